// NBDHandshake+StateMachine.swift — framing of the fixed-newstyle handshake
// (server side).
//
// Design note: a pure state machine. The server sends `greeting()`, then
// passes every received chunk to `feed`, and performs the returned actions in
// order. `feed` works on whatever bytes are buffered: it parses the 4-byte
// client flags, then any number of complete options (IHAVEOPT magic, option,
// length, data), answering each, until it runs out of bytes, enters
// transmission, or decides to close. Replies produced by one `feed` are
// merged into a single `.send` so the server writes once per read; a `.send`
// always precedes the `.close` / `.enterTransmission` it belongs to.
//
// Framing rules:
// * unknown client flags, or a wrong IHAVEOPT magic → `.close` (the stream
//   can no longer be trusted; the spec mandates dropping the connection for
//   unknown client flags);
// * option data up to `maxOptionLength` is buffered and handled; longer data
//   up to `maxSkippableOptionLength` is discarded as it arrives (never
//   buffered) and then answered with NBD_REP_ERR_TOO_BIG, which keeps the
//   stream in sync; anything longer closes (treated as denial of service);
//   NBD_OPT_EXPORT_NAME cannot carry an error reply, so an oversized one
//   closes too;
// * bytes fed after entering transmission are never interpreted: they are
//   kept for `takeLeftover()`, which the server hands to `NBDRequestDecoder`;
// * feeding after `.close` throws `NBDWireError.handshakeClosed`.
// The semantics of each option live in NBDHandshake+Options.swift.

/// Server side of the fixed-newstyle handshake as a pure state machine.
public struct NBDHandshake {
    /// Option data longer than this is skipped and answered NBD_REP_ERR_TOO_BIG.
    public var maxOptionLength: Int = 64 << 10
    /// Option data longer than this closes the connection.
    public var maxSkippableOptionLength: Int = 1 << 20
    /// Context id handed out for "base:allocation" by NBD_OPT_SET_META_CONTEXT.
    public var baseAllocationContextID: UInt32 = 1

    let lookup: (String) -> NBDExportInfo?
    let listNames: () -> [String]
    let defaultExport: String

    /// Current phase (read-only for callers).
    public internal(set) var phase: NBDHandshakePhase = .awaitingClientFlags

    var input = NBDInputBuffer()
    var leftover: [UInt8] = []
    var clientFlags: UInt32 = 0
    var structuredReplies = false
    /// Export (canonical name) for which base:allocation is selected.
    var metaContextExport: String?

    /// - Parameters:
    ///   - lookup: export by name (the name as the client sent it, or
    ///     `defaultExport` when the client sent an empty name); nil if unknown.
    ///   - listNames: names reported by NBD_OPT_LIST.
    ///   - defaultExport: name looked up when the client asks for "".
    public init(lookup: @escaping (String) -> NBDExportInfo?, listNames: @escaping () -> [String],
                defaultExport: String = "") {
        self.lookup = lookup
        self.listNames = listNames
        self.defaultExport = defaultExport
    }

    /// The first bytes the server sends: "NBDMAGIC", "IHAVEOPT", and the
    /// handshake flags FIXED_NEWSTYLE | NO_ZEROES.
    public func greeting() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(18)
        out.appendBE(NBDConst.nbdMagic)
        out.appendBE(NBDConst.ihaveOpt)
        out.appendBE(NBDConst.fixedNewstyle | NBDConst.noZeroes)
        return out
    }

    /// True once transmission was entered or a close was requested.
    public var isFinished: Bool { phase == .transmission || phase == .closed }

    /// Bytes received after the option that entered transmission; returns
    /// them once (subsequent calls return what was fed since).
    public mutating func takeLeftover() -> [UInt8] {
        defer { leftover = [] }
        return leftover
    }

    public mutating func feed(_ bytes: [UInt8]) throws -> [NBDHandshakeAction] {
        try bytes.withUnsafeBytes { try feed($0) }
    }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer) throws -> [NBDHandshakeAction] {
        switch phase {
        case .closed:
            throw NBDWireError.handshakeClosed
        case .transmission:
            leftover.append(contentsOf: bytes)
            return []
        default:
            break
        }
        input.append(bytes)
        var session = Session()
        while step(&session) {}
        session.flush()
        return session.actions
    }

    /// Output collected during one `feed`.
    struct Session {
        var pending: [UInt8] = []
        var actions: [NBDHandshakeAction] = []

        mutating func flush() {
            guard !pending.isEmpty else { return }
            actions.append(.send(pending))
            pending = []
        }
    }

    /// Makes one unit of progress; false when more input is needed or the
    /// handshake is over.
    private mutating func step(_ s: inout Session) -> Bool {
        switch phase {
        case .awaitingClientFlags:
            guard let flags = input.peek(UInt32.self, at: 0) else { return false }
            input.consume(4)
            let unknown = flags & ~NBDConst.knownClientFlags
            guard unknown == 0 else {
                close("unknown client flags 0x" + String(unknown, radix: 16), &s)
                return false
            }
            // A client without FIXED_NEWSTYLE is still answered in fixed
            // newstyle, which the spec permits ("MAY choose to honour").
            clientFlags = flags
            phase = .negotiating
            return true

        case .negotiating:
            guard input.count >= NBDConst.optionHeaderSize,
                  let magic = input.peek(UInt64.self, at: 0),
                  let option = input.peek(UInt32.self, at: 8),
                  let length32 = input.peek(UInt32.self, at: 12)
            else { return false }
            guard magic == NBDConst.ihaveOpt else {
                close("bad option magic 0x" + String(magic, radix: 16), &s)
                return false
            }
            let length = Int(length32)
            if length > maxOptionLength {
                if option == NBDOption.exportName.rawValue {
                    close("NBD_OPT_EXPORT_NAME with \(length) bytes of data", &s)
                    return false
                }
                if length > maxSkippableOptionLength {
                    close("option \(option) with \(length) bytes of data", &s)
                    return false
                }
                input.consume(NBDConst.optionHeaderSize)
                phase = .skippingOption(option: option, remaining: length)
                return true
            }
            guard input.count >= NBDConst.optionHeaderSize + length else { return false }
            let data = input.copy(from: NBDConst.optionHeaderSize, length: length)
            input.consume(NBDConst.optionHeaderSize + length)
            handleOption(option, data: data, &s)
            return phase == .negotiating

        case .skippingOption(let option, let remaining):
            let n = min(remaining, input.count)
            input.consume(n)
            guard n == remaining else {
                phase = .skippingOption(option: option, remaining: remaining - n)
                return false
            }
            NBDOptionReply.error(option: option, type: NBDConst.repErrTooBig,
                                 message: "option data too large", into: &s.pending)
            phase = .negotiating
            return true

        case .transmission, .closed:
            return false
        }
    }

    /// Queues `.close`, drops whatever input remains.
    mutating func close(_ reason: String, _ s: inout Session) {
        s.flush()
        s.actions.append(.close(reason: reason))
        phase = .closed
        input.removeAll()
    }

    /// Queues `.enterTransmission`; input that follows becomes leftover.
    mutating func enterTransmission(_ negotiated: NBDNegotiated, _ s: inout Session) {
        s.flush()
        s.actions.append(.enterTransmission(negotiated))
        phase = .transmission
        leftover.append(contentsOf: input.takeAll())
    }
}
