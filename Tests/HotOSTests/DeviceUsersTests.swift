import Foundation
import Testing
@testable import HotOS

// The quiet check over a fake sysfs and procfs: a disk with two partitions,
// a dm device stacked on one, a loop over the other, a second loop over the
// dm device, and processes holding various nodes. Sysfs is laid out as the
// kernel does (class/block links into devices/, a partition inside its
// disk's directory). Fd entries are symlinks named after the node they stand
// for ("dev:8:1"); `nodeDev` reads them back, as stat(2) would give st_rdev.

@Suite("DeviceUsers")
struct DeviceUsersTests {
    final class Tree {
        let root: String
        var sys: String { root + "/sys" }
        var proc: String { root + "/proc" }
        init() throws {
            root = NSTemporaryDirectory() + "devusers-" + UUID().uuidString
            try FileManager.default.createDirectory(atPath: root + "/sys/class/block", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: root + "/proc", withIntermediateDirectories: true)
        }
        deinit { try? FileManager.default.removeItem(atPath: root) }

        func write(_ path: String, _ text: String) throws {
            let p = root + path
            try FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try text.write(toFile: p, atomically: false, encoding: .utf8)
        }
        /// A block device NAME with DEV ("8:0"); `parent` makes it a partition of it.
        func device(_ name: String, _ dev: String, partitionOf parent: String? = nil) throws {
            let d = sys + "/devices/block/" + (parent.map { $0 + "/" } ?? "") + name
            try write(String(d.dropFirst(root.count)) + "/dev", dev + "\n")
            try FileManager.default.createDirectory(atPath: d + "/holders", withIntermediateDirectories: true)
            if parent != nil { try write(String(d.dropFirst(root.count)) + "/partition", "1\n") }
            try FileManager.default.createSymbolicLink(atPath: sys + "/class/block/" + name, withDestinationPath: d)
        }
        func holder(_ of: String, _ h: String) throws {
            try FileManager.default.createDirectory(atPath: sys + "/class/block/\(of)/holders/\(h)", withIntermediateDirectories: true)
        }
        func loop(_ name: String, _ dev: String, backing: String) throws {
            try device(name, dev)
            try write("/sys/class/block/\(name)/loop/backing_file", backing + "\n")
        }
        func process(_ pid: Int32, _ comm: String, fds: [String]) throws {
            try write("/proc/\(pid)/comm", comm + "\n")
            try FileManager.default.createDirectory(atPath: proc + "/\(pid)/fd", withIntermediateDirectories: true)
            for (i, target) in fds.enumerated() {
                try FileManager.default.createSymbolicLink(atPath: proc + "/\(pid)/fd/\(i)", withDestinationPath: target)
            }
        }
        /// "dev:8:1" links (fd entries) and "/dev/sdaN"-style backing files.
        func nodeDev(_ path: String) -> DevNum? {
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)) ?? path
            if target.hasPrefix("dev:") { return DevNum(sysfs: String(target.dropFirst(4))) }
            let name = (target as NSString).lastPathComponent
            return readSmallFile(sys + "/class/block/\(name)/dev").flatMap(DevNum.init(sysfs:))
        }
        func scan(_ dev: String, mounts: [MountEntry] = [], ignoring: Set<Int32> = []) -> DeviceUsage {
            DeviceUsers.scan(DevNum(sysfs: dev)!, classBlock: sys + "/class/block", procRoot: proc, mounts: mounts,
                             ignoring: ignoring, nodeDev: { self.nodeDev($0) })
        }
    }

    static func mount(_ dev: String, at point: String, ro: Bool = false) -> MountEntry {
        let id = DevNum(sysfs: dev)!
        return MountEntry(major: id.major, minor: id.minor, mountPoint: point, fsType: "ext4", source: "x", readOnly: ro)
    }

    func stack() throws -> Tree {
        let t = try Tree()
        try t.device("sda", "8:0")
        try t.device("sda1", "8:1", partitionOf: "sda")
        try t.device("sda2", "8:2", partitionOf: "sda")
        try t.device("sdb", "8:16")
        try t.device("dm-0", "253:0")
        try t.holder("sda1", "dm-0")
        try t.loop("loop3", "7:3", backing: "/dev/sda2")
        try t.loop("loop4", "7:4", backing: "/dev/dm-0")
        try t.loop("loop5", "7:5", backing: "/srv/file.img")   // a file: no device
        return t
    }

    @Test("A quiet disk: its partitions are family, nothing uses it")
    func quiet() throws {
        let t = try Tree()
        try t.device("sda", "8:0")
        try t.device("sda1", "8:1", partitionOf: "sda")
        try t.process(100, "bash", fds: ["dev:8:16"])   // another disk
        let u = t.scan("8:0", mounts: [Self.mount("8:16", at: "/other")])
        #expect(u.family.map(\.name) == ["sda", "sda1"])
        #expect(u.users.isEmpty)
    }

    @Test("A whole disk whose partition is mounted, with holders stacked two deep")
    func wholeDisk() throws {
        let t = try stack()
        let u = t.scan("8:0", mounts: [Self.mount("8:2", at: "/srv")])
        #expect(Set(u.family.map(\.name)) == ["sda", "sda1", "sda2", "dm-0", "loop3", "loop4"])
        #expect(u.users.contains(.mount(name: "sda2", mountPoint: "/srv", readOnly: false)))
        #expect(u.users.contains(.holder(name: "sda1", holder: "dm-0")))
        #expect(u.users.contains(.holder(name: "sda2", holder: "loop3")))
        #expect(u.users.contains(.holder(name: "dm-0", holder: "loop4")))
        #expect(!u.users.contains { $0.description.contains("loop5") })
    }

    @Test("A process holding a stacked device, a partition, or the device itself")
    func processes() throws {
        let t = try stack()
        try t.process(200, "qemu-system-x86", fds: ["/dev/null", "dev:7:4"])   // the loop over dm-0 over sda1
        try t.process(201, "postgres", fds: ["dev:8:1", "dev:8:1"])             // listed once
        try t.process(202, "sleep", fds: ["dev:8:16"])                          // not ours
        let u = t.scan("8:0")
        #expect(u.processes == [.process(pid: 200, command: "qemu-system-x86", name: "loop4"),
                                .process(pid: 201, command: "postgres", name: "sda1")])
        // A partition alone: only what stands on it.
        let p = t.scan("8:2")
        #expect(Set(p.family.map(\.name)) == ["sda2", "loop3"])
        #expect(p.processes.isEmpty)
        // The scanning process itself is not counted.
        #expect(t.scan("8:0", ignoring: [200]).processes.map(\.description) == ["pid 201 (postgres) has /dev/sda1 open"])
    }

    @Test("A device not in sysfs has no family and no users")
    func unknown() throws {
        let t = try stack()
        let u = t.scan("9:9")
        #expect(u.family.isEmpty && u.users.isEmpty)
    }

    @Test("A read-only mount is a user, marked read-only")
    func readOnlyMount() throws {
        let t = try stack()
        let u = t.scan("8:1", mounts: [Self.mount("8:1", at: "/ro", ro: true)])
        #expect(u.users.filter { $0.isReadOnlyMount } == [.mount(name: "sda1", mountPoint: "/ro", readOnly: true)])
    }
}
