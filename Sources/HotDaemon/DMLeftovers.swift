// What a dm-snapshot daemon that was killed (kill -9, OOM, a crash) left
// behind, and how to remove it. Found by name and owner only, so it touches
// only what hotimage created:
//
//   - dm devices named hotimage-NAME-{real,cow,snap} whose UUID says so
//     (DeviceMapper+Table.swift) and whose owner process (pid + start time)
//     no longer runs. A live daemon's devices are never touched.
//   - the origin of such a stack: the device whose table is exactly
//     "snapshot-origin <REAL>"; it gets REAL's table back (REAL holds the
//     origin's original table), so it maps its data directly again. Its
//     filesystem is thawed (the daemon may have died while it was frozen).
//   - loop devices named in the dead COW device's table whose backing file
//     is an hb_NN.tmp, and those files.
//   - run directories of dead dm daemons (marked by RUN/NAME/via = dm, lock
//     not held): the loops and hb files listed in RUN/NAME/loops (a daemon
//     killed between creating a loop and the COW device), then the files.
//   - the linear device hotimage-NAME of `attach --via dm` whose daemon is
//     dead (RUN/NAME/lock not held); removed only by `detach NAME`, and only
//     when nothing has it mounted or open.
//
// `find`/`all` only read (`status` lists what they find). `clean` removes
// one name's leftovers (`detach NAME`, through Leftovers); the static
// `clean(runDir:)` removes every dead session (not linear devices) and is
// what each new dm daemon runs when it starts.
import Foundation
import HotControl
import HotOS
#if canImport(Glibc)
import Glibc
#endif

public struct DMLeftovers: Sendable, Codable, Equatable {
    public var name: String
    /// Dead sessions of this name (normally one).
    public var sessions: [Session] = []
    /// RUN/NAME of a dead dm daemon.
    public var runDirectory: RunDirectory?
    /// The linear device of `attach --via dm` whose daemon is dead.
    public var linear: Linear?

    public init(name: String) { self.name = name }

    public struct LoopFile: Sendable, Codable, Equatable {
        public var device: String
        public var file: String
        public init(device: String, file: String) { self.device = device; self.file = file }
    }

    /// The dm devices of one dead session daemon.
    public struct Session: Sendable, Codable, Equatable {
        public var pid: Int32
        public var startTime: UInt64
        /// Device names by role ("snap", "real", "cow").
        public var devices: [String: String]
        /// major:minor of the REAL device (what an origin maps through).
        public var realDevNumber: String?
        /// Devices whose table is "snapshot-origin REAL" (they get REAL's table back).
        public var origins: [String] = []
        /// Loops over hb files in the COW device's table.
        public var loops: [LoopFile] = []

        public init(pid: Int32, startTime: UInt64, devices: [String: String]) {
            self.pid = pid
            self.startTime = startTime
            self.devices = devices
        }

        /// In the order they are removed: the snapshot, REAL, the COW device.
        public var removalOrder: [String] { [DMRole.snap, .real, .cow].compactMap { devices[$0.rawValue] } }
    }

    /// The run directory of a dead dm daemon.
    public struct RunDirectory: Sendable, Codable, Equatable {
        public var dir: String
        public var pid: Int32?
        public var records: [String] = []
        /// RUN/NAME/loops entries whose loop is still bound to its hb file.
        public var loops: [LoopFile] = []
        /// Recorded hb files that still exist.
        public var hbFiles: [String] = []
    }

    /// `attach --via dm`'s linear device hotimage-NAME.
    public struct Linear: Sendable, Codable, Equatable {
        public var device: String
        public var mountedOn: [String] = []
        public var openCount: Int32 = 0
    }

    static let runRecords = ["control.sock", "device", "pid", "via", "loops", "lock"]

    public var isEmpty: Bool { sessions.isEmpty && runDirectory == nil && linear == nil }

    /// The daemon's pid, from its session devices or its records.
    public var pid: Int32? { sessions.first?.pid ?? runDirectory?.pid }

    /// Mount points `detach` waits for (the linear device's).
    public var mountedOn: [String] { linear?.mountedOn ?? [] }
}

// MARK: - Finding (reads only)

extension DMLeftovers {
    /// What a dead dm daemon named `name` left; nil if nothing (or its daemon lives).
    public static func find(name: String, runDir: String) -> DMLeftovers? {
        var l = DMLeftovers(name: name)
        l.sessions = findSessions().filter { $0.name == name }.map(\.session)
        l.runDirectory = findRunDirectory(runDir + "/" + name)
        l.linear = findLinear(name: name, runDir: runDir)
        return l.isEmpty ? nil : l
    }

    /// Every dead dm daemon's leftovers, by name. `linear`: include
    /// orphaned linear devices of `attach --via dm`.
    public static func all(runDir: String?, linear: Bool = true) -> [DMLeftovers] {
        var by: [String: DMLeftovers] = [:]
        for s in findSessions() { by[s.name, default: DMLeftovers(name: s.name)].sessions.append(s.session) }
        if let runDir {
            for n in directoryNames(runDir) {
                if let r = findRunDirectory(runDir + "/" + n) { by[n, default: DMLeftovers(name: n)].runDirectory = r }
            }
            if linear {
                for n in linearNames() {
                    if let a = findLinear(name: n, runDir: runDir) { by[n, default: DMLeftovers(name: n)].linear = a }
                }
            }
        }
        return by.keys.sorted().map { by[$0]! }
    }

    /// Dead sessions' devices, grouped by owner (root only; else none).
    static func findSessions() -> [(name: String, session: Session)] {
        guard getuid() == 0, DeviceMapper.available, let list = try? DeviceMapper.list() else { return [] }
        var devices: [(name: String, uuid: String)] = []
        var infos: [String: DMInfo] = [:]
        for d in list where d.name.hasPrefix(DMOwner.namePrefix) {
            guard let info = try? DeviceMapper.info(name: d.name) else { continue }
            devices.append((d.name, info.uuid))
            infos[d.name] = info
        }
        var out = staleSessions(devices, isAlive: { ProcStat.isAlive(pid: $0, startTime: $1) })
        let tables: [(name: String, table: [DMTarget])] = list.compactMap { d in
            (try? DeviceMapper.table(name: d.name)).map { (d.name, $0) }
        }
        for i in out.indices {
            if let real = out[i].session.devices[DMRole.real.rawValue], let info = infos[real] {
                out[i].session.realDevNumber = info.devNumber
                out[i].session.origins = origins(over: info.devNumber, tables: tables.filter { $0.name != real })
            }
            if let cow = out[i].session.devices[DMRole.cow.rawValue] {
                for mm in DMTable.devices(tables.first(where: { $0.name == cow })?.table ?? []) {
                    let (ma, mi) = (devMajor(mm), devMinor(mm))
                    if let f = Loop.backingFile(major: ma, minor: mi), Loop.isHBFileName(f),
                       let dev = Loop.devicePath(major: ma, minor: mi) {
                        out[i].session.loops.append(LoopFile(device: dev, file: f))
                    }
                }
            }
        }
        return out
    }

    /// Groups hotimage's session devices (name, UUID) by owner and keeps
    /// those whose owner no longer runs; sorted by owner name, pid.
    static func staleSessions(_ devices: [(name: String, uuid: String)],
                              isAlive: (Int32, UInt64) -> Bool) -> [(name: String, session: Session)] {
        var groups: [String: (name: String, session: Session)] = [:]
        for d in devices {
            guard let o = DMOwner(uuid: d.uuid), o.role.isSession, o.matches(deviceName: d.name),
                  let pid = o.pid, let st = o.startTime, !isAlive(pid, st) else { continue }
            let key = "\(o.name)\u{0}\(pid)-\(st)"
            groups[key, default: (o.name, Session(pid: pid, startTime: st, devices: [:]))].session.devices[o.role.rawValue] = d.name
        }
        return groups.keys.sorted().map { groups[$0]! }
    }

    /// Devices whose table is exactly "snapshot-origin REAL".
    static func origins(over realDevNumber: String, tables: [(name: String, table: [DMTarget])]) -> [String] {
        tables.filter { t in
            t.table.count == 1 && t.table[0].type == "snapshot-origin" && t.table[0].params == realDevNumber
        }.map(\.name).sorted()
    }

    /// RUN/NAME/loops: "LOOPDEV HBFILE" per line; other lines are ignored.
    static func parseLoopsRecord(_ text: String) -> [LoopFile] {
        text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ", maxSplits: 1).map(String.init)
            guard f.count == 2, Loop.isHBFileName(f[1]) else { return nil }
            return LoopFile(device: f[0], file: f[1])
        }
    }

    /// RUN/NAME if a dm daemon that is dead left it.
    static func findRunDirectory(_ dir: String) -> RunDirectory? {
        guard recordedVia(dir: dir) == .dm, HotCoreLeftovers.exists(dir + "/lock"),
              !HotCoreLeftovers.daemonAlive(dir: dir) else { return nil }
        var r = RunDirectory(dir: dir)
        r.pid = HotCoreLeftovers.parsePid(readSmallFile(dir + "/pid"))
        r.records = runRecords.filter { HotCoreLeftovers.exists(dir + "/" + $0) }
        for lf in parseLoopsRecord(readSmallFile(dir + "/loops") ?? "") {
            if let (ma, mi) = try? DeviceMapper.deviceNumber(lf.device), Loop.backingFile(major: ma, minor: mi) == lf.file {
                r.loops.append(lf)
            }
            if HotCoreLeftovers.exists(lf.file) { r.hbFiles.append(lf.file) }
        }
        return r
    }

    /// hotimage-NAME made by `attach --via dm` (UUID HOTIMAGE-attach-NAME)
    /// whose daemon does not hold RUN/NAME/lock (root only).
    static func findLinear(name: String, runDir: String) -> Linear? {
        guard getuid() == 0, DeviceMapper.available else { return nil }
        let dmName = DMOwner.deviceName(name, .attach)
        guard let info = try? DeviceMapper.info(name: dmName), info.uuid == DMOwner(role: .attach, name: name).uuid,
              !HotCoreLeftovers.daemonAlive(dir: runDir + "/" + name) else { return nil }
        let path = DeviceMapper.nodePath(dmName)
        return Linear(device: path, mountedOn: Mounts.of(device: path).map(\.mountPoint), openCount: info.openCount)
    }

    /// Names of `attach --via dm` linear devices (hotimage-NAME, attach UUID).
    static func linearNames() -> [String] {
        guard getuid() == 0, DeviceMapper.available, let list = try? DeviceMapper.list() else { return [] }
        return list.compactMap { d in
            guard d.name.hasPrefix(DMOwner.namePrefix), let info = try? DeviceMapper.info(name: d.name),
                  let o = DMOwner(uuid: info.uuid), o.role == .attach, o.matches(deviceName: d.name) else { return nil }
            return o.name
        }
    }

    static func directoryNames(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
    }

    /// One line per leftover, for `status` and `detach`.
    public var lines: [String] {
        var out: [String] = []
        var loopsSaid = Set<String>()
        for s in sessions {
            out.append("dm-snapshot session devices \(s.removalOrder.joined(separator: ", ")) (daemon pid \(s.pid))")
            for o in s.origins {
                out.append("\(o) maps through \(s.devices[DMRole.real.rawValue] ?? "?") (snapshot-origin; it gets its own table back)")
            }
            for l in s.loops where loopsSaid.insert(l.device).inserted { out.append("loop device \(l.device) over \(l.file)") }
        }
        if let r = runDirectory {
            out.append("run directory \(r.dir) (\(r.records.joined(separator: ", ")))")
            for l in r.loops where loopsSaid.insert(l.device).inserted { out.append("loop device \(l.device) over \(l.file)") }
        }
        let files = Set(sessions.flatMap { $0.loops.map(\.file) } + (runDirectory?.hbFiles ?? []))
        for f in files.sorted() where HotCoreLeftovers.exists(f) { out.append("hb file \(f)") }
        if let a = linear {
            out.append("linear device \(a.device) (attach --via dm)" + (a.mountedOn.isEmpty ? "" : ", mounted on \(a.mountedOn.joined(separator: ", "))"))
        }
        return out
    }
}

// MARK: - Cleaning

extension DMLeftovers {
    /// Cleans what dead dm daemons left (sessions and run directories, not
    /// linear devices); returns one line per action or failure. Run by
    /// every dm daemon when it starts.
    @discardableResult
    public static func clean(runDir: String?) -> [String] {
        var out: [String] = []
        for l in all(runDir: runDir, linear: false) {
            var said: [String] = []
            let left = l.clean(keepLog: true, say: { said.append($0) })
            out += said + left
        }
        return out
    }

    /// Removes this name's leftovers; returns what is left (empty: all
    /// gone), each with what to do about it. `say` reports each action.
    public func clean(say: (String) -> Void) -> [String] { clean(keepLog: false, say: say) }

    /// `keepLog`: leave RUN/NAME/daemon.log (a daemon starting under this
    /// name may already be writing it).
    func clean(keepLog: Bool, say: (String) -> Void) -> [String] {
        var left: [String] = []
        for s in sessions { left += cleanSession(s, say: say) }
        if left.isEmpty, let r = runDirectory { left += cleanRunDirectory(r, keepLog: keepLog, say: say) }
        if left.isEmpty, let a = linear { left += cleanLinear(a, say: say) }
        return left
    }

    func cleanSession(_ s: Session, say: (String) -> Void) -> [String] {
        say("cleaning the leftovers of the dead dm-snapshot session '\(name)' (daemon pid \(s.pid))")
        var left: [String] = []
        if let real = s.devices[DMRole.real.rawValue], let num = s.realDevNumber {
            if !DMLeftovers.restoreOrigins(real: real, devNumber: num, log: { say($0) }, failed: { left.append($0) }) {
                left.append("leaving \(s.removalOrder.joined(separator: ", ")) in place: an origin still maps through them")
                return left
            }
        }
        for dev in s.removalOrder {
            do {
                try DMSnapshotStack.removeBusyTolerant(dev, sectors: 8)
                say("  removed \(dev)")
            } catch { left.append("removing \(dev): \(error)") }
        }
        for lf in s.loops {
            do { try Loop.detach(lf.device); say("  detached \(lf.device) (\(lf.file))") } catch { left.append("detaching \(lf.device): \(error) ('losetup -d \(lf.device)')") }
            if unlink(lf.file) == 0 { say("  deleted \(lf.file)") }
        }
        return left
    }

    /// Gives every device whose table is "snapshot-origin REAL" REAL's table
    /// back. Returns false if one could not be restored.
    static func restoreOrigins(real: String, devNumber: String, log: (String) -> Void, failed: (String) -> Void) -> Bool {
        guard let realTable = try? DeviceMapper.table(name: real), !realTable.isEmpty,
              let all = try? DeviceMapper.list() else { return false }
        let tables: [(name: String, table: [DMTarget])] = all.compactMap { d in
            d.name == real ? nil : (try? DeviceMapper.table(name: d.name)).map { (d.name, $0) }
        }
        var ok = true
        for o in origins(over: devNumber, tables: tables) {
            do {
                try DeviceMapper.suspend(name: o, lockfs: false)
                try DeviceMapper.reload(name: o, table: realTable)
                try DeviceMapper.resume(name: o)
                log("  restored \(o) to its own table (\(realTable.map(\.description).joined(separator: "; ")))")
                for mnt in Mounts.of(device: DeviceMapper.nodePath(o))
                where FrozenFilesystem.thawIfFrozen(mountPoint: mnt.mountPoint) {
                    log("  thawed \(mnt.mountPoint)")
                }
            } catch {
                failed("restoring \(o): \(error)")
                ok = false
            }
        }
        return ok
    }

    /// The recorded loops and hb files, then the records and the directory.
    /// Holds the lock meanwhile, so a daemon starting under the same name waits.
    func cleanRunDirectory(_ r: RunDirectory, keepLog: Bool, say: (String) -> Void) -> [String] {
        let fd = open(r.dir + "/lock", O_RDWR | O_CLOEXEC)
        if fd < 0 { return [] }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { return [] }   // its daemon lives (again)
        say("removing the run directory of the dead dm daemon '\(name)'")
        for lf in DMLeftovers.parseLoopsRecord(readSmallFile(r.dir + "/loops") ?? "") {
            if let (ma, mi) = try? DeviceMapper.deviceNumber(lf.device), Loop.backingFile(major: ma, minor: mi) == lf.file {
                // Only if no dm device still uses it (the session pass handles those).
                if (try? Loop.detach(lf.device)) != nil { say("  detached \(lf.device) (\(lf.file))") }
            }
            if unlink(lf.file) == 0 { say("  deleted \(lf.file)") }
        }
        for f in DMLeftovers.runRecords { unlink(r.dir + "/" + f) }
        if !keepLog { unlink(r.dir + "/daemon.log") }
        rmdir(r.dir)
        return []
    }

    /// Removes the linear device unless it is mounted or open.
    func cleanLinear(_ a: Linear, say: (String) -> Void) -> [String] {
        let dmName = DMOwner.deviceName(name, .attach)
        if let m = Mounts.of(device: a.device).first {
            return ["\(a.device) is mounted on \(m.mountPoint): unmount it first, then run 'hotimage detach \(name)' again"]
        }
        if let info = try? DeviceMapper.info(name: dmName), info.openCount > 0 {
            return ["\(a.device) is open by another program: close it, then run 'hotimage detach \(name)' again"]
        }
        do { try DeviceMapper.remove(name: dmName) } catch { return ["removing \(a.device): \(error)"] }
        say("removed \(dmName) (the linear device of 'attach --via dm')")
        return []
    }
}
