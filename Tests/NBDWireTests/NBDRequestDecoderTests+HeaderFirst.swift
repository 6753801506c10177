// The header-first path a server uses to read WRITE payloads straight into
// its own buffers: `fill` (reads into the decoder), `nextHeader`, then
// `takeBuffered` for the payload bytes already read ahead and the rest from
// the "socket". Must give the same messages as `next()` for every way the
// stream arrives, including reads that stop inside a header or a payload.

import Testing
@testable import NBDWire

/// A byte stream handed out in the sizes a chunking dictates, as read(2) would.
private struct FakeSocket {
    var chunks: [[UInt8]]
    var pending: [UInt8] = []

    /// Up to `max` bytes into `p`; 0 at the end.
    mutating func read(into p: UnsafeMutableRawPointer, max: Int) -> Int {
        if pending.isEmpty {
            guard !chunks.isEmpty else { return 0 }
            pending = chunks.removeFirst()
        }
        let n = min(max, pending.count)
        pending.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: n) }
        pending.removeFirst(n)
        return n
    }
}

@Suite("Request decoder, header-first")
struct NBDRequestDecoderHeaderFirstTests {
    /// The server's loop over a fake socket; `readAhead` bytes per fill.
    static func serve(_ chunks: [[UInt8]], readAhead: Int) throws -> (messages: [NBDIncoming], left: Int, direct: Int) {
        var socket = FakeSocket(chunks: chunks)
        var decoder = NBDRequestDecoder()
        var out: [NBDIncoming] = []
        var direct = 0
        while true {
            while let req = try decoder.nextHeader() {
                var payload: [UInt8] = []
                if req.hasPayload {
                    let len = Int(req.length)
                    payload = [UInt8](repeating: 0, count: len)
                    try payload.withUnsafeMutableBytes { p in
                        var got = decoder.takeBuffered(into: p.baseAddress!, max: len)
                        while got < len {
                            let n = socket.read(into: p.baseAddress! + got, max: len - got)
                            if n == 0 { throw NBDWireError.handshakeClosed }   // ended mid-payload
                            got += n
                            direct += n
                        }
                    }
                }
                out.append(.request(req, payload: payload))
            }
            let n = decoder.fill(max: readAhead) { socket.read(into: $0, max: $1) }
            if n == 0 { return (out, decoder.bufferedBytes, direct) }
        }
    }

    @Test(arguments: Chunking.standard + (30..<40).map { Chunking.random(seed: UInt64($0), maxChunk: 100) })
    func sameMessagesAsNext(_ chunking: Chunking) throws {
        for readAhead in [1, 7, 28, 64 << 10] {
            let (messages, left, _) = try Self.serve(chunking.split(NBDRequestDecoderTests.stream), readAhead: readAhead)
            #expect(messages == NBDRequestDecoderTests.expected, "read-ahead \(readAhead)")
            #expect(left == 0)
        }
    }

    /// With a header-sized read-ahead the WRITE's payload (1000 bytes) is
    /// read from the socket into the caller's buffer, none via the decoder.
    @Test func payloadBypassesTheDecoder() throws {
        let (messages, _, direct) = try Self.serve([NBDRequestDecoderTests.stream], readAhead: NBDConst.requestHeaderSize)
        #expect(messages == NBDRequestDecoderTests.expected)
        #expect(direct == NBDRequestDecoderTests.writePayload.count)
        let (_, _, viaSocket) = try Self.serve([NBDRequestDecoderTests.stream], readAhead: 64 << 10)
        // With a large read-ahead the whole stream arrives in one read: all via the decoder.
        #expect(viaSocket == 0)
    }

    @Test func framingErrorsThrowBeforeThePayload() throws {
        var d = NBDRequestDecoder(maxPayload: 100)
        d.feed(requestBytes(command: 1, cookie: 1, offset: 0, length: 101))
        #expect(throws: NBDWireError.payloadTooLarge(101)) { try d.nextHeader() }
        #expect(throws: NBDWireError.payloadTooLarge(101)) { try d.nextHeader() }
        // A broken decoder takes no more input.
        #expect(d.fill(max: 10) { _, n in n } == 0)

        var bad = NBDRequestDecoder()
        var junk = requestBytes(command: 0, cookie: 1, offset: 0, length: 512)
        junk[0] ^= 0xff
        bad.feed(junk)
        #expect(throws: NBDWireError.self) { try bad.nextHeader() }
    }

    /// Many small requests through one buffer: the live bytes move to the
    /// front instead of the buffer growing.
    @Test func bufferStaysSmall() throws {
        var stream: [UInt8] = []
        for i in 0..<5000 { stream += requestBytes(command: 1, cookie: UInt64(i), offset: 0, length: 100, payload: [UInt8](repeating: UInt8(i & 0xff), count: 100)) }
        var d = NBDRequestDecoder()
        var socket = FakeSocket(chunks: Chunking.random(seed: 9, maxChunk: 3000).split(stream))
        var count = 0
        while true {
            while let r = try d.nextHeader() {
                var p = [UInt8](repeating: 0, count: 100)
                p.withUnsafeMutableBytes { b in
                    var got = d.takeBuffered(into: b.baseAddress!, max: 100)
                    while got < 100 { got += socket.read(into: b.baseAddress! + got, max: 100 - got) }
                }
                #expect(p == [UInt8](repeating: UInt8(r.cookie & 0xff), count: 100))
                count += 1
            }
            if d.fill(max: 4096, { socket.read(into: $0, max: $1) }) == 0 { break }
        }
        #expect(count == 5000)
        #expect(d.storageBytes <= 16 << 10)
    }
}
