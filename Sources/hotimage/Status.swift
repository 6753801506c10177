import ArgumentParser
import Foundation
import HotControl
import HotCore
import HotDaemon
import HotImager
import HotOS

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show HotCore daemons and their backup sessions.",
        discussion: """
        For each attachment (or the one named): the devices, the session state \
        (idle, waiting, armed, protecting, failed with the reason), protected, \
        archived and buffered blocks, memory and hb file bytes, the deadlines, and \
        counters, and the change map (changed-block tracking: the 64 KiB \
        clusters written since the last committed backup image, or why the map \
        is not trusted and the next incremental compares). For a dm-snapshot daemon (attach --via dm, or spawned by backup): \
        the snapshot device and its state, COW bytes used of the store's size, \
        and its hb files. --json prints one JSON object per daemon per line.

        A daemon that was killed is listed with what it left behind (its run \
        directory, the loop device over its FUSE file, the FUSE mount, an \
        nbdfuse process, /dev/nbdN; for a dm-snapshot daemon its snapshot, COW \
        and REAL devices, the origin that still maps through them, the loops \
        over hb files and the files, the linear device of 'attach --via dm') \
        and the command that removes them, 'hotimage detach NAME'. Listing them \
        changes nothing.

        \(ExitCodes.help(ExitCodes.status))
        """)

    @Argument(help: "Attachment name (default: all).")
    var name: String?

    @Flag(help: "Machine-readable output.")
    var json = false

    @OptionGroup var paths: RunDirOptions

    func run() throws {
        // (dir, what its dead daemon left); listing changes nothing.
        var entries: [(dir: String, dead: Leftovers?)]
        if let name {
            if let d = daemonDir(name, runDir: paths.runDir) {
                entries = [(d, Leftovers.find(name: (d as NSString).lastPathComponent, runDir: (d as NSString).deletingLastPathComponent))]
            } else if !name.contains("/"), let l = Leftovers.find(name: name, runDir: paths.runDir) {
                entries = [(paths.runDir + "/" + name, l)]
            } else {
                throw CLIExit.fail("no HotCore daemon '\(name)' in \(paths.runDir)")
            }
        } else {
            let dead = Leftovers.all(runDir: paths.runDir)
            let deadNames = Set(dead.map(\.name))
            let names = (try? FileManager.default.contentsOfDirectory(atPath: paths.runDir)) ?? []
            entries = names.filter {
                !deadNames.contains($0) && FileManager.default.fileExists(atPath: paths.runDir + "/" + $0 + "/control.sock")
            }.map { (paths.runDir + "/" + $0, nil) }
            entries += dead.map { (paths.runDir + "/" + $0.name, $0) }
            entries.sort { $0.dir < $1.dir }
            if entries.isEmpty && !json { print("no HotCore daemons in \(paths.runDir)") }
        }
        var failed = false
        for (d, dead) in entries {
            // A killed daemon: show what it left and how to remove it (read only).
            if let l = dead {
                if json {
                    let enc = JSONEncoder()
                    enc.outputFormatting = [.sortedKeys]
                    print(String(decoding: try enc.encode(DeadDaemon(deadDaemon: l, hint: l.hint)), as: UTF8.self))
                } else {
                    print(renderLeftovers(l))
                }
                continue
            }
            do {
                let c = try ControlClient(path: d + "/control.sock")
                defer { c.close() }
                let r = try c.call(.status)
                guard let s = r.status else { throw CLIExit.fail(r.error ?? "no status") }
                if json {
                    let enc = JSONEncoder()
                    enc.outputFormatting = [.sortedKeys]
                    print(String(decoding: try enc.encode(s), as: UTF8.self))
                } else {
                    print(render(s))
                }
            } catch {
                failed = true
                FileHandle.standardError.write(Data("hotimage: \(d): \(error) (stale run directory? the daemon may have died)\n".utf8))
            }
        }
        if failed { throw CLIExit.status(.failed) }
    }

    struct DeadDaemon: Encodable {
        var deadDaemon: Leftovers
        var hint: String
    }

    /// One line: `changes: 12 clusters (768 KiB) since image 3f2a… (trusted)`,
    /// or why the map is not trusted.
    static func renderTracking(_ t: TrackingStatus) -> String {
        let count = "\(t.changedClusters) cluster\(t.changedClusters == 1 ? "" : "s") (\(formatBytes(t.changedBytes)))"
        if t.trusted {
            let id = t.since.map { $0.count > 12 ? String($0.prefix(12)) + "…" : $0 } ?? "?"
            return "changes: \(count) since image \(id) (trusted)"
        }
        return "changes: untrusted (\(t.reason ?? "unknown reason")); the next incremental compares; \(count) written since tracking began"
    }

    func renderLeftovers(_ l: Leftovers) -> String {
        var lines = ["\(l.name): daemon dead\(l.pid.map { " (was pid \($0))" } ?? ""); left behind:"]
        lines += l.lines.map { "  " + $0 }
        lines.append("  remove with: \(l.hint)" + (l.mountedOn.isEmpty ? "" : " (after 'umount \(l.mountedOn.joined(separator: " "))')"))
        return lines.joined(separator: "\n")
    }

    func render(_ s: DaemonStatus) -> String {
        if let dm = s.dm { return renderDM(s, dm) }
        guard let e = s.engine else { return "\(s.name): \(s.device) via \(s.via.rawValue): session \(s.session.phase.rawValue)" }
        let bs = UInt64(e.blockSize)
        var lines = ["\(s.name): \(s.device) → \(s.protectedDevice ?? "(not presented)") via \(s.via.rawValue), daemon pid \(s.pid), \(s.connections ?? 0) NBD connection(s)"]
        var state = "  session: \(e.phase.rawValue)"
        if let f = e.failure { state += " — \(f)" }
        if let c = e.consistency { state += " (\(c.rawValue))" }
        if let fz = s.frozen { state += ", \(fz) frozen" }
        lines.append(state)
        if let t = s.tracking { lines.append("  " + Status.renderTracking(t)) }
        if e.phase != .idle {
            lines.append("  blocks (\(e.blockSize) B): used \(e.usedBlocks), protected \(e.protectedBlocks), archived \(e.counters.archivedBlocks), buffered \(e.bufferedBlocks)")
            lines.append("  buffer: memory \(formatBytes(e.memoryBytes)) of \(formatBytes(e.memoryCapacityBytes)), hb files \(formatBytes(e.spillBytes)) in \(e.spillFiles) file(s) in \(s.bufferDir)")
            lines.append("  copies \(e.counters.copies) blocks (\(formatBytes(e.counters.copies * bs))), spilled \(e.counters.spilledBlocks), peak memory \(formatBytes(e.counters.peakMemoryBytes)), peak hb \(formatBytes(e.counters.peakSpillBytes))")
            if let age = e.oldestMemoryAgeMs { lines.append("  oldest block in memory: \(age) ms") }
            if e.phase.copiesOnWrite { lines.append("  snapshot: \(s.snapshotURI ?? "")") }
        }
        lines.append(String(format: "  deadlines: snapshot %.0f s, buffer %.0f s, heartbeat %.0f s; pause %.0f ms; map memory %@",
                            e.deadlines.snapshotSeconds, e.deadlines.memorySeconds, e.deadlines.heartbeatSeconds,
                            e.deadlines.pauseMs, formatBytes(UInt64(e.mapMemoryBytes))))
        if let r = s.reads {
            lines.append("  NBD reads: \(r.spliced) spliced, \(r.copied) copied\(r.spliceEnabled ? "" : " (splicing off)")")
        }
        return lines.joined(separator: "\n")
    }
}
