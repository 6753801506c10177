// NBDConst+Values.swift — every number the NBD wire protocol defines.
//
// Design note: constants live as static members of one caseless enum so that
// call sites read `NBDConst.sendFlush` and nothing leaks into the module's
// global namespace. Each constant carries the exact width it has on the wire
// (UInt16 for transmission/command/handshake flags, UInt32 for client flags,
// option reply types and block-status states, UInt64 for the 8-byte magics),
// so encoders never need a narrowing conversion. Values come from
// doc/proto.md of NetworkBlockDevice/nbd (master). Constants marked
// "experimental" are defined by extension branches; this module knows them
// only so it can name them (it does not implement extended headers or resize).
//
// The closed sets that a server switches over (commands, options, errno
// values) are also offered as enums at the bottom of this file.

/// Namespaced NBD protocol constants.
public enum NBDConst {
    // MARK: Magics

    /// "NBDMAGIC": first 8 bytes the server sends (also called INIT_PASSWD).
    public static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle magic; also prefixes every client option.
    public static let ihaveOpt: UInt64 = 0x4948_4156_454f_5054
    /// Oldstyle `cliserv_magic` (never sent by this module).
    public static let oldstyleMagic: UInt64 = 0x0000_4202_8186_1253
    /// Magic that prefixes every fixed-newstyle option reply.
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    /// NBD_REQUEST_MAGIC: compact (28-byte) transmission request header.
    public static let requestMagic: UInt32 = 0x2560_9513
    /// NBD_SIMPLE_REPLY_MAGIC (formerly NBD_REPLY_MAGIC).
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    /// NBD_STRUCTURED_REPLY_MAGIC.
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef
    /// NBD_EXTENDED_REQUEST_MAGIC (experimental EXTENDED_HEADERS).
    public static let extendedRequestMagic: UInt32 = 0x21e4_1c71
    /// NBD_EXTENDED_REPLY_MAGIC (experimental EXTENDED_HEADERS).
    public static let extendedReplyMagic: UInt32 = 0x6e8a_278c

    // MARK: Handshake flags (server → client, 16 bits)

    public static let fixedNewstyle: UInt16 = 1 << 0
    public static let noZeroes: UInt16 = 1 << 1

    // MARK: Client flags (client → server, 32 bits)

    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1
    /// Every client flag this module understands; anything else closes.
    public static let knownClientFlags: UInt32 = clientFixedNewstyle | clientNoZeroes

    // MARK: Transmission flags (16 bits, sent with the export size)

    public static let hasFlags: UInt16 = 1 << 0
    public static let readOnly: UInt16 = 1 << 1
    public static let sendFlush: UInt16 = 1 << 2
    public static let sendFUA: UInt16 = 1 << 3
    public static let rotational: UInt16 = 1 << 4
    public static let sendTrim: UInt16 = 1 << 5
    public static let sendWriteZeroes: UInt16 = 1 << 6
    public static let sendDF: UInt16 = 1 << 7
    public static let canMultiConn: UInt16 = 1 << 8
    /// Experimental RESIZE extension.
    public static let sendResize: UInt16 = 1 << 9
    public static let sendCache: UInt16 = 1 << 10
    public static let sendFastZero: UInt16 = 1 << 11
    /// Experimental EXTENDED_HEADERS extension.
    public static let blockStatusPayload: UInt16 = 1 << 12

    // MARK: Command flags (16 bits, in every request)

    public static let fua: UInt16 = 1 << 0
    public static let noHole: UInt16 = 1 << 1
    public static let df: UInt16 = 1 << 2
    public static let reqOne: UInt16 = 1 << 3
    public static let fastZero: UInt16 = 1 << 4
    /// Experimental EXTENDED_HEADERS extension.
    public static let payloadLen: UInt16 = 1 << 5
    /// Every command flag defined by the non-experimental protocol.
    public static let knownCommandFlags: UInt16 = fua | noHole | df | reqOne | fastZero

    // MARK: NBD_REP_* option reply types (32 bits)

    public static let repAck: UInt32 = 1
    public static let repServer: UInt32 = 2
    public static let repInfo: UInt32 = 3
    public static let repMetaContext: UInt32 = 4
    /// Bit 31 marks every error reply type.
    public static let repFlagError: UInt32 = 1 << 31
    public static let repErrUnsup: UInt32 = repFlagError | 1
    public static let repErrPolicy: UInt32 = repFlagError | 2
    public static let repErrInvalid: UInt32 = repFlagError | 3
    public static let repErrPlatform: UInt32 = repFlagError | 4
    public static let repErrTLSReqd: UInt32 = repFlagError | 5
    public static let repErrUnknown: UInt32 = repFlagError | 6
    public static let repErrShutdown: UInt32 = repFlagError | 7
    public static let repErrBlockSizeReqd: UInt32 = repFlagError | 8
    public static let repErrTooBig: UInt32 = repFlagError | 9
    /// Experimental EXTENDED_HEADERS extension.
    public static let repErrExtHeaderReqd: UInt32 = repFlagError | 10

    // MARK: NBD_INFO_* information types (16 bits)

    public static let infoExport: UInt16 = 0
    public static let infoName: UInt16 = 1
    public static let infoDescription: UInt16 = 2
    public static let infoBlockSize: UInt16 = 3

    // MARK: Structured reply flags and types (16 bits)

    public static let replyFlagDone: UInt16 = 1 << 0
    public static let replyTypeNone: UInt16 = 0
    public static let replyTypeOffsetData: UInt16 = 1
    public static let replyTypeOffsetHole: UInt16 = 2
    public static let replyTypeBlockStatus: UInt16 = 5
    /// Experimental EXTENDED_HEADERS extension.
    public static let replyTypeBlockStatusExt: UInt16 = 6
    /// Bit 15 marks every error chunk type.
    public static let replyTypeErrorBit: UInt16 = 1 << 15
    public static let replyTypeError: UInt16 = replyTypeErrorBit | 1
    public static let replyTypeErrorOffset: UInt16 = replyTypeErrorBit | 2

    // MARK: base:allocation metadata context

    /// The only metadata context this module negotiates.
    public static let baseAllocation = "base:allocation"
    /// NBD_STATE_HOLE: extent is not allocated.
    public static let stateHole: UInt32 = 1 << 0
    /// NBD_STATE_ZERO: extent reads as zeroes.
    public static let stateZero: UInt32 = 1 << 1

    // MARK: Sizes

    /// Bytes in a compact request header.
    public static let requestHeaderSize = 28
    /// Bytes in a simple reply header.
    public static let simpleReplyHeaderSize = 16
    /// Bytes in a structured reply chunk header.
    public static let structuredReplyHeaderSize = 20
    /// Bytes in an option request header (magic, option, length).
    public static let optionHeaderSize = 16
    /// Bytes in an option reply header (magic, option, type, length).
    public static let optionReplyHeaderSize = 20
    /// Reserved zero bytes after an NBD_OPT_EXPORT_NAME reply.
    public static let exportNameZeroPad = 124
    /// Longest string (export name, message) the spec allows.
    public static let maxStringLength = 4096
    /// Maximum payload every server should accept (2^25).
    public static let defaultMaxPayload = 32 << 20
}

/// Transmission request types (`NBD_CMD_*`). A request's raw `command`
/// field may hold values outside this enum; those decode fine and are
/// rejected by validation.
public enum NBDCommand: UInt16, Sendable, CaseIterable {
    case read = 0
    case write = 1
    case disc = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
    /// Experimental RESIZE extension; not supported by validation.
    case resize = 8
}

/// Handshake option types (`NBD_OPT_*`).
public enum NBDOption: UInt32, Sendable, CaseIterable {
    case exportName = 1
    case abort = 2
    case list = 3
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    /// Experimental EXTENDED_HEADERS extension; answered NBD_REP_ERR_UNSUP.
    case extendedHeaders = 11
}

/// Error values allowed on the wire (`NBD_E*`), independent of host errno.
public enum NBDErrno: UInt32, Sendable, CaseIterable {
    case perm = 1
    case io = 5
    case nomem = 12
    case inval = 22
    case nospc = 28
    case overflow = 75
    case notsup = 95
    case shutdown = 108
}
