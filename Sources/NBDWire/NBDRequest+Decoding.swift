// NBDRequest+Decoding.swift — framing of the transmission phase, client → server.
//
// Design note: the decoder is a pure, incremental byte-stream parser. The
// server feeds whatever `read(2)` returned (any chunking, down to single
// bytes) and then calls `next()` until it returns nil. Framing and semantics
// are deliberately split:
//
// * Framing errors — a header whose magic is not NBD_REQUEST_MAGIC, or a
//   WRITE whose announced payload exceeds `maxPayload` — leave the decoder
//   unable to find the next message boundary, so they throw. The error is
//   sticky: every later `next()` throws the same error, which guarantees a
//   caller loop terminates and the server closes the connection.
// * Anything well-framed decodes, even unknown commands, bad flags or
//   out-of-range offsets; `nbdValidate` decides which errno to answer with.
//   Only NBD_CMD_WRITE carries a payload on the wire (compact headers), so an
//   unknown command is assumed to have none — exactly what a spec-following
//   server must assume too.
//
// Two ways to take messages out. `next()` consumes a header only once its
// whole message (header + WRITE payload) is buffered, so `bufferedBytes`
// counts the bytes of the next incomplete message and nothing is ever
// half-consumed. `nextHeader()` is for the server: it consumes the header
// alone, and the caller moves the WRITE payload into its own buffer (the
// part already read ahead with `takeBuffered`, the rest straight from the
// socket), so a large payload is never copied through the decoder. A
// server may also read into the decoder's buffer directly (`fill`). Extended headers
// (experimental) are not implemented: their magic is a framing error here,
// and the handshake never agrees to NBD_OPT_EXTENDED_HEADERS.

/// One transmission-phase request header, with the raw command number.
public struct NBDRequest: Equatable, Sendable {
    /// Command flags (`NBDConst.fua`, `.noHole`, `.df`, `.reqOne`, `.fastZero`).
    public var flags: UInt16
    /// Raw command type; unknown values are preserved.
    public var command: UInt16
    /// Opaque client cookie (formerly "handle"), echoed in every reply.
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16 = 0, command: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public init(flags: UInt16 = 0, _ command: NBDCommand, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.init(flags: flags, command: command.rawValue, cookie: cookie, offset: offset, length: length)
    }

    /// The typed command, or nil for a value this protocol version does not define.
    public var knownCommand: NBDCommand? { NBDCommand(rawValue: command) }

    /// True when the wire carries `length` payload bytes after this header.
    public var hasPayload: Bool { command == NBDCommand.write.rawValue }

    /// Appends the 28-byte compact header (client side; used by tests and tools).
    /// The caller appends the WRITE payload itself.
    public func encode(into out: inout [UInt8]) {
        out.reserveCapacity(out.count + NBDConst.requestHeaderSize)
        out.appendBE(NBDConst.requestMagic)
        out.appendBE(flags)
        out.appendBE(command)
        out.appendBE(cookie)
        out.appendBE(offset)
        out.appendBE(length)
    }
}

/// A complete message from the client in the transmission phase.
public enum NBDIncoming: Equatable, Sendable {
    /// `payload` is empty unless the request is a WRITE, in which case it
    /// holds exactly `request.length` bytes.
    case request(NBDRequest, payload: [UInt8])
}

/// Errors that break framing; the only sane response is closing the connection.
public enum NBDWireError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A request header did not start with NBD_REQUEST_MAGIC (value seen).
    case badMagic(UInt32)
    /// A WRITE announced more payload than the decoder accepts (length seen).
    case payloadTooLarge(UInt32)
    /// `NBDHandshake.feed` was called after it had already asked to close.
    case handshakeClosed

    public var description: String {
        switch self {
        case .badMagic(let m):
            return "bad NBD request magic 0x" + String(m, radix: 16)
        case .payloadTooLarge(let n):
            return "NBD write payload of \(n) bytes exceeds the limit"
        case .handshakeClosed:
            return "NBD handshake already closed"
        }
    }
}

/// Incremental request decoder for the transmission phase (compact
/// 28-byte headers only).
public struct NBDRequestDecoder {
    /// Largest WRITE payload accepted before the stream is declared broken.
    public let maxPayload: Int

    private var input = NBDInputBuffer()
    private var failure: NBDWireError?

    public init(maxPayload: Int = 32 << 20) {
        self.maxPayload = max(0, maxPayload)
    }

    /// Bytes received but not yet returned as part of a message.
    public var bufferedBytes: Int { input.count }

    /// Bytes the decoder's buffer occupies (tests).
    var storageBytes: Int { input.storage.count }

    /// The framing error already reported, if any.
    public var error: NBDWireError? { failure }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        guard failure == nil else { return }
        input.append(bytes)
    }

    public mutating func feed(_ bytes: [UInt8]) {
        guard failure == nil else { return }
        input.append(bytes)
    }

    /// Lets `read` put up to `max` received bytes straight into the
    /// decoder's buffer (one copy fewer than `feed`); returns its result.
    public mutating func fill(max: Int, _ read: (UnsafeMutableRawPointer, Int) throws -> Int) rethrows -> Int {
        guard failure == nil else { return 0 }
        return try input.fill(max: max, read)
    }

    /// Next complete message, or nil if more bytes are needed.
    ///
    /// Throws `NBDWireError.badMagic` / `.payloadTooLarge` for input that
    /// breaks framing (and keeps throwing it afterwards). Semantically wrong
    /// but well-framed requests decode normally; see `nbdValidate`.
    public mutating func next() throws -> NBDIncoming? {
        guard let request = try peekHeader() else { return nil }
        let headerSize = NBDConst.requestHeaderSize
        guard request.hasPayload else {
            input.consume(headerSize)
            return .request(request, payload: [])
        }
        let total = headerSize + Int(request.length)
        guard input.count >= total else { return nil }
        let payload = input.copy(from: headerSize, length: Int(request.length))
        input.consume(total)
        return .request(request, payload: payload)
    }

    /// Header-first decoding, for a server that reads WRITE payloads straight
    /// into its own buffers: the next request header as soon as its 28 bytes
    /// are buffered, consuming only the header. After a WRITE the caller owns
    /// the next `length` bytes of the stream: it takes what is already
    /// buffered with `takeBuffered(into:max:)` and reads the rest from the
    /// connection itself, before asking for the next header. Framing errors
    /// as for `next()`.
    public mutating func nextHeader() throws -> NBDRequest? {
        guard let request = try peekHeader() else { return nil }
        input.consume(NBDConst.requestHeaderSize)
        return request
    }

    /// Moves up to `max` buffered bytes (the start of a WRITE payload after
    /// `nextHeader`) to `dst`; returns how many.
    public mutating func takeBuffered(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        guard failure == nil else { return 0 }
        return input.take(into: dst, max: max)
    }

    /// The header at the front, checked for framing, not consumed.
    private mutating func peekHeader() throws -> NBDRequest? {
        if let failure { throw failure }
        guard input.count >= NBDConst.requestHeaderSize,
              let magic = input.peek(UInt32.self, at: 0),
              let flags = input.peek(UInt16.self, at: 4),
              let command = input.peek(UInt16.self, at: 6),
              let cookie = input.peek(UInt64.self, at: 8),
              let offset = input.peek(UInt64.self, at: 16),
              let length = input.peek(UInt32.self, at: 24)
        else { return nil }
        guard magic == NBDConst.requestMagic else {
            return try fail(.badMagic(magic))
        }
        let request = NBDRequest(flags: flags, command: command, cookie: cookie,
                                 offset: offset, length: length)
        if request.hasPayload && UInt64(length) > UInt64(maxPayload) {
            return try fail(.payloadTooLarge(length))
        }
        return request
    }

    /// Number of further bytes needed before `next()` can return a message
    /// (0 when one is ready or the stream is broken). Lets a server size its
    /// next read for large WRITE payloads.
    public var bytesNeeded: Int {
        if failure != nil { return 0 }
        let headerSize = NBDConst.requestHeaderSize
        guard input.count >= headerSize,
              let command = input.peek(UInt16.self, at: 6),
              let length = input.peek(UInt32.self, at: 24)
        else { return headerSize - input.count }
        guard command == NBDCommand.write.rawValue,
              UInt64(length) <= UInt64(maxPayload) else { return 0 }
        return max(0, headerSize + Int(length) - input.count)
    }

    private mutating func fail<T>(_ error: NBDWireError) throws -> T? {
        failure = error
        input.removeAll()
        throw error
    }
}
