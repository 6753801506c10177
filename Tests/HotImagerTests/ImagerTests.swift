import Foundation
import Testing
import QCow2
@testable import HotImager

/// A volume in memory; counts what the imager reads.
final class MemorySource: BlockSource, @unchecked Sendable {
    let bytes: [UInt8]
    var size: UInt64 { UInt64(bytes.count) }
    var description: String { "memory" }
    var alignment: Int { 4096 }
    let lock = NSLock()
    var reads: [Range<UInt64>] = []
    init(_ b: [UInt8]) { bytes = b }
    func makeReader() throws -> BlockReader { Reader(src: self) }
    final class Reader: BlockReader {
        let src: MemorySource
        init(src: MemorySource) { self.src = src }
        func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
            guard offset + UInt64(count) <= src.size else { throw ReadError(description: "past the end") }
            src.bytes.withUnsafeBytes { memcpy(buf, $0.baseAddress! + Int(offset), count) }
            src.lock.lock(); src.reads.append(offset..<(offset + UInt64(count))); src.lock.unlock()
        }
        func close() {}
    }
}

@Suite struct ImagerTests {
    func volume(_ size: Int, seed: UInt64) -> [UInt8] {
        var s = seed
        return (0..<size).map { i in
            if (i / 65536) % 3 == 0 { return UInt8(truncatingIfNeeded: i / 7) }    // compressible
            s = s &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: s >> 56)
        }
    }

    /// Only used blocks are read; the image holds them (unused 4 KiB blocks
    /// inside a cluster as zeros) and nothing else, whatever the worker count.
    @Test(arguments: [1, 4]) func imagesExactlyTheUsedBlocks(workers: Int) throws {
        let size = 3 * 1024 * 1024 + 12288          // not a multiple of the cluster
        let src = MemorySource(volume(size, seed: 7))
        let used: [Range<UInt64>] = [0..<8192, 65536..<(65536 + 4096), 200_000..<700_000, UInt64(size - 4096)..<UInt64(size)]
        let path = "/tmp/hotimage-imager-\(getpid())-\(workers).qcow2"
        defer { unlink(path) }
        let w = try QCow2Writer(path: path, virtualSize: UInt64(size), clusterBits: 16, compression: .zstd(level: 1), overwrite: true)
        var cfg = ImagerConfig()
        cfg.workers = workers
        cfg.unitClusters = 3
        let im = Imager(source: src, ranges: used, writer: w, compression: .zstd(level: 1), clusterSize: 65536,
                        config: cfg, session: nil, log: { _ in })
        let res = try im.run { _ in }
        _ = try w.finish(metadata: Array("{}".utf8), complete: true)

        // What was read: only 4 KiB-rounded used blocks.
        let aligned = RangeSet.normalize(used.map { ($0.lowerBound & ~4095)..<min(UInt64(size), ($0.upperBound + 4095) & ~4095) })
        #expect(RangeSet.subtract(RangeSet.normalize(src.reads), aligned).isEmpty)
        #expect(RangeSet.total(RangeSet.normalize(src.reads)) == RangeSet.total(aligned))
        #expect(res.bytesRead == RangeSet.total(aligned))

        // What the image holds.
        let r = try QCow2Reader(path: path)
        let dec = ClusterDecoder()
        var buf = [UInt8](repeating: 0, count: 65536)
        var expected = [UInt8](repeating: 0, count: size)
        for a in aligned { for i in a { expected[Int(i)] = src.bytes[Int(i)] } }
        let clusters = (size + 65535) / 65536
        var allocated = Set(try r.allocatedClusters())
        for c in 0..<clusters {
            let lo = c * 65536, hi = min(size, lo + 65536)
            let inUse = aligned.contains { $0.overlaps(UInt64(lo)..<UInt64(hi)) }
            let got = try buf.withUnsafeMutableBytes { try r.readCluster(UInt64(c), into: $0, decoder: dec) }
            if !inUse { #expect(!allocated.contains(UInt64(c)), "cluster \(c) is unused but allocated") }
            #expect(Array(buf[0..<(hi - lo)]) == Array(expected[lo..<hi]), "cluster \(c)")
            if got { allocated.remove(UInt64(c)) }
        }
        #expect(allocated.isEmpty)
        #expect(r.verify().problems.isEmpty)
    }

    /// A read error fails the run with the reader's message; nothing hangs.
    @Test func readErrorFailsTheRun() throws {
        let path = "/tmp/hotimage-imager-err-\(getpid()).qcow2"
        defer { unlink(path) }
        let w = try QCow2Writer(path: path, virtualSize: 2 << 20, clusterBits: 16, compression: .none, overwrite: true)
        // Ranges past the source's end are clamped: make a source lie about its size instead.
        final class Failing: BlockSource, @unchecked Sendable {
            var size: UInt64 { 2 << 20 }
            var description: String { "failing" }
            var alignment: Int { 4096 }
            func makeReader() throws -> BlockReader { R() }
            final class R: BlockReader {
                func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
                    if offset >= 1 << 20 { throw ReadError(description: "medium error at \(offset)") }
                    memset(buf, 1, count)
                }
                func close() {}
            }
        }
        let im = Imager(source: Failing(), ranges: [0..<(2 << 20)], writer: w, compression: .none, clusterSize: 65536,
                        config: ImagerConfig(), session: nil, log: { _ in })
        #expect(throws: ImagerError.self) { _ = try im.run { _ in } }
        w.abandon()
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    /// cancel() from another thread ends run() promptly with the reason.
    @Test func cancelStopsTheRun() throws {
        let path = "/tmp/hotimage-imager-cancel-\(getpid()).qcow2"
        defer { unlink(path) }
        final class Slow: BlockSource, @unchecked Sendable {
            var size: UInt64 { 64 << 20 }
            var description: String { "slow" }
            var alignment: Int { 4096 }
            func makeReader() throws -> BlockReader { R() }
            final class R: BlockReader {
                func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws { usleep(100_000); memset(buf, 2, count) }
                func close() {}
            }
        }
        let w = try QCow2Writer(path: path, virtualSize: 64 << 20, clusterBits: 16, compression: .none, overwrite: true)
        let im = Imager(source: Slow(), ranges: [0..<(64 << 20)], writer: w, compression: .none, clusterSize: 65536,
                        config: ImagerConfig(), session: nil, log: { _ in })
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.2) { im.cancel("stop now") }
        let t0 = Date()
        do { _ = try im.run { _ in }; Issue.record("run() did not fail") } catch {
            #expect("\(error)".contains("stop now"))
        }
        #expect(Date().timeIntervalSince(t0) < 5)
        w.abandon()
    }
}
