// NBDHandshake+Options.swift — what the server answers to each NBD_OPT_*.
//
// Design note: each handler receives one complete option (number and data)
// and appends replies to the session; only EXPORT_NAME, GO and ABORT end the
// negotiation. Malformed data (lengths that do not add up, strings that are
// not NUL-free UTF-8 or exceed 4096 bytes) earns NBD_REP_ERR_INVALID and
// negotiation continues. Policy in brief:
//
// * EXPORT_NAME: size u64 + flags u16 (+124 zeroes unless NO_ZEROES);
//   an unknown export can only be refused by closing.
// * ABORT: ACK, then close. Data is ignored, as the spec advises.
// * LIST: one NBD_REP_SERVER per name, then ACK (data → ERR_INVALID).
// * STARTTLS: this server runs in NOTLS mode → ERR_POLICY.
// * INFO / GO: INFO_EXPORT always, INFO_NAME / INFO_DESCRIPTION when asked
//   (description only if the export has one), INFO_BLOCK_SIZE when asked
//   and always for GO; then ACK. Unknown export → ERR_UNKNOWN + message.
// * STRUCTURED_REPLY: ACK (data → ERR_INVALID).
// * LIST_META_CONTEXT / SET_META_CONTEXT: only "base:allocation" exists.
//   LIST answers it (id 0, reserved) for no queries, "base:" or the full
//   name; SET requires structured replies, always discards the previous
//   selection, and selects it (with `baseAllocationContextID`) when queried
//   by full name. Unknown namespaces/leaves are ignored, per spec.
// * EXTENDED_HEADERS and everything unknown → ERR_UNSUP.
//
// Transmission flags are adjusted as the spec requires before they are
// sent: HAS_FLAGS is always set, SEND_DF is cleared unless structured replies
// were negotiated, SEND_FAST_ZERO is cleared unless SEND_WRITE_ZEROES is set.

extension NBDHandshake {
    mutating func handleOption(_ option: UInt32, data: [UInt8], _ s: inout Session) {
        guard let known = NBDOption(rawValue: option) else {
            NBDOptionReply.error(option: option, type: NBDConst.repErrUnsup,
                                 message: "option \(option) not supported", into: &s.pending)
            return
        }
        switch known {
        case .exportName:
            handleExportName(data, &s)
        case .abort:
            NBDOptionReply.ack(option: option, into: &s.pending)
            close("client sent NBD_OPT_ABORT", &s)
        case .list:
            guard data.isEmpty else {
                return invalid(option, "NBD_OPT_LIST takes no data", &s)
            }
            for name in listNames() {
                NBDOptionReply.server(name: name, into: &s.pending)
            }
            NBDOptionReply.ack(option: option, into: &s.pending)
        case .startTLS:
            guard data.isEmpty else {
                return invalid(option, "NBD_OPT_STARTTLS takes no data", &s)
            }
            NBDOptionReply.error(option: option, type: NBDConst.repErrPolicy,
                                 message: "TLS is not offered by this server", into: &s.pending)
        case .info, .go:
            handleInfoOrGo(option, go: known == .go, data: data, &s)
        case .structuredReply:
            guard data.isEmpty else {
                return invalid(option, "NBD_OPT_STRUCTURED_REPLY takes no data", &s)
            }
            structuredReplies = true
            NBDOptionReply.ack(option: option, into: &s.pending)
        case .listMetaContext, .setMetaContext:
            handleMetaContext(option, set: known == .setMetaContext, data: data, &s)
        case .extendedHeaders:
            NBDOptionReply.error(option: option, type: NBDConst.repErrUnsup,
                                 message: "extended headers not supported", into: &s.pending)
        }
    }

    // MARK: Export selection

    private mutating func handleExportName(_ data: [UInt8], _ s: inout Session) {
        guard let name = validString(data) else {
            return close("NBD_OPT_EXPORT_NAME with an invalid name", &s)
        }
        guard let info = resolve(name) else {
            return close("unknown export '\(clip(name))'", &s)
        }
        let advertised = advertise(info)
        s.pending.appendBE(advertised.size)
        s.pending.appendBE(advertised.transmissionFlags)
        if clientFlags & NBDConst.clientNoZeroes == 0 {
            s.pending.appendZeroes(NBDConst.exportNameZeroPad)
        }
        enterTransmission(negotiated(advertised, blockSizeAcknowledged: false), &s)
    }

    private mutating func handleInfoOrGo(_ option: UInt32, go: Bool, data: [UInt8], _ s: inout Session) {
        var r = NBDByteReader(data)
        guard let nameLength = r.read(UInt32.self),
              let nameBytes = r.readBytes(count: nameLength),
              let count = r.read(UInt16.self)
        else { return invalid(option, "malformed NBD_OPT_INFO/GO data", &s) }
        var requested = Set<UInt16>()
        for _ in 0..<count {
            guard let type = r.read(UInt16.self) else {
                return invalid(option, "information request list is truncated", &s)
            }
            requested.insert(type)
        }
        guard r.isAtEnd else { return invalid(option, "trailing bytes after information requests", &s) }
        guard let info = exportForOption(option, nameBytes, &s) else { return }
        let advertised = advertise(info)

        var payload: [UInt8] = []
        payload.appendBE(advertised.size)
        payload.appendBE(advertised.transmissionFlags)
        NBDOptionReply.info(option: option, infoType: NBDConst.infoExport, payload: payload, into: &s.pending)
        if requested.contains(NBDConst.infoName) {
            NBDOptionReply.info(option: option, infoType: NBDConst.infoName,
                                payload: truncatedUTF8(info.name, max: NBDConst.maxStringLength), into: &s.pending)
        }
        if requested.contains(NBDConst.infoDescription), let text = info.description {
            NBDOptionReply.info(option: option, infoType: NBDConst.infoDescription,
                                payload: truncatedUTF8(text, max: NBDConst.maxStringLength), into: &s.pending)
        }
        let blockSizeRequested = requested.contains(NBDConst.infoBlockSize)
        if go || blockSizeRequested {
            payload = []
            payload.appendBE(info.minBlock)
            payload.appendBE(info.preferredBlock)
            payload.appendBE(info.maxBlock)
            NBDOptionReply.info(option: option, infoType: NBDConst.infoBlockSize, payload: payload,
                                into: &s.pending)
        }
        NBDOptionReply.ack(option: option, into: &s.pending)
        if go {
            enterTransmission(negotiated(advertised, blockSizeAcknowledged: blockSizeRequested), &s)
        }
    }

    // MARK: Metadata contexts

    private mutating func handleMetaContext(_ option: UInt32, set: Bool, data: [UInt8], _ s: inout Session) {
        if set {
            // "Issuing this command replaces all previously-set metadata
            // contexts (including when this command fails)."
            metaContextExport = nil
            guard structuredReplies else {
                return invalid(option, "negotiate structured replies first", &s)
            }
        }
        var r = NBDByteReader(data)
        guard let nameLength = r.read(UInt32.self),
              let nameBytes = r.readBytes(count: nameLength),
              let queryCount = r.read(UInt32.self)
        else { return invalid(option, "malformed meta context request", &s) }
        var queries: [String] = []
        var left = queryCount
        while left > 0 {
            // Each query consumes at least 4 bytes, so this ends within data.count / 4 rounds.
            guard let length = r.read(UInt32.self), let bytes = r.readBytes(count: length) else {
                return invalid(option, "meta context query list is truncated", &s)
            }
            guard let query = validString(bytes) else {
                return invalid(option, "meta context query is not a valid string", &s)
            }
            queries.append(query)
            left -= 1
        }
        guard r.isAtEnd else { return invalid(option, "trailing bytes after meta context queries", &s) }
        guard let info = exportForOption(option, nameBytes, &s) else { return }

        if set {
            if queries.contains(NBDConst.baseAllocation) {
                metaContextExport = info.name
                NBDOptionReply.metaContext(option: option, contextID: baseAllocationContextID,
                                           name: NBDConst.baseAllocation, into: &s.pending)
            }
        } else if queries.isEmpty || queries.contains(where: { $0 == "base:" || $0 == NBDConst.baseAllocation }) {
            NBDOptionReply.metaContext(option: option, contextID: 0, name: NBDConst.baseAllocation,
                                       into: &s.pending)
        }
        NBDOptionReply.ack(option: option, into: &s.pending)
    }

    // MARK: Helpers

    /// The export an INFO/GO/META_CONTEXT option names, or nil after
    /// queuing ERR_INVALID (bad string) or ERR_UNKNOWN (no such export).
    private func exportForOption(_ option: UInt32, _ nameBytes: [UInt8], _ s: inout Session) -> NBDExportInfo? {
        guard let name = validString(nameBytes) else {
            invalid(option, "export name is not a valid string", &s)
            return nil
        }
        guard let info = resolve(name) else {
            NBDOptionReply.error(option: option, type: NBDConst.repErrUnknown,
                                 message: "unknown export '\(clip(name))'", into: &s.pending)
            return nil
        }
        return info
    }

    private func resolve(_ name: String) -> NBDExportInfo? {
        lookup(name.isEmpty ? defaultExport : name)
    }

    /// The export with the transmission flags the spec lets us send now.
    private func advertise(_ info: NBDExportInfo) -> NBDExportInfo {
        var out = info
        var flags = info.transmissionFlags | NBDConst.hasFlags
        if !structuredReplies { flags &= ~NBDConst.sendDF }
        if flags & NBDConst.sendWriteZeroes == 0 { flags &= ~NBDConst.sendFastZero }
        out.transmissionFlags = flags
        return out
    }

    private func negotiated(_ export: NBDExportInfo, blockSizeAcknowledged: Bool) -> NBDNegotiated {
        let selected = structuredReplies && metaContextExport == export.name
        return NBDNegotiated(exportName: export.name, structuredReplies: structuredReplies,
                             baseAllocationContextID: selected ? baseAllocationContextID : nil,
                             noZeroes: clientFlags & NBDConst.clientNoZeroes != 0, export: export,
                             blockSizeAcknowledged: blockSizeAcknowledged)
    }

    private func invalid(_ option: UInt32, _ message: String, _ s: inout Session) {
        NBDOptionReply.error(option: option, type: NBDConst.repErrInvalid, message: message, into: &s.pending)
    }

    /// A spec-conforming string (UTF-8, no NUL, at most 4096 bytes), or nil.
    private func validString(_ bytes: [UInt8]) -> String? {
        guard bytes.count <= NBDConst.maxStringLength else { return nil }
        return decodeNBDString(bytes)
    }

    /// Client-supplied text, shortened for use inside a message.
    private func clip(_ text: String) -> String {
        String(decoding: truncatedUTF8(text, max: 256), as: UTF8.self)
    }
}
