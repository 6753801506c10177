import ArgumentParser
import Foundation
import HotControl
import HotCore
import HotDaemon
import HotOS
#if canImport(Glibc)
import Glibc
#endif

struct Attach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Put a block device behind HotCore and print the protected device.",
        discussion: """
        Opens DEVICE exclusively (it must not be mounted or held), serves it over NBD \
        on a root-only unix socket in RUN-DIR/NAME, and presents it again as the \
        protected device, whose path is the last line of the output. Use the \
        protected device (mount it, point fstab at it) instead of DEVICE from then on: \
        every write through it reaches HotCore before it completes, which is what \
        lets 'hotimage snapshot' and 'hotimage backup' take a point-in-time copy.

        --via fuse: libnbd's nbdfuse presents the NBD export as a file and a loop \
        device with direct I/O stands over it (works on any kernel with FUSE and loop).

        If the daemon is killed (--via fuse), nbdfuse loses its server and all \
        I/O on the protected device fails at once, without a hang: the kernel logs \
        I/O errors on the loop device, ext4 aborts its journal and remounts \
        read-only, applications get EIO or EROFS. Writes that had completed are \
        on DEVICE. To recover: stop the applications, unmount, run 'hotimage \
        detach NAME' (it removes the loop device, the FUSE mount and the run \
        directory, which 'hotimage status' lists), attach again and fsck the \
        protected device before mounting it.

        --via nbd: the kernel NBD client (needs the nbd module), configured over \
        netlink with --nbd-connections sockets. If the daemon dies, the kernel holds \
        I/O on the device for --dead-conn-timeout seconds; 'hotimage attach DEVICE \
        --name NAME --via nbd --reconnect' (or the systemd unit restarting it) hands \
        it new sockets and the mounted filesystem carries on without an I/O error. \
        Requests the dead daemon had not answered are resent after --nbd-timeout. \
        A backup session that was running is lost.

        --via dm: a device-mapper linear device /dev/mapper/hotimage-NAME over \
        DEVICE (no userspace in the data path); backups use the kernel's \
        dm-snapshot (see 'backup --backend') with hb_NN.tmp files as its \
        copy-on-write store (--hb-file-size each, grown up to --buffer-limit); \
        --memory-buffer, --pause-ms and --buffer-deadline do not apply. With \
        --once, DEVICE is an existing device-mapper volume (an LVM LV) that is \
        snapshotted as it is, for one backup session, after which the daemon \
        exits; 'backup' of such a volume starts this by itself.

        The protected device is also reachable as /dev/hotimage/NAME, which \
        stays the same whatever loop or nbd number it gets (use it in fstab).

        The daemon runs in the background (log: RUN-DIR/NAME/daemon.log) unless \
        --foreground. 'hotimage detach NAME' undoes everything.

        Copy-on-write buffer: originals of overwritten blocks go to memory first \
        (--memory-buffer), then to hb_NN.tmp files in --buffer-dir (each at most \
        --hb-file-size, all together at most --buffer-limit). Put --buffer-dir on \
        a volume that is NOT being backed up: attach and every session start \
        refuse a directory on DEVICE, on the protected device or on anything \
        stacked on them. The directory is held open from attach, so a later \
        mount over its path does not move the hb files (0600; a directory attach \
        creates is 0700). When a limit or deadline is hit the session fails; the \
        live volume is never harmed.

        Example:
          hotimage attach /dev/vdb1 --name data --buffer-dir /var/tmp/hb

        \(ExitCodes.help(ExitCodes.attach))
        """)

    @Argument(help: "The block device to protect (or a regular file, for tests).")
    var device: String

    @Option(help: "Name of this attachment (default: the device's base name).")
    var name: String?

    @Option(help: "How the protected device is presented: fuse, nbd or dm.")
    var via: String = "fuse"

    @Option(help: ArgumentHelp("Directory for hb_NN.tmp buffer files (default \(Defaults.bufferDirHelp)).", valueName: "dir"))
    var bufferDir: String?

    @Option(help: "Memory tier of the copy-on-write buffer (K, M, G suffixes).")
    var memoryBuffer: String = Defaults.sizeText(UInt64(Defaults.memoryBufferBytes))

    @Option(help: "Size of each hb_NN.tmp file.")
    var hbFileSize: String = Defaults.sizeText(Defaults.hbFileBytes)

    @Option(help: "Total size of all hb files; beyond it the session fails.")
    var bufferLimit: String = Defaults.sizeText(Defaults.bufferLimitBytes)

    @Option(help: "Write-inactivity pause that marks a consistent point, in ms.")
    var pauseMs: Double = Double(Defaults.pauseNanos) / 1e6

    @Option(help: "The snapshot must be complete within this many seconds.")
    var snapshotDeadline: Double = Double(Defaults.snapshotDeadlineNanos) / 1e9

    @Option(help: "No block may stay in the memory buffer longer than this many seconds.")
    var bufferDeadline: Double = Double(Defaults.memoryDeadlineNanos) / 1e9

    @Option(help: "Drop the session when its client is silent this many seconds.")
    var heartbeatTimeout: Double = Double(Defaults.heartbeatTimeoutNanos) / 1e9

    @Option(help: "--via nbd: sockets between the kernel and HotCore (1-16).")
    var nbdConnections: Int = 2

    @Option(help: "--via nbd: seconds the kernel holds I/O for a restarted daemon.")
    var deadConnTimeout: Int = 120

    @Option(help: "--via nbd: seconds before the kernel resends an unanswered request on another connection.")
    var nbdTimeout: Int = 30

    @Flag(help: "--via nbd: re-attach the nbd device a dead daemon of this name left (else attach anew).")
    var reconnect = false

    @Flag(help: "--via dm: snapshot DEVICE, an existing device-mapper volume (an LVM LV), for one backup session and exit ('backup' starts this itself).")
    var once = false

    @Flag(help: "Stay in the foreground (for systemd or debugging).")
    var foreground = false

    @OptionGroup var paths: RunDirOptions

    func validate() throws {
        for (flag, v) in [("--memory-buffer", memoryBuffer), ("--hb-file-size", hbFileSize), ("--buffer-limit", bufferLimit)] {
            guard let n = parseSize(v), n > 0 else { throw ValidationError("\(flag) '\(v)' is not a size (e.g. 64M, 1G)") }
        }
        guard SessionVia(rawValue: via) != nil else { throw ValidationError("--via must be fuse, nbd or dm") }
        guard pauseMs >= 0, snapshotDeadline > 0, bufferDeadline > 0, heartbeatTimeout > 0 else {
            throw ValidationError("pause and deadlines must be positive")
        }
        guard (1...16).contains(nbdConnections) else { throw ValidationError("--nbd-connections must be 1 to 16") }
        guard nbdTimeout >= 1 else { throw ValidationError("--nbd-timeout must be at least 1 second") }
        guard deadConnTimeout >= 1 else { throw ValidationError("--dead-conn-timeout must be at least 1 second") }
        if reconnect && frontend != .nbd { throw ValidationError("--reconnect applies to --via nbd only") }
        if once && frontend != .dm { throw ValidationError("--once applies to --via dm only") }
        if let n = name, n.isEmpty || n.contains("/") || n.hasPrefix(".") {
            throw ValidationError("--name must be a plain name without '/'")
        }
    }

    /// --via as parsed (validate() refused any other word).
    var frontend: SessionVia { SessionVia(rawValue: via) ?? .fuse }

    var resolvedName: String { name ?? String(device.split(separator: "/").last ?? "disk") }

    func options() -> AttachOptions {
        var o = AttachOptions(device: device, name: resolvedName)
        o.via = frontend
        o.runDir = paths.runDir
        o.bufferDir = bufferDir
        o.hbFileBytes = parseSize(hbFileSize)!
        o.bufferLimitBytes = parseSize(bufferLimit)!
        o.engine.memoryBufferBytes = Int(parseSize(memoryBuffer)!)
        o.engine.pauseNanos = UInt64(pauseMs * 1e6)
        o.engine.snapshotDeadlineNanos = UInt64(snapshotDeadline * 1e9)
        o.engine.memoryDeadlineNanos = UInt64(bufferDeadline * 1e9)
        o.engine.spillAfterNanos = min(o.engine.spillAfterNanos, o.engine.memoryDeadlineNanos / 4)
        o.engine.heartbeatTimeoutNanos = UInt64(heartbeatTimeout * 1e9)
        o.nbdConnections = nbdConnections
        o.deadConnTimeoutSeconds = UInt64(deadConnTimeout)
        o.reconnect = reconnect
        o.nbdRequestTimeoutSeconds = UInt64(nbdTimeout)
        return o
    }

    func run() throws {
        guard getuid() == 0 else { throw CLIExit.fail(.refused, "attach must run as root") }
        if foreground { return try runForeground() }
        // Background: this command line again with --foreground, through
        // the launcher (HotDaemon/DaemonLauncher.swift).
        let o = options()
        let args = Array(CommandLine.arguments.dropFirst()) + ["--foreground"]
        do {
            let r = try DaemonLauncher.launch(arguments: args, dir: o.dir, within: 60)
            print("attached \(device) as '\(o.name)' (daemon pid \(r.pid), log \(r.logPath))")
            print(r.device)
        } catch let f as DaemonLauncher.Failure {
            throw CLIExit.fail(f.refused ? .refused : .failed, f.description)
        }
    }

    func runForeground() throws {
        if frontend == .dm {
            let o = dmOptions()
            try runInForeground(label: "dm.\(resolvedName)") { try SessionDaemon.dmSnapshot(o, logger: $0) }
        } else {
            let o = options()
            try runInForeground(label: "hotcore.\(resolvedName)") { try SessionDaemon.hotCore(o, logger: $0) }
        }
    }
}

struct Detach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove the protected device and stop its HotCore daemon.",
        discussion: """
        Refuses while a filesystem is mounted on the protected device (unmount it \
        first) or while a backup session runs (unless --force, which ends the \
        session). Waits until the daemon has exited.

        After the daemon was killed, it removes what the daemon left: the loop \
        device over its nbdfuse file, the FUSE mount, a leftover nbdfuse \
        process, /dev/nbdN, /dev/hotimage/NAME and the run directory; for a \
        dm-snapshot daemon (attach --via dm, or the one 'backup' starts for a \
        device-mapper volume, named after it) the snapshot, COW and REAL \
        devices, the loops over hb files and the files, and it gives the \
        origin its own table back, then removes the linear device of 'attach \
        --via dm' once nothing has it mounted ('hotimage status' lists all of \
        these). What it cannot remove it names, with the command to remove \
        it; it then exits 1 and can be run again.

        \(ExitCodes.help(ExitCodes.detach))
        """)

    @Argument(help: "Attachment name (or protected device path).")
    var name: String

    @Flag(help: "End a running backup session first.")
    var force = false

    @OptionGroup var paths: RunDirOptions

    func run() throws {
        guard let dir = daemonDir(name, runDir: paths.runDir) else {
            // A dead daemon's leftovers without its control socket.
            if !name.contains("/"), let l = Leftovers.find(name: name, runDir: paths.runDir) {
                return try cleanUpAfterDeadDaemon(l)
            }
            throw CLIExit.fail("no HotCore daemon '\(name)' in \(paths.runDir)")
        }
        let pid = (try? String(contentsOfFile: dir + "/pid", encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        let c: ControlClient
        do { c = try ControlClient(path: dir + "/control.sock") } catch {
            // The daemon holds RUN/NAME/lock while it lives.
            if Leftovers.daemonAlive(dir: dir) {
                throw CLIExit.fail("the daemon\(pid.map { " (pid \($0))" } ?? "") does not answer on \(dir)/control.sock: \(error)")
            }
            let runDir = (dir as NSString).deletingLastPathComponent
            guard let l = Leftovers.find(name: (dir as NSString).lastPathComponent, runDir: runDir) else {
                throw CLIExit.fail("nothing of '\(name)' is left in \(dir)")
            }
            try cleanUpAfterDeadDaemon(l)
            return
        }
        var req = ControlRequest(op: .detach)
        req.force = force
        let r = try c.call(req)
        c.close()
        guard r.ok else { throw CLIExit.fail("detach refused: \(r.error ?? "?")") }
        if let pid {
            for _ in 0..<600 {
                if kill(pid, 0) != 0 { break }
                usleep(50_000)
            }
            if kill(pid, 0) == 0 { throw CLIExit.fail("the daemon (pid \(pid)) did not exit within 30 s") }
        }
        print("detached \(name)")
    }

    /// The daemon was killed: Leftovers removes what it left (by its own
    /// records and hotimage's own devices only), going to the end or saying
    /// what is left; here only the printing and the exit code.
    func cleanUpAfterDeadDaemon(_ l: Leftovers) throws {
        for line in l.lines { writeStderr("hotimage: left by the dead daemon of '\(l.name)': \(line)\n") }
        // What it did is its output (stdout); what it found and what is left, stderr.
        let left = l.clean { print($0) }
        if !left.isEmpty {
            for line in left { writeStderr("hotimage: still there: \(line)\n") }
            throw CLIExit.fail("could not clean up everything after the dead daemon of '\(l.name)' (see above); run 'hotimage detach \(l.name)' again when done")
        }
        print("cleaned up after the dead daemon of '\(l.name)'")
    }
}
