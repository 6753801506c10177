// NBDReplyTests+Encoding.swift — every encoder against hand-computed bytes.
//
// Design note: each expectation is typed in from the layouts in
// doc/proto.md ("Simple reply message", "Structured reply chunk message",
// "Structured reply types", "Option reply types"), grouped by field with
// spaces, so a reviewer can check them against the spec without running
// anything. Encoders append, so one test also checks that existing bytes in
// the target buffer are preserved.

import Testing
@testable import NBDWire

@Suite("Reply encoders")
struct NBDReplyEncodingTests {
    /// One encoder call and the bytes the spec says it must produce.
    struct Case: Sendable, CustomTestStringConvertible {
        let testDescription: String
        let encode: @Sendable (inout [UInt8]) -> Void
        let expected: String
    }

    static let cases: [Case] = [
        // Simple reply, EINVAL: magic | error 22 | cookie.
        Case(testDescription: "simple error", encode: {
            NBDReply.simple(cookie: 0x0102_0304_0506_0708, error: 22, into: &$0)
        }, expected: "67446698 00000016 0102030405060708"),
        // Simple reply, success via the typed overload (error 0).
        Case(testDescription: "simple ok", encode: {
            NBDReply.simple(cookie: 0xdead_beef, errno: nil, into: &$0)
        }, expected: "67446698 00000000 00000000deadbeef"),
        // Structured header: magic | flags | type | cookie | length.
        Case(testDescription: "structured header", encode: {
            NBDReply.structuredHeader(cookie: 1, flags: 1, type: 5, length: 12, into: &$0)
        }, expected: "668e33ef 0001 0005 0000000000000001 0000000c"),
        // OFFSET_DATA, done: length = 8 + 512 = 0x208, then the offset.
        Case(testDescription: "offset data done", encode: {
            NBDReply.offsetData(cookie: 0xaabb, offset: 0x1000, dataLength: 512, done: true, into: &$0)
        }, expected: "668e33ef 0001 0001 000000000000aabb 00000208 0000000000001000"),
        // OFFSET_DATA, not done.
        Case(testDescription: "offset data not done", encode: {
            NBDReply.offsetData(cookie: 2, offset: 0, dataLength: 1, done: false, into: &$0)
        }, expected: "668e33ef 0000 0001 0000000000000002 00000009 0000000000000000"),
        // OFFSET_HOLE: length is always 12 (offset u64 + hole size u32).
        Case(testDescription: "offset hole", encode: {
            NBDReply.offsetHole(cookie: 7, offset: 0x200, length: 0x400, done: false, into: &$0)
        }, expected: "668e33ef 0000 0002 0000000000000007 0000000c 0000000000000200 00000400"),
        // ERROR chunk: type 0x8001, length 6 + 3, errno EIO, message "bad".
        Case(testDescription: "error chunk", encode: {
            NBDReply.error(cookie: 9, errno: 5, message: "bad", into: &$0)
        }, expected: "668e33ef 0001 8001 0000000000000009 00000009 00000005 0003 626164"),
        // ERROR chunk with empty message, not done, typed errno.
        Case(testDescription: "error chunk empty message", encode: {
            NBDReply.error(cookie: 9, errno: NBDErrno.nospc, message: "", done: false, into: &$0)
        }, expected: "668e33ef 0000 8001 0000000000000009 00000006 0000001c 0000"),
        // ERROR_OFFSET chunk: type 0x8002, length 14 + 1, trailing offset.
        Case(testDescription: "error offset chunk", encode: {
            NBDReply.errorOffset(cookie: 9, errno: 5, message: "x", offset: 0x10, into: &$0)
        }, expected: "668e33ef 0001 8002 0000000000000009 0000000f 00000005 0001 78 0000000000000010"),
        // BLOCK_STATUS: length 4 + 2*8 = 20, context id, (length, flags) pairs.
        Case(testDescription: "block status", encode: {
            NBDReply.blockStatus(cookie: 3, contextID: 1, extents: [(length: 4096, flags: 3), (length: 8192, flags: 0)],
                                 done: true, into: &$0)
        }, expected: "668e33ef 0001 0005 0000000000000003 00000014 00000001 00001000 00000003 00002000 00000000"),
        // NONE: always DONE, length 0.
        Case(testDescription: "none", encode: {
            NBDReply.none(cookie: .max, into: &$0)
        }, expected: "668e33ef 0001 0000 ffffffffffffffff 00000000"),
        // Option ACK for NBD_OPT_STRUCTURED_REPLY.
        Case(testDescription: "option ack", encode: {
            NBDOptionReply.ack(option: 8, into: &$0)
        }, expected: "0003e889045565a9 00000008 00000001 00000000"),
        // NBD_REP_SERVER: name length u32 + name.
        Case(testDescription: "option server", encode: {
            NBDOptionReply.server(name: "ab", into: &$0)
        }, expected: "0003e889045565a9 00000003 00000002 00000006 00000002 6162"),
        // NBD_REP_INFO / NBD_INFO_BLOCK_SIZE, length 14.
        Case(testDescription: "option info", encode: {
            NBDOptionReply.info(option: 7, infoType: 3, payload: hex("00000200 00001000 02000000"), into: &$0)
        }, expected: "0003e889045565a9 00000007 00000003 0000000e 0003 00000200 00001000 02000000"),
        // NBD_REP_META_CONTEXT: id + name, length 4 + 15.
        Case(testDescription: "option meta context", encode: {
            NBDOptionReply.metaContext(option: 10, contextID: 1, name: "base:allocation", into: &$0)
        }, expected: "0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e"),
        // NBD_REP_ERR_POLICY with message "no".
        Case(testDescription: "option error", encode: {
            NBDOptionReply.error(option: 5, type: 0x8000_0002, message: "no", into: &$0)
        }, expected: "0003e889045565a9 00000005 80000002 00000002 6e6f"),
        // Client request header (flags FUA, WRITE).
        Case(testDescription: "request header", encode: {
            NBDRequest(flags: 1, .write, cookie: 0x11, offset: 0x200, length: 4).encode(into: &$0)
        }, expected: "25609513 0001 0001 0000000000000011 0000000000000200 00000004"),
    ]

    /// Each encoder produces exactly the spec's bytes.
    @Test(arguments: cases)
    func encodesSpecBytes(_ c: Case) {
        var out: [UInt8] = []
        c.encode(&out)
        #expect(out == hex(c.expected))
    }

    /// Encoders append: bytes already in the buffer are kept in front.
    @Test func appendsAfterExistingBytes() {
        var out: [UInt8] = [0xee]
        NBDReply.none(cookie: 1, into: &out)
        NBDReply.simple(cookie: 2, error: 0, into: &out)
        #expect(out == [0xee] + hex("668e33ef 0001 0000 0000000000000001 00000000 67446698 00000000 0000000000000002"))
    }

    /// The server greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
    @Test func greeting() {
        let hs = Exports.handshake()
        #expect(hs.greeting() == hex("4e42444d41474943 49484156454f5054 0003"))
        #expect(hs.greeting() == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3])
    }

    /// An over-long error message is clipped to 4096 bytes, never inside a
    /// UTF-8 sequence ("a" + 3000 × "é": byte 4096 is a continuation byte).
    @Test func errorMessageClippedOnScalarBoundary() {
        var out: [UInt8] = []
        let message = "a" + String(repeating: "é", count: 3000)
        NBDReply.error(cookie: 0, errno: 5, message: message, into: &out)
        let messageLength = Int(out[24]) << 8 | Int(out[25])
        #expect(messageLength == 4095)
        #expect(out.count == 20 + 6 + 4095)
        #expect(Array(out[16..<20]) == be32(UInt32(6 + 4095)))
        let text = Array(out[26...])
        #expect(String(decoding: text, as: UTF8.self).utf8.count == 4095)
    }

    /// Constants that are easy to get wrong, checked against the spec text.
    @Test func constantsMatchSpec() {
        #expect(NBDConst.optionReplyMagic == 0x3e88_9045_565a9)
        #expect(NBDConst.repErrTooBig == 0x8000_0009)
        #expect(NBDConst.repErrUnknown == 2_147_483_654)
        #expect(NBDConst.replyTypeErrorOffset == 32770)
        #expect(NBDConst.sendFastZero == 0x0800 && NBDConst.sendCache == 0x0400)
        #expect(NBDConst.fastZero == 0x10 && NBDConst.reqOne == 0x08)
        #expect(NBDConst.stateHole == 1 && NBDConst.stateZero == 2)
        #expect(NBDErrno.shutdown.rawValue == 108 && NBDErrno.overflow.rawValue == 75)
        #expect(NBDOption.extendedHeaders.rawValue == 11 && NBDCommand.blockStatus.rawValue == 7)
    }
}
