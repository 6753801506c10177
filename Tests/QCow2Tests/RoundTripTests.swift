// RoundTripTests.swift — what the writer writes, the reader reads back:
// every compression, several cluster sizes, clusters in shuffled order,
// unwritten clusters reading as zeros, and the writer's error paths.

import Foundation
import Testing
@testable import QCow2

@Suite("Compression option")
struct CompressionOptionTests {
    @Test func parsesNamesAndLevels() throws {
        #expect(try QCow2Compression(parsing: "none") == .none)
        #expect(try QCow2Compression(parsing: "zstd") == .zstd(level: 1))
        #expect(try QCow2Compression(parsing: "zstd:3") == .zstd(level: 3))
        #expect(try QCow2Compression(parsing: " ZSTD:19 ") == .zstd(level: 19))
        #expect(try QCow2Compression(parsing: "zstd:-5") == .zstd(level: -5))
        #expect(try QCow2Compression(parsing: "zlib") == .zlib(level: 6))
        #expect(try QCow2Compression(parsing: "zlib:9") == .zlib(level: 9))
        for c: QCow2Compression in [.none, .zstd(level: 7), .zlib(level: 2)] {
            #expect(try QCow2Compression(parsing: c.description) == c)
        }
    }

    @Test(arguments: ["zstd:0", "zstd:23", "zstd:x", "zstd:", "zlib:0", "zlib:10", "none:1", "lz4", "", "gzip:3"])
    func rejectsBadInput(_ text: String) {
        do {
            _ = try QCow2Compression(parsing: text)
            Issue.record("\"\(text)\" was accepted")
        } catch let e as QCow2Error {
            #expect(e.message.contains("\"\(text)\"") || e.message.contains(text.split(separator: ":").last.map(String.init) ?? text),
                    "error should quote the input: \(e.message)")
        } catch {
            Issue.record("unexpected error type \(error)")
        }
    }
}

@Suite("Cluster encoder and decoder")
struct CodecTests {
    @Test(arguments: [QCow2Compression.none, .zstd(level: 1), .zlib(level: 6)])
    func payloadKinds(_ compression: QCow2Compression) throws {
        let cs = 4096
        let enc = ClusterEncoder(compression: compression, clusterSize: cs)
        let dec = ClusterDecoder()
        var rng = SeededRNG(seed: 7)
        let zeros = [UInt8](repeating: 0, count: cs)
        let random = (0..<cs).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let text = Array(String(repeating: "hotimage backs up live filesystems. ", count: 200).utf8.prefix(cs))
        let short = Array(text.prefix(1000))

        let z = zeros.withUnsafeBytes { enc.encode(index: 0, data: $0) }
        guard case .zero = z.payload else { Issue.record("zeros not detected"); return }
        #expect(z.crc == crc32Of(zeros))

        let r = random.withUnsafeBytes { enc.encode(index: 1, data: $0) }
        guard case .raw(let rb) = r.payload else { Issue.record("random data was not stored raw"); return }
        #expect(rb == random)
        #expect(r.crc == crc32Of(random))

        let t = text.withUnsafeBytes { enc.encode(index: 2, data: $0) }
        switch (compression, t.payload) {
        case (.none, .raw(let b)):
            #expect(b == text)
        case (.zstd, .compressed(let b)), (.zlib, .compressed(let b)):
            #expect(b.count < cs)
            var out = [UInt8](repeating: 0xEE, count: cs)
            let type: QCow2CompressionType = compression.headerType
            // Trailing garbage after the stream (the rest of a sector) must be ignored.
            let padded = b + [1, 2, 3, 4, 5]
            let why = padded.withUnsafeBytes { src in out.withUnsafeMutableBytes { dec.decompress(type, src: src, dst: $0, strict: true) } }
            #expect(why == nil)
            #expect(out == text)
        default:
            Issue.record("unexpected payload for text with \(compression)")
        }
        #expect(t.crc == crc32Of(text))

        // Short data is zero-padded to a full cluster.
        let s = short.withUnsafeBytes { enc.encode(index: 3, data: $0) }
        let padded = short + [UInt8](repeating: 0, count: cs - short.count)
        #expect(s.crc == crc32Of(padded))
        if case .raw(let b) = s.payload { #expect(b == padded) }

        // Empty data is a zero cluster.
        let e = [UInt8]().withUnsafeBytes { enc.encode(index: 4, data: $0) }
        guard case .zero = e.payload else { Issue.record("empty data is not zero"); return }
    }

    @Test func decoderRejectsTruncatedAndGarbage() {
        let cs = 65536
        let text = Array(String(repeating: "abcdefgh12345678", count: cs / 16).utf8)
        for compression in [QCow2Compression.zstd(level: 3), .zlib(level: 6)] {
            let enc = ClusterEncoder(compression: compression, clusterSize: cs)
            let c = text.withUnsafeBytes { enc.encode(index: 0, data: $0) }
            guard case .compressed(let b) = c.payload else { Issue.record("not compressed"); continue }
            let dec = ClusterDecoder()
            var out = [UInt8](repeating: 0, count: cs)
            let type = compression.headerType
            let cut = Array(b.prefix(b.count / 2))
            let why = cut.withUnsafeBytes { src in out.withUnsafeMutableBytes { dec.decompress(type, src: src, dst: $0, strict: false) } }
            #expect(why != nil, "truncated \(compression) stream accepted")
            let garbage = [UInt8](repeating: 0xA5, count: 300)
            let why2 = garbage.withUnsafeBytes { src in out.withUnsafeMutableBytes { dec.decompress(type, src: src, dst: $0, strict: false) } }
            #expect(why2 != nil, "garbage accepted as \(compression)")
            // The decoder is reusable after failures.
            let why3 = b.withUnsafeBytes { src in out.withUnsafeMutableBytes { dec.decompress(type, src: src, dst: $0, strict: true) } }
            #expect(why3 == nil)
            #expect(out == text)
        }
    }
}

@Suite("Round trip")
struct RoundTripTests {
    static let cases: [(QCow2Compression, Int)] = [
        (.none, 12), (.zstd(level: 1), 12), (.zlib(level: 6), 12),
        (.none, 16), (.zstd(level: 3), 16), (.zlib(level: 1), 16),
        (.zstd(level: 1), 9),
    ]

    @Test(arguments: 0..<cases.count)
    func writeShuffledReadBack(_ k: Int) throws {
        let (compression, bits) = Self.cases[k]
        let cs = 1 << bits
        let dir = TempDir()
        // Not a multiple of the cluster size (but of 512).
        let size = cs * 37 + (cs > 512 ? cs / 2 : 0) + 512 * (cs > 1024 ? 1 : 0)
        let disk = Fixture.clusteredDisk(size: size, clusterSize: cs, seed: UInt64(k + 11))
        let skipEvery: UInt64 = 5
        let built = try Fixture.build(path: dir.file("img.qcow2"), disk: disk, clusterBits: bits,
                                      compression: compression, seed: UInt64(k),
                                      keep: { $0 % skipEvery != 3 })
        let reader = try QCow2Reader(path: built.path)
        #expect(reader.virtualSize == UInt64(size))
        #expect(reader.clusterSize == cs)
        #expect(reader.compressionType == (compression.headerType == .zstd ? "zstd" : "zlib"))
        #expect(reader.hotimage?.complete == true)
        #expect(reader.hotimage?.metadata == built.metadata)
        #expect(reader.hotimageProblems.isEmpty, "\(reader.hotimageProblems)")

        let back = try Fixture.readAll(built.path)
        #expect(back == built.expected)

        // Cluster states and the data/zero/unwritten distinction.
        var dataClusters: [UInt64] = []
        var sawCompressed = false, sawRaw = false, sawZero = false
        let dec = ClusterDecoder()
        var buf = [UInt8](repeating: 0, count: cs)
        for c in 0..<reader.guestClusters {
            let state = try reader.clusterState(c)
            let hasData = try buf.withUnsafeMutableBytes { try reader.readCluster(c, into: $0, decoder: dec) }
            if !built.written.contains(c) {
                #expect(state == .unallocated, "cluster \(c) was never written")
                #expect(!hasData)
                #expect(buf.allSatisfy { $0 == 0 })
                continue
            }
            switch state {
            case .unallocated: Issue.record("written cluster \(c) is unallocated")
            case .zero: sawZero = true; #expect(!hasData)
            case .raw: sawRaw = true; dataClusters.append(c); #expect(hasData)
            case .compressed: sawCompressed = true; dataClusters.append(c); #expect(hasData)
            }
        }
        #expect(Array(try reader.allocatedClusters()) == dataClusters)
        #expect(sawZero && sawRaw)
        #expect(sawCompressed == (compression != .none))

        let report = reader.verify()
        #expect(report.isClean, "\(report)")
        #expect(report.checkedChecksums && report.checkedRefcounts)
        #expect(report.clustersChecked == UInt64(built.written.count))
    }

    /// Several threads encode and write concurrently, in interleaved order.
    @Test func concurrentWriters() throws {
        let dir = TempDir()
        let cs = 65536
        let size = cs * 150
        let disk = Fixture.mixedData(count: size, seed: 99)
        let path = dir.file("mt.qcow2")
        let writer = try QCow2Writer(path: path, virtualSize: UInt64(size), compression: .zstd(level: 1))
        let threads = 4
        let failures = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let enc = ClusterEncoder(compression: .zstd(level: 1), clusterSize: cs)
            var c = UInt64(t)
            while c < 150 {
                let lo = Int(c) * cs
                let e = disk.withUnsafeBytes { enc.encode(index: c, data: UnsafeRawBufferPointer(rebasing: $0[lo..<(lo + cs)])) }
                do { try writer.write(e) } catch { failures.add() }
                c += UInt64(threads)
            }
        }
        #expect(failures.value == 0)
        let summary = try writer.finish(metadata: [], complete: true)
        #expect(summary.clustersWritten == 150)
        #expect(try Fixture.readAll(path) == disk)
        let report = QCow2Reader.verifyImage(at: path)
        #expect(report.isClean, "\(report)")
    }

    /// Tiny staging buffers: many compressed runs and standard-cluster
    /// batches are detached and written concurrently, outside the lock.
    @Test(arguments: [QCow2Compression.zstd(level: 1), .zlib(level: 1)])
    func concurrentFlushesWithTinyBuffers(_ compression: QCow2Compression) throws {
        let dir = TempDir()
        let cs = 4096
        let n = 900
        let disk = Fixture.clusteredDisk(size: cs * n, clusterSize: cs, seed: 31)
        let path = dir.file("tiny.qcow2")
        let writer = try QCow2Writer(path: path, virtualSize: UInt64(disk.count), clusterBits: 12, compression: compression,
                                     overwrite: false, runBytes: 3 * cs, rawBatchClusters: 2)
        let threads = 4
        let failures = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let enc = ClusterEncoder(compression: compression, clusterSize: cs)
            var order = Array(stride(from: t, to: n, by: threads))
            var rng = SeededRNG(seed: UInt64(t))
            order.shuffle(using: &rng)
            for c in order {
                let lo = c * cs
                let e = disk.withUnsafeBytes { enc.encode(index: UInt64(c), data: UnsafeRawBufferPointer(rebasing: $0[lo..<(lo + cs)])) }
                do { try writer.write(e) } catch { failures.add() }
            }
        }
        #expect(failures.value == 0)
        let s = try writer.finish(metadata: [], complete: true)
        #expect(s.rawClusters > 20 && s.compressedClusters > 100)
        #expect(s.hostBytesWritten >= s.compressedBytes + s.rawClusters * UInt64(cs))
        #expect(try Fixture.readAll(path) == disk)
        let report = QCow2Reader.verifyImage(at: path)
        #expect(report.isClean, "\(report)")
        if Tools.qemuImg != nil {
            let (clean, output) = try Tools.qemuCheck(path)
            #expect(clean, "\(output)")
        }
    }

    @Test func emptyAndTinyImages() throws {
        let dir = TempDir()
        // Zero-size image: no L1 table at all.
        let w0 = try QCow2Writer(path: dir.file("empty.qcow2"), virtualSize: 0, compression: .zstd(level: 1))
        _ = try w0.finish(metadata: Array("{}".utf8), complete: true)
        let r0 = try QCow2Reader(path: dir.file("empty.qcow2"))
        #expect(r0.virtualSize == 0 && r0.l1Size == 0)
        #expect(r0.verify().isClean)
        #expect(try r0.allocatedClusters().count == 0)
        // One sector, nothing written.
        let w1 = try QCow2Writer(path: dir.file("one.qcow2"), virtualSize: 512, compression: .zlib(level: 6))
        _ = try w1.finish(metadata: [], complete: false)
        let r1 = try QCow2Reader(path: dir.file("one.qcow2"))
        #expect(r1.hotimage?.complete == false)
        #expect(try Fixture.readAll(dir.file("one.qcow2")) == [UInt8](repeating: 0, count: 512))
        let rep = r1.verify()
        #expect(rep.problems.map(\.kind) == [.incomplete], "\(rep)")
    }

    @Test func writerRejectsMisuse() throws {
        let dir = TempDir()
        let path = dir.file("w.qcow2")
        let cs = 4096
        let w = try QCow2Writer(path: path, virtualSize: UInt64(cs * 10), clusterBits: 12, compression: .zstd(level: 1))
        let enc = ClusterEncoder(compression: .zstd(level: 1), clusterSize: cs)
        let data = Array(String(repeating: "x", count: cs).utf8)
        let c0 = data.withUnsafeBytes { enc.encode(index: 0, data: $0) }
        try w.write(c0)
        #expect(throws: QCow2Error.self) { try w.write(c0) }                     // twice
        let zero = EncodedCluster(index: 0, payload: .zero, crc: 0)
        #expect(throws: QCow2Error.self) { try w.write(zero) }                   // twice, other kind
        let far = EncodedCluster(index: 10, payload: .zero, crc: 0)
        #expect(throws: QCow2Error.self) { try w.write(far) }                    // beyond the disk
        let badRaw = EncodedCluster(index: 1, payload: .raw([1, 2, 3]), crc: 0)
        #expect(throws: QCow2Error.self) { try w.write(badRaw) }
        let bigCompressed = EncodedCluster(index: 2, payload: .compressed(data), crc: 0)
        #expect(throws: QCow2Error.self) { try w.write(bigCompressed) }
        // Misuse does not poison the writer.
        try w.write(EncodedCluster(index: 3, payload: .zero, crc: crc32OfZeros(cs)))
        _ = try w.finish(metadata: [], complete: true)
        #expect(throws: QCow2Error.self) { try w.write(EncodedCluster(index: 4, payload: .zero, crc: 0)) }
        #expect(QCow2Reader.verifyImage(at: path).isClean)

        // O_EXCL, and overwrite.
        do {
            _ = try QCow2Writer(path: path, virtualSize: 4096, compression: .none)
            Issue.record("existing file was overwritten without overwrite: true")
        } catch let e as QCow2Error {
            #expect(e.message.contains("exists"))
        }
        let w2 = try QCow2Writer(path: path, virtualSize: 4096, compression: .none, overwrite: true)
        w2.abandon()
        #expect(!FileManager.default.fileExists(atPath: path))

        #expect(throws: QCow2Error.self) { _ = try QCow2Writer(path: dir.file("a"), virtualSize: 1000, compression: .none) }
        #expect(throws: QCow2Error.self) { _ = try QCow2Writer(path: dir.file("b"), virtualSize: 4096, clusterBits: 8, compression: .none) }
        #expect(throws: QCow2Error.self) { _ = try QCow2Writer(path: dir.file("c"), virtualSize: 4096, clusterBits: 22, compression: .none) }
        // 512-byte clusters cannot address more than 128 GiB (32 MiB of L1).
        #expect(throws: QCow2Error.self) { _ = try QCow2Writer(path: dir.file("d"), virtualSize: 256 << 30, clusterBits: 9, compression: .none) }
        #expect(throws: QCow2Error.self) { _ = try QCow2Writer(path: dir.file("nodir/x"), virtualSize: 4096, compression: .none) }
    }

    /// Compressed data is packed: the data area holds little beyond the
    /// compressed bytes themselves.
    @Test func compressedDataIsPacked() throws {
        let dir = TempDir()
        let cs = 65536
        let disk = Fixture.mixedData(count: cs * 200, seed: 5)
        let built = try Fixture.build(path: dir.file("p.qcow2"), disk: disk, clusterBits: 16, compression: .zstd(level: 1))
        let s = built.summary
        let payload = s.compressedBytes + s.rawClusters * UInt64(cs)
        let dataArea = s.dataAreaBytes - UInt64(cs)         // minus the header cluster
        // Waste: at most one cluster per switch from compressed to raw data,
        // bounded by the number of raw batches (the order is shuffled).
        #expect(dataArea >= payload)
        #expect(dataArea - payload <= UInt64(cs) * (s.rawClusters + 1), "data area \(dataArea) vs payload \(payload)")
        let sequential = try Fixture.build(path: dir.file("q.qcow2"), disk: Array(disk.prefix(cs * 100)) + [UInt8](repeating: 7, count: cs * 100),
                                           clusterBits: 16, compression: .zstd(level: 1), keep: { _ in true })
        let s2 = sequential.summary
        #expect(s2.dataAreaBytes - UInt64(cs) - (s2.compressedBytes + s2.rawClusters * UInt64(cs)) <= UInt64(cs) * (s2.rawClusters + 1))
    }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}
