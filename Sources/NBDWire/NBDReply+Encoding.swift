// NBDReply+Encoding.swift — server → client messages of the transmission phase.
//
// Design note: every encoder appends to a caller-owned `[UInt8]` and never
// allocates a buffer of its own, so a server can batch several replies into
// one write and reuse capacity. Bulk data is never copied through here:
// `simple` (for a successful READ) and `offsetData` write only the header
// (plus the 8-byte offset) and the caller sends the data bytes right after,
// e.g. with writev. Lengths that cannot be represented on the wire are
// programmer errors and trap via `precondition`; strings are clipped to the
// spec's limits (4096 bytes for error messages) instead, since they may
// embed client-chosen text.
//
// Layouts (all big-endian):
//   simple:      magic 0x67446698 | error u32 | cookie u64
//   structured:  magic 0x668e33ef | flags u16 | type u16 | cookie u64 | length u32 | payload

/// Reply encoders appending to a byte array.
public enum NBDReply {
    /// Simple reply header. For a successful READ the caller sends the
    /// `length` data bytes after it; on error no data may follow.
    public static func simple(cookie: UInt64, error: UInt32, into out: inout [UInt8]) {
        out.reserveCapacity(out.count + NBDConst.simpleReplyHeaderSize)
        out.appendBE(NBDConst.simpleReplyMagic)
        out.appendBE(error)
        out.appendBE(cookie)
    }

    /// Writes the 16-byte simple reply header at `p` (no allocation: the
    /// server's per-request success reply).
    public static func simple(cookie: UInt64, error: UInt32, at p: UnsafeMutableRawPointer) {
        p.storeBytes(of: NBDConst.simpleReplyMagic.bigEndian, toByteOffset: 0, as: UInt32.self)
        p.storeBytes(of: error.bigEndian, toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: cookie.bigEndian, toByteOffset: 8, as: UInt64.self)
    }

    /// Simple reply header with a typed error (nil = success).
    public static func simple(cookie: UInt64, errno: NBDErrno?, into out: inout [UInt8]) {
        simple(cookie: cookie, error: errno?.rawValue ?? 0, into: &out)
    }

    /// Structured reply chunk header; `length` payload bytes must follow.
    public static func structuredHeader(cookie: UInt64, flags: UInt16, type: UInt16, length: UInt32,
                                        into out: inout [UInt8]) {
        out.reserveCapacity(out.count + NBDConst.structuredReplyHeaderSize)
        out.appendBE(NBDConst.structuredReplyMagic)
        out.appendBE(flags)
        out.appendBE(type)
        out.appendBE(cookie)
        out.appendBE(length)
    }

    /// NBD_REPLY_TYPE_OFFSET_DATA header plus the 8-byte offset; the caller
    /// sends `dataLength` data bytes right after. `dataLength` must be in
    /// 1...(2^32 - 9).
    public static func offsetData(cookie: UInt64, offset: UInt64, dataLength: Int, done: Bool,
                                  into out: inout [UInt8]) {
        precondition(dataLength > 0 && dataLength <= Int(UInt32.max) - 8,
                     "OFFSET_DATA chunk must carry 1...(2^32-9) bytes")
        structuredHeader(cookie: cookie, flags: doneFlag(done), type: NBDConst.replyTypeOffsetData,
                         length: UInt32(8 + dataLength), into: &out)
        out.appendBE(offset)
    }

    /// NBD_REPLY_TYPE_OFFSET_HOLE: `length` bytes at `offset` read as zeroes
    /// (`length` must be nonzero).
    public static func offsetHole(cookie: UInt64, offset: UInt64, length: UInt32, done: Bool,
                                  into out: inout [UInt8]) {
        precondition(length > 0, "OFFSET_HOLE size must be nonzero")
        structuredHeader(cookie: cookie, flags: doneFlag(done), type: NBDConst.replyTypeOffsetHole,
                         length: 12, into: &out)
        out.appendBE(offset)
        out.appendBE(length)
    }

    /// NBD_REPLY_TYPE_ERROR chunk: errno, then a human-readable message
    /// (clipped to 4096 bytes on a UTF-8 boundary). `errno` must be nonzero.
    public static func error(cookie: UInt64, errno: UInt32, message: String, done: Bool = true,
                             into out: inout [UInt8]) {
        let text = truncatedUTF8(message, max: NBDConst.maxStringLength)
        structuredHeader(cookie: cookie, flags: doneFlag(done), type: NBDConst.replyTypeError,
                         length: UInt32(6 + text.count), into: &out)
        out.appendBE(errno)
        out.appendBE(UInt16(text.count))
        out.append(contentsOf: text)
    }

    /// Typed convenience for `error(cookie:errno:message:done:into:)`.
    public static func error(cookie: UInt64, errno: NBDErrno, message: String, done: Bool = true,
                             into out: inout [UInt8]) {
        error(cookie: cookie, errno: errno.rawValue, message: message, done: done, into: &out)
    }

    /// NBD_REPLY_TYPE_ERROR_OFFSET chunk: like `error`, plus the offset
    /// (inside the request's range) at which the failure happened.
    public static func errorOffset(cookie: UInt64, errno: UInt32, message: String, offset: UInt64,
                                   done: Bool = true, into out: inout [UInt8]) {
        let text = truncatedUTF8(message, max: NBDConst.maxStringLength)
        structuredHeader(cookie: cookie, flags: doneFlag(done), type: NBDConst.replyTypeErrorOffset,
                         length: UInt32(14 + text.count), into: &out)
        out.appendBE(errno)
        out.appendBE(UInt16(text.count))
        out.append(contentsOf: text)
        out.appendBE(offset)
    }

    /// NBD_REPLY_TYPE_BLOCK_STATUS chunk for one metadata context. The spec
    /// requires at least one extent, each with a nonzero length, and advises
    /// at most 2^20 extents per chunk; the caller is responsible for both.
    public static func blockStatus(cookie: UInt64, contextID: UInt32,
                                   extents: [(length: UInt32, flags: UInt32)], done: Bool,
                                   into out: inout [UInt8]) {
        precondition(extents.count <= (Int(UInt32.max) - 4) / 8, "too many extents for one chunk")
        structuredHeader(cookie: cookie, flags: doneFlag(done), type: NBDConst.replyTypeBlockStatus,
                         length: UInt32(4 + 8 * extents.count), into: &out)
        out.reserveCapacity(out.count + 4 + 8 * extents.count)
        out.appendBE(contextID)
        for e in extents {
            out.appendBE(e.length)
            out.appendBE(e.flags)
        }
    }

    /// NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: ends a structured reply.
    public static func none(cookie: UInt64, into out: inout [UInt8]) {
        structuredHeader(cookie: cookie, flags: NBDConst.replyFlagDone, type: NBDConst.replyTypeNone,
                         length: 0, into: &out)
    }

    @inline(__always)
    private static func doneFlag(_ done: Bool) -> UInt16 { done ? NBDConst.replyFlagDone : 0 }
}

/// Option replies of the fixed-newstyle handshake (server → client).
public enum NBDOptionReply {
    /// Generic reply: magic 0x3e889045565a9 | option u32 | type u32 | length u32 | data.
    public static func encode(option: UInt32, type: UInt32, data: [UInt8], into out: inout [UInt8]) {
        precondition(data.count <= Int(UInt32.max), "option reply too long")
        out.reserveCapacity(out.count + NBDConst.optionReplyHeaderSize + data.count)
        out.appendBE(NBDConst.optionReplyMagic)
        out.appendBE(option)
        out.appendBE(type)
        out.appendBE(UInt32(data.count))
        out.append(contentsOf: data)
    }

    /// NBD_REP_ACK (no data).
    public static func ack(option: UInt32, into out: inout [UInt8]) {
        encode(option: option, type: NBDConst.repAck, data: [], into: &out)
    }

    /// An error reply (`type` has bit 31 set) with an optional message,
    /// clipped to 4096 bytes.
    public static func error(option: UInt32, type: UInt32, message: String, into out: inout [UInt8]) {
        encode(option: option, type: type, data: truncatedUTF8(message, max: NBDConst.maxStringLength),
               into: &out)
    }

    /// NBD_REP_SERVER for NBD_OPT_LIST: name length u32 | name.
    public static func server(name: String, into out: inout [UInt8]) {
        let bytes = Array(name.utf8)
        var data: [UInt8] = []
        data.reserveCapacity(4 + bytes.count)
        data.appendBE(UInt32(bytes.count))
        data.append(contentsOf: bytes)
        encode(option: NBDOption.list.rawValue, type: NBDConst.repServer, data: data, into: &out)
    }

    /// NBD_REP_INFO: info type u16 | payload.
    public static func info(option: UInt32, infoType: UInt16, payload: [UInt8], into out: inout [UInt8]) {
        var data: [UInt8] = []
        data.reserveCapacity(2 + payload.count)
        data.appendBE(infoType)
        data.append(contentsOf: payload)
        encode(option: option, type: NBDConst.repInfo, data: data, into: &out)
    }

    /// NBD_REP_META_CONTEXT: context id u32 | context name.
    public static func metaContext(option: UInt32, contextID: UInt32, name: String, into out: inout [UInt8]) {
        var data: [UInt8] = []
        data.appendBE(contextID)
        data.append(contentsOf: Array(name.utf8))
        encode(option: option, type: NBDConst.repMetaContext, data: data, into: &out)
    }
}
