// Who uses a block device: the quiet check behind offline backups.
//
// An offline backup reads a device directly, so it is a point in time only
// if nothing changes the device while it is read. O_EXCL refuses mounts and
// exclusive openers (device-mapper, md, another hotimage), but a program
// that opened the device plainly (a database on a raw device, a VM's disk)
// keeps writing behind it. So a device is in use when any of its family is
// mounted, held or open:
//
//   family   the device, its partitions (a whole disk), and everything stacked
//            on any of them (BlockStack: sysfs holders and slaves of dm, md,
//            bcache, recursively, and loop devices over one of them)
//   mounts   /proc/self/mountinfo entries of a family member
//   holders  stacked devices (they may be written through)
//   open     /proc/PID/fd entries that are a family member's device node
//
// Everything is read from sysfs and procfs below the given roots, so the
// scan runs in unit tests over a fake tree.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim
import Foundation

/// One reason a device is not quiet.
public enum DeviceUser: Equatable, Sendable, CustomStringConvertible {
    /// `name` (a family member) is mounted at `mountPoint`.
    case mount(name: String, mountPoint: String, readOnly: Bool)
    /// `holder` is stacked on `name` (sysfs holders, or a loop over it).
    case holder(name: String, holder: String)
    /// Process `pid` (`command`) has `name` open.
    case process(pid: Int32, command: String, name: String)

    public var description: String {
        switch self {
        case let .mount(n, m, ro): return "/dev/\(n) is mounted \(ro ? "read-only" : "read-write") at \(m)"
        case let .holder(n, h): return "/dev/\(h) is stacked on /dev/\(n)"
        case let .process(p, c, n): return "pid \(p) (\(c)) has /dev/\(n) open"
        }
    }

    public var isReadOnlyMount: Bool {
        if case .mount(_, _, true) = self { return true }
        return false
    }
}

public struct DeviceUsage: Sendable {
    /// Every family member (the device first).
    public var family: [BlockStack.Member]
    public var users: [DeviceUser]
    public var processes: [DeviceUser] { users.filter { if case .process = $0 { return true }; return false } }
    /// Users that may change the device: all but read-only mounts.
    public var active: [DeviceUser] { users.filter { !$0.isReadOnlyMount } }
    /// The pids of `processes`.
    public var processIDs: [Int32] { users.compactMap { if case let .process(p, _, _) = $0 { return p }; return nil } }
}

public enum DeviceUsers {
    /// The usage of the block device `dev`: its family and its users.
    /// `classBlock` is /sys/class/block; `ignoring` are pids not counted
    /// (this process). `nodeDev` maps a path (a loop's backing file, a
    /// /proc/PID/fd entry) to the block device it is, if any.
    public static func scan(_ dev: DevNum, classBlock: String = "/sys/class/block", procRoot: String = "/proc",
                            mounts: [MountEntry]? = nil, ignoring: Set<Int32> = [getpid()],
                            nodeDev: (String) -> DevNum? = { DevNum(blockDevice: $0) }) -> DeviceUsage {
        let family = BlockStack.members(over: [dev], root: classBlock, resolve: nodeDev)
        var users: [DeviceUser] = []
        for m in family {
            switch m.relation {
            case .holder, .loop: users.append(.holder(name: m.on ?? "?", holder: m.name))
            case .base, .partition: break
            }
        }
        let names = Dictionary(family.map { ($0.dev, $0.name) }, uniquingKeysWith: { a, _ in a })
        for m in mounts ?? Mounts.all() {
            if let n = names[DevNum(major: m.major, minor: m.minor)] {
                users.append(.mount(name: n, mountPoint: m.mountPoint, readOnly: m.readOnly))
            }
        }
        for p in BlockStack.listDirectory(procRoot).compactMap(Int32.init).sorted() where !ignoring.contains(p) {
            let fdDir = "\(procRoot)/\(p)/fd"
            var opened = Set<String>()
            for fd in BlockStack.listDirectory(fdDir) {
                guard let d = nodeDev(fdDir + "/" + fd), let n = names[d], !opened.contains(n) else { continue }
                opened.insert(n)
                let comm = readSmallFile("\(procRoot)/\(p)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
                users.append(.process(pid: p, command: comm, name: n))
            }
        }
        return DeviceUsage(family: family, users: users)
    }

    /// The usage of the block device node at `path`; nil if it is not one.
    public static func scan(path: String) -> DeviceUsage? {
        guard let dev = DevNum(blockDevice: path) else { return nil }
        return scan(dev)
    }
}
