// NBDRequest+Validation.swift — semantic checks on a well-framed request.
//
// Design note: validation is a pure function from (request, what was
// negotiated) to "OK" (nil) or the errno to put in the reply. It is kept
// apart from framing so the server can answer a bad request and carry on,
// as the spec requires ("SHOULD NOT disconnect"). Checks run in a fixed
// order and the first failure wins:
//
//  1. unknown command (including experimental RESIZE)        → EINVAL
//  2. NBD_CMD_DISC: always accepted (it has no reply)
//  3. unknown flag bits, or a flag not documented for the
//     command, or one whose feature was not advertised        → EINVAL
//  4. command whose feature was not advertised/negotiated
//     (FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS)               → EINVAL
//  5. WRITE / TRIM / WRITE_ZEROES on a read-only export       → EPERM
//  6. FLUSH with nonzero offset or length                     → EINVAL
//  7. zero length on a ranged command                         → EINVAL
//  8. offset + length wraps past 2^64                         → EINVAL
//  9. range past the export end: WRITE / WRITE_ZEROES → ENOSPC,
//     READ / TRIM / CACHE / BLOCK_STATUS → EINVAL
// 10. offset or length not a multiple of the minimum block
//     (a length reaching exactly the export end is allowed)   → EINVAL
// 11. READ longer than the maximum payload → EOVERFLOW;
//     WRITE longer than it → EINVAL. Payload-free commands
//     (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) may exceed it.
//
// The errno choices follow the "Error values" section of the spec: ENOSPC
// for writes beyond the end, EINVAL for reads/trims beyond it and for
// misalignment, EPERM for writes on read-only exports, EOVERFLOW only for
// oversized reads. The short `nbdValidate(_:exportSize:readOnly:...)` form
// assumes every optional feature was advertised; the context form checks
// against the flags actually sent.

/// Everything validation needs to know about the negotiated session.
public struct NBDValidationContext: Equatable, Sendable {
    public var exportSize: UInt64
    /// Transmission flags as sent to the client (`NBDConst.readOnly`, `.sendFUA`, ...).
    public var transmissionFlags: UInt16
    /// Maximum payload advertised (or the default 32 MiB).
    public var maxLength: UInt32
    /// Minimum block size advertised (1 when none).
    public var minBlock: UInt32
    /// A metadata context (base:allocation) was selected for this export.
    public var metaContextSelected: Bool

    public init(exportSize: UInt64, transmissionFlags: UInt16, maxLength: UInt32 = UInt32(NBDConst.defaultMaxPayload),
                minBlock: UInt32 = 1, metaContextSelected: Bool) {
        self.exportSize = exportSize
        self.transmissionFlags = transmissionFlags
        self.maxLength = maxLength
        self.minBlock = minBlock
        self.metaContextSelected = metaContextSelected
    }

    /// Every optional feature advertised; only read-only is configurable.
    public static func permissive(exportSize: UInt64, readOnly: Bool, maxLength: UInt32,
                                  minBlock: UInt32) -> NBDValidationContext {
        var flags = NBDConst.hasFlags | NBDConst.sendFlush | NBDConst.sendFUA | NBDConst.sendTrim
            | NBDConst.sendWriteZeroes | NBDConst.sendDF | NBDConst.sendCache | NBDConst.sendFastZero
        if readOnly { flags |= NBDConst.readOnly }
        return NBDValidationContext(exportSize: exportSize, transmissionFlags: flags, maxLength: maxLength,
                                    minBlock: minBlock, metaContextSelected: true)
    }

    @inline(__always)
    func has(_ flag: UInt16) -> Bool { transmissionFlags & flag != 0 }
}

/// Semantic validation separate from framing: nil if the request may be
/// executed, else the errno to reply with. Assumes all optional features
/// (FLUSH, FUA, TRIM, WRITE_ZEROES, DF, CACHE, FAST_ZERO, BLOCK_STATUS) were
/// advertised; use `nbdValidate(_:context:)` to check against actual flags.
public func nbdValidate(_ r: NBDRequest, exportSize: UInt64, readOnly: Bool, maxLength: UInt32,
                        minBlock: UInt32 = 1) -> NBDErrno? {
    nbdValidate(r, context: .permissive(exportSize: exportSize, readOnly: readOnly,
                                        maxLength: maxLength, minBlock: minBlock))
}

/// Semantic validation against the flags actually negotiated.
public func nbdValidate(_ r: NBDRequest, context c: NBDValidationContext) -> NBDErrno? {
    guard let command = r.knownCommand, command != .resize else { return .inval }
    if command == .disc { return nil }

    if let bad = flagError(r.flags, command: command, context: c) { return bad }

    switch command {
    case .flush where !c.has(NBDConst.sendFlush),
         .trim where !c.has(NBDConst.sendTrim),
         .writeZeroes where !c.has(NBDConst.sendWriteZeroes),
         .blockStatus where !c.metaContextSelected:
        return .inval
    default:
        break
    }

    let writes = command == .write || command == .trim || command == .writeZeroes
    if writes && c.has(NBDConst.readOnly) { return .perm }

    if command == .flush {
        return (r.offset != 0 || r.length != 0) ? .inval : nil
    }

    // Every remaining command addresses the range [offset, offset + length).
    if r.length == 0 { return .inval }
    let (end, wrapped) = r.offset.addingReportingOverflow(UInt64(r.length))
    if wrapped { return .inval }
    if end > c.exportSize {
        return (command == .write || command == .writeZeroes) ? .nospc : .inval
    }

    let block = UInt64(max(c.minBlock, 1))
    if r.offset % block != 0 { return .inval }
    if UInt64(r.length) % block != 0 && end != c.exportSize { return .inval }

    switch command {
    case .read where r.length > c.maxLength:
        return .overflow
    case .write where r.length > c.maxLength:
        return .inval
    default:
        return nil
    }
}

/// Flags each command may carry (FUA is valid on every command when advertised).
private func flagError(_ flags: UInt16, command: NBDCommand, context c: NBDValidationContext) -> NBDErrno? {
    if flags & ~NBDConst.knownCommandFlags != 0 { return .inval }
    if flags & NBDConst.fua != 0 && !c.has(NBDConst.sendFUA) { return .inval }
    if flags & NBDConst.noHole != 0 && command != .writeZeroes { return .inval }
    if flags & NBDConst.df != 0 && (command != .read || !c.has(NBDConst.sendDF)) { return .inval }
    if flags & NBDConst.reqOne != 0 && command != .blockStatus { return .inval }
    if flags & NBDConst.fastZero != 0 && (command != .writeZeroes || !c.has(NBDConst.sendFastZero)) {
        return .inval
    }
    return nil
}
