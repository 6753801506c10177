// OracleTests.swift — qemu-img is the oracle: it must find our images
// flawless (no errors, no leaks), read the same bytes we do, and we must
// read (and verify clean) the images qemu-img writes. Skipped, with the
// reason printed, when qemu-img is not on PATH.

import Foundation
import Testing
@testable import QCow2

private func requireQemu() -> Bool {
    if Tools.qemuImg == nil {
        print("SKIPPED: qemu-img not found on PATH; the qemu-img oracle tests did not run")
        return false
    }
    return true
}

@Suite("qemu-img oracle")
struct OracleTests {
    static let cases: [(QCow2Compression, Int)] = [
        (.zstd(level: 1), 16), (.zlib(level: 6), 16), (.none, 16),
        (.zstd(level: 1), 9), (.zlib(level: 6), 12), (.zstd(level: 5), 21),
    ]

    @Test(arguments: 0..<cases.count)
    func qemuAcceptsOurImages(_ k: Int) throws {
        guard requireQemu() else { return }
        let (compression, bits) = Self.cases[k]
        let cs = 1 << bits
        let dir = TempDir("oracle")
        let clusters = bits == 21 ? 5 : (bits == 9 ? 700 : 60)
        let size = cs * clusters + (bits > 9 ? cs / 2 : 0)
        let disk = Fixture.clusteredDisk(size: size, clusterSize: cs, seed: UInt64(100 + k))
        let built = try Fixture.build(path: dir.file("ours.qcow2"), disk: disk, clusterBits: bits,
                                      compression: compression, seed: UInt64(k), keep: { $0 % 7 != 2 })

        let (clean, output) = try Tools.qemuCheck(built.path)
        #expect(clean, "qemu-img check:\n\(output)")

        let info = try Tools.run(Tools.qemuImg!, ["info", "--output=json", built.path])
        #expect(info.status == 0, "\(info.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any]
        #expect(json?["format"] as? String == "qcow2")
        #expect((json?["virtual-size"] as? NSNumber)?.uint64Value == UInt64(size))
        #expect((json?["cluster-size"] as? NSNumber)?.intValue == cs)
        let specific = (json?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        #expect(specific?["compression-type"] as? String == (compression.headerType == .zstd ? "zstd" : "zlib"))
        #expect(specific?["compat"] as? String == "1.1")

        let raw = dir.file("out.raw")
        let conv = try Tools.run(Tools.qemuImg!, ["convert", "-f", "qcow2", "-O", "raw", built.path, raw])
        #expect(conv.status == 0, "\(conv.stderr)")
        let qemuBytes = Fixture.bytes(raw)
        #expect(qemuBytes.count == size)
        #expect(qemuBytes == built.expected, "qemu-img reads different guest data")
        #expect(try Fixture.readAll(built.path) == qemuBytes)

        // An incomplete image is just as valid a qcow2.
        let partial = try Fixture.build(path: dir.file("partial.qcow2"), disk: disk, clusterBits: bits,
                                        compression: compression, keep: { $0 % 3 == 0 }, complete: false)
        let (clean2, output2) = try Tools.qemuCheck(partial.path)
        #expect(clean2, "qemu-img check (incomplete image):\n\(output2)")
    }

    /// Edge shapes: an empty disk, nothing written, only zero clusters, and
    /// a huge sparse disk written at both ends.
    @Test func qemuAcceptsEdgeImages() throws {
        guard requireQemu() else { return }
        let dir = TempDir("edge")
        var images: [(String, UInt64, [UInt64: [UInt8]])] = []
        let cs = 65536
        let text = Array(String(repeating: "edge case ", count: cs / 10 + 1).utf8.prefix(cs))
        images.append(("empty", 0, [:]))
        images.append(("unwritten", 1 << 30, [:]))
        images.append(("zeros", 1 << 30, [0: [UInt8](repeating: 0, count: cs), 9000: [UInt8](repeating: 0, count: cs)]))
        let huge: UInt64 = 8 << 40
        let last = huge / UInt64(cs) - 1
        images.append(("huge-sparse", huge, [0: text, 1: text.reversed(), last: text, last - 70_000: text]))
        for (name, size, clusters) in images {
            let path = dir.file("\(name).qcow2")
            let w = try QCow2Writer(path: path, virtualSize: size, compression: .zstd(level: 1))
            let enc = ClusterEncoder(compression: .zstd(level: 1), clusterSize: cs)
            for (c, data) in clusters { try w.write(data.withUnsafeBytes { enc.encode(index: c, data: $0) }) }
            _ = try w.finish(metadata: Array(name.utf8), complete: true)
            let (clean, output) = try Tools.qemuCheck(path)
            #expect(clean, "\(name): qemu-img check:\n\(output)")
            let info = try Tools.run(Tools.qemuImg!, ["info", "--output=json", path])
            let json = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any]
            #expect((json?["virtual-size"] as? NSNumber)?.uint64Value == size, "\(name)")
            let r = try QCow2Reader(path: path)
            #expect(r.hotimage?.metadata == Array(name.utf8))
            let report = r.verify()
            #expect(report.isClean, "\(name): \(report)")
            #expect(report.clustersChecked == UInt64(clusters.count))
            let dec = ClusterDecoder()
            var buf = [UInt8](repeating: 0, count: cs)
            for (c, data) in clusters {
                let hasData = try buf.withUnsafeMutableBytes { try r.readCluster(c, into: $0, decoder: dec) }
                #expect(buf == data && hasData == data.contains { $0 != 0 }, "\(name) cluster \(c)")
            }
            #expect(Set(try r.allocatedClusters()) == Set(clusters.filter { $0.value.contains { $0 != 0 } }.keys))
        }
    }

    /// Many compressed clusters in one host cluster: with 2 MiB clusters and
    /// tiny payloads a host cluster would exceed the 16-bit refcount limit;
    /// the writer must start a new host cluster instead.
    @Test func refcountLimitPerHostCluster() throws {
        guard requireQemu() else { return }
        let dir = TempDir("refmax")
        let path = dir.file("many.qcow2")
        let n: UInt64 = 70_000
        let cs: UInt64 = 2 << 20
        let w = try QCow2Writer(path: path, virtualSize: n * cs, clusterBits: 21, compression: .zstd(level: 1))
        // Not real zstd frames: qemu-img check does not decompress.
        let blob = [UInt8](repeating: 0x42, count: 16)
        for i in 0..<n { try w.write(EncodedCluster(index: i, payload: .compressed(blob), crc: 0)) }
        _ = try w.finish(metadata: [], complete: true)
        let (clean, output) = try Tools.qemuCheck(path)
        #expect(clean, "qemu-img check:\n\(output)")
        let report = QCow2Reader.verifyImage(at: path)
        #expect(!report.problems.contains { $0.kind == .refcount || $0.kind == .l2 || $0.kind == .l1 }, "\(report.problems.prefix(5))")
    }

    static let qemuCases: [(String, [String])] = [
        ("uncompressed", []),
        ("zlib", ["-c"]),
        ("zstd", ["-c", "-o", "compression_type=zstd"]),
        ("zstd-4k", ["-c", "-o", "compression_type=zstd,cluster_size=4096"]),
        ("zlib-512", ["-c", "-o", "cluster_size=512"]),
        ("v2-zlib", ["-c", "-o", "compat=0.10"]),
    ]

    @Test(arguments: 0..<qemuCases.count)
    func weReadQemuImages(_ k: Int) throws {
        guard requireQemu() else { return }
        let (name, args) = Self.qemuCases[k]
        let dir = TempDir("qemu-\(name)")
        let size = 3 << 20
        let src = dir.file("src.raw")
        let disk = Fixture.clusteredDisk(size: size, clusterSize: 65536, seed: UInt64(k + 500))
        Fixture.store(disk, src)
        let img = dir.file("qemu.qcow2")
        let conv = try Tools.run(Tools.qemuImg!, ["convert", "-f", "raw", "-O", "qcow2"] + args + [src, img])
        #expect(conv.status == 0, "\(conv.stderr)")
        let reader = try QCow2Reader(path: img)
        #expect(reader.hotimage == nil)
        #expect(reader.hotimageProblems.isEmpty)
        #expect(reader.virtualSize == UInt64(size))
        #expect(try Fixture.readAll(img) == disk)
        if args.contains("-c") {
            let states = try (0..<reader.guestClusters).map { try reader.clusterState($0) }
            #expect(states.contains { if case .compressed = $0 { return true } else { return false } })
        }
        let report = reader.verify()
        #expect(report.isClean, "\(report)")
        #expect(report.checkedRefcounts && !report.checkedChecksums)
    }

    /// Internal snapshots: the active state is read; refcounts are skipped
    /// (with a note) because snapshot tables hold references too.
    @Test func weReadQemuImagesWithSnapshots() throws {
        guard requireQemu(), let qemuIO = Tools.qemuIO else {
            print("SKIPPED: qemu-img or qemu-io not found on PATH")
            return
        }
        let dir = TempDir("qemu-snap")
        let img = dir.file("s.qcow2")
        _ = try Tools.run(Tools.qemuImg!, ["create", "-q", "-f", "qcow2", img, "1M"])
        _ = try Tools.run(qemuIO, ["-f", "qcow2", "-c", "write -P 0x01 0 128k", img])
        let snap = try Tools.run(Tools.qemuImg!, ["snapshot", "-c", "before", img])
        #expect(snap.status == 0, "\(snap.stderr)")
        _ = try Tools.run(qemuIO, ["-f", "qcow2", "-c", "write -P 0x02 64k 64k", img])
        let r = try QCow2Reader(path: img)
        #expect(r.snapshotCount == 1)
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        for i in 0..<(64 << 10) { expected[i] = 1 }
        for i in (64 << 10)..<(128 << 10) { expected[i] = 2 }
        #expect(try Fixture.readAll(img) == expected)
        let report = r.verify()
        #expect(report.isClean, "\(report)")
        #expect(!report.checkedRefcounts && report.notes.contains { $0.contains("snapshot") })
    }

    /// Zero-flag clusters (plain and preallocated) as qemu writes them.
    @Test func weReadQemuZeroClusters() throws {
        guard requireQemu(), let qemuIO = Tools.qemuIO else {
            print("SKIPPED: qemu-img or qemu-io not found on PATH")
            return
        }
        let dir = TempDir("qemu-zero")
        let img = dir.file("z.qcow2")
        _ = try Tools.run(Tools.qemuImg!, ["create", "-q", "-f", "qcow2", img, "4M"])
        let io = try Tools.run(qemuIO, ["-f", "qcow2",
                                        "-c", "write -P 0x5a 0 256k",
                                        "-c", "write -z 64k 64k",          // zero flag over allocated data
                                        "-c", "write -z 1M 128k",          // plain zero clusters
                                        "-c", "write -P 0x11 3M 4k", img])
        #expect(io.status == 0, "\(io.stderr)")
        let reader = try QCow2Reader(path: img)
        #expect(try reader.clusterState(16) == .zero)
        var expected = [UInt8](repeating: 0, count: 4 << 20)
        for i in 0..<(256 << 10) { expected[i] = 0x5A }
        for i in (64 << 10)..<(128 << 10) { expected[i] = 0 }
        for i in (3 << 20)..<((3 << 20) + 4096) { expected[i] = 0x11 }
        #expect(try Fixture.readAll(img) == expected)
        #expect(!(try reader.allocatedClusters().contains(16)))
        let report = reader.verify()
        #expect(report.isClean, "\(report)")
        #expect(report.zeroClusters >= 2)
    }
}

/// With QCOW2_SAMPLE_DIR set, leaves sample images there for inspection
/// with qemu-img (no assertions beyond the write succeeding).
@Test func writeSampleImagesWhenAsked() throws {
    guard let dir = ProcessInfo.processInfo.environment["QCOW2_SAMPLE_DIR"] else { return }
    let cs = 65536
    let disk = Fixture.clusteredDisk(size: cs * 64 + cs / 2, clusterSize: cs, seed: 42)
    for (name, c) in [("zstd", QCow2Compression.zstd(level: 1)), ("zlib", .zlib(level: 6)), ("none", .none)] {
        let path = "\(dir)/sample-\(name).qcow2"
        try? FileManager.default.removeItem(atPath: path)
        try Fixture.build(path: path, disk: disk, clusterBits: 16, compression: c, keep: { $0 % 9 != 4 })
    }
    Fixture.store(disk, "\(dir)/sample-source.raw")
}
