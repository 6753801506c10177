// Human and JSON output of the checker, and the log context for mismatch lines.

extension StampChecker {
    /// The op on `block` with sequence number `seq`, if the log has it.
    func op(block: UInt64, seq: UInt64) -> OpRecord? {
        for i in opIndices(ofBlock: block) where log.ops[Int(i)].seq == seq {
            return log.ops[Int(i)]
        }
        return nil
    }

    /// The latest-issued settled op that supersedes `op` at `cut`, if any.
    func supersedingOp(of op: OpRecord, cut: UInt64) -> OpRecord? {
        var best: OpRecord?
        for i in opIndices(ofBlock: op.block) {
            let o2 = log.ops[Int(i)]
            guard !o2.failed, o2.endNs < cut, o2.startNs > op.endNs else { continue }
            if best == nil || o2.startNs > best!.startNs { best = o2 }
        }
        return best
    }

    /// What the image holds at `block`, with what the log knows about it.
    func describeFound(block: UInt64, content p: UnsafeRawPointer, cut: UInt64) -> String {
        let content = Stamp.decode(p)
        var text = Stamp.describe(content)
        guard case let .stamp(stampBlock, seq, thread) = content else { return text }
        if stampBlock != block { text += ", misdirected (belongs to block \(stampBlock))" }
        guard let op = op(block: stampBlock, seq: seq) else { return text + ", seq not in the log" }
        if op.kind != .write || UInt64(op.thread) != thread {
            return text + ", but the log has seq \(seq) as \(op.kind.name) by thread \(op.thread)"
        }
        if !Stamp.matches(p, block: stampBlock, seq: seq, thread: thread) {
            return text + ", header and checksum valid but the body differs from the regenerated stamp"
        }
        if stampBlock != block { return text }
        if op.startNs >= cut {
            return text + ", a write that started \(op.startNs - cut) ns after the cut"
        }
        if let newer = supersedingOp(of: op, cut: cut) {
            let when = cut == UInt64.max ? "" : ", ended \(cut - newer.endNs) ns before the cut"
            return text + ", an older write superseded by \(newer.kind.name) seq \(newer.seq)\(when)"
        }
        return text
    }

    /// The candidates, as "write seq S thread T" or "trim seq S (zeros)".
    func describeExpected(_ candidates: [UInt32]) -> String {
        let shown = candidates.prefix(4).map { i -> String in
            let op = log.ops[Int(i)]
            var s = op.kind == .write
                ? "write seq \(op.seq) thread \(op.thread)"
                : "\(op.kind.name) seq \(op.seq) (zeros)"
            if op.failed { s += " [failed: errno \(op.errorCode)]" }
            return s
        }
        var text = (candidates.count == 1 ? "" : "one of ") + shown.joined(separator: " | ")
        if candidates.count > shown.count { text += " | +\(candidates.count - shown.count) more" }
        return text
    }
}

extension CheckResult {
    var summaryLine: String {
        "check: \(blocks) blocks, \(exact) exact, \(ambiguous) ambiguous (\(maxCandidates) candidates max), "
            + "\(mismatches) mismatches"
    }

    /// The summary line, the unlogged count when there is one, and the first mismatches.
    var textReport: [String] {
        var lines = [summaryLine]
        if unlogged > 0 {
            lines.append("check: \(unlogged) blocks unlogged (no logged op completed before the cut; any content accepted)")
        }
        for m in samples {
            lines.append("mismatch: block \(m.block): found \(m.found); expected \(m.expected)")
        }
        if mismatches > samples.count {
            lines.append("mismatch: ... \(mismatches - samples.count) more")
        }
        return lines
    }

    var json: String {
        let sampleText = samples.map {
            "{\"block\":\($0.block),\"found\":\(jsonString($0.found)),\"expected\":\(jsonString($0.expected))}"
        }.joined(separator: ",")
        let cut = cutNs.map { String($0) } ?? "null"
        return "{\"blocks\":\(blocks),\"exact\":\(exact),\"ambiguous\":\(ambiguous),"
            + "\"maxCandidates\":\(maxCandidates),\"mismatches\":\(mismatches),\"unlogged\":\(unlogged),"
            + "\"ops\":\(ops),\"firstBlock\":\(firstBlock),\"cutNs\":\(cut),\"ok\":\(mismatches == 0),"
            + "\"mismatchSamples\":[\(sampleText)]}"
    }
}

func jsonString(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        default:
            if u.value < 0x20 {
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            } else {
                out.unicodeScalars.append(u)
            }
        }
    }
    return out + "\""
}
