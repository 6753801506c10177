// NBDHandshake+Types.swift — the values that go into and come out of the
// server's fixed-newstyle handshake.
//
// Design note: the handshake state machine talks to the server only through
// plain values. The server describes its exports with `NBDExportInfo`
// (looked up by name through a closure, so the codec never owns export
// state), and the machine answers each `feed` with a list of
// `NBDHandshakeAction`s: bytes to send, a request to close (with a reason for
// the log), or the switch to transmission carrying `NBDNegotiated` — the
// complete, final result of negotiation. `NBDNegotiated.export` holds the
// export as the client actually saw it (its `transmissionFlags` are the exact
// bits sent, after the spec-mandated adjustments), and
// `validationContext` turns it into the input of `nbdValidate`, so the
// server never has to re-derive what was agreed.

/// How the server describes one export to the handshake.
public struct NBDExportInfo: Equatable, Sendable {
    /// Canonical export name (reported by NBD_INFO_NAME and used in `NBDNegotiated`).
    public var name: String
    /// Export size in bytes.
    public var size: UInt64
    /// Transmission flags to advertise (`NBDConst.hasFlags` is always added).
    public var transmissionFlags: UInt16
    /// Human-readable description for NBD_INFO_DESCRIPTION, if any.
    public var description: String?
    /// Block size constraints for NBD_INFO_BLOCK_SIZE.
    public var minBlock: UInt32
    public var preferredBlock: UInt32
    /// Maximum payload size.
    public var maxBlock: UInt32

    public init(name: String, size: UInt64, transmissionFlags: UInt16 = NBDConst.hasFlags,
                description: String? = nil, minBlock: UInt32 = 1, preferredBlock: UInt32 = 4096,
                maxBlock: UInt32 = UInt32(NBDConst.defaultMaxPayload)) {
        self.name = name
        self.size = size
        self.transmissionFlags = transmissionFlags
        self.description = description
        self.minBlock = minBlock
        self.preferredBlock = preferredBlock
        self.maxBlock = maxBlock
    }
}

/// The outcome of a successful negotiation.
public struct NBDNegotiated: Equatable, Sendable {
    /// Canonical name of the selected export (`NBDExportInfo.name`).
    public var exportName: String
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged: READ must use structured replies.
    public var structuredReplies: Bool
    /// Non-nil when the client selected "base:allocation" for this export
    /// with NBD_OPT_SET_META_CONTEXT; use it in block-status chunks.
    public var baseAllocationContextID: UInt32?
    /// The client set NBD_FLAG_C_NO_ZEROES.
    public var noZeroes: Bool
    /// The export as advertised; `transmissionFlags` are the bits actually sent.
    public var export: NBDExportInfo
    /// The client requested NBD_INFO_BLOCK_SIZE in NBD_OPT_GO, i.e. promised
    /// to honour the advertised block sizes.
    public var blockSizeAcknowledged: Bool

    public init(exportName: String, structuredReplies: Bool, baseAllocationContextID: UInt32?,
                noZeroes: Bool, export: NBDExportInfo, blockSizeAcknowledged: Bool) {
        self.exportName = exportName
        self.structuredReplies = structuredReplies
        self.baseAllocationContextID = baseAllocationContextID
        self.noZeroes = noZeroes
        self.export = export
        self.blockSizeAcknowledged = blockSizeAcknowledged
    }

    /// Input for `nbdValidate(_:context:)` matching what was negotiated.
    public var validationContext: NBDValidationContext {
        NBDValidationContext(exportSize: export.size, transmissionFlags: export.transmissionFlags,
                             maxLength: export.maxBlock, minBlock: export.minBlock,
                             metaContextSelected: baseAllocationContextID != nil)
    }
}

/// What the server must do after feeding bytes to the handshake, in order.
public enum NBDHandshakeAction: Equatable, Sendable {
    /// Write these bytes to the client.
    case send([UInt8])
    /// Negotiation finished: switch the connection to the transmission phase
    /// (feed `takeLeftover()` to the request decoder first).
    case enterTransmission(NBDNegotiated)
    /// Close the connection (after sending anything queued before this action).
    case close(reason: String)
}

/// Where the handshake state machine is.
public enum NBDHandshakePhase: Equatable, Sendable {
    /// Waiting for the 32-bit client flags.
    case awaitingClientFlags
    /// Option haggling.
    case negotiating
    /// Skipping the data of an option too large to buffer (answered
    /// NBD_REP_ERR_TOO_BIG once all of it has arrived).
    case skippingOption(option: UInt32, remaining: Int)
    /// NBD_OPT_GO / NBD_OPT_EXPORT_NAME succeeded.
    case transmission
    /// The handshake asked for the connection to be closed.
    case closed
}
