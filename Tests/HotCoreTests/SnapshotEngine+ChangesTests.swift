import Foundation
import Testing
import HotCore

// Changed-block tracking (SnapshotEngine+Changes.swift): marks at cluster
// granularity for WRITE, TRIM and WRITE_ZEROES; the cut at arming; commit
// drops the cut's changes, every other end merges them back; a concurrent
// stress test that every write lands in exactly one of (cut, next).

private let cl: UInt64 = 65536

private func set(_ b: ChangeBits?) -> Set<UInt64> {
    guard let b else { return [] }
    var s = Set<UInt64>()
    b.bits.forEachRun(in: 0..<b.clusterCount) { r in for c in r { s.insert(c) } }
    return s
}

/// 20 whole clusters and a partial 21st (1000 bytes).
private func fixture(_ tweak: (inout EngineConfig) -> Void = { _ in }) -> EngFixture {
    EngFixture(size: 20 * cl + 1000, memoryBlocks: 1024, tweak: tweak)
}

@Suite("SnapshotEngine: change tracking")
struct SnapshotEngineChangesTests {

    @Test("Writes, TRIM and WRITE_ZEROES mark every cluster they touch, unaligned spans included")
    func marks() throws {
        let f = fixture()
        #expect(f.engine.clusterCount == 21)
        #expect(set(f.engine.exportChanges()).isEmpty)
        try f.write(cl - 1, 2, seed: 3)                      // straddles clusters 0 and 1
        try f.zero(3 * cl + 100, cl, unmap: true)            // TRIM: clusters 3 and 4
        try f.zero(10 * cl, cl, unmap: false)                // WRITE_ZEROES: exactly cluster 10
        try f.write(12 * cl + 4096, 512, seed: 4)            // inside cluster 12
        try f.write(20 * cl + 10, 100, seed: 5)              // the partial last cluster
        try f.zero(15 * cl, 0, unmap: false)                 // empty: nothing
        #expect(set(f.engine.exportChanges()) == [0, 1, 3, 4, 10, 12, 20])
        #expect(f.engine.changeCounts()?.changedClusters == 7)
        #expect(f.engine.changeCounts()?.pendingClusters == 0)
    }

    @Test("Writes before the arm are the cut's; writes after it are not, and remain after a commit")
    func cutAndCommit() throws {
        let f = fixture()
        try f.write(1 * cl, 4096, seed: 2)
        try f.arm()
        try f.write(2 * cl, 4096, seed: 3)
        #expect(set(f.engine.cutChanges()) == [1])
        _ = try f.engine.narrow(used: [0..<f.size])
        try f.write(1 * cl + 8192, 4096, seed: 4)            // after the cut, cluster 1 again
        #expect(set(f.engine.cutChanges()) == [1])
        #expect(f.engine.changeCounts()?.changedClusters == 2)
        #expect(f.engine.endSession(commit: true))
        #expect(set(f.engine.exportChanges()) == [1, 2])      // both written after the cut
        #expect(set(f.engine.cutChanges()).isEmpty)
        // The next cut takes them.
        try f.arm()
        #expect(set(f.engine.cutChanges()) == [1, 2])
        _ = try f.engine.narrow(used: [0..<f.size])
        #expect(f.engine.endSession(commit: true))
        #expect(set(f.engine.exportChanges()).isEmpty)
    }

    @Test("A plain end, a failure and a lost heartbeat merge the cut back")
    func noCommitMergesBack() throws {
        for how in ["end", "commit-while-armed", "fail", "fail-then-begin", "heartbeat"] {
            let f = fixture()
            try f.write(1 * cl, 4096, seed: 2)
            try f.protect()
            try f.write(2 * cl, 4096, seed: 3)
            #expect(set(f.engine.cutChanges()) == [1], "\(how)")
            switch how {
            case "end":
                #expect(!f.engine.endSession(commit: false))
            case "commit-while-armed":
                f.engine.end()
                try f.arm()
                // Never reached protecting: a commit is refused.
                #expect(!f.engine.endSession(commit: true))
            case "fail":
                f.engine.fail("test")
                #expect(!f.engine.endSession(commit: true))  // a failed session never commits
            case "fail-then-begin":
                f.engine.fail("test")
                try f.engine.begin(consistency: .raw)
                f.engine.end()
            default:
                f.manual.advance(nanos: f.engine.config.heartbeatTimeoutNanos + engSecond)
                #expect(f.engine.tick().count == 1)
            }
            #expect(set(f.engine.exportChanges()) == [1, 2], "\(how)")
            #expect(set(f.engine.cutChanges()).isEmpty, "\(how)")
            // The next committed cut takes all of them.
            try f.protect()
            #expect(set(f.engine.cutChanges()) == [1, 2], "\(how)")
            #expect(f.engine.endSession(commit: true))
            #expect(set(f.engine.exportChanges()).isEmpty, "\(how)")
        }
    }

    @Test("A wip retry arms again and the cut keeps every mark")
    func wipRetryAccumulates() throws {
        let f = fixture()
        try f.write(1 * cl, 4096, seed: 2)
        try f.arm(.wip)
        try f.write(5 * cl, 4096, seed: 3)                   // during the map read
        #expect(set(f.engine.cutChanges()) == [1])
        guard case .retry = try f.engine.narrow(used: [0..<f.size]) else {
            Issue.record("expected a retry"); return
        }
        #expect(set(f.engine.cutChanges()) == [1])
        f.armAgain()
        #expect(set(f.engine.cutChanges()) == [1, 5])
        guard case .protecting = try f.engine.narrow(used: [0..<f.size]) else {
            Issue.record("expected protecting"); return
        }
        #expect(f.engine.endSession(commit: true))
        #expect(set(f.engine.exportChanges()).isEmpty)
    }

    @Test("Tracking off: no maps, nothing marked")
    func off() throws {
        let f = fixture { $0.trackChanges = false }
        try f.write(0, 4096, seed: 2)
        #expect(f.engine.cutChanges() == nil)
        #expect(f.engine.exportChanges() == nil)
        #expect(f.engine.changeCounts() == nil)
    }

    @Test("Cluster size: a power of two at least the block size")
    func clusterSize() throws {
        let f = fixture { $0.changeClusterBytes = 4096 }
        try f.write(4095, 2, seed: 2)
        #expect(set(f.engine.exportChanges()) == [0, 1])
        #expect(f.engine.clusterCount == (f.size + 4095) / 4096)
    }

    @Test("Load, export and the flat word form round-trip; a wrong geometry is refused")
    func loadExport() throws {
        let f = fixture()
        var b = ChangeBits(clusterBytes: Int(cl), clusterCount: 21)
        b.bits.insert(0); b.bits.insert(range: 5..<9); b.bits.insert(20)
        try f.engine.loadChanges(b)
        #expect(f.engine.exportChanges() == b)
        let w = b.words()
        #expect(w.count == 1)
        #expect(w[0] == (1 | (0b1111 << 5) | (1 << 20)))
        #expect(ChangeBits(clusterBytes: Int(cl), clusterCount: 21, words: w) == b)
        #expect(ChangeBits(clusterBytes: Int(cl), clusterCount: 21, words: w + [0]) == nil)
        #expect(ChangeBits(clusterBytes: Int(cl), clusterCount: 21, words: [1 << 21]) == nil)
        #expect(throws: EngineError.self) { try f.engine.loadChanges(ChangeBits(clusterBytes: Int(cl), clusterCount: 22)) }
        // Words over many words and whole-word runs.
        var big = ChangeBits(clusterBytes: 4096, clusterCount: 1000)
        big.bits.insert(range: 60..<200); big.bits.insert(range: 256..<320); big.bits.insert(999)
        let bw = big.words()
        #expect(bw.count == 16)
        #expect(bw[1] == ~0 && bw[4] == ~0 && bw[5] == 0)
        #expect(ChangeBits(clusterBytes: 4096, clusterCount: 1000, words: bw) == big)
        // The streamed form (what the files hold) is the flat form in pieces,
        // little-endian, whatever the piece size.
        for piece in [1, 3, 7, 16, 100] {
            var streamed: [UInt8] = []
            big.forEachLittleEndianChunk(maxWords: piece) { streamed += $0 }
            var flat: [UInt8] = []
            for x in bw { withUnsafeBytes(of: x.littleEndian) { flat += $0 } }
            #expect(streamed == flat, "pieces of \(piece) words")
        }
        // Writes after a load add to it.
        try f.write(3 * cl, 1, seed: 2)
        #expect(set(f.engine.exportChanges()) == [0, 3, 5, 6, 7, 8, 20])
    }

    /// Four writers each write distinct clusters (each cluster once) while a
    /// cutter begins, arms, narrows and ends sessions, committing some.
    /// Every write must land in exactly one committed cut or in what is left
    /// at the end; a write completed before an arm is in that cut (or an
    /// earlier one); a write started after an arm returned is not in it.
    @Test("Concurrent writers: every write lands in exactly one of (cut, next)")
    func stress() throws {
        let writers = 4
        let perWriter: UInt64 = 1024
        let size = UInt64(writers) * perWriter * 4096
        let f = EngFixture(size: size, memoryBlocks: 4096, clock: MonotonicClock()) {
            $0.changeClusterBytes = 4096
            $0.pauseNanos = 0
        }
        let engine = f.engine
        let image = f.image
        let completed = EngBox<[UInt64]>([])          // clusters whose write returned
        let epoch = EngBox<Int>(0)                     // bumped after each arm returns
        let startedAt = EngBox<[UInt64: Int]>([:])     // cluster → epoch read before the write
        let stop = EngBox(false)
        var threads: [DispatchSemaphore] = []
        for w in 0..<writers {
            threads.append(engSpawn {
                var rng = TestRNG(seed: UInt64(w) + 11)
                var order = Array(UInt64(w) * perWriter..<UInt64(w + 1) * perWriter)
                for i in stride(from: order.count - 1, to: 0, by: -1) {
                    order.swapAt(i, Int(rng.below(UInt64(i + 1))))
                }
                var buf = [UInt8](repeating: UInt8(w), count: 4096)
                for c in order {
                    let e = epoch.value
                    startedAt.update { $0[c] = e }
                    if c % 3 == 0 {
                        try? engine.zero(offset: c * 4096, length: 4096, unmap: c % 2 == 0)
                    } else {
                        try? buf.withUnsafeMutableBytes { try engine.write(offset: c * 4096, count: 4096, from: $0.baseAddress!) }
                    }
                    completed.update { $0.append(c) }
                    if rng.below(2) == 0 { usleep(200) }
                }
            })
        }
        var committed: [Set<UInt64>] = []
        var problems: [String] = []
        var cuts = 0
        let cutter = engSpawn {
            var rng = TestRNG(seed: 99)
            while !stop.value {
                let before = Set(completed.value)
                guard (try? engine.begin(consistency: .raw)) != nil else { continue }
                guard case .armed = engine.arm(pauseNanos: 0) else { engine.end(); continue }
                let myEpoch = epoch.update { v -> Int in v += 1; return v }
                let cut = set(engine.cutChanges())
                let earlier = committed.reduce(into: Set<UInt64>()) { $0.formUnion($1) }
                let missing = before.subtracting(earlier).subtracting(cut)
                if !missing.isEmpty { problems.append("cut \(cuts): \(missing.count) writes completed before the arm are missing") }
                let starts = startedAt.value
                let late = cut.filter { (starts[$0] ?? -1) >= myEpoch }
                if !late.isEmpty { problems.append("cut \(cuts): \(late.count) writes started after the arm are in it") }
                // Whatever the snapshot shows written (not the original
                // image) must be in this cut or an earlier committed one:
                // a write on the device before the cut with its mark after
                // it would be lost to the incremental.
                if case .protecting = try? engine.narrow(used: [0..<size]) {
                    var snap = [UInt8](repeating: 0, count: Int(size))
                    if (try? snap.withUnsafeMutableBytes({ try engine.snapshotRead(offset: 0, count: Int(size), into: $0.baseAddress!) })) != nil {
                        var unmarked = 0
                        for c in 0..<size / 4096 where !cut.contains(c) && !earlier.contains(c) {
                            // The image is random; a write leaves a constant
                            // byte or zeros: 16 bytes tell them apart.
                            let o = Int(c * 4096)
                            if snap[o..<o + 16] != image[o..<o + 16] { unmarked += 1 }
                        }
                        if unmarked > 0 { problems.append("cut \(cuts): \(unmarked) clusters written before the cut are not in it") }
                    }
                }
                usleep(UInt32(rng.below(300)))
                let commit = rng.below(2) == 0
                if engine.endSession(commit: commit) { committed.append(cut) }
                cuts += 1
                usleep(UInt32(rng.below(300)))
            }
        }
        for t in threads { #expect(engWait(t, seconds: 60)) }
        stop.value = true
        #expect(engWait(cutter, seconds: 30))
        #expect(problems.isEmpty, "\(problems.prefix(5))")
        let rest = set(engine.exportChanges())
        var seen = rest
        var twice = 0
        for c in committed {
            twice += seen.intersection(c).count
            seen.formUnion(c)
        }
        #expect(twice == 0, "\(twice) writes counted in two cuts")
        #expect(seen == Set(0..<UInt64(writers) * perWriter), "lost \(UInt64(writers) * perWriter - UInt64(seen.count)) writes")
        #expect(cuts > 4)
        #expect(committed.count > 0)
    }
}
