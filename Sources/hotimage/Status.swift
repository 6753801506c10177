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
        counters. For a dm-snapshot daemon (attach --via dm, or spawned by backup): \
        the snapshot device and its state, COW bytes used of the store's size, \
        and its hb files. --json prints one JSON object per daemon per line.

        A HotCore daemon that was killed is listed with what it left behind (its \
        run directory, the loop device over its FUSE file, the FUSE mount, an \
        nbdfuse process) and the command that removes them, 'hotimage detach \
        NAME'; listing them changes nothing.

        It also cleans up what killed dm-snapshot daemons left behind (only \
        hotimage's own devices, found by name and owner; each action is \
        printed on stderr).

        \(ExitCodes.help(ExitCodes.status))
        """)

    @Argument(help: "Attachment name (default: all).")
    var name: String?

    @Flag(help: "Machine-readable output.")
    var json = false

    @OptionGroup var paths: RunDirOptions

    func run() throws {
        // Leftovers of killed dm-snapshot daemons (only hotimage's own devices, by name and owner).
        for line in DMLeftovers.clean(runDir: paths.runDir) { writeStderr("hotimage: \(line)\n") }
        var dirs: [String]
        if let name {
            if let d = daemonDir(name, runDir: paths.runDir) {
                dirs = [d]
            } else if !name.contains("/"), HotCoreLeftovers.inspect(dir: paths.runDir + "/" + name) != nil {
                dirs = [paths.runDir + "/" + name]
            } else {
                throw CLIExit.fail("no HotCore daemon '\(name)' in \(paths.runDir)")
            }
        } else {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: paths.runDir)) ?? []
            dirs = names.sorted().map { paths.runDir + "/" + $0 }.filter {
                FileManager.default.fileExists(atPath: $0 + "/control.sock") || HotCoreLeftovers.inspect(dir: $0) != nil
            }
            if dirs.isEmpty && !json { print("no HotCore daemons in \(paths.runDir)") }
        }
        var failed = false
        for d in dirs {
            // A killed daemon: show what it left and how to remove it (read only).
            if let l = HotCoreLeftovers.inspect(dir: d) {
                if json {
                    let enc = JSONEncoder()
                    enc.outputFormatting = [.sortedKeys]
                    print(String(decoding: try enc.encode(DeadDaemon(deadDaemon: l, hint: "hotimage detach \(l.name)")), as: UTF8.self))
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
        var deadDaemon: HotCoreLeftovers
        var hint: String
    }

    func renderLeftovers(_ l: HotCoreLeftovers) -> String {
        var lines = ["\(l.name): daemon dead\(l.pid.map { " (was pid \($0))" } ?? ""); left behind:"]
        lines += l.lines.map { "  " + $0 }
        lines.append("  remove with: hotimage detach \(l.name)" + (l.mountedOn.isEmpty ? "" : " (after 'umount \(l.mountedOn.joined(separator: " "))')"))
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
