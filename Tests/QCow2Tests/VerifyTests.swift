// VerifyTests.swift — verify() is clean on good images and reports damage
// anywhere: compressed and raw data (naming the right guest cluster), L1,
// L2, refcount structures, the header and its hotimage extension, the tail
// blob, truncation, the incomplete flag, and writes by another program.

import Foundation
import Testing
@testable import QCow2

/// A small image plus the knowledge needed to damage it precisely.
struct DamageLab {
    let dir = TempDir("verify")
    let disk: [UInt8]
    let built: Fixture.Built
    let original: [UInt8]
    let compression: QCow2Compression
    let cs: Int

    init(compression: QCow2Compression = .zstd(level: 1), clusterBits: Int = 12, clusters: Int = 48, seed: UInt64 = 3) throws {
        cs = 1 << clusterBits
        self.compression = compression
        disk = Fixture.clusteredDisk(size: cs * clusters, clusterSize: cs, seed: seed)
        built = try Fixture.build(path: dir.file("good.qcow2"), disk: disk, clusterBits: clusterBits,
                                  compression: compression, seed: seed, keep: { $0 % 6 != 1 })
        original = Fixture.bytes(built.path)
    }

    var reader: QCow2Reader { try! QCow2Reader(path: built.path) }

    /// Writes a damaged copy and verifies it; init failures become an `.open` problem.
    func verify(_ damage: (inout [UInt8]) -> Void) -> VerifyReport {
        var bytes = original
        damage(&bytes)
        let path = dir.file("damaged.qcow2")
        Fixture.store(bytes, path)
        return QCow2Reader.verifyImage(at: path)
    }

    /// The exact length of cluster `c`'s compressed stream (re-encoded).
    func streamLength(_ c: UInt64) -> Int? {
        let enc = ClusterEncoder(compression: compression, clusterSize: cs)
        let lo = Int(c) * cs
        let e = disk.withUnsafeBytes { enc.encode(index: c, data: UnsafeRawBufferPointer(rebasing: $0[lo..<(lo + cs)])) }
        if case .compressed(let b) = e.payload { return b.count }
        return nil
    }

    func clusters(where pick: (ClusterState) -> Bool) throws -> [(UInt64, ClusterState)] {
        let r = reader
        return try (0..<r.guestClusters).compactMap { c in
            let s = try r.clusterState(c)
            return pick(s) ? (c, s) : nil
        }
    }
}

@Suite("Verify")
struct VerifyTests {
    @Test(arguments: [QCow2Compression.none, .zstd(level: 1), .zlib(level: 6)])
    func cleanImagesVerifyClean(_ compression: QCow2Compression) throws {
        let lab = try DamageLab(compression: compression)
        var calls = 0
        var last: (UInt64, UInt64) = (0, 0)
        let report = lab.reader.verify { done, total in calls += 1; last = (done, total) }
        #expect(report.isClean, "\(report)")
        #expect(report.clustersChecked == UInt64(lab.built.written.count))
        #expect(calls > 0 && last.0 == last.1 && last.1 == UInt64(lab.built.written.count))
        #expect(lab.verify { _ in }.isClean)
    }

    @Test(arguments: [QCow2Compression.zstd(level: 1), .zlib(level: 6)])
    func flippedByteInCompressedCluster(_ compression: QCow2Compression) throws {
        let lab = try DamageLab(compression: compression)
        let compressed = try lab.clusters { if case .compressed = $0 { return true } else { return false } }
        #expect(compressed.count >= 5)
        for (c, state) in compressed.prefix(6) {
            guard case .compressed(let host, _) = state, let n = lab.streamLength(c) else { continue }
            for pos in [0, n / 2, n - 1] {
                let report = lab.verify { $0[Int(host) + pos] ^= 0xFF }
                let data = report.problems.filter { $0.kind == .data }
                #expect(data.count == 1 && data.first?.cluster == c,
                        "flip at byte \(pos) of \(n) in cluster \(c)'s stream: \(report)")
                #expect(data.first?.description.contains("(cluster \(c))") == true)
                #expect(data.first?.guestOffset == c * UInt64(lab.cs))
            }
        }
    }

    /// Single-bit flips spread over every compressed stream, including bits
    /// that do not change the decompressed output (deflate padding, unused
    /// table bits): the stream itself is covered by the recorded checksum.
    /// (An exhaustive sweep of every bit position passed when this was written.)
    @Test(arguments: [QCow2Compression.zstd(level: 1), .zlib(level: 6)])
    func bitFlipsAcrossCompressedStreams(_ compression: QCow2Compression) throws {
        let lab = try DamageLab(compression: compression)
        let compressed = try lab.clusters { if case .compressed = $0 { return true } else { return false } }
        var cases = 0
        var phase = 0
        for (c, state) in compressed {
            guard case .compressed(let host, _) = state, let n = lab.streamLength(c) else { continue }
            var pos = phase % 37
            while pos < n {
                let bit = UInt8(1) << UInt8((pos + Int(c)) % 8)
                let report = lab.verify { $0[Int(host) + pos] ^= bit }
                #expect(report.problems.contains { $0.kind == .data && $0.cluster == c },
                        "bit \(bit) at byte \(pos) of cluster \(c)'s \(n)-byte stream went unnoticed")
                pos += 37
                cases += 1
            }
            phase += 5
        }
        #expect(cases > 200)
    }

    @Test func flippedByteInRawCluster() throws {
        let lab = try DamageLab()
        let raws = try lab.clusters { if case .raw = $0 { return true } else { return false } }
        #expect(!raws.isEmpty)
        for (c, state) in raws.prefix(4) {
            guard case .raw(let host) = state else { continue }
            let report = lab.verify { $0[Int(host) + 1234] ^= 0x01 }
            #expect(report.problems.count == 1, "\(report)")
            let p = report.problems.first
            #expect(p?.kind == .data && p?.cluster == c && p?.hostOffset == host)
            let start = c * UInt64(lab.cs)
            #expect(p?.description.hasPrefix("guest bytes 0x\(String(start, radix: 16))–0x\(String(start + UInt64(lab.cs) - 1, radix: 16)) (cluster \(c)): checksum mismatch") == true,
                    "\(p?.description ?? "")")
        }
    }

    @Test func flippedByteInL2Table() throws {
        let lab = try DamageLab()
        let r = lab.reader
        let l2 = r.l1[0] & Q.offsetMask
        // An entry of a written cluster, and an entry of an unwritten one.
        let written = lab.built.written.sorted().first { $0 > 2 }!
        let unwritten = (0..<r.guestClusters).first { !lab.built.written.contains($0) }!
        for c in [written, unwritten] {
            let report = lab.verify { $0[Int(l2) + Int(c) * 8 + 6] ^= 0x10 }
            #expect(report.problems.contains { $0.kind == .l2 && $0.message.contains("checksum mismatch") && $0.cluster == 0 },
                    "\(report)")
            #expect(!report.isClean)
        }
        // Clearing an entry: the cluster is recorded as written but missing.
        let report = lab.verify { for k in 0..<8 { $0[Int(l2) + Int(written) * 8 + k] = 0 } }
        #expect(report.problems.contains { $0.kind == .missing && $0.cluster == written }, "\(report)")
    }

    @Test func flippedByteInL1AndRefcountStructures() throws {
        let lab = try DamageLab()
        let r = lab.reader
        let l1 = Int(r.l1Offset)
        let report = lab.verify { $0[l1 + 5] ^= 0x01 }
        #expect(report.problems.contains { $0.kind == .l1 && $0.message.contains("checksum mismatch") }, "\(report)")
        // Padding after the last L1 entry is covered too.
        let report2 = lab.verify { $0[l1 + r.l1Size * 8 + 3] = 0x7F }
        #expect(report2.problems.contains { $0.kind == .l1 }, "\(report2)")

        let rt = Int(r.refcountTableOffset)
        let block = Int(lab.original.be64(at: rt))
        // Cluster 0's refcount 1 -> 0x0101.
        let report3 = lab.verify { $0[block] ^= 0x01 }
        #expect(report3.problems.contains { $0.kind == .refcount && $0.message.contains("checksum mismatch") }, "\(report3)")
        #expect(report3.problems.contains { $0.kind == .refcount && $0.hostOffset == 0 && $0.message.contains("refcount 257") }, "\(report3)")
        // An unused refcount entry far beyond the file.
        let report4 = lab.verify { $0[block + lab.cs - 1] = 1 }
        #expect(report4.problems.contains { $0.kind == .refcount && $0.message.contains("checksum mismatch") }, "\(report4)")
        // The refcount table itself.
        let report5 = lab.verify { $0[rt + 40] = 0x55 }
        #expect(report5.problems.contains { $0.kind == .refcount }, "\(report5)")
    }

    /// Every byte of the header and the hotimage extension matters.
    @Test func everyHeaderByteIsProtected() throws {
        let lab = try DamageLab(clusterBits: 9, clusters: 40)
        let ext = lab.reader.hotiExtOffset!
        for pos in 0..<(ext + Q.hotiExtLength + 8) {
            for flip: UInt8 in [0x01, 0x80] {
                let report = lab.verify { $0[pos] ^= flip }
                #expect(!report.isClean, "flip \(flip) at header byte \(pos) went unnoticed")
            }
        }
        // Damage to the extension's magic: the autoclear marker reveals it.
        let report = lab.verify { $0[Q.headerLength] ^= 0x20 }
        #expect(report.problems.contains { $0.kind == .hotimage && $0.message.contains("missing or damaged") }, "\(report)")
        // Rest of the header cluster (unused bytes).
        let report2 = lab.verify { $0[lab.cs - 1] = 9 }
        #expect(report2.problems.contains { $0.kind == .header && $0.message.contains("checksum mismatch") }, "\(report2)")
    }

    @Test func flippedBytesInTailBlob() throws {
        let lab = try DamageLab()
        let info = lab.reader.hotimage!
        var pos = Int(info.tailOffset)
        let end = Int(info.tailOffset + info.tailLength)
        var cases = 0
        while pos < end {
            let report = lab.verify { $0[pos] ^= 0x04 }
            #expect(!report.isClean, "flip at tail byte \(pos - Int(info.tailOffset)) went unnoticed")
            if pos - Int(info.tailOffset) >= Q.tailHeaderLength {
                #expect(report.problems.contains { $0.kind == .tail || $0.kind == .hotimage }, "\(report)")
            }
            pos += 13
            cases += 1
        }
        #expect(cases > 20)
        // The per-cluster checksum table names the cluster whose record is wrong.
        let r = lab.reader
        let t = r.tail!
        let c = lab.built.written.sorted().first { c in
            if case .raw = try! r.clusterState(c) { return true } else { return false }
        }!
        let at = Int(info.tailOffset + t.groupsOffset) + 16 + r.l2Entries / 8 + 4 * Int(c)
        let report = lab.verify { $0[at] ^= 0xFF }
        #expect(report.problems.contains { $0.kind == .data && $0.cluster == c }, "\(report)")
        #expect(report.problems.contains { $0.kind == .tail }, "\(report)")
    }

    @Test func truncationIsReported() throws {
        let lab = try DamageLab()
        let r = lab.reader
        let info = r.hotimage!
        let n = lab.original.count
        let points = [n - 1, Int(info.tailOffset) + Q.tailHeaderLength + 3, Int(info.tailOffset),
                      Int(r.refcountTableOffset) + 100, Int(r.l1Offset) + 4, Int(r.l1Offset) - 1000,
                      lab.cs + 10, lab.cs, 200, 100, 50, 0]
        for cut in points {
            let report = lab.verify { $0.removeSubrange(cut...) }
            #expect(!report.isClean, "truncation to \(cut) bytes went unnoticed")
        }
    }

    @Test func incompleteFlagIsReported() throws {
        let dir = TempDir("incomplete")
        let cs = 4096
        let disk = Fixture.clusteredDisk(size: cs * 20, clusterSize: cs, seed: 8)
        let built = try Fixture.build(path: dir.file("i.qcow2"), disk: disk, clusterBits: 12,
                                      compression: .zstd(level: 1), keep: { $0 < 7 }, complete: false)
        let r = try QCow2Reader(path: built.path)
        #expect(r.hotimage?.complete == false)
        let report = r.verify()
        #expect(report.problems.map(\.kind) == [.incomplete], "\(report)")
        #expect(try Fixture.readAll(built.path) == built.expected)
    }

    /// qemu opening the image for writing clears autoclear bit 63: our
    /// checksums no longer apply and verify says so.
    @Test func writesByQemuAreNoticed() throws {
        guard let qemuIO = Tools.qemuIO else {
            print("SKIPPED: qemu-io not found on PATH")
            return
        }
        let lab = try DamageLab()
        let path = lab.dir.file("qemu-touched.qcow2")
        Fixture.store(lab.original, path)
        let io = try Tools.run(qemuIO, ["-f", "qcow2", "-c", "write -P 0x33 8k 4k", path])
        #expect(io.status == 0, "\(io.stderr)")
        let r = try QCow2Reader(path: path)
        #expect(r.hotimage?.checksumsValid == false)
        let report = r.verify()
        #expect(report.problems.contains { $0.kind == .hotimage && $0.message.contains("another program") }, "\(report)")
    }

    @Test func problemDescriptionsNameTheRegion() {
        let p = VerifyProblem(kind: .data, guestOffset: 0x30000, guestLength: 0x10000, cluster: 3,
                              clusterCount: 1, hostOffset: 0x123400, message: "checksum mismatch")
        #expect(p.description == "guest bytes 0x30000–0x3ffff (cluster 3): checksum mismatch (file offset 0x123400)")
        let q = VerifyProblem(kind: .l2, guestOffset: 0, guestLength: 0x2000_0000, cluster: 0, clusterCount: 8192,
                              hostOffset: 0x50000, message: "L2 table at file offset 0x50000: checksum mismatch")
        #expect(q.description == "guest bytes 0x0–0x1fffffff (clusters 0–8191): L2 table at file offset 0x50000: checksum mismatch")
    }
}
