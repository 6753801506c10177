import Foundation
import Testing
import HotCore
import Logging
@testable import HotDaemon

// The change map's state file (ChangeTracking.swift): its path beside the
// buffer directory, the encoding, and every trust rule with its reason.

private let id = DeviceIdentity(device: "/dev/loop7", devMajor: 7, devMinor: 7, sizeBytes: 1 << 30,
                                backingDev: 2049, backingIno: 1234)

private func header(_ tweak: (inout ChangeStateHeader) -> Void = { _ in }) -> ChangeStateHeader {
    var h = ChangeStateHeader(device: "/dev/loop7", devMajor: 7, devMinor: 7, sizeBytes: 1 << 30, backingDev: 2049,
                              backingIno: 1234, bootId: "boot-a", sectorsWritten: 1000, clean: true, trusted: true,
                              reason: nil, since: "img-1", sinceTime: "t", generation: 3, clusterBytes: 65536,
                              clusterCount: 16384)
    tweak(&h)
    return h
}

private func file(_ h: ChangeStateHeader, words: [UInt64]? = nil) -> [UInt8] {
    var w = words ?? [UInt64](repeating: 0, count: 256)
    if words == nil { w[0] = 0b101; w[255] = 1 << 63 }
    return ChangeStateFile.encode(h, w)
}

private func judge(_ bytes: [UInt8]?, boot: String? = "boot-a", sectors: UInt64? = 1000) -> ChangeLoad {
    ChangeStateFile.judge(bytes, identity: id, bootID: boot, sectorsNow: sectors, clusterBytes: 65536, clusterCount: 16384)
}

@Suite("Change tracking: the state file and trust")
struct ChangeTrackingTests {
    @Test("The state file sits beside the buffer directory")
    func path() {
        #expect(ChangeStateFile.path(bufferDir: "/var/tmp/hotimage-data") == "/var/tmp/hotimage-data.cbt")
        #expect(ChangeStateFile.path(bufferDir: "/srv/buf/") == "/srv/buf.cbt")
    }

    @Test("A clean, trusted file of this boot and device with an unchanged counter is trusted")
    func trusted() {
        let r = judge(file(header()))
        #expect(r.trusted)
        #expect(r.reason == nil)
        #expect(r.header?.since == "img-1")
        #expect(r.bits?.count == 3)
        #expect(r.bits.map { Array($0.bits.runs(in: 0..<16384)) } == [0..<1, 2..<3, 16383..<16384])
    }

    @Test("Each broken rule gives its reason")
    func untrusted() {
        #expect(judge(nil).reason == "no saved map")
        #expect(judge(Array("garbage".utf8)).reason == "the saved map is unreadable")
        #expect(judge(Array(file(header()).dropLast())).reason == "the saved map is unreadable")
        #expect(judge(file(header { $0.clean = false })).reason == "the daemon stopped without a clean detach")
        #expect(judge(file(header()), boot: "boot-b").reason == "another boot")
        #expect(judge(file(header()), sectors: 1016).reason == "the device was written while detached (16 sectors)")
        #expect(judge(file(header { $0.sizeBytes = 1 << 31 })).reason == "another device or size")
        #expect(judge(file(header { $0.backingIno = 99 })).reason == "another device or size")
        #expect(judge(file(header { $0.devMinor = 8 })).reason == "another device or size")
        // A loop device's backing file written another way while detached.
        #expect(judge(file(header { $0.backingStamp = "1048576 10 10" })).reason == "the loop device's backing file changed while detached")
        #expect(ChangeStateFile.judge(file(header { $0.backingStamp = "1048576 10 10" }), identity: id, bootID: "boot-a", sectorsNow: 1000,
                                      backingStampNow: "1048576 10 10", clusterBytes: 65536, clusterCount: 16384).trusted)
        #expect(judge(file(header { $0.trusted = false; $0.reason = "no saved map" })).reason == "no saved map")
        #expect(judge(file(header { $0.clusterBytes = 4096; $0.clusterCount = 262144 },
                           words: [UInt64](repeating: 0, count: 4096))).reason == "another cluster size")
        for r in [judge(nil), judge(file(header()), boot: "boot-b")] { #expect(!r.trusted && r.bits == nil) }
    }

    @Test("Atomic write: 0600, content as encoded, no temp file left")
    func write() throws {
        let dir = "/tmp/cbt-test-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let p = dir + "/x.cbt"
        let bytes = file(header())
        try ChangeStateFile.writeAtomically(p, bytes)
        try ChangeStateFile.writeAtomically(p, bytes)   // over an existing file
        #expect(ChangeStateFile.read(p) == bytes)
        let attrs = try FileManager.default.attributesOfItem(atPath: p)
        #expect((attrs[.posixPermissions] as? Int) == 0o600)
        #expect(!FileManager.default.fileExists(atPath: p + ".tmp"))
    }

    @Test("The tracker over an engine: attach, commit, clean detach, attach again; a crash; a write while detached")
    func trackerFlow() throws {
        let dir = "/tmp/cbt-test-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let state = dir + "/hb.cbt"
        let device = MemoryBlockIO(size: 1 << 20)   // 16 clusters
        let counter = Box(500)
        let ident = DeviceIdentity(device: "/dev/x", devMajor: 1, devMinor: 2, sizeBytes: 1 << 20)
        var n = 0
        func attach() -> (SnapshotEngine, ChangeTracker) {
            n += 1
            let e = SnapshotEngine(device: device, spill: MemorySpillStore())
            let t = ChangeTracker(engine: e, identity: ident, stateFile: state, logger: Logger(label: "t\(n)"),
                                  bootID: { "boot" }, sectorsWritten: { UInt64(counter.value) })
            t.load(persistRefusal: nil)
            return (e, t)
        }
        func write(_ e: SnapshotEngine, cluster: UInt64) throws {
            var b = [UInt8](repeating: 1, count: 512)
            try b.withUnsafeMutableBytes { try e.write(offset: cluster << 16, count: 512, from: $0.baseAddress!) }
        }
        func header() -> ChangeStateHeader? { ChangeStateFile.read(state).flatMap { ChangeStateFile.decode($0)?.0 } }

        // Fresh: untrusted, the file written unclean at once.
        var (e, t) = attach()
        #expect(t.status()?.trusted == false)
        #expect(t.status()?.reason == "no saved map")
        #expect(header()?.clean == false)
        try write(e, cluster: 3)
        // A committed cut: trusted from test-1; the writes after it stay.
        try e.begin(consistency: .raw)
        _ = e.arm()
        _ = try e.narrow(used: [0..<(1 << 20)])
        try write(e, cluster: 7)
        #expect(e.endSession(commit: true))
        t.committed("test-1")
        #expect(t.status()?.trusted == true)
        #expect(t.status()?.since == "test-1")
        #expect(t.status()?.changedClusters == 1)
        #expect(header()?.since == "test-1" && header()?.clean == false && header()?.generation == 1)
        t.saveClean()
        #expect(header()?.clean == true)
        // Attach again: trusted, same since, same map.
        (e, t) = attach()
        #expect(t.status()?.trusted == true, "\(t.status()?.reason ?? "")")
        #expect(t.status()?.since == "test-1")
        #expect(t.status()?.changedClusters == 1)
        #expect(e.exportChanges().map { Array($0.bits.runs(in: 0..<16)) } == [7..<8])
        #expect(header()?.clean == false)
        // A crash (no saveClean): untrusted, empty, since gone.
        (e, t) = attach()
        #expect(t.status()?.trusted == false)
        #expect(t.status()?.reason == "the daemon stopped without a clean detach")
        #expect(t.status()?.since == nil)
        #expect(t.status()?.changedClusters == 0)
        // A clean detach while untrusted keeps it untrusted.
        t.saveClean()
        (e, t) = attach()
        #expect(t.status()?.trusted == false)
        // Trusted again by a commit; clean detach; the device written while detached.
        try e.begin(consistency: .raw)
        _ = e.arm()
        _ = try e.narrow(used: [0..<(1 << 20)])
        #expect(e.endSession(commit: true))
        t.committed("test-2")
        t.saveClean()
        counter.value += 8
        (e, t) = attach()
        #expect(t.status()?.reason == "the device was written while detached (8 sectors)")
    }
}

private final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ v: T) { value = v }
}
