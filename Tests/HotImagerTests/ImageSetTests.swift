// Set directories (ImageSet.swift, Restore+Set.swift): a whole set is
// whole; each way of not being whole is found and names its member or file;
// verify names a damaged member; restore refuses before writing anything and
// restores the members it is asked for.
import Foundation
import Testing
import QCow2
@testable import HotImager

final class QuietReporter: Reporter {
    var lines: [String] = []
    func log(_ line: String) { lines.append(line) }
    func event(_ name: String, _ fields: [String: JSONValue]) {}
    func progress(_ p: ImagerProgress, phase: String) {}
    func finishProgress() {}
}

/// A temporary directory, removed with its contents.
final class SetLab {
    let dir: String
    static let clusterSize = 65536
    static let clusters = 4
    init(_ name: String) {
        dir = "/tmp/hotimage-set-\(name)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: dir) }
    func path(_ f: String) -> String { dir + "/" + f }

    static func members(_ names: [String]) -> [SetRecord.Member] {
        names.map { SetRecord.Member(name: $0, source: "/dev/vg/\($0)", device: "/dev/mapper/vg-\($0)",
                                     deviceBytes: UInt64(clusters * clusterSize), filesystemUUID: "uuid-\($0)") }
    }

    /// The volume's bytes of an image made with `seed`.
    static func volume(seed: UInt8) -> [UInt8] {
        (0..<(clusters * clusterSize)).map { i in i / clusterSize == 2 ? 0 : UInt8(truncatingIfNeeded: i &* 31 &+ Int(seed)) }
    }

    /// A small uncompressed image with metadata (and `set`), as a backup writes it.
    @discardableResult
    func image(_ file: String, set: SetRecord?, complete: Bool = true, seed: UInt8 = 1) throws -> String {
        let p = path(file)
        let vol = SetLab.volume(seed: seed)
        let w = try QCow2Writer(path: p, virtualSize: UInt64(vol.count), clusterBits: 16, compression: .none, overwrite: true)
        let enc = ClusterEncoder(compression: .none, clusterSize: SetLab.clusterSize)
        for c in 0..<SetLab.clusters where c != 3 {       // cluster 3 unallocated (reads as zeros)
            let lo = c * SetLab.clusterSize
            try vol.withUnsafeBytes { try w.write(enc.encode(index: UInt64(c), data: UnsafeRawBufferPointer(rebasing: $0[lo..<(lo + SetLab.clusterSize)]))) }
        }
        let meta = ImageMetadata(
            toolVersion: "test", host: "test",
            source: .init(device: "/dev/test", realDevice: nil, attachName: nil, mountPoint: nil, deviceBytes: UInt64(vol.count)),
            filesystem: .init(type: nil, uuid: nil, label: nil, blockSize: nil),
            snapshotTime: set?.cutTime ?? "2026-01-01T00:00:00.000Z", consistency: "offline", mode: "offline", mapMethod: "raw",
            blockSize: 4096, clusterSize: SetLab.clusterSize, compression: "none", usedBytes: UInt64(vol.count),
            imagedBytes: UInt64(vol.count), excluded: [], hooks: [], emergencyEpisodes: [], components: nil, writerErrors: nil, set: set)
        _ = try w.finish(metadata: meta.encoded(), complete: complete)
        return p
    }

    /// A whole set: one image per member, NAME.qcow2.
    func wholeSet(_ names: [String], id: String = "set-A") throws -> [SetRecord] {
        let ms = SetLab.members(names)
        return try names.enumerated().map { i, n in
            let r = SetRecord(id: id, cutTime: "2026-12-06T04:00:00.000Z", members: ms, member: n)
            try image(SetRecord.imageName(n), set: r, seed: UInt8(i + 1))
            return r
        }
    }

    /// Flips bytes inside data cluster `c` of an uncompressed image.
    func damage(_ file: String, cluster c: UInt64 = 1) throws {
        guard case .raw(let host) = try QCow2Reader(path: path(file)).clusterState(c) else {
            Issue.record("cluster \(c) of \(file) is not a raw cluster"); return
        }
        let fd = open(path(file), O_RDWR)
        defer { close(fd) }
        var b: [UInt8] = [0, 0, 0, 0]
        _ = pread(fd, &b, 4, off_t(host + 100))
        b = b.map { $0 ^ 0x5a }
        _ = pwrite(fd, b, 4, off_t(host + 100))
    }
}

@Suite struct ImageSetTests {
    @Test func wholeSetIsWhole() throws {
        let lab = SetLab("whole")
        try lab.wholeSet(["a", "b", "c"])
        let s = try ImageSet.open(lab.dir)
        #expect(s.problems == [])
        #expect(s.whole)
        #expect(s.id == "set-A")
        #expect(s.members.map(\.name) == ["a", "b", "c"])
        #expect(s.members.allSatisfy { $0.present && $0.complete == true && ($0.imageBytes ?? 0) > 0 })
        let v = try SetVerifyOutcome.run(lab.dir)
        #expect(v.problems == [])
        #expect(v.members.allSatisfy { $0.outcome?.problems == [] && ($0.outcome?.clustersChecked ?? 0) > 0 })
    }

    @Test func aMissingMemberIsNamed() throws {
        let lab = SetLab("missing")
        try lab.wholeSet(["a", "b", "c"])
        unlink(lab.path("b.qcow2"))
        let s = try ImageSet.open(lab.dir)
        #expect(!s.whole)
        #expect(s.problems == ["member 'b' (b.qcow2) is missing"])
        #expect(s.member("b")?.present == false)
        #expect(try SetVerifyOutcome.run(lab.dir).problems.contains("member 'b' (b.qcow2) is missing"))
    }

    @Test func anImageOfAnotherSetIsNamed() throws {
        let lab = SetLab("other")
        try lab.wholeSet(["a", "b"])
        let foreign = SetRecord(id: "set-B", cutTime: "2026-12-05T00:00:00.000Z", members: SetLab.members(["x"]), member: "x")
        try lab.image("x.qcow2", set: foreign)
        let s = try ImageSet.open(lab.dir)
        #expect(s.id == "set-A")
        #expect(s.problems.count == 1)
        #expect(s.problems.first?.hasPrefix("x.qcow2 belongs to another set (id set-B") == true, "\(s.problems)")
        // In a member's place: the member is missing, and why. (With x.qcow2
        // still there set-B would have more images, and be the set judged.)
        unlink(lab.path("x.qcow2"))
        try lab.image("b.qcow2", set: SetRecord(id: "set-B", cutTime: "2026-12-05T00:00:00.000Z", members: SetLab.members(["b"]), member: "b"))
        let s2 = try ImageSet.open(lab.dir)
        #expect(s2.problems.contains { $0.hasPrefix("member 'b' (b.qcow2) is missing: b.qcow2 belongs to another set (id set-B") }, "\(s2.problems)")
    }

    @Test func anImageWithoutASetRecordIsNamed() throws {
        let lab = SetLab("single")
        try lab.wholeSet(["a", "b"])
        try lab.image("lone.qcow2", set: nil)
        let s = try ImageSet.open(lab.dir)
        #expect(s.problems == ["lone.qcow2 is not a member of a set (a single-volume image: no set record)"])
        // Only single images: no set.
        let lab2 = SetLab("nosets")
        try lab2.image("lone.qcow2", set: nil)
        let s2 = try ImageSet.open(lab2.dir)
        #expect(s2.id == nil && !s2.whole)
        #expect(s2.problems.first == "no image in \(lab2.dir) is a member of a set")
    }

    @Test func aRenamedMemberIsNamed() throws {
        let lab = SetLab("renamed")
        try lab.wholeSet(["a", "b"])
        rename(lab.path("b.qcow2"), lab.path("b-old.qcow2"))
        let s = try ImageSet.open(lab.dir)
        #expect(Set(s.problems) == ["member 'b' (b.qcow2) is missing",
                                    "b-old.qcow2 is the image of member 'b', whose file is b.qcow2 (renamed?)"])
        // Two members' images swapped: both named.
        let lab2 = SetLab("swapped")
        try lab2.wholeSet(["a", "b"])
        rename(lab2.path("a.qcow2"), lab2.path("t.qcow2"))
        rename(lab2.path("b.qcow2"), lab2.path("a.qcow2"))
        rename(lab2.path("t.qcow2"), lab2.path("b.qcow2"))
        let s2 = try ImageSet.open(lab2.dir)
        #expect(s2.problems.count == 2)
        #expect(s2.problems.contains { $0.hasPrefix("member 'a' (a.qcow2) is missing: a.qcow2 is the image of member 'b'") }, "\(s2.problems)")
    }

    @Test func anIncompleteMemberIsNamed() throws {
        let lab = SetLab("incomplete")
        let rs = try lab.wholeSet(["a", "b"])
        try lab.image("a.qcow2", set: rs[0], complete: false)
        // A backup's temporary file is not an image.
        FileManager.default.createFile(atPath: lab.path(".b.qcow2.1234.hotimage-partial"), contents: Data([1, 2, 3]))
        let s = try ImageSet.open(lab.dir)
        #expect(s.problems == ["member 'a': a.qcow2 is incomplete (a partial image kept by --keep-partial)"])
        #expect(s.member("a")?.complete == false)
        #expect(s.notes.count == 1 && s.notes[0].hasPrefix(".b.qcow2.1234.hotimage-partial is a backup's temporary file"))
    }

    @Test func aDifferentMemberListIsNamed() throws {
        let lab = SetLab("list")
        try lab.wholeSet(["a", "b"])
        try lab.image("b.qcow2", set: SetRecord(id: "set-A", cutTime: "2026-12-06T04:00:00.000Z", members: SetLab.members(["a", "b", "c"]), member: "b"))
        let s = try ImageSet.open(lab.dir)
        #expect(s.problems.count == 1)
        #expect(s.problems.first?.hasPrefix("member 'b' (b.qcow2) is missing: b.qcow2 records set set-A with a different") == true, "\(s.problems)")
    }

    @Test func verifyNamesTheDamagedMember() throws {
        let lab = SetLab("damaged")
        try lab.wholeSet(["a", "b", "c"])
        try lab.damage("c.qcow2")
        #expect(try ImageSet.open(lab.dir).whole)       // the structure of the set is intact
        let v = try SetVerifyOutcome.run(lab.dir)
        #expect(!v.problems.isEmpty)
        #expect(v.problems.allSatisfy { $0.hasPrefix("member 'c' (c.qcow2): ") }, "\(v.problems)")
        #expect(v.members.first { $0.member == "c" }?.outcome?.problems.isEmpty == false)
        #expect(v.members.filter { $0.member != "c" }.allSatisfy { $0.outcome?.problems == [] })
    }

    // MARK: restore

    func options(_ lab: SetLab, _ to: [(String, String)], only: [String]? = nil) -> SetRestoreOptions {
        SetRestoreOptions(directory: lab.dir, targets: to.map { (member: $0.0, target: $0.1) }, only: only)
    }

    func refusal(_ o: SetRestoreOptions) -> String? {
        do { _ = try SetRestoreJob.run(o, reporter: QuietReporter()); return nil } catch let e as RestoreFailure {
            #expect(e.kind == .refused)
            return e.description
        } catch { return "\(error)" }
    }

    @Test func restoreRefusesBeforeWriting() throws {
        let lab = SetLab("refuse")
        try lab.wholeSet(["a", "b"])
        let out = SetLab("refuse-out")
        let ta = out.path("a.raw"), tb = out.path("b.raw")
        // A member without a target.
        let r1 = refusal(options(lab, [("a", ta)]))
        #expect(r1?.contains("no target for member 'b'") == true && r1?.contains("--only NAME") == true, "\(r1 ?? "")")
        // An unknown name, in --to and in --only.
        #expect(refusal(options(lab, [("a", ta), ("b", tb), ("z", tb)]))?.contains("the set has no member 'z'") == true)
        #expect(refusal(options(lab, [("a", ta)], only: ["a", "q"]))?.contains("--only q: the set has no member 'q'") == true)
        // Two members to one target; a target that is an image of the set.
        #expect(refusal(options(lab, [("a", ta), ("b", ta)]))?.contains("target \(ta) is also the target of member 'a'") == true)
        #expect(refusal(options(lab, [("a", ta), ("b", lab.path("a.qcow2"))]))?.contains("is also the image") == true)
        // A set that is not whole.
        unlink(lab.path("b.qcow2"))
        let r2 = refusal(options(lab, [("a", ta)], only: ["a"]))
        #expect(r2?.contains("is not a whole set") == true && r2?.contains("member 'b' (b.qcow2) is missing") == true, "\(r2 ?? "")")
        #expect(!FileManager.default.fileExists(atPath: ta) && !FileManager.default.fileExists(atPath: tb))
    }

    @Test func restoreRefusesADamagedMemberBeforeWritingAny() throws {
        let lab = SetLab("refuse-damaged")
        try lab.wholeSet(["a", "b"])
        try lab.damage("b.qcow2")
        let out = SetLab("refuse-damaged-out")
        let r = refusal(options(lab, [("a", out.path("a.raw")), ("b", out.path("b.raw"))]))
        #expect(r?.hasPrefix("member 'b': ") == true && r?.contains("is damaged") == true, "\(r ?? "")")
        #expect(!FileManager.default.fileExists(atPath: out.path("a.raw")))
        // The intact member alone restores.
        let res = try SetRestoreJob.run(options(lab, [("a", out.path("a.raw"))], only: ["a"]), reporter: QuietReporter())
        #expect(res.failure == nil && res.members.map(\.member) == ["a"])
    }

    @Test func restoreWritesEveryMember() throws {
        let lab = SetLab("restore")
        try lab.wholeSet(["a", "b"])
        let out = SetLab("restore-out")
        let res = try SetRestoreJob.run(options(lab, [("b", out.path("b.raw")), ("a", out.path("a.raw"))]), reporter: QuietReporter())
        #expect(res.failure == nil)
        #expect(res.setID == "set-A")
        #expect(res.members.map(\.member) == ["a", "b"])         // the set's order
        for (i, n) in ["a", "b"].enumerated() {
            var expected = SetLab.volume(seed: UInt8(i + 1))
            for j in (3 * SetLab.clusterSize)..<expected.count { expected[j] = 0 }   // cluster 3 was not imaged
            let got = [UInt8](FileManager.default.contents(atPath: out.path("\(n).raw")) ?? Data())
            #expect(got == expected, "member \(n)")
        }
    }
}
