import Foundation
import Testing
import HotControl
@testable import HotDaemon
@testable import HotOS
#if canImport(Glibc)
import Glibc
#endif

// What a dead daemon left, found from fake run directories (no root, no
// devices): the records parsed, the frontend told, the decision what to
// clean, and that finding reads only.

private final class FakeRun {
    let root: String
    init() throws {
        root = "/tmp/leftovers-test-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: root) }

    func dir(_ name: String) -> String { root + "/" + name }

    func write(_ name: String, _ file: String, _ text: String) throws {
        try FileManager.default.createDirectory(atPath: dir(name), withIntermediateDirectories: true)
        try text.write(toFile: dir(name) + "/" + file, atomically: false, encoding: .utf8)
    }

    func files(_ name: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir(name))) ?? []).sorted()
    }
}

@Suite struct RecordParsingTests {
    @Test func pidRecord() {
        #expect(HotCoreLeftovers.parsePid("1234\n") == 1234)
        #expect(HotCoreLeftovers.parsePid(" 77 ") == 77)
        #expect(HotCoreLeftovers.parsePid("x") == nil)
        #expect(HotCoreLeftovers.parsePid(nil) == nil)
    }

    @Test func nbdIndexRecord() {
        #expect(HotCoreLeftovers.parseNBDIndex("3 2\n") == 3)
        #expect(HotCoreLeftovers.parseNBDIndex("12\n") == 12)
        #expect(HotCoreLeftovers.parseNBDIndex("") == nil)
        #expect(HotCoreLeftovers.parseNBDIndex("nbd3") == nil)
    }

    @Test func loopsRecordKeepsOnlyHBFiles() {
        let l = DMLeftovers.parseLoopsRecord("/dev/loop3 /var/tmp/hb/hb_00.tmp\n/dev/loop4 /etc/passwd\ngarbage\n/dev/loop5 /x/hb_01.tmp\n")
        #expect(l == [DMLeftovers.LoopFile(device: "/dev/loop3", file: "/var/tmp/hb/hb_00.tmp"),
                      DMLeftovers.LoopFile(device: "/dev/loop5", file: "/x/hb_01.tmp")])
    }

    @Test func nbdfuseCommandLine() {
        let files: Set = ["/run/hotimage/a/fuse/disk"]
        #expect(HotCoreLeftovers.isNBDFuse(argv: ["/usr/bin/nbdfuse", "/run/hotimage/a/fuse/disk", "--unix", "s"], serving: files))
        #expect(!HotCoreLeftovers.isNBDFuse(argv: ["/usr/bin/nbdfuse", "/run/hotimage/b/fuse/disk"], serving: files))
        #expect(!HotCoreLeftovers.isNBDFuse(argv: ["grep", "/run/hotimage/a/fuse/disk"], serving: files))
    }
}

@Suite struct HotCoreLeftoversTests {
    @Test func deadNBDDaemonIsFoundAndReadOnly() throws {
        let run = try FakeRun()
        for (f, t) in [("pid", "999999\n"), ("device", "/dev/nbd7\n"), ("nbd-index", "7 2\n"), ("lock", ""), ("control.sock", "")] {
            try run.write("n", f, t)
        }
        let before = run.files("n")
        let found = try #require(Leftovers.find(name: "n", runDir: run.root))
        guard case .hotCore(let l) = found else { Issue.record("not a HotCore daemon's: \(found)"); return }
        #expect(l.pid == 999999)
        #expect(l.device == "/dev/nbd7")
        #expect(l.nbdIndex == 7)
        #expect(l.frontend == .nbd && found.frontend == .nbd)
        #expect(l.records == ["device", "pid", "nbd-index", "lock", "control.sock"])
        #expect(found.lines.contains("run directory \(run.dir("n")) (device, pid, nbd-index, lock, control.sock)"))
        #expect(found.lines.contains("/dev/nbd7 (kept for 'attach --reconnect')"))
        #expect(found.hint == "hotimage detach n")
        #expect(run.files("n") == before, "finding changed the run directory")
        #expect(Leftovers.all(runDir: run.root).map(\.name) == ["n"])
    }

    @Test func fuseIsTheDefaultFrontend() throws {
        let run = try FakeRun()
        try run.write("f", "pid", "5\n")
        try run.write("f", "device", "/dev/loop9\n")
        let l = try #require(HotCoreLeftovers.inspect(dir: run.dir("f")))
        #expect(l.frontend == .fuse)
    }

    @Test func liveDaemonLeavesNothing() throws {
        let run = try FakeRun()
        try run.write("live", "pid", "\(getpid())\n")
        try run.write("live", "lock", "")
        let fd = open(run.dir("live") + "/lock", O_RDWR)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(flock(fd, LOCK_EX | LOCK_NB) == 0)
        #expect(Leftovers.daemonAlive(dir: run.dir("live")))
        #expect(Leftovers.find(name: "live", runDir: run.root) == nil)
        #expect(Leftovers.all(runDir: run.root).isEmpty)
    }

    @Test func refusedAttachLeavesNothingToClean() throws {
        let run = try FakeRun()
        try run.write("r", "lock", "")
        try run.write("r", "nbdfuse.log", "x")
        #expect(Leftovers.find(name: "r", runDir: run.root) == nil)
    }

    @Test func mountedDeviceIsRefusedWithoutTouchingAnything() {
        var l = HotCoreLeftovers(name: "k", dir: "/nonexistent/k")
        l.device = "/dev/loop5"
        l.loops = ["/dev/loop5"]
        l.mountedOn = ["/mnt/a", "/mnt/b"]
        l.records = ["pid"]
        var said: [String] = []
        let left = Leftovers.hotCore(l).clean { said.append($0) }
        #expect(said.isEmpty)
        #expect(left == ["/dev/loop5 is mounted on /mnt/a, /mnt/b: unmount it first ('umount /mnt/a /mnt/b'; if that hangs, 'umount -l /mnt/a /mnt/b'), then run 'hotimage detach k' again"])
        #expect(Leftovers.hotCore(l).mountedOn == ["/mnt/a", "/mnt/b"])
        #expect(l.lines.contains("loop device /dev/loop5 over /nonexistent/k/fuse/disk, mounted on /mnt/a, /mnt/b"))
    }

    @Test func cleanRemovesTheRecords() throws {
        let run = try FakeRun()
        for f in ["pid", "device", "control.sock", "lock", "daemon.log"] { try run.write("c", f, "1\n") }
        let l = try #require(Leftovers.find(name: "c", runDir: run.root))
        var said: [String] = []
        #expect(l.clean { said.append($0) } == [])
        #expect(!FileManager.default.fileExists(atPath: run.dir("c")))
    }

    @Test func jsonKeepsItsShape() throws {
        var l = HotCoreLeftovers(name: "j", dir: "/r/j")
        l.nbdIndex = 2
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        #expect(try enc.encode(Leftovers.hotCore(l)) == enc.encode(l))
    }
}

@Suite struct DMLeftoversTests {
    @Test func staleSessionsGroupByOwnerAndSkipLiveOnes() {
        let devices: [(name: String, uuid: String)] = [
            ("hotimage-a-snap", "HOTIMAGE-snap-100-5-a"),
            ("hotimage-a-real", "HOTIMAGE-real-100-5-a"),
            ("hotimage-a-cow", "HOTIMAGE-cow-100-5-a"),
            ("hotimage-b-snap", "HOTIMAGE-snap-200-6-b"),        // alive
            ("hotimage-c-cow", "HOTIMAGE-cow-300-7-other"),      // name and UUID disagree
            ("hotimage-a", "HOTIMAGE-attach-a"),                 // not a session device
            ("hotimage-d-real", "LVM-xyz"),                      // not ours
        ]
        let s = DMLeftovers.staleSessions(devices, isAlive: { pid, _ in pid == 200 })
        #expect(s.count == 1)
        #expect(s[0].name == "a")
        #expect(s[0].session.pid == 100 && s[0].session.startTime == 5)
        #expect(s[0].session.removalOrder == ["hotimage-a-snap", "hotimage-a-real", "hotimage-a-cow"])
    }

    @Test func originsAreTheDevicesMappingThroughReal() {
        let tables: [(name: String, table: [DMTarget])] = [
            ("vg-lv", [.snapshotOrigin(length: 100, origin: "253:4")]),
            ("other", [.snapshotOrigin(length: 100, origin: "253:9")]),
            ("two", [.snapshotOrigin(length: 50, origin: "253:4"), .linear(start: 50, length: 50, device: "7:0")]),
            ("plain", [.linear(length: 100, device: "253:4")]),
        ]
        #expect(DMLeftovers.origins(over: "253:4", tables: tables) == ["vg-lv"])
    }

    @Test func deadDMRunDirectoryIsFoundAndCleaned() throws {
        let run = try FakeRun()
        let hb = run.root + "/hb"
        try FileManager.default.createDirectory(atPath: hb, withIntermediateDirectories: true)
        try "x".write(toFile: hb + "/hb_00.tmp", atomically: false, encoding: .utf8)
        for (f, t) in [("pid", "4242\n"), ("via", "dm\n"), ("device", "/dev/mapper/vg-lv\n"), ("lock", ""), ("control.sock", ""),
                       ("loops", "/dev/loop250 \(hb)/hb_00.tmp\n/dev/loop251 \(hb)/hb_01.tmp\n"), ("daemon.log", "log\n")] {
            try run.write("vg-lv", f, t)
        }
        // A HotCore daemon's cleaner does not take a dm daemon's directory.
        #expect(HotCoreLeftovers.inspect(dir: run.dir("vg-lv")) == nil)
        let before = run.files("vg-lv")
        let found = try #require(Leftovers.find(name: "vg-lv", runDir: run.root))
        guard case .dm(let l) = found else { Issue.record("not a dm daemon's: \(found)"); return }
        #expect(found.frontend == .dm)
        #expect(found.pid == 4242)
        let r = try #require(l.runDirectory)
        #expect(r.records == ["control.sock", "device", "pid", "via", "loops", "lock"])
        #expect(r.hbFiles == [hb + "/hb_00.tmp"])
        #expect(found.lines.contains("hb file \(hb)/hb_00.tmp"))
        #expect(found.lines.contains { $0.hasPrefix("run directory \(run.dir("vg-lv")) (") })
        #expect(run.files("vg-lv") == before, "finding changed the run directory")
        #expect(Leftovers.all(runDir: run.root).map(\.name).contains("vg-lv"))
        let json = String(decoding: try JSONEncoder().encode(found), as: UTF8.self)
        #expect(json.contains("\"via\":\"dm\""))

        var said: [String] = []
        #expect(found.clean { said.append($0) } == [])
        #expect(said.first == "removing the run directory of the dead dm daemon 'vg-lv'")
        #expect(said.contains("  deleted \(hb)/hb_00.tmp"))
        #expect(!FileManager.default.fileExists(atPath: hb + "/hb_00.tmp"))
        #expect(!FileManager.default.fileExists(atPath: run.dir("vg-lv")))
        #expect(Leftovers.find(name: "vg-lv", runDir: run.root) == nil)
    }

    @Test func liveDMDaemonIsLeftAlone() throws {
        let run = try FakeRun()
        for (f, t) in [("pid", "\(getpid())\n"), ("via", "dm\n"), ("lock", "")] { try run.write("live", f, t) }
        let fd = open(run.dir("live") + "/lock", O_RDWR)
        defer { close(fd) }
        #expect(flock(fd, LOCK_EX | LOCK_NB) == 0)
        #expect(Leftovers.find(name: "live", runDir: run.root) == nil)
        #expect(DMLeftovers.clean(runDir: run.root).isEmpty)
        #expect(run.files("live") == ["lock", "pid", "via"])
    }

    @Test func daemonStartCleansEveryDeadRunDirectory() throws {
        let run = try FakeRun()
        for n in ["x", "y"] {
            for (f, t) in [("pid", "1\n"), ("via", "dm\n"), ("lock", "")] { try run.write(n, f, t) }
        }
        try run.write("y", "daemon.log", "a new daemon's log\n")   // kept: it may be writing it
        try run.write("core", "pid", "1\n")   // a HotCore daemon's: not the dm cleaner's
        let out = DMLeftovers.clean(runDir: run.root)
        #expect(out == ["removing the run directory of the dead dm daemon 'x'", "removing the run directory of the dead dm daemon 'y'"])
        #expect(!FileManager.default.fileExists(atPath: run.dir("x")))
        #expect(FileManager.default.fileExists(atPath: run.dir("core") + "/pid"))
        #expect(run.files("y") == ["daemon.log"])
    }
}
