import ArgumentParser
import Foundation
import HotCore
import HotDaemon
import HotOS
#if canImport(Glibc)
import Glibc
#endif

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a backup session and run a command against the snapshot export.",
        discussion: """
        Begins a session on the HotCore daemon of TARGET (attachment name, protected \
        device, or a mount point of it), waits for a write-inactivity pause, \
        freezes the filesystem if one is mounted, reads its used-block map \
        (FS_IOC_GETFSMAP), narrows copy-on-write to the used blocks and thaws. \
        Then it runs COMMAND (no shell; the variables below may also be written \
        literally in its arguments, quoted, and are replaced) with these variables set, heart-beating while it runs, \
        and ends the session when COMMAND exits:

          HOTIMAGE_SNAPSHOT_URI  nbd+unix:///snapshot?socket=... (read-only, point in time;
                                 blocks outside the used map read as zeros and are
                                 reported as holes)
          HOTIMAGE_NBD_SOCKET    the daemon's NBD socket
          HOTIMAGE_ARMED_NS      the cut, in CLOCK_MONOTONIC nanoseconds
          HOTIMAGE_USED_BYTES    bytes in the used-block map

        Consistency: 'freeze' (default when a filesystem is mounted) freezes it for \
        the map read; 'wip' relies on the pause alone and starts again if a write \
        lands during the map read; 'raw' (default without a filesystem) protects \
        every block.

        Examples:
          hotimage snapshot data -- nbdcopy '$HOTIMAGE_SNAPSHOT_URI' /backup/data.raw
          hotimage snapshot /srv/data -- sh -c 'qemu-img convert -O qcow2 "$HOTIMAGE_SNAPSHOT_URI" /backup/d.qcow2'

        Exit status: COMMAND's, or 3 if the session failed while it ran.
        """)

    @Argument(help: "Attachment name, protected device or mount point.")
    var target: String

    @Option(help: "freeze, wip or raw (default: freeze if mounted, else raw).")
    var consistency: String?

    @Option(help: "Write-inactivity pause in ms (default: the daemon's).")
    var pauseMs: Double?

    @Option(help: "How often to retry the pause/map cycle under --consistency wip.")
    var retries: Int = 20

    @Argument(parsing: .postTerminator, help: "The command to run against the snapshot.")
    var command: [String] = []

    @OptionGroup var paths: RunDirOptions

    func validate() throws {
        if let c = consistency, Consistency(rawValue: c) == nil { throw ValidationError("--consistency must be freeze, wip or raw") }
        if command.isEmpty { throw ValidationError("give the command to run after --") }
    }

    func run() throws {
        guard let dir = daemonDir(target, runDir: paths.runDir) else {
            throw CLIExit.fail("no HotCore daemon for '\(target)' in \(paths.runDir)")
        }
        let client = try ControlClient(path: dir + "/control.sock")
        let hello = try client.call("hello")
        guard let dev = hello.protectedDevice, let size = hello.size else { throw CLIExit.fail("the daemon is not ready") }
        let mount = Mounts.of(device: dev).first
        let mode = consistency.flatMap(Consistency.init(rawValue:)) ?? (mount == nil ? .raw : .freeze)
        if mode != .raw && mount == nil { throw CLIExit.fail("\(dev) is not mounted: use --consistency raw", code: 2) }

        var armedAt: UInt64 = 0
        var usedBytes: UInt64 = 0
        var attempt = 0
        while true {
            attempt += 1
            var req = ControlRequest(op: "begin")
            req.consistency = mode.rawValue
            req.mountPoint = mount?.mountPoint
            req.pauseMs = pauseMs
            let b = try client.call(req)
            guard b.ok, let at = b.armedAtNanos else { throw CLIExit.fail("snapshot failed: \(b.error ?? "?")", code: 3) }
            armedAt = at
            var used: [[UInt64]]
            if let m = mount {
                do {
                    used = try FSMap.usedExtents(mountPoint: m.mountPoint, deviceBytes: size).map { [$0.offset, $0.offset + $0.length] }
                } catch {
                    _ = try? client.call("end")
                    throw CLIExit.fail("reading the used-block map of \(m.mountPoint): \(error)", code: 3)
                }
            } else {
                used = [[0, size]]
            }
            usedBytes = used.reduce(0) { $0 + $1[1] - $1[0] }
            var mreq = ControlRequest(op: "map")
            mreq.used = used
            let r = try client.call(mreq)
            if r.ok { break }
            if r.retry == true && attempt < retries {
                FileHandle.standardError.write(Data("hotimage: \(r.error ?? "writes during the map read"); retrying\n".utf8))
                continue
            }
            _ = try? client.call("end")
            throw CLIExit.fail("snapshot failed: \(r.error ?? "?")", code: 3)
        }
        FileHandle.standardError.write(Data("hotimage: snapshot of \(dev) taken (\(mode.rawValue), \(formatBytes(usedBytes)) used, armed at \(armedAt) ns)\n".utf8))

        setenv("HOTIMAGE_SNAPSHOT_URI", hello.snapshotURI ?? "", 1)
        setenv("HOTIMAGE_NBD_SOCKET", dir + "/nbd.sock", 1)
        setenv("HOTIMAGE_ARMED_NS", "\(armedAt)", 1)
        setenv("HOTIMAGE_USED_BYTES", "\(usedBytes)", 1)
        // Arguments may name the variables literally ('$HOTIMAGE_SNAPSHOT_URI'),
        // so no shell is needed for the common case.
        let vars = ["HOTIMAGE_SNAPSHOT_URI", "HOTIMAGE_NBD_SOCKET", "HOTIMAGE_ARMED_NS", "HOTIMAGE_USED_BYTES"]
        let argv = command.map { arg in
            vars.reduce(arg) { a, v in a.replacingOccurrences(of: "$" + v, with: String(cString: getenv(v))) }
        }
        let pid = try ProcessControl.spawn(argv, inheritStdio: true, newSession: false)
        var code: Int32 = 0
        var sessionError: String?
        var lastBeat = monotonicNanos()
        while true {
            if let st = ProcessControl.reap(pid) { code = ProcessControl.exitCode(st); break }
            if monotonicNanos() - lastBeat > 1_000_000_000 {
                lastBeat = monotonicNanos()
                let h = try? client.call("heartbeat")
                if let h, !h.ok, sessionError == nil { sessionError = h.error }
            }
            usleep(20_000)
        }
        // A failure while the command ran: the snapshot it read may be incomplete.
        if let st = try? client.call("status"), let s = st.status, s.engine.phase == .failed {
            sessionError = s.engine.failure ?? "failed"
        }
        _ = try? client.call("end")
        client.close()
        if let e = sessionError {
            throw CLIExit.fail("the session failed while the command ran: \(e)", code: 3)
        }
        if code != 0 { throw ExitCode(code) }
    }
}
