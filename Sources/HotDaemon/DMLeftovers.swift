// Cleans up after a dm-snapshot daemon that was killed (kill -9, OOM, a
// crash): run by `hotimage status` and by every new dm daemon. It touches
// only what hotimage created, found by name and owner:
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
import HotControl
import HotOS
#if canImport(Glibc)
import Glibc
#endif

public enum DMLeftovers {
    /// Cleans what dead dm daemons left; returns one line per action.
    @discardableResult
    public static func clean(runDir: String?) -> [String] {
        var out: [String] = []
        if getuid() == 0, DeviceMapper.available {
            do { out += try cleanDevices() } catch { out.append("cleaning dm leftovers: \(error)") }
        }
        if let runDir { out += cleanRunDirs(runDir) }
        return out
    }

    struct Found {
        var name: String
        var info: DMInfo
        var owner: DMOwner
    }

    static func cleanDevices() throws -> [String] {
        var out: [String] = []
        var stale: [String: [DMRole: Found]] = [:]     // key: owner uuid without the role
        for d in try DeviceMapper.list() {
            guard d.name.hasPrefix(DMOwner.namePrefix), let info = try DeviceMapper.info(name: d.name),
                  let o = DMOwner(uuid: info.uuid), o.role.isSession, o.matches(deviceName: d.name),
                  let pid = o.pid, let st = o.startTime, !ProcStat.isAlive(pid: pid, startTime: st) else { continue }
            stale["\(pid)-\(st)-\(o.name)", default: [:]][o.role] = Found(name: d.name, info: info, owner: o)
        }
        for (_, g) in stale.sorted(by: { $0.key < $1.key }) {
            let any = g.values.first!
            out.append("cleaning the leftovers of the dead dm-snapshot session '\(any.owner.name)' (daemon pid \(any.owner.pid ?? 0))")
            var loops: [(String, String)] = []
            if let cow = g[.cow] {
                for mm in DMTable.devices((try? DeviceMapper.table(name: cow.name)) ?? []) {
                    let (ma, mi) = (devMajor(mm), devMinor(mm))
                    if let f = Loop.backingFile(major: ma, minor: mi), Loop.isHBFileName(f),
                       let dev = Loop.devicePath(major: ma, minor: mi) {
                        loops.append((dev, f))
                    }
                }
            }
            var originRestored = true
            if let real = g[.real] {
                originRestored = restoreOrigins(of: real, log: { out.append($0) })
            }
            if !originRestored {
                out.append("  leaving \(g.values.map(\.name).sorted().joined(separator: ", ")) in place: an origin still maps through them")
                continue
            }
            for role in [DMRole.snap, .real, .cow] {
                guard let f = g[role] else { continue }
                do {
                    try DMSnapshotStack.removeBusyTolerant(f.name, sectors: 8)
                    out.append("  removed \(f.name)")
                } catch { out.append("  removing \(f.name): \(error)") }
            }
            for (dev, file) in loops {
                do { try Loop.detach(dev); out.append("  detached \(dev) (\(file))") } catch { out.append("  detaching \(dev): \(error)") }
                if unlink(file) == 0 { out.append("  deleted \(file)") }
            }
        }
        return out
    }

    /// Gives every device whose table is "snapshot-origin REAL" REAL's table
    /// back. Returns false if one could not be restored.
    static func restoreOrigins(of real: Found, log: (String) -> Void) -> Bool {
        guard let realTable = try? DeviceMapper.table(name: real.name), !realTable.isEmpty,
              let all = try? DeviceMapper.list() else { return false }
        var ok = true
        for d in all where d.name != real.name {
            guard let t = try? DeviceMapper.table(name: d.name), t.count == 1, t[0].type == "snapshot-origin",
                  t[0].params == real.info.devNumber else { continue }
            do {
                try DeviceMapper.suspend(name: d.name, lockfs: false)
                try DeviceMapper.reload(name: d.name, table: realTable)
                try DeviceMapper.resume(name: d.name)
                log("  restored \(d.name) to its own table (\(realTable.map(\.description).joined(separator: "; ")))")
                for mnt in Mounts.of(device: DeviceMapper.nodePath(d.name))
                where FrozenFilesystem.thawIfFrozen(mountPoint: mnt.mountPoint) {
                    log("  thawed \(mnt.mountPoint)")
                }
            } catch {
                log("  restoring \(d.name): \(error)")
                ok = false
            }
        }
        return ok
    }

    /// Run directories of dm daemons that died: their recorded loops and hb
    /// files, then the directory.
    static func cleanRunDirs(_ runDir: String) -> [String] {
        var out: [String] = []
        guard let d = opendir(runDir) else { return out }
        var names: [String] = []
        while let e = readdir(d) {
            let n = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if n != "." && n != ".." { names.append(n) }
        }
        closedir(d)
        for n in names.sorted() {
            let dir = runDir + "/" + n
            guard recordedVia(dir: dir) == .dm else { continue }
            let fd = open(dir + "/lock", O_RDWR | O_CLOEXEC)
            if fd < 0 { continue }
            let free = flock(fd, LOCK_EX | LOCK_NB) == 0
            defer { close(fd) }
            guard free else { continue }   // its daemon lives
            out.append("removing the run directory of the dead dm daemon '\(n)'")
            for line in (readSmallFile(dir + "/loops") ?? "").split(separator: "\n") {
                let f = line.split(separator: " ", maxSplits: 1).map(String.init)
                guard f.count == 2, Loop.isHBFileName(f[1]) else { continue }
                if let (ma, mi) = try? DeviceMapper.deviceNumber(f[0]), Loop.backingFile(major: ma, minor: mi) == f[1] {
                    // Only if no dm device still uses it (the device pass handles those).
                    if (try? Loop.detach(f[0])) != nil { out.append("  detached \(f[0]) (\(f[1]))") }
                }
                if unlink(f[1]) == 0 { out.append("  deleted \(f[1])") }
            }
            for f in ["control.sock", "device", "pid", "via", "loops", "lock"] { unlink(dir + "/" + f) }
            rmdir(dir)
        }
        return out
    }
}
