// NBDRequestDecoderTests+Framing.swift — the transmission-phase decoder.
//
// Design note: the central property is chunking independence — the same
// byte stream must yield the same messages however it is split (whole,
// one byte at a time, seeded random chunks). The stream mixes every shape
// the decoder distinguishes: header-only requests, a WRITE with payload
// (including a zero-length WRITE), and an unknown command whose length must
// NOT be taken as a payload. Framing failures (bad magic, oversized WRITE)
// must throw, stay thrown, and not depend on the payload having arrived.

import Testing
@testable import NBDWire

@Suite("Request decoder")
struct NBDRequestDecoderTests {
    static let writePayload: [UInt8] = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }

    /// Requests in the sample stream, in order.
    static let expected: [NBDIncoming] = [
        .request(NBDRequest(.read, cookie: 1, offset: 0, length: 4096), payload: []),
        .request(NBDRequest(flags: NBDConst.fua, .write, cookie: 2, offset: 512, length: 1000), payload: writePayload),
        .request(NBDRequest(.flush, cookie: 3, offset: 0, length: 0), payload: []),
        .request(NBDRequest(.trim, cookie: 4, offset: 8192, length: 65536), payload: []),
        .request(NBDRequest(flags: 0xffff, command: 99, cookie: 5, offset: 0xdead, length: 12345), payload: []),
        .request(NBDRequest(.write, cookie: 6, offset: 0, length: 0), payload: []),
        .request(NBDRequest(.disc, cookie: .max, offset: 0, length: 0), payload: []),
    ]

    /// The same requests as raw bytes, built independently of the encoder.
    static let stream: [UInt8] =
        requestBytes(command: 0, cookie: 1, offset: 0, length: 4096)
        + requestBytes(flags: 1, command: 1, cookie: 2, offset: 512, length: 1000, payload: writePayload)
        + requestBytes(command: 3, cookie: 3, offset: 0, length: 0)
        + requestBytes(command: 4, cookie: 4, offset: 8192, length: 65536)
        + requestBytes(flags: 0xffff, command: 99, cookie: 5, offset: 0xdead, length: 12345)
        + requestBytes(command: 1, cookie: 6, offset: 0, length: 0)
        + requestBytes(command: 2, cookie: .max, offset: 0, length: 0)

    static func decodeAll(_ chunks: [[UInt8]], maxPayload: Int = 32 << 20) throws -> ([NBDIncoming], NBDRequestDecoder) {
        var decoder = NBDRequestDecoder(maxPayload: maxPayload)
        var out: [NBDIncoming] = []
        for chunk in chunks {
            decoder.feed(chunk)
            while let message = try decoder.next() { out.append(message) }
        }
        return (out, decoder)
    }

    /// Whole, byte-by-byte and random chunkings all give the same messages.
    @Test(arguments: Chunking.standard + (10..<20).map { Chunking.random(seed: UInt64($0), maxChunk: 64) })
    func chunkingIndependence(_ chunking: Chunking) throws {
        let (messages, decoder) = try Self.decodeAll(chunking.split(Self.stream))
        #expect(messages == Self.expected)
        #expect(decoder.bufferedBytes == 0)
    }

    /// The UnsafeRawBufferPointer overload behaves like the array one.
    @Test func rawBufferFeed() throws {
        var decoder = NBDRequestDecoder()
        Self.stream.withUnsafeBytes { decoder.feed($0) }
        var out: [NBDIncoming] = []
        while let m = try decoder.next() { out.append(m) }
        #expect(out == Self.expected)
    }

    /// A partial WRITE is held back whole; bufferedBytes and bytesNeeded report it.
    @Test func partialWriteIsNotConsumed() throws {
        var decoder = NBDRequestDecoder()
        let write = requestBytes(command: 1, cookie: 2, offset: 512, length: 1000, payload: Self.writePayload)
        #expect(decoder.bytesNeeded == 28)
        decoder.feed(Array(write[0..<20]))
        #expect(try decoder.next() == nil)
        #expect(decoder.bufferedBytes == 20)
        #expect(decoder.bytesNeeded == 8)
        decoder.feed(Array(write[20..<500]))
        #expect(try decoder.next() == nil)
        #expect(decoder.bufferedBytes == 500)
        #expect(decoder.bytesNeeded == 528)
        decoder.feed(Array(write[500...]))
        #expect(decoder.bytesNeeded == 0)
        #expect(try decoder.next() == .request(NBDRequest(.write, cookie: 2, offset: 512, length: 1000),
                                                  payload: Self.writePayload))
        #expect(decoder.bufferedBytes == 0)
        #expect(try decoder.next() == nil)
    }

    /// Bad magic throws with the value seen, and keeps throwing.
    @Test(arguments: [UInt32(0x2560_9514), 0x21e4_1c71, 0x6744_6698, 0])
    func badMagic(_ magic: UInt32) throws {
        var decoder = NBDRequestDecoder()
        decoder.feed(be32(magic) + Array(repeating: 0, count: 24))
        #expect(throws: NBDWireError.badMagic(magic)) { try decoder.next() }
        decoder.feed(requestBytes(command: 0, cookie: 1, offset: 0, length: 1))
        #expect(throws: NBDWireError.badMagic(magic)) { try decoder.next() }
        #expect(decoder.error == .badMagic(magic))
    }

    /// Valid requests before garbage are still delivered; the garbage then throws.
    @Test func garbageAfterValidRequest() throws {
        var decoder = NBDRequestDecoder()
        decoder.feed(requestBytes(command: 0, cookie: 7, offset: 0, length: 512) + Array("GET / HTTP/1.1\r\nHost: example\r\n\r\n".utf8))
        #expect(try decoder.next() == .request(NBDRequest(.read, cookie: 7, offset: 0, length: 512), payload: []))
        #expect(throws: NBDWireError.badMagic(0x4745_5420)) { try decoder.next() }
    }

    /// A WRITE over maxPayload throws as soon as its header is complete.
    @Test func oversizedWrite() throws {
        var decoder = NBDRequestDecoder(maxPayload: 4096)
        decoder.feed(requestBytes(command: 1, cookie: 1, offset: 0, length: 4097))
        #expect(throws: NBDWireError.payloadTooLarge(4097)) { try decoder.next() }
        #expect(throws: NBDWireError.payloadTooLarge(4097)) { try decoder.next() }
    }

    /// A WRITE of exactly maxPayload is fine; a READ of any length carries no payload.
    @Test func payloadLimitBoundary() throws {
        let payload = [UInt8](repeating: 0xab, count: 4096)
        let bytes = requestBytes(command: 1, cookie: 1, offset: 0, length: 4096, payload: payload)
            + requestBytes(command: 0, cookie: 2, offset: 0, length: .max)
        let (messages, decoder) = try Self.decodeAll([bytes], maxPayload: 4096)
        #expect(messages == [
            .request(NBDRequest(.write, cookie: 1, offset: 0, length: 4096), payload: payload),
            .request(NBDRequest(.read, cookie: 2, offset: 0, length: .max), payload: []),
        ])
        #expect(decoder.bufferedBytes == 0)
    }

    /// Many small requests through the buffer's compaction path stay intact.
    @Test func longStreamCompaction() throws {
        var bytes: [UInt8] = []
        var expected: [NBDIncoming] = []
        for i in 0..<2000 {
            let payload = [UInt8](repeating: UInt8(i % 251), count: i % 97)
            bytes += requestBytes(command: 1, cookie: UInt64(i), offset: UInt64(i) * 512,
                                  length: UInt32(payload.count), payload: payload)
            expected.append(.request(NBDRequest(.write, cookie: UInt64(i), offset: UInt64(i) * 512,
                                                length: UInt32(payload.count)), payload: payload))
        }
        let (messages, _) = try Self.decodeAll(Chunking.random(seed: 5, maxChunk: 5000).split(bytes))
        #expect(messages == expected)
    }

    /// Typed accessors on a decoded request.
    @Test func typedAccessors() {
        #expect(NBDRequest(command: 99, cookie: 0, offset: 0, length: 0).knownCommand == nil)
        #expect(NBDRequest(command: 6, cookie: 0, offset: 0, length: 0).knownCommand == .writeZeroes)
        #expect(NBDRequest(.write, cookie: 0, offset: 0, length: 0).hasPayload)
        #expect(!NBDRequest(.writeZeroes, cookie: 0, offset: 0, length: 9).hasPayload)
    }
}
