// What a HotCore daemon (--via fuse or --via nbd) killed with SIGKILL leaves
// behind, found by its own records only, and how `detach` removes it. Reached
// through Leftovers (Leftovers.swift), the one entry point for all frontends.
//
// Both frontends (the daemon's records):
//   RUN/NAME/{pid,lock,device,control.sock,nbd.sock}   records (lock not held)
//   /dev/hotimage/NAME                                  link to the protected device
//   mounts of the protected device                      (detach refuses while mounted)
// The fuse frontend:
//   /dev/loopN  backing_file = RUN/NAME/fuse/disk       (losetup -a shows it)
//   RUN/NAME/fuse                                      FUSE mount (dead or alive)
//   nbdfuse ... RUN/NAME/fuse/disk --unix ...           if only the daemon died
// The nbd frontend:
//   /dev/nbdN  (RUN/NAME/nbd-index; backend "hotimage:NAME:...")  kept for --reconnect
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

public struct HotCoreLeftovers: Sendable, Codable, Equatable {
    // Both frontends.
    public var name: String
    public var dir: String
    public var pid: Int32?
    public var device: String?
    // The fuse frontend.
    /// Loop devices over RUN/NAME/fuse/disk.
    public var loops: [String] = []
    /// Mount points of those loops (or of the recorded device).
    public var mountedOn: [String] = []
    public var fuseMounted = false
    public var nbdfusePids: [Int32] = []
    // Both.
    public var stableLink: String?
    // The nbd frontend.
    public var nbdIndex: Int?
    // Both.
    /// Record files still in the run directory.
    public var records: [String] = []

    public init(name: String, dir: String) {
        self.name = name
        self.dir = dir
    }

    static let recordFiles = ["device", "pid", "via", "nbd-index", "lock", "control.sock", "nbd.sock", "nbdfuse.log"]

    /// The frontend the dead daemon presented its device with, from its records.
    public var frontend: SessionVia {
        nbdIndex != nil || (device?.hasPrefix("/dev/nbd") ?? false) ? .nbd : .fuse
    }

    /// A refused attach leaves its lock and logs; a daemon that ran leaves
    /// pid, device and sockets.
    public var isEmpty: Bool {
        fuseIsEmpty && nbdIndex == nil && stableLink == nil
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
        var l = readRecords(dir: dir)
        l.findFuse()
        l.findMounts()
        l.findLink()
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
        out += fuseLines
        if loops.isEmpty && !mountedOn.isEmpty { out.append("\(device ?? "the protected device") mounted on \(mountedOn.joined(separator: ", "))") }
        out += nbdLines
        if let s = stableLink { out.append("link \(s)") }
        return out
    }

    /// Why `clean` does nothing yet (the protected device is mounted), with
    /// what to run; nil when it can go ahead.
    public var refusal: String? {
        guard !mountedOn.isEmpty else { return nil }
        let mps = mountedOn.joined(separator: " ")
        return "\(device ?? loops.first ?? "the protected device") is mounted on \(mountedOn.joined(separator: ", ")): "
            + "unmount it first ('umount \(mps)'; if that hangs, 'umount -l \(mps)'), then run 'hotimage detach \(name)' again"
    }

    /// Removes everything; returns what is left (empty: all gone), each
    /// with the command that removes it. `say` reports each action.
    public func clean(say: (String) -> Void) -> [String] {
        if let r = refusal { return [r] }
        var left: [String] = []
        left += cleanNBD(say: say)
        left += cleanFuse(say: say)
        if let s = stableLink { unlink(s); rmdir("/dev/hotimage") }
        guard left.isEmpty else { return left }
        // Records last: while anything is left they let detach run again.
        for f in HotCoreLeftovers.recordFiles { unlink(dir + "/" + f) }
        unlink(dir + "/daemon.log")
        rmdir(dir + "/fuse")
        rmdir(dir)
        return []
    }
}

// MARK: - Both frontends: records, mounts, the stable link

extension HotCoreLeftovers {
    /// The records in `dir` (no kernel state): pid, device, nbd-index and
    /// which record files are there.
    static func readRecords(dir: String) -> HotCoreLeftovers {
        var l = HotCoreLeftovers(name: (dir as NSString).lastPathComponent, dir: dir)
        l.pid = parsePid(readSmallFile(dir + "/pid"))
        l.device = readSmallFile(dir + "/device")?.trimmingCharacters(in: .whitespacesAndNewlines)
        l.records = recordFiles.filter { exists(dir + "/" + $0) }
        l.nbdIndex = parseNBDIndex(readSmallFile(dir + "/nbd-index"))
        return l
    }

    /// RUN/NAME/pid: the daemon's pid and a newline.
    static func parsePid(_ text: String?) -> Int32? {
        text.flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// RUN/NAME/nbd-index: "N ..." (the index first).
    static func parseNBDIndex(_ text: String?) -> Int? {
        guard let s = text, let first = s.split(whereSeparator: { $0 == " " || $0 == "\n" }).first else { return nil }
        return Int(first)
    }

    /// Mount points of the loops over the FUSE file or of the recorded device.
    mutating func findMounts() {
        for dev in loops + (device.map { [$0] } ?? []) {
            for m in Mounts.of(device: dev) where !mountedOn.contains(m.mountPoint) { mountedOn.append(m.mountPoint) }
        }
    }

    /// /dev/hotimage/NAME if it points at this daemon's device (or nowhere).
    mutating func findLink() {
        let link = "/dev/hotimage/" + name
        if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: link),
           target == device || loops.contains(target) || access(target, F_OK) != 0 {
            stableLink = link
        }
    }

    static func exists(_ p: String) -> Bool {
        var st = stat()
        return lstat(p, &st) == 0
    }
}

// MARK: - The fuse frontend: loop over the nbdfuse file, FUSE mount, nbdfuse

extension HotCoreLeftovers {
    var fuseIsEmpty: Bool { loops.isEmpty && !fuseMounted && nbdfusePids.isEmpty }

    mutating func findFuse() {
        let files = Set(HotCoreLeftovers.fuseFilePaths(dir))
        loops = Loop.all().filter { files.contains($0.file) }.map(\.device).sorted()
        let fuseDirs = Set(files.map { ($0 as NSString).deletingLastPathComponent })
        fuseMounted = Mounts.all().contains { fuseDirs.contains($0.mountPoint) }
        nbdfusePids = HotCoreLeftovers.nbdfuseProcesses(serving: files)
    }

    var fuseLines: [String] {
        var out: [String] = []
        for l in loops { out.append("loop device \(l) over \(dir)/fuse/disk" + (mountedOn.isEmpty ? "" : ", mounted on \(mountedOn.joined(separator: ", "))")) }
        if fuseMounted { out.append("FUSE mount \(dir)/fuse") }
        for p in nbdfusePids { out.append("nbdfuse process \(p)") }
        return out
    }

    /// The loop (LOOP_CLR_FD, then wait until sysfs shows it unbound:
    /// autoclear finishes at the last close), the FUSE mount (lazily if the
    /// normal unmount fails), nbdfuse (alive if only the daemon died).
    func cleanFuse(say: (String) -> Void) -> [String] {
        var left: [String] = []
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
        return left
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
            if isNBDFuse(argv: raw.split(separator: "\0").map(String.init), serving: files) { out.append(pid) }
        }
        return out.sorted()
    }

    /// Whether a command line is nbdfuse serving one of `files`.
    static func isNBDFuse(argv: [String], serving files: Set<String>) -> Bool {
        guard let a0 = argv.first, (a0 as NSString).lastPathComponent == "nbdfuse" else { return false }
        return argv.contains(where: { files.contains($0) })
    }
}

// MARK: - The nbd frontend: /dev/nbdN

extension HotCoreLeftovers {
    var nbdLines: [String] {
        nbdIndex.map { ["/dev/nbd\($0) (kept for 'attach --reconnect')"] } ?? []
    }

    /// Disconnects /dev/nbdN if it still serves this attachment.
    func cleanNBD(say: (String) -> Void) -> [String] {
        guard let i = nbdIndex, let be = KernelNBD.backend(index: i), be.hasPrefix("hotimage:\(name):") else { return [] }
        do { try KernelNBD.disconnect(index: i); say("disconnected /dev/nbd\(i)") } catch {
            return ["/dev/nbd\(i): \(error) (try 'nbd-client -d /dev/nbd\(i)')"]
        }
        return []
    }
}
