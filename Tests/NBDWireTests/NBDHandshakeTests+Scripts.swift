// NBDHandshakeTests+Scripts.swift — scripted client conversations.
//
// Design note: each test is a client script (flags + options, built with the
// naive builders) and the exact server bytes expected in return, typed from
// the spec. Scripts that must be chunking-independent run under every
// `Chunking.standard` mode, including one byte at a time; actions are
// normalised (adjacent sends merged) before comparing. Expected option
// replies use `optReply`, which writes header fields one by one.

import Testing
@testable import NBDWire

@Suite("Handshake")
struct NBDHandshakeTests {
    static let noZeroesFlags = clientFlags(3)
    static let readAfterGo = requestBytes(command: 0, cookie: 77, offset: 0, length: 512)

    /// The full GO script: structured replies, base:allocation, GO with NAME + BLOCK_SIZE.
    static let goScript: [UInt8] = noZeroesFlags
        + option(8)
        + option(10, metaData("disk", queries: ["base:allocation", "qemu:dirty-bitmap:x"]))
        + option(7, goData("disk", infos: [1, 3]))
        + readAfterGo

    static let goReplies: [UInt8] =
        optReply(8, 1)
        + optReply(10, 4, hex("00000001") + Array("base:allocation".utf8))
        + optReply(10, 1)
        + optReply(7, 3, hex("0000 0000000000100000 00ad"))
        + optReply(7, 3, hex("0001") + Array("disk".utf8))
        + optReply(7, 3, hex("0003 00000200 00001000 02000000"))
        + optReply(7, 1)

    static let goNegotiated = NBDNegotiated(exportName: "disk", structuredReplies: true, baseAllocationContextID: 1,
                                            noZeroes: true, export: Exports.disk, blockSizeAcknowledged: true)

    /// Full GO negotiation, any chunking; the READ sent after GO is left over intact.
    @Test(arguments: Chunking.standard)
    func fullGo(_ chunking: Chunking) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.goScript, chunking)
        #expect(run.actions == [.send(Self.goReplies), .enterTransmission(Self.goNegotiated)])
        #expect(run.phase == .transmission)
        #expect(run.leftover == Self.readAfterGo)

        var decoder = NBDRequestDecoder()
        decoder.feed(run.leftover)
        #expect(try decoder.next() == .request(NBDRequest(.read, cookie: 77, offset: 0, length: 512), payload: []))
    }

    /// takeLeftover hands bytes out once; later feeds accumulate again.
    @Test func leftoverIsTakenOnce() throws {
        var hs = Exports.handshake()
        _ = try hs.feed(Self.goScript)
        #expect(hs.takeLeftover() == Self.readAfterGo)
        #expect(hs.takeLeftover() == [])
        #expect(try hs.feed([1, 2, 3]) == [])
        #expect(hs.takeLeftover() == [1, 2, 3])
    }

    /// GO without structured replies: DF is withheld, no context id, BLOCK_SIZE still sent.
    @Test func goWithoutStructuredReplies() throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, clientFlags(1) + option(7, goData("disk")))
        let reply = optReply(7, 3, hex("0000 0000000000100000 002d"))
            + optReply(7, 3, hex("0003 00000200 00001000 02000000"))
            + optReply(7, 1)
        var export = Exports.disk
        export.transmissionFlags = 0x002d
        #expect(run.actions == [.send(reply), .enterTransmission(NBDNegotiated(
            exportName: "disk", structuredReplies: false, baseAllocationContextID: nil, noZeroes: false,
            export: export, blockSizeAcknowledged: false))])
    }

    /// base:allocation chosen for another export does not carry over to GO.
    @Test func metaContextForOtherExportIsDropped() throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(8)
            + option(10, metaData("ro", queries: ["base:allocation"])) + option(7, goData("disk")))
        guard case .enterTransmission(let n)? = run.actions.last else {
            Issue.record("no transmission: \(run.actions)")
            return
        }
        #expect(n.baseAllocationContextID == nil && n.structuredReplies)
    }

    /// LIST: one SERVER reply per export, then ACK; negotiation continues.
    @Test(arguments: Chunking.standard)
    func list(_ chunking: Chunking) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(3), chunking)
        #expect(run.actions == [.send(
            optReply(3, 2, hex("00000004") + Array("disk".utf8))
            + optReply(3, 2, hex("00000002") + Array("ro".utf8))
            + optReply(3, 1))])
        #expect(run.phase == .negotiating)
    }

    /// INFO for an unknown export: ERR_UNKNOWN with a message; then INFO on a real one works.
    @Test func infoUnknownExport() throws {
        var hs = Exports.handshake()
        var run = try runHandshake(&hs, Self.noZeroesFlags + option(6, goData("nope", infos: [3])))
        guard case .send(let bytes)? = run.actions.first, run.actions.count == 1 else {
            Issue.record("unexpected actions \(run.actions)")
            return
        }
        #expect(Array(bytes[0..<16]) == hex("0003e889045565a9 00000006 80000006"))
        let message = String(decoding: bytes[20...], as: UTF8.self)
        #expect(Array(bytes[16..<20]) == be32(UInt32(bytes.count - 20)))
        #expect(message.contains("nope"))
        #expect(hs.phase == .negotiating)

        // INFO (not GO) sends BLOCK_SIZE only on request, and DESCRIPTION when asked.
        run = try runHandshake(&hs, option(6, goData("disk", infos: [2])))
        #expect(run.actions == [.send(
            optReply(6, 3, hex("0000 0000000000100000 002d"))
            + optReply(6, 3, hex("0002") + Array("test disk".utf8))
            + optReply(6, 1))])
        #expect(hs.phase == .negotiating)
    }

    /// ABORT: ACK, then close; feeding afterwards throws.
    @Test(arguments: Chunking.standard)
    func abort(_ chunking: Chunking) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(2, [9, 9]) + option(3), chunking)
        #expect(run.actions == [.send(optReply(2, 1)), .close(reason: "client sent NBD_OPT_ABORT")])
        #expect(throws: NBDWireError.handshakeClosed) { try hs.feed([0]) }
    }

    /// Options with lengths that do not add up get ERR_INVALID, and the next option still works.
    @Test(arguments: [
        option(7, be32(100) + Array("disk".utf8) + be16(0)),     // name length past the data
        option(7, goData("disk", infos: [3]) + [0]),             // trailing byte
        option(7, Array(goData("disk", infos: [1, 3]).dropLast(1))), // truncated info list
        option(6, [0, 0, 0]),                                    // shorter than 6 bytes
        option(3, [0]),                                          // LIST with data
        option(8, [0, 0, 0, 0]),                                 // STRUCTURED_REPLY with data
        option(9, Array(metaData("disk", queries: ["base:"]).dropLast(2))), // truncated query
        option(9, be32(4) + Array("disk".utf8) + be32(0x4000_0000)), // absurd query count
        option(5, [1]),                                          // STARTTLS with data
        option(7, goData("di\u{0}sk")),                          // NUL in the name
        option(7, be32(2) + [0xc3, 0x28] + be16(0)),             // invalid UTF-8 name
    ] as [[UInt8]])
    func malformedOptionIsInvalid(_ opt: [UInt8]) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + opt + option(8), .bytewise)
        guard case .send(let bytes)? = run.actions.first, run.actions.count == 1 else {
            Issue.record("unexpected actions \(run.actions)")
            return
        }
        let option = Array(opt[8..<12])
        #expect(Array(bytes[0..<16]) == hex("0003e889045565a9") + option + hex("80000003"))
        #expect(Array(bytes.suffix(20)) == optReply(8, 1))
        #expect(hs.phase == .negotiating)
    }

    /// SET_META_CONTEXT before STRUCTURED_REPLY is refused with ERR_INVALID.
    @Test func setMetaContextNeedsStructuredReplies() throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(10, metaData("disk", queries: ["base:allocation"]))
            + option(7, goData("disk")))
        guard case .enterTransmission(let n)? = run.actions.last, case .send(let bytes)? = run.actions.first else {
            Issue.record("unexpected actions \(run.actions)")
            return
        }
        #expect(Array(bytes[0..<16]) == hex("0003e889045565a9 0000000a 80000003"))
        #expect(n.baseAllocationContextID == nil)
    }

    /// LIST_META_CONTEXT: "base:" and no queries list base:allocation (id 0); foreign namespaces list nothing.
    @Test(arguments: [
        ([], true), (["base:"], true), (["base:allocation"], true), (["qemu:dirty-bitmap:a"], false),
        (["base:nonexistent"], false), (["nocolon"], false),
    ] as [([String], Bool)])
    func listMetaContext(_ queries: [String], _ listed: Bool) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(8) + option(9, metaData("disk", queries: queries)))
        let context = optReply(9, 4, hex("00000000") + Array("base:allocation".utf8))
        #expect(run.actions == [.send(optReply(8, 1) + (listed ? context : []) + optReply(9, 1))])
    }

    /// SET_META_CONTEXT with no queries (or only "base:") selects nothing and clears an earlier choice.
    @Test func setMetaContextReplacesSelection() throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(8)
            + option(10, metaData("disk", queries: ["base:allocation"]))
            + option(10, metaData("disk", queries: ["base:"]))
            + option(7, goData("disk")))
        guard case .enterTransmission(let n)? = run.actions.last else {
            Issue.record("no transmission: \(run.actions)")
            return
        }
        #expect(n.baseAllocationContextID == nil)
    }

    /// Garbage instead of the IHAVEOPT magic closes, at any chunking.
    @Test(arguments: Chunking.standard)
    func garbageMagicCloses(_ chunking: Chunking) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + Array("GET / HTTP/1.1\r\n\r\n".utf8), chunking)
        guard case .close? = run.actions.last, run.actions.count == 1 else {
            Issue.record("unexpected actions \(run.actions)")
            return
        }
        #expect(hs.phase == .closed)
    }

    /// Unknown client flags close before any option is read.
    @Test func unknownClientFlagsClose() throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, clientFlags(4) + option(3))
        #expect(run.actions == [.close(reason: "unknown client flags 0x4")])
    }

    /// EXPORT_NAME: size + flags, then 124 zeroes unless NO_ZEROES; empty name means the default export.
    @Test(arguments: [UInt32(1), 3])
    func exportName(_ flags: UInt32) throws {
        var hs = Exports.handshake(defaultExport: "ro")
        let run = try runHandshake(&hs, clientFlags(flags) + option(1) + [0xaa], .bytewise)
        let zeroes = flags & 2 == 0 ? [UInt8](repeating: 0, count: 124) : []
        #expect(run.actions == [.send(hex("0000000000001000 0003") + zeroes), .enterTransmission(NBDNegotiated(
            exportName: "ro", structuredReplies: false, baseAllocationContextID: nil, noZeroes: flags & 2 != 0,
            export: Exports.ro, blockSizeAcknowledged: false))])
        #expect(run.leftover == [0xaa])
    }

    /// EXPORT_NAME for an unknown export can only close.
    @Test func exportNameUnknownCloses() throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(1, Array("nope".utf8)))
        #expect(run.actions == [.close(reason: "unknown export 'nope'")])
    }

    /// Unsupported options: STARTTLS → POLICY, EXTENDED_HEADERS / PEEK / unknown → UNSUP.
    @Test(arguments: [(UInt32(5), UInt32(0x8000_0002)), (11, 0x8000_0001), (4, 0x8000_0001), (4242, 0x8000_0001)])
    func unsupportedOptions(_ number: UInt32, _ type: UInt32) throws {
        var hs = Exports.handshake()
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(number))
        guard case .send(let bytes)? = run.actions.first, run.actions.count == 1 else {
            Issue.record("unexpected actions \(run.actions)")
            return
        }
        #expect(Array(bytes[0..<16]) == hex("0003e889045565a9") + be32(number) + be32(type))
        #expect(Array(bytes[16..<20]) == be32(UInt32(bytes.count - 20)))
    }

    /// Over-long option data is skipped without buffering, then ERR_TOO_BIG; sync is kept.
    @Test(arguments: [Chunking.whole, .random(seed: 3, maxChunk: 999)])
    func tooBigOptionIsSkipped(_ chunking: Chunking) throws {
        var hs = Exports.handshake()
        let big = [UInt8](repeating: 0x5a, count: 70_000)
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(6, big) + option(8), chunking)
        #expect(run.actions == [.send(optReply(6, 0x8000_0009, Array("option data too large".utf8)) + optReply(8, 1))])
    }

    /// Huge option data (over 1 MiB) or a huge EXPORT_NAME closes at once.
    @Test(arguments: [(UInt32(6), 2 << 20), (1, 70_000)])
    func hugeOptionCloses(_ number: UInt32, _ length: Int) throws {
        var hs = Exports.handshake()
        let header = Array("IHAVEOPT".utf8) + be32(number) + be32(UInt32(length))
        let run = try runHandshake(&hs, Self.noZeroesFlags + header)
        guard case .close? = run.actions.last else {
            Issue.record("expected close, got \(run.actions)")
            return
        }
    }

    /// SEND_FAST_ZERO is withheld when SEND_WRITE_ZEROES is not advertised.
    @Test func fastZeroNeedsWriteZeroes() throws {
        let export = NBDExportInfo(name: "x", size: 512, transmissionFlags: NBDConst.sendFastZero)
        var hs = NBDHandshake(lookup: { _ in export }, listNames: { [] })
        let run = try runHandshake(&hs, Self.noZeroesFlags + option(1))
        #expect(run.actions.first == .send(hex("0000000000000200 0001")))
    }
}
