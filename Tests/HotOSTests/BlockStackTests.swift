import Foundation
import Testing
@testable import HotOS

// BlockStack.devices(over:): which devices stand on a device, read from a
// fake /sys/class/block tree (dev files, holders/slaves, partition links,
// loop backing files) so no root and no real devices are needed.

private final class FakeSysfs {
    let root: String
    var classBlock: String { root + "/class/block" }
    init() throws {
        root = "/tmp/blockstack-test-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root + "/class/block", withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: root) }

    private func write(_ path: String, _ s: String) throws {
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try s.write(toFile: path, atomically: false, encoding: .utf8)
    }

    /// A whole device: /sys/devices/virtual/block/NAME, linked from class/block.
    func disk(_ name: String, _ dev: String, holders: [String] = [], slaves: [String] = [], backing: String? = nil) throws {
        let d = root + "/devices/virtual/block/" + name
        try write(d + "/dev", dev + "\n")
        for h in holders { try FileManager.default.createDirectory(atPath: d + "/holders/" + h, withIntermediateDirectories: true) }
        for s in slaves { try FileManager.default.createDirectory(atPath: d + "/slaves/" + s, withIntermediateDirectories: true) }
        if let b = backing { try write(d + "/loop/backing_file", b + "\n") }
        try FileManager.default.createSymbolicLink(atPath: classBlock + "/" + name, withDestinationPath: d)
    }

    /// A partition NAME of PARENT: a directory inside the parent's.
    func partition(_ name: String, of parent: String, _ dev: String) throws {
        let d = root + "/devices/virtual/block/" + parent + "/" + name
        try write(d + "/dev", dev + "\n")
        try write(d + "/partition", "1\n")
        try FileManager.default.createSymbolicLink(atPath: classBlock + "/" + name, withDestinationPath: d)
    }
}

private func dn(_ s: String) -> DevNum { DevNum(sysfs: s)! }

@Suite("BlockStack over a fake sysfs")
struct BlockStackTests {
    @Test("A device alone is its own stack")
    func alone() throws {
        let f = try FakeSysfs()
        try f.disk("loop1", "7:1")
        try f.disk("sda", "8:0")
        let s = BlockStack.devices(over: [dn("7:1")], root: f.classBlock, resolve: { _ in nil })
        #expect(s == ["loop1": dn("7:1")])
    }

    @Test("dm over a partition of the device, found by holders and slaves, transitively")
    func dmOverPartition() throws {
        let f = try FakeSysfs()
        try f.disk("loop1", "7:1")
        try f.partition("loop1p1", of: "loop1", "259:0")
        // dm-0 lists loop1p1 as a slave; dm-1 is held by dm-0 (holders only).
        try f.disk("dm-0", "253:0", holders: ["dm-1"], slaves: ["loop1p1"])
        try f.disk("dm-1", "253:1")
        try f.disk("dm-2", "253:2", slaves: ["sda"])
        try f.disk("sda", "8:0", holders: ["dm-2"])
        let s = BlockStack.devices(over: [dn("7:1")], root: f.classBlock, resolve: { _ in nil })
        #expect(Set(s.keys) == ["loop1", "loop1p1", "dm-0", "dm-1"])
    }

    @Test("A loop device whose backing file is the device (loop registers no holder)")
    func loopOverDevice() throws {
        let f = try FakeSysfs()
        try f.disk("loop0", "7:0")
        try f.disk("loop5", "7:5", backing: "/dev/loop0")
        try f.disk("loop6", "7:6", backing: "/tmp/some.img")
        // A loop over loop5 is stacked too (two levels).
        try f.disk("loop7", "7:7", backing: "/dev/loop5")
        let nodes = ["/dev/loop0": dn("7:0"), "/dev/loop5": dn("7:5")]
        let s = BlockStack.devices(over: [dn("7:0")], root: f.classBlock, resolve: { nodes[$0] })
        #expect(Set(s.keys) == ["loop0", "loop5", "loop7"])
    }

    @Test("Several bases (real and protected device); unrelated devices stay out")
    func severalBases() throws {
        let f = try FakeSysfs()
        try f.disk("loop0", "7:0")
        try f.disk("loop1", "7:1")
        try f.disk("loop2", "7:2")
        try f.disk("dm-0", "253:0", slaves: ["loop2"])
        let s = BlockStack.devices(over: [dn("7:0"), dn("7:1")], root: f.classBlock, resolve: { _ in nil })
        #expect(Set(s.keys) == ["loop0", "loop1"])
    }

    @Test("A missing tree gives nothing (no sysfs: nothing found, no crash)")
    func missingTree() {
        #expect(BlockStack.devices(over: [dn("7:0")], root: "/nonexistent-\(getpid())").isEmpty)
    }

    @Test("DevNum parses sysfs dev files", arguments: [("7:1\n", "7:1"), ("259:12", "259:12")])
    func parse(_ input: String, _ want: String) {
        #expect(DevNum(sysfs: input)?.description == want)
    }
}
