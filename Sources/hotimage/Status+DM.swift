// `hotimage status` for a dm-snapshot daemon: the origin and its snapshot,
// the COW store's fill, size and hb files.
import HotControl
import HotCore
import HotDaemon
import HotImager

extension Status {
    func renderDM(_ s: DaemonStatus, _ dm: DMSessionStatus) -> String {
        let e = s.session
        var lines = ["\(s.name): \(s.protectedDevice ?? s.device) via dm (dm-snapshot)\(dm.transient ? ", transient" : "")" +
                     (s.device != s.protectedDevice ? " over \(s.device)" : "") + ", daemon pid \(s.pid)"]
        var state = "  session: \(e.phase.rawValue)"
        if let f = e.failure { state += " — \(f)" }
        if let c = e.consistency { state += " (\(c.rawValue))" }
        if let fz = s.frozen { state += ", \(fz) frozen" }
        lines.append(state)
        if e.failure == nil, let lf = e.lastFailure { lines.append("  last session failed: \(lf)") }
        if let snap = dm.snapshotDevice {
            lines.append("  snapshot: \(snap) (\(dm.snapshotState ?? "status not read yet"))")
            let pct = dm.cowTotalBytes > 0 ? Double(dm.cowUsedBytes) * 100 / Double(dm.cowTotalBytes) : 0
            lines.append("  COW: \(formatBytes(dm.cowUsedBytes)) used of \(formatBytes(dm.cowTotalBytes)) (\(Int(pct))%), " +
                         "peak \(formatBytes(dm.cowPeakBytes)), limit \(formatBytes(dm.cowLimitBytes)), grown \(dm.growths) time(s)")
            lines.append("  hb files (\(formatBytes(dm.hbFileBytes)) each) in \(s.bufferDir): " +
                         zip(dm.hbFiles, dm.loops).map { "\($0.0.split(separator: "/").last ?? "") on \($0.1)" }.joined(separator: ", "))
        }
        if e.usedBlocks > 0 { lines.append("  used-block map: \(e.usedBlocks) blocks (dm-snapshot copies any written chunk, used or not)") }
        lines.append("  origin table: \(dm.originTable.joined(separator: "; "))")
        lines.append(String(format: "  deadlines: snapshot %.0f s, heartbeat %.0f s", e.snapshotDeadlineSeconds, e.heartbeatTimeoutSeconds))
        return lines.joined(separator: "\n")
    }
}
