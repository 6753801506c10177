// Which block devices stand on a given device, from sysfs: the device, its
// partitions, everything that lists it (transitively) among its `slaves`
// (dm, md) or that it lists among its `holders`, and loop devices whose
// backing file is one of those devices (loop registers no holder). The
// buffer-directory check uses it: an hb file on any of these would be
// written through (or under) the very device HotCore protects.
//
//   /sys/class/block/NAME/dev                M:m
//   /sys/class/block/NAME/partition          present for a partition; the
//                                            parent is the directory above
//                                            NAME in the link's target
//   /sys/class/block/NAME/holders/*, slaves/*   names of stacked devices
//   /sys/class/block/NAME/loop/backing_file  the loop's backing path
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public struct DevNum: Hashable, Sendable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32
    public init(major: UInt32, minor: UInt32) { self.major = major; self.minor = minor }
    /// The device number of a block device node (st_rdev), nil if `path` is not one.
    public init?(blockDevice path: String) {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        self.init(rawDev: UInt64(st.st_rdev))
    }
    /// The device a file system object lives on (st_dev of an open descriptor).
    public init?(filesystemOf fd: Int32) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        self.init(rawDev: UInt64(st.st_dev))
    }
    public init?(filesystemOf path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        self.init(rawDev: UInt64(st.st_dev))
    }
    init(rawDev: UInt64) { self.init(major: UInt32(hs_major(rawDev)), minor: UInt32(hs_minor(rawDev))) }
    /// Parses "M:m" (a sysfs `dev` file).
    public init?(sysfs s: String) {
        let p = s.split(whereSeparator: { $0 == ":" || $0 == "\n" })
        guard p.count == 2, let a = UInt32(p[0]), let b = UInt32(p[1]) else { return nil }
        self.init(major: a, minor: b)
    }
    public var description: String { "\(major):\(minor)" }
}

public enum BlockStack {
    /// How a member of a stack came into it.
    public enum Relation: Sendable, Equatable {
        /// One of the devices asked about.
        case base
        /// A partition of the member `on`.
        case partition
        /// A device-mapper, md or other device that lists `on` among its slaves
        /// (or that `on` lists among its holders).
        case holder
        /// A loop device whose backing file is the member `on`.
        case loop
    }

    public struct Member: Sendable, Equatable {
        public var name: String
        public var dev: DevNum
        public var relation: Relation
        /// The member it stands on (nil for a base).
        public var on: String?
    }

    /// Every device in `bases` and every device stacked on one of them.
    /// `root` is /sys/class/block (a fake tree in tests); `resolve` turns a
    /// loop's backing path into a device number (nil: a regular file).
    public static func devices(over bases: Set<DevNum>, root: String = "/sys/class/block",
                               resolve: (String) -> DevNum? = { DevNum(blockDevice: $0) }) -> [String: DevNum] {
        Dictionary(members(over: bases, root: root, resolve: resolve).map { ($0.name, $0.dev) }, uniquingKeysWith: { a, _ in a })
    }

    /// The same stack with what each member stands on, in the order found
    /// (bases first, then each level of stacking; names sorted within one).
    public static func members(over bases: Set<DevNum>, root: String = "/sys/class/block",
                               resolve: (String) -> DevNum? = { DevNum(blockDevice: $0) }) -> [Member] {
        struct Node { var dev: DevNum; var parent: String?; var holders: [String]; var slaves: [String]; var backing: String? }
        var nodes: [String: Node] = [:]
        for name in listDirectory(root) {
            let d = root + "/" + name
            guard let dev = readSmallFile(d + "/dev").flatMap(DevNum.init(sysfs:)) else { continue }
            var parent: String?
            if access(d + "/partition", F_OK) == 0 {
                var buf = [CChar](repeating: 0, count: Int(PATH_MAX))
                if realpath(d, &buf) != nil {
                    let comps = String(cString: buf).split(separator: "/")
                    if comps.count >= 2 { parent = String(comps[comps.count - 2]) }
                }
            }
            var backing = readSmallFile(d + "/loop/backing_file")
            while backing?.hasSuffix("\n") == true { backing?.removeLast() }
            if backing?.hasSuffix(" (deleted)") == true { backing = nil }
            nodes[name] = Node(dev: dev, parent: parent, holders: listDirectory(d + "/holders"),
                               slaves: listDirectory(d + "/slaves"), backing: backing?.isEmpty == false ? backing : nil)
        }
        var out: [Member] = []
        var inStack: [String: DevNum] = [:]
        for n in nodes.keys.sorted() where bases.contains(nodes[n]!.dev) {
            inStack[n] = nodes[n]!.dev
            out.append(Member(name: n, dev: nodes[n]!.dev, relation: .base, on: nil))
        }
        // Loop backing paths resolve once (a stat each).
        var backingDev: [String: DevNum] = [:]
        for (n, node) in nodes { if let b = node.backing, let d = resolve(b) { backingDev[n] = d } }
        var changed = true
        while changed {
            changed = false
            var found: [Member] = []
            for n in nodes.keys.sorted() where inStack[n] == nil {
                let node = nodes[n]!
                if let p = node.parent, inStack[p] != nil {
                    found.append(Member(name: n, dev: node.dev, relation: .partition, on: p))
                } else if let s = node.slaves.first(where: { inStack[$0] != nil }) {
                    found.append(Member(name: n, dev: node.dev, relation: .holder, on: s))
                } else if let h = inStack.keys.sorted().first(where: { nodes[$0]?.holders.contains(n) == true }) {
                    found.append(Member(name: n, dev: node.dev, relation: .holder, on: h))
                } else if let b = backingDev[n], let on = inStack.first(where: { $0.value == b })?.key ?? (bases.contains(b) ? "" : nil) {
                    found.append(Member(name: n, dev: node.dev, relation: .loop, on: on.isEmpty ? nil : on))
                }
            }
            for m in found {
                inStack[m.name] = m.dev
                out.append(m)
                changed = true
            }
        }
        return out
    }

    static func listDirectory(_ path: String) -> [String] {
        guard let d = opendir(path) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { out.append(name) }
        }
        return out.sorted()
    }
}
