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

        A SET (two or more TARGETs) is taken at one point in time, as 'backup' \
        takes a set: a write-inactivity pause common to all, every filesystem \
        frozen and every volume armed (HotCore holds an unmounted volume's writes until all are), \
        the maps read, all thawed; if any fails, every one is released. Then, per \
        volume NAME (its attachment name, upper-cased, other characters as _):

          HOTIMAGE_SNAPSHOT_URI_NAME     its export (empty for a dm volume)
          HOTIMAGE_SNAPSHOT_DEVICE_NAME  (dm) its snapshot device
          HOTIMAGE_SNAPSHOT_URIS         NAME=URI for every volume with an export,
                                         space-separated (names as attached)
          HOTIMAGE_SNAPSHOT_DEVICES      NAME=DEVICE for every dm volume
          HOTIMAGE_VOLUMES               the names, space-separated
          HOTIMAGE_ARMED_NS              the set's cut (every volume armed)

          hotimage snapshot vmdisks vmconf -- sh -c \\
              'for kv in $HOTIMAGE_SNAPSHOT_URIS; do
                 nbdcopy "${kv#*=}" "/backup/${kv%%=*}.raw"; done'

        Exit status: COMMAND's, or \(ExitCodes.code(.sessionFailed)) if the session failed while it ran.
        """)

    @Argument(help: ArgumentHelp("Attachment name, protected device or mount point; two or more: a set at one point in time.", valueName: "target"))
    var targets: [String] = []

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
        if targets.isEmpty { throw ValidationError("give the volume (TARGET) before --") }
    }

    func run() throws {
        if targets.count > 1 { return try runSet() }
        let target = targets[0]
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
            snap = try session.take(consistency: mode, mountPoint: mount?.mountPoint, pauseMs: pauseMs, retries: retries, readMap: { try Self.usedMap(vol, mount) }, onRetry: { FileHandle.standardError.write(Data("hotimage: \($0); retrying\n".utf8)) })
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
        try runCommand(env: env, sessions: [(vol.name, session)])
    }

    /// Runs COMMAND with `env`, heart-beating the sessions; ends them; fails
    /// if any session failed while it ran.
    func runCommand(env: [String: String], sessions: [(String, SessionClient)]) throws {
        for (k, v) in env { setenv(k, v, 1) }
        // Arguments may name the variables literally ('$HOTIMAGE_SNAPSHOT_URI'),
        // so no shell is needed for the common case. Longest names first, so
        // that $HOTIMAGE_SNAPSHOT_URI_A is not read as $HOTIMAGE_SNAPSHOT_URI.
        let keys = env.keys.sorted { $0.count > $1.count }
        let argv = command.map { arg in keys.reduce(arg) { a, k in a.replacingOccurrences(of: "$" + k, with: env[k]!) } }
        let pid = try ProcessControl.spawn(argv, inheritStdio: true, newSession: false)
        let code = ProcessControl.wait(pid)
        // A failure while the command ran: the snapshot it read may be incomplete.
        var errors: [String] = []
        for (name, session) in sessions {
            var e = session.lastError
            if let s = try? session.status(), s.session.phase == .failed { e = s.session.failure ?? "failed" }
            if let e { errors.append(sessions.count > 1 ? "\(name): \(e)" : e) }
        }
        for (_, session) in sessions { session.end(); session.close() }
        if !errors.isEmpty {
            throw CLIExit.fail(.sessionFailed, "the session failed while the command ran: \(errors.joined(separator: "; "))")
        }
        if code != 0 { throw ExitCode(code) }
    }
}

extension Snapshot {
    /// A set: one cut across every target (SetCut), one export each.
    func runSet() throws {
        var vols: [(AttachedVolume, MountEntry?)] = []
        var seen = Set<String>()
        for t in targets {
            guard let dir = daemonDir(t, runDir: paths.runDir) else { throw CLIExit.fail(.refused, "no session daemon for '\(t)' in \(paths.runDir)") }
            let vol: AttachedVolume
            do { vol = try SessionClient.locate(runDir: dir) } catch { throw CLIExit.fail("\(error)") }
            guard seen.insert(vol.name).inserted else { throw CLIExit.fail(.refused, "'\(t)' names '\(vol.name)' again: each volume once in a set") }
            let mount = Mounts.of(device: vol.protectedDevice).first
            if let c = consistency.flatMap(Consistency.init(rawValue:)), c != .raw, mount == nil {
                throw CLIExit.fail(.refused, "\(vol.name): \(vol.protectedDevice) is not mounted: --consistency \(c.rawValue) needs every volume mounted (leave it out: unmounted volumes are taken raw)")
            }
            if vol.via == .dm, mount == nil {
                throw CLIExit.fail(.refused, "\(vol.name): a dm-snapshot volume in a set must hold a mounted filesystem (its freeze holds the cut)")
            }
            vols.append((vol, mount))
        }
        var sessions: [(String, SessionClient)] = []
        var members: [SetCutMember] = []
        for (vol, mount) in vols {
            let s: SessionClient
            do { s = try SessionClient(volume: vol) } catch {
                for (_, x) in sessions { x.close() }
                throw CLIExit.fail("\(vol.name): \(error)")
            }
            sessions.append((vol.name, s))
            let mode = mount == nil ? Consistency.raw : (consistency.flatMap(Consistency.init(rawValue:)) ?? .freeze)
            members.append(SetCutMember(name: vol.name, session: s, consistency: mode, mountPoint: mount?.mountPoint,
                                        device: vol.protectedDevice, readMap: { try Self.usedMap(vol, mount) }))
        }
        var o = SetCutOptions()
        if let p = pauseMs { o.pauseNanos = UInt64(max(0, p) * 1e6) }
        o.retries = retries
        let cut: SetCutResult
        do {
            cut = try SetCut.take(members, o, log: { FileHandle.standardError.write(Data("hotimage: \($0)\n".utf8)) })
        } catch {
            for (_, s) in sessions { s.close() }
            throw CLIExit.fail(.sessionFailed, "the set's snapshot failed: \(error.description); every volume was released")
        }
        FileHandle.standardError.write(Data(String(format: "hotimage: set snapshot of %d volumes taken (armed within %.3f s, cut at %llu ns)\n",
                                                   vols.count, cut.armSpreadSeconds, cut.cutNanos).utf8))
        for (_, s) in sessions { s.startHeartbeat() }
        var env = ["HOTIMAGE_ARMED_NS": "\(cut.cutNanos)", "HOTIMAGE_VOLUMES": vols.map(\.0.name).joined(separator: " ")]
        var uris: [String] = [], devices: [String] = []
        for ((vol, _), snap) in zip(vols, cut.snapshots) {
            let key = Self.envName(vol.name)
            let uri = snap.snapshotDevice == nil ? vol.snapshotURI : ""
            env["HOTIMAGE_SNAPSHOT_URI_" + key] = uri
            env["HOTIMAGE_SNAPSHOT_DEVICE_" + key] = snap.snapshotDevice ?? ""
            if !uri.isEmpty { uris.append("\(vol.name)=\(uri)") }
            if let d = snap.snapshotDevice { devices.append("\(vol.name)=\(d)") }
        }
        env["HOTIMAGE_SNAPSHOT_URIS"] = uris.joined(separator: " ")
        env["HOTIMAGE_SNAPSHOT_DEVICES"] = devices.joined(separator: " ")
        try runCommand(env: env, sessions: sessions)
    }

    /// The used map (GETFSMAP of the mounted filesystem, else every block); nothing excluded.
    static func usedMap(_ vol: AttachedVolume, _ mount: MountEntry?) throws -> (used: [Range<UInt64>], excluded: [Range<UInt64>]) {
        guard let m = mount else { return ([0..<vol.size], []) }
        return (try FSMap.usedExtents(mountPoint: m.mountPoint, deviceBytes: vol.size).map { $0.offset..<($0.offset + $0.length) }, [])
    }

    /// A volume's name as a variable suffix: upper case, anything but A-Z, 0-9 as _.
    static func envName(_ name: String) -> String {
        String(name.uppercased().map { ($0.isASCII && ($0.isLetter || $0.isNumber)) ? $0 : "_" })
    }
}
