import Foundation
import Testing
import HotCore

// Real threads against one engine (MonotonicClock, a 16-block memory buffer so the
// mover works all the time): 4 writers, 2 snapshot readers, a mover, and in the second
// test an imager thread releasing archived ranges. Invariants:
// - every successful snapshot read equals the pre-arm image;
// - with release: a read may fail with `archived`, but only for a block whose release
//   had started, inside the range read;
// - afterwards the live device equals each writer's last write per byte (writers own
//   disjoint regions, so their own order fixes the final state);
// - every written block was copied exactly once; nothing stays buffered after release.
// Every thread is joined with a timeout so a deadlock fails the test instead of hanging it.

private func sameBytes(_ a: UnsafeRawBufferPointer, _ b: ArraySlice<UInt8>) -> Bool {
    guard a.count == b.count else { return false }
    return b.withUnsafeBytes { memcmp(a.baseAddress!, $0.baseAddress!, a.count) == 0 }
}

@Suite("SnapshotEngine: concurrency stress")
struct SnapshotEngineStressTests {
    static let blocks: UInt64 = 1024
    static let writers = 4
    static let region = blocks / UInt64(writers)

    /// What each writer leaves behind: its region of the live device, and the blocks it touched.
    final class WriterResult: @unchecked Sendable {
        var model: [UInt8] = []
        var touched = Set<UInt64>()
    }

    /// Runs writers (each in its own region), readers and a mover; `releaser` runs too if given.
    /// Returns the writer results, or nil after recording an issue if a thread hung.
    static func run(_ f: EngFixture, writesPerWriter: Int, releaser: ((_ stop: EngBox<Bool>) -> Void)? = nil,
                    readerCheck: @escaping (_ offset: UInt64, _ count: Int, _ error: Error) -> String?) -> [WriterResult]? {
        let image = f.image
        let engine = f.engine
        let size = f.size
        let stop = EngBox(false)
        let problems = EngBox<[String]>([])
        let reads = EngBox(0)
        var threads: [DispatchSemaphore] = []
        let results = (0..<writers).map { _ in WriterResult() }

        for w in 0..<writers {
            let result = results[w]
            threads.append(engSpawn {
                let lo = UInt64(w) * region
                var model = Array(image[Int(blk(lo))..<Int(blk(lo + region))])
                var rng = TestRNG(seed: UInt64(w) &* 7919 &+ 1)
                for i in 0..<writesPerWriter {
                    let n = 1 + rng.below(3)
                    let b = lo + rng.below(region - n + 1)
                    let head = rng.below(4) == 0 ? rng.below(512) : 0      // some writes unaligned
                    let tail = rng.below(4) == 0 ? rng.below(512) : 0
                    let offset = blk(b) + head
                    let count = Int(n * 4096 - head - tail)
                    var data = [UInt8](repeating: UInt8(truncatingIfNeeded: i &* 31 &+ w), count: count)
                    data[0] = UInt8(w); data[count - 1] = UInt8(truncatingIfNeeded: i)
                    do {
                        if rng.below(16) == 0 {
                            try engine.zero(offset: offset, length: UInt64(count), unmap: true)
                            data = [UInt8](repeating: 0, count: count)
                        } else {
                            try data.withUnsafeBytes { try engine.write(offset: offset, count: count, from: $0.baseAddress!) }
                        }
                    } catch {
                        problems.update { $0.append("write \(offset)+\(count): \(error)") }
                        return
                    }
                    let at = Int(offset - blk(lo))
                    model.replaceSubrange(at..<at + count, with: data)
                    for t in b..<b + n { result.touched.insert(t) }
                }
                result.model = model
            })
        }
        let writersDone = threads
        for r in 0..<2 {
            threads.append(engSpawn {
                var rng = TestRNG(seed: 0xABCD &+ UInt64(r))
                let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 * 4096, alignment: 16)
                defer { buf.deallocate() }
                while !stop.value {
                    let offset = rng.below(size)
                    let count = Int(min(1 + rng.below(8 * 4096), size - offset))
                    do {
                        try engine.snapshotRead(offset: offset, count: count, into: buf.baseAddress!)
                        if !sameBytes(UnsafeRawBufferPointer(rebasing: buf[0..<count]),
                                      image[Int(offset)..<Int(offset) + count]) {
                            problems.update { $0.append("snapshot read \(offset)+\(count) returned wrong data") }
                            return
                        }
                        reads.update { $0 += 1 }
                    } catch {
                        if let p = readerCheck(offset, count, error) {
                            problems.update { $0.append(p) }
                            return
                        }
                    }
                }
            })
        }
        threads.append(engSpawn {
            while !stop.value {
                if engine.waitForSpillWork(timeoutNanos: 2 * engMS) { engine.spillStep(maxBlocks: 8) }
            }
        })
        if let releaser { threads.append(engSpawn { releaser(stop) }) }

        let deadline = DispatchTime.now() + 30
        for t in writersDone where t.wait(timeout: deadline) == .timedOut {
            stop.value = true
            Issue.record("a writer hung (deadlock?); status: \(engine.status())")
            return nil
        }
        stop.value = true
        for t in threads.dropFirst(writers) where t.wait(timeout: deadline) == .timedOut {
            Issue.record("a reader, the mover or the releaser hung; status: \(engine.status())")
            return nil
        }
        for p in problems.value.prefix(5) { Issue.record(Comment(rawValue: p)) }
        #expect(reads.value > 0)
        return problems.value.isEmpty ? results : nil
    }

    static func expectLive(_ f: EngFixture, _ results: [WriterResult]) {
        let live = f.deviceBytes()
        for (w, r) in results.enumerated() {
            let lo = Int(blk(UInt64(w) * region))
            #expect(Array(live[lo..<lo + r.model.count]) == r.model, "writer \(w)'s region")
        }
    }

    @Test("Stress: writers, snapshot readers and the mover; the snapshot never changes",
          arguments: [EngPhase.armed, .protecting])
    func writersReadersMover(_ phase: EngPhase) throws {
        let f = EngFixture(size: Self.blocks * 4096, memoryBlocks: 16, clock: MonotonicClock()) {
            $0.spillAfterNanos = engMS
            $0.maxWriteWaitNanos = 20 * engSecond
        }
        try f.enter(phase)
        guard let results = Self.run(f, writesPerWriter: 3000, readerCheck: { o, c, e in
            "snapshot read \(o)+\(c) failed: \(e)"
        }) else { return }
        #expect(f.phase.rawValue == phase.rawValue, "failed: \(f.engine.failureReason ?? "")")
        let touched = results.reduce(0) { $0 + $1.touched.count }
        let s = f.status
        #expect(s.counters.copies == UInt64(touched))          // each written block copied exactly once
        #expect(s.bufferedBlocks == UInt64(touched))
        #expect(s.protectedBlocks == Self.blocks - UInt64(touched))
        #expect(s.counters.spilledBlocks > 0)
        #expect(s.counters.writesDuringSession == UInt64(Self.writers * 3000))
        #expect(try f.snap(0, Int(f.size)) == f.image)
        Self.expectLive(f, results)
    }

    @Test("Stress: release concurrent with writers and readers: archived or right, never wrong")
    func releaseUnderLoad() throws {
        let f = EngFixture(size: Self.blocks * 4096, memoryBlocks: 16, clock: MonotonicClock()) {
            $0.spillAfterNanos = engMS
            $0.maxWriteWaitNanos = 20 * engSecond
        }
        try f.protect()
        let engine = f.engine
        let image = f.image
        let releasing = EngBox(Set<UInt64>())         // blocks whose release has started
        let releasedTotal = EngBox<UInt64>(0)
        let releaserProblems = EngBox<[String]>([])
        let releaser: (EngBox<Bool>) -> Void = { _ in
            // An imager: reads each 16-block chunk of the snapshot, checks it, releases it.
            var rng = TestRNG(seed: 99)
            var chunks = Array(0..<Self.blocks / 16)
            for i in chunks.indices.reversed() { chunks.swapAt(i, Int(rng.below(UInt64(i + 1)))) }
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 4096, alignment: 16)
            defer { buf.deallocate() }
            for c in chunks {
                let off = blk(c * 16)
                do {
                    try engine.snapshotRead(offset: off, count: 16 * 4096, into: buf.baseAddress!)
                    if !sameBytes(UnsafeRawBufferPointer(buf), image[Int(off)..<Int(off) + 16 * 4096]) {
                        releaserProblems.update { $0.append("chunk \(c) read wrong data before release") }
                    }
                    releasing.update { for b in c * 16..<(c + 1) * 16 { $0.insert(b) } }
                    let n = try engine.release(offset: off, length: 16 * 4096)
                    releasedTotal.update { $0 += n }
                } catch {
                    releaserProblems.update { $0.append("chunk \(c): \(error)") }
                }
                Thread.sleep(forTimeInterval: 0.002)
            }
        }
        guard let results = Self.run(f, writesPerWriter: 2500, releaser: releaser, readerCheck: { o, c, e in
            guard case EngineError.archived(let b) = e else { return "snapshot read \(o)+\(c) failed: \(e)" }
            if b < o / 4096 || b > (o + UInt64(c) - 1) / 4096 { return "archived block \(b) outside the read \(o)+\(c)" }
            if !releasing.value.contains(b) { return "archived block \(b) that was never released" }
            return nil
        }) else { return }
        for p in releaserProblems.value.prefix(5) { Issue.record(Comment(rawValue: p)) }
        #expect(f.phase == .protecting, "failed: \(f.engine.failureReason ?? "")")
        #expect(releasedTotal.value == Self.blocks)     // each block released exactly once
        let s = f.status
        #expect(s.counters.archivedBlocks == Self.blocks)
        #expect(s.protectedBlocks == 0)
        #expect(s.bufferedBlocks == 0)
        #expect(s.memoryBytes == 0)
        #expect(f.spill.bytesInUse == 0)
        #expect(s.counters.copies <= Self.blocks)
        Self.expectLive(f, results)
        // The released snapshot now answers archived everywhere.
        #expect(throws: EngineError.archived(block: 0)) { try f.snap(0, 4096) }
    }
}
