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
//            on any of them: sysfs holders (dm, md, bcache), recursively, and
//            loop devices whose backing file is one of them
//   mounts   /proc/self/mountinfo entries of a family member
//   holders  stacked devices (they may be written through)
//   open     /proc/PID/fd entries that are a family member's device node
//
// Everything is read from sysfs and procfs below the given roots, so the
// walk runs in unit tests over a fake tree.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim
import Foundation

public struct BlockDeviceID: Hashable, Sendable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32
    public init(major: UInt32, minor: UInt32) { self.major = major; self.minor = minor }
    public var description: String { "\(major):\(minor)" }

    /// "8:1" as sysfs writes it.
    public init?(sysfs s: String) {
        let p = s.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":")
        guard p.count == 2, let a = UInt32(p[0]), let b = UInt32(p[1]) else { return nil }
        self.init(major: a, minor: b)
    }

    /// The block device node at `path` (following links), or nil.
    public static func ofNode(_ path: String) -> BlockDeviceID? {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        return BlockDeviceID(major: UInt32(hs_major(UInt64(st.st_rdev))), minor: UInt32(hs_minor(UInt64(st.st_rdev))))
    }
}

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
    /// Every family member by kernel name (the device first).
    public var family: [(name: String, id: BlockDeviceID)]
    public var users: [DeviceUser]
    public var processes: [DeviceUser] { users.filter { if case .process = $0 { return true }; return false } }
}

public enum DeviceUsers {
    /// The usage of the block device `id`: its family and its users.
    /// `ignoring` are pids not counted (this process). `nodeID` maps a path
    /// (a loop's backing file, a /proc/PID/fd entry) to the block device it
    /// is, if any.
    public static func scan(_ id: BlockDeviceID, sysRoot: String = "/sys", procRoot: String = "/proc",
                            mounts: [MountEntry]? = nil, ignoring: Set<Int32> = [getpid()],
                            nodeID: (String) -> BlockDeviceID? = BlockDeviceID.ofNode) -> DeviceUsage {
        let blocks = sysRoot + "/class/block"
        let names = listDir(blocks).sorted()
        var byID: [BlockDeviceID: String] = [:]
        for n in names {
            if let d = readSmallFile(blocks + "/" + n + "/dev").flatMap(BlockDeviceID.init(sysfs:)) { byID[d] = n }
        }
        var users: [DeviceUser] = []
        var family: [(name: String, id: BlockDeviceID)] = []
        var seen = Set<String>()
        var queue: [String] = []
        func add(_ n: String) {
            guard !seen.contains(n), let d = readSmallFile(blocks + "/" + n + "/dev").flatMap(BlockDeviceID.init(sysfs:)) else { return }
            seen.insert(n)
            family.append((n, d))
            queue.append(n)
        }
        guard let first = byID[id] else { return DeviceUsage(family: [], users: []) }
        add(first)
        // Partitions: entries of the disk's own directory that are partitions.
        for p in listDir(blocks + "/" + first).sorted() where access(blocks + "/" + first + "/" + p + "/partition", F_OK) == 0 {
            add(p)
        }
        // Loop devices and their backing files, read once.
        var loops: [(name: String, backing: BlockDeviceID)] = []
        for n in names where n.hasPrefix("loop") {
            guard let f = readSmallFile(blocks + "/" + n + "/loop/backing_file")?.trimmingCharacters(in: .whitespacesAndNewlines),
                  !f.isEmpty, let b = nodeID(f) else { continue }
            loops.append((n, b))
        }
        var i = 0
        while i < queue.count {
            let n = queue[i]; i += 1
            let nid = family.first { $0.name == n }!.id
            for h in listDir(blocks + "/" + n + "/holders").sorted() {
                users.append(.holder(name: n, holder: h))
                add(h)
            }
            for l in loops where l.backing == nid {
                users.append(.holder(name: n, holder: l.name))
                add(l.name)
            }
        }
        let ids = Dictionary(family.map { ($0.id, $0.name) }, uniquingKeysWith: { a, _ in a })
        for m in mounts ?? Mounts.all() {
            if let n = ids[BlockDeviceID(major: m.major, minor: m.minor)] {
                users.append(.mount(name: n, mountPoint: m.mountPoint, readOnly: m.readOnly))
            }
        }
        for p in listDir(procRoot).compactMap(Int32.init).sorted() where !ignoring.contains(p) {
            let fdDir = "\(procRoot)/\(p)/fd"
            var opened = Set<String>()
            for fd in listDir(fdDir) {
                guard let d = nodeID(fdDir + "/" + fd), let n = ids[d], !opened.contains(n) else { continue }
                opened.insert(n)
                let comm = readSmallFile("\(procRoot)/\(p)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
                users.append(.process(pid: p, command: comm, name: n))
            }
        }
        return DeviceUsage(family: family, users: users)
    }

    /// The usage of the block device node at `path`; nil if it is not one.
    public static func scan(path: String) -> DeviceUsage? {
        guard let id = BlockDeviceID.ofNode(path) else { return nil }
        return scan(id)
    }

    static func listDir(_ path: String) -> [String] {
        guard let d = opendir(path) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }
}
