// What a HotCore daemon killed with SIGKILL leaves behind, found by its own
// records only (its run directory, the loop device over its nbdfuse file,
// the FUSE mount in its run directory, an nbdfuse process serving that file,
// the /dev/hotimage/NAME link), and how `detach` removes it.
//
//   RUN/NAME/{pid,lock,device,control.sock,nbd.sock}   records (lock not held)
//   /dev/loopN  backing_file = RUN/NAME/fuse/disk       (losetup -a shows it)
//   RUN/NAME/fuse                                      FUSE mount (dead or alive)
//   nbdfuse ... RUN/NAME/fuse/disk --unix ...           if only the daemon died
//
// `inspect` only reads (status uses it and must not change kernel state);
// `clean` goes to the end or says exactly what is left and how to remove it,
// and keeps the records then so it can run again. A dm daemon's directory
// (RUN/NAME/via = dm) belongs to DMLeftovers.
import Foundation
import HotControl
import HotOS
#if canImport(Glibc)
import Glibc
#endif

public struct HotCoreLeftovers: Sendable, Codable {
    public var name: String
    public var dir: String
    public var pid: Int32?
    public var device: String?
    /// Loop devices over RUN/NAME/fuse/disk.
    public var loops: [String] = []
    /// Mount points of those loops (or of the recorded device).
    public var mountedOn: [String] = []
    public var fuseMounted = false
    public var nbdfusePids: [Int32] = []
    public var stableLink: String?
    public var nbdIndex: Int?
    /// Record files still in the run directory.
    public var records: [String] = []

    static let recordFiles = ["device", "pid", "via", "nbd-index", "lock", "control.sock", "nbd.sock", "nbdfuse.log"]

    /// A refused attach leaves its lock and logs; a daemon that ran leaves
    /// pid, device and sockets.
    public var isEmpty: Bool {
        loops.isEmpty && !fuseMounted && nbdfusePids.isEmpty && stableLink == nil && nbdIndex == nil
            && records.allSatisfy { $0 == "lock" || $0 == "nbdfuse.log" }
    }

    /// Whether a daemon holds RUN/NAME/lock (it takes it for its lifetime).
    public static func daemonAlive(dir: String) -> Bool {
        let fd = open(dir + "/lock", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        if flock(fd, LOCK_SH | LOCK_NB) == 0 { flock(fd, LOCK_UN); return false }
        return errno == EWOULDBLOCK
    }

    /// What a dead HotCore daemon left in `dir`; nil if its daemon lives, it
    /// is a dm daemon's, or nothing is left.
    public static func inspect(dir: String) -> HotCoreLeftovers? {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else { return nil }
        if recordedVia(dir: dir) == .dm { return nil }
        if daemonAlive(dir: dir) { return nil }
        let name = (dir as NSString).lastPathComponent
        var l = HotCoreLeftovers(name: name, dir: dir)
        l.pid = readSmallFile(dir + "/pid").flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        l.device = readSmallFile(dir + "/device")?.trimmingCharacters(in: .whitespacesAndNewlines)
        l.records = recordFiles.filter { exists(dir + "/" + $0) }
        if let s = readSmallFile(dir + "/nbd-index"), let i = Int(s.split(separator: " ").first ?? "") { l.nbdIndex = i }
        let files = Set(fuseFilePaths(dir))
        l.loops = Loop.all().filter { files.contains($0.file) }.map(\.device).sorted()
        let fuseDirs = Set(files.map { ($0 as NSString).deletingLastPathComponent })
        l.fuseMounted = Mounts.all().contains { fuseDirs.contains($0.mountPoint) }
        l.nbdfusePids = nbdfuseProcesses(serving: files)
        for dev in l.loops + (l.device.map { [$0] } ?? []) {
            for m in Mounts.of(device: dev) where !l.mountedOn.contains(m.mountPoint) { l.mountedOn.append(m.mountPoint) }
        }
        let link = "/dev/hotimage/" + name
        if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: link),
           target == l.device || l.loops.contains(target) || access(target, F_OK) != 0 {
            l.stableLink = link
        }
        // A failed attach or a finished detach leaves only daemon.log.
        return l.isEmpty ? nil : l
    }

    /// Every dead daemon's leftovers in `runDir`, by name.
    public static func all(runDir: String) -> [HotCoreLeftovers] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? []
        return names.sorted().compactMap { inspect(dir: runDir + "/" + $0) }
    }

    /// One line per leftover, for `status` and `detach`.
    public var lines: [String] {
        var out: [String] = []
        if !records.isEmpty { out.append("run directory \(dir) (\(records.joined(separator: ", ")))") }
        for l in loops { out.append("loop device \(l) over \(dir)/fuse/disk" + (mountedOn.isEmpty ? "" : ", mounted on \(mountedOn.joined(separator: ", "))")) }
        if loops.isEmpty && !mountedOn.isEmpty { out.append("\(device ?? "the protected device") mounted on \(mountedOn.joined(separator: ", "))") }
        if fuseMounted { out.append("FUSE mount \(dir)/fuse") }
        for p in nbdfusePids { out.append("nbdfuse process \(p)") }
        if let i = nbdIndex { out.append("/dev/nbd\(i) (kept for 'attach --reconnect')") }
        if let s = stableLink { out.append("link \(s)") }
        return out
    }

    /// Removes everything; returns what is left (empty: all gone), each
    /// with the command that removes it. `say` reports each action.
    public func clean(say: (String) -> Void) -> [String] {
        if !mountedOn.isEmpty {
            let mps = mountedOn.joined(separator: " ")
            return ["\(device ?? loops.first ?? "the protected device") is mounted on \(mountedOn.joined(separator: ", ")): "
                    + "unmount it first ('umount \(mps)'; if that hangs, 'umount -l \(mps)'), then run 'hotimage detach \(name)' again"]
        }
        var left: [String] = []
        if let i = nbdIndex, let be = KernelNBD.backend(index: i), be.hasPrefix("hotimage:\(name):") {
            do { try KernelNBD.disconnect(index: i); say("disconnected /dev/nbd\(i)") } catch {
                left.append("/dev/nbd\(i): \(error) (try 'nbd-client -d /dev/nbd\(i)')")
            }
        }
        // 1. The loop over the nbdfuse file: LOOP_CLR_FD, then wait until
        // sysfs shows it unbound (autoclear finishes at the last close).
        for l in loops {
            _ = try? Loop.detach(l)
            let sys = "/sys/block/\((l as NSString).lastPathComponent)/loop/backing_file"
            var gone = false
            for _ in 0..<100 {
                if access(sys, F_OK) != 0 { gone = true; break }
                usleep(50_000)
            }
            if gone { say("detached \(l)") } else {
                let openers = DeviceUsers.scan(path: l)?.processIDs ?? []
                left.append("\(l) is still bound to \(dir)/fuse/disk" + (openers.isEmpty ? "" : " (open by pid \(openers.map(String.init).joined(separator: ", ")))")
                            + ": close it, then 'losetup -d \(l)'")
            }
        }
        // 2. nbdfuse (alive if only the daemon died): unmount its FUSE
        // mount, lazily if the normal unmount fails, then make sure it exits.
        for fuseDir in Set(HotCoreLeftovers.fuseFilePaths(dir).map { ($0 as NSString).deletingLastPathComponent }).sorted() {
            guard Mounts.all().contains(where: { $0.mountPoint == fuseDir }) else { continue }
            if let fm = FuseFrontend.which("fusermount3") ?? FuseFrontend.which("fusermount"),
               let r = try? ProcessControl.run([fm, "-u", fuseDir]), r.status == 0 {
                say("unmounted \(fuseDir)")
            } else if umount2(fuseDir, Int32(MNT_DETACH)) == 0 {
                say("unmounted \(fuseDir) (lazily)")
            }
            if Mounts.all().contains(where: { $0.mountPoint == fuseDir }) {
                left.append("FUSE mount \(fuseDir): 'umount -l \(fuseDir)'")
            }
        }
        for p in nbdfusePids {
            kill(p, SIGTERM)
            var gone = false
            for i in 0..<60 {
                // Gone, or a zombie its new parent has not reaped yet.
                if kill(p, 0) != 0 || ProcStat.isZombie(pid: p) { gone = true; break }
                if i == 40 { kill(p, SIGKILL) }
                usleep(50_000)
            }
            if gone { say("stopped nbdfuse (pid \(p))") } else { left.append("nbdfuse pid \(p) does not exit: 'kill -9 \(p)'") }
        }
        if let s = stableLink { unlink(s); rmdir("/dev/hotimage") }
        guard left.isEmpty else { return left }
        // Records last: while anything is left they let detach run again.
        for f in HotCoreLeftovers.recordFiles { unlink(dir + "/" + f) }
        unlink(dir + "/daemon.log")
        rmdir(dir + "/fuse")
        rmdir(dir)
        return []
    }

    static func exists(_ p: String) -> Bool {
        var st = stat()
        return lstat(p, &st) == 0
    }

    /// RUN/NAME/fuse/disk as given and as the kernel spells it (canonical).
    static func fuseFilePaths(_ dir: String) -> [String] {
        var out = [dir + "/fuse/disk"]
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX))
        if realpath(dir, &buf) != nil {
            let r = String(cString: buf) + "/fuse/disk"
            if r != out[0] { out.append(r) }
        }
        return out
    }

    /// nbdfuse processes whose command line names one of `files`.
    static func nbdfuseProcesses(serving files: Set<String>) -> [Int32] {
        var out: [Int32] = []
        for e in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(e), let raw = readSmallFile("/proc/\(e)/cmdline") else { continue }
            let argv = raw.split(separator: "\0").map(String.init)
            guard let a0 = argv.first, (a0 as NSString).lastPathComponent == "nbdfuse" else { continue }
            if argv.contains(where: { files.contains($0) }) { out.append(pid) }
        }
        return out.sorted()
    }
}
