import ArgumentParser
import Foundation
import HotCore
import HotDaemon
import HotImager
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

          HOTIMAGE_SNAPSHOT_URI     nbd+unix:///snapshot?socket=... (read-only,
                                    the point in time; blocks outside the used
                                    map read as zeros, reported as holes)
          HOTIMAGE_NBD_SOCKET       the daemon's NBD socket
          HOTIMAGE_ARMED_NS         the cut, in CLOCK_MONOTONIC nanoseconds
          HOTIMAGE_USED_BYTES       bytes in the used-block map
          HOTIMAGE_SNAPSHOT_DEVICE  (attach --via dm) the read-only dm-snapshot
                                    device; the URI is empty then

        Consistency: 'freeze' (default when a filesystem is mounted) freezes it for \
        the map read; 'wip' relies on the pause alone and starts again if a write \
        lands during the map read; 'raw' (default without a filesystem) protects \
        every block.

        Examples:
          hotimage snapshot data -- \\
              nbdcopy '$HOTIMAGE_SNAPSHOT_URI' /backup/data.raw
          hotimage snapshot /srv/data -- sh -c \\
              'qemu-img convert -O qcow2 "$HOTIMAGE_SNAPSHOT_URI" /backup/d.qcow2'

        Exit status: COMMAND's, or \(ExitCodes.code(.sessionFailed)) if the session failed while it ran.
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
        let vol: AttachedVolume
        do { vol = try SessionClient.locate(runDir: dir) } catch { throw CLIExit.fail("\(error)") }
        let mount = Mounts.of(device: vol.protectedDevice).first
        let mode = consistency.flatMap(Consistency.init(rawValue:)) ?? (mount == nil ? .raw : .freeze)
        if mode != .raw && mount == nil { throw CLIExit.fail(.refused, "\(vol.protectedDevice) is not mounted: use --consistency raw") }

        let session = try SessionClient(volume: vol)
        let snap: TakenSnapshot
        do {
            snap = try session.take(consistency: mode, mountPoint: mount?.mountPoint, pauseMs: pauseMs, retries: retries, readMap: {
                guard let m = mount else { return ([0..<vol.size], []) }
                return (try FSMap.usedExtents(mountPoint: m.mountPoint, deviceBytes: vol.size).map { $0.offset..<($0.offset + $0.length) }, [])
            }, onRetry: { FileHandle.standardError.write(Data("hotimage: \($0); retrying\n".utf8)) })
        } catch {
            throw CLIExit.fail(.sessionFailed, "snapshot failed: \(error)")
        }
        FileHandle.standardError.write(Data("hotimage: snapshot of \(vol.protectedDevice) taken (\(mode.rawValue), \(formatBytes(snap.usedBytes)) used, armed at \(snap.armedAtNanos) ns)\n".utf8))
        session.startHeartbeat()

        let env = [
            "HOTIMAGE_SNAPSHOT_URI": snap.snapshotDevice == nil ? vol.snapshotURI : "",
            "HOTIMAGE_NBD_SOCKET": vol.nbdSocket,
            "HOTIMAGE_ARMED_NS": "\(snap.armedAtNanos)",
            "HOTIMAGE_USED_BYTES": "\(snap.usedBytes)",
            "HOTIMAGE_SNAPSHOT_DEVICE": snap.snapshotDevice ?? "",
        ]
        for (k, v) in env { setenv(k, v, 1) }
        // Arguments may name the variables literally ('$HOTIMAGE_SNAPSHOT_URI'),
        // so no shell is needed for the common case.
        let argv = command.map { arg in env.reduce(arg) { a, kv in a.replacingOccurrences(of: "$" + kv.key, with: kv.value) } }
        let pid = try ProcessControl.spawn(argv, inheritStdio: true, newSession: false)
        let code = ProcessControl.wait(pid)
        // A failure while the command ran: the snapshot it read may be incomplete.
        var sessionError = session.lastError
        if let s = try? session.status(), s.session.phase == .failed {
            sessionError = s.session.failure ?? "failed"
        }
        session.end()
        session.close()
        if let e = sessionError {
            throw CLIExit.fail(.sessionFailed, "the session failed while the command ran: \(e)")
        }
        if code != 0 { throw ExitCode(code) }
    }
}
