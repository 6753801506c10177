import Foundation
import Testing
import HotCore

// The COW buffer and the deadlines: the mover (spillStep) moves the oldest memory
// blocks to the spill store above the high-water mark or after spillAfterNanos; a
// spill failure fails the session but never a write; a write waits for room in a
// full memory buffer at most maxWriteWaitNanos; tick() enforces the heartbeat, the
// memory and the snapshot deadlines; status() reports counters.

@Suite("SnapshotEngine: buffer, deadlines, status")
struct SnapshotEngineBufferTests {

    // MARK: - Spill

    @Test("Above the high-water mark the mover moves the oldest blocks, and only as many as needed")
    func spillAboveHighWater() throws {
        let f = EngFixture(memoryBlocks: 16)                 // high water 0.5: 8 blocks
        try f.protect()
        for b: UInt64 in 0..<8 {
            f.manual.advance(nanos: 10 * engMS)
            try f.writeBlocks(b, 1, seed: 2)                  // block b stored at t0 + 10 ms * b
        }
        #expect(f.engine.spillStep() == 0)                   // 8 of 16: at the mark, not above
        #expect(f.engine.waitForSpillWork(timeoutNanos: engMS) == false)
        f.manual.advance(nanos: 10 * engMS)
        try f.writeBlocks(8, 1, seed: 2)
        #expect(f.engine.waitForSpillWork(timeoutNanos: engMS) == true)
        #expect(f.engine.spillStep() == 1)
        let s = f.status
        #expect(s.memoryBlocks == 8)
        #expect(s.bufferedBlocks == 9)
        #expect(s.counters.spilledBlocks == 1)
        #expect(f.spill.bytesInUse == 4096)
        #expect(s.spillBytes == 4096)
        #expect(s.oldestMemoryAgeMs == 70)                   // block 0 left; block 1 is the oldest now
        for b in 0..<f.blockCount { #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)") }
    }

    @Test("Below the high-water mark, blocks older than spillAfterNanos move")
    func spillByAge() throws {
        let f = EngFixture(memoryBlocks: 16) { $0.spillAfterNanos = 2 * engSecond }
        try f.protect()
        try f.writeBlocks(0, 3, seed: 2)
        f.manual.advance(nanos: 1999 * engMS)
        #expect(f.engine.spillStep() == 0)                   // not old enough yet
        f.manual.advance(nanos: 1 * engMS)
        #expect(f.engine.spillStep() == 3)
        try f.writeBlocks(10, 2, seed: 2)
        f.manual.advance(seconds: 1)
        #expect(f.engine.spillStep() == 0)
        #expect(f.status.oldestMemoryAgeMs == 1000)
        f.manual.advance(seconds: 1)
        #expect(f.engine.spillStep(maxBlocks: 1) == 1)       // maxBlocks bounds one step
        #expect(f.engine.spillStep() == 1)
        #expect(f.status.memoryBlocks == 0)
        #expect(f.status.oldestMemoryAgeMs == nil)
        #expect(f.status.counters.spilledBlocks == 5)
        #expect(f.spill.bytesInUse == 5 * 4096)
        for b: UInt64 in [0, 1, 2, 10, 11] { #expect(try f.snapBlock(b) == f.imageBlock(b)) }
    }

    @Test("The partial last block is spilled and read back with its real length")
    func spillPartialLastBlock() throws {
        let f = EngFixture { $0.spillAfterNanos = engSecond }
        try f.protect()
        try f.write(f.size - 10, 10, seed: 2)
        f.manual.advance(seconds: 1)
        #expect(f.engine.spillStep() == 1)
        #expect(f.spill.bytesInUse == 1000)
        #expect(try f.snapBlock(64) == f.imageBlock(64))
        #expect(try f.snap(f.size - 3, 3) == Array(f.image.suffix(3)))
    }

    @Test("The mover does nothing outside a copy-on-write phase",
          arguments: [EngPhase.idle, .waiting, .failed])
    func noSpillWhenPassthrough(_ phase: EngPhase) throws {
        let f = EngFixture(memoryBlocks: 4)
        try f.enter(phase)
        try f.writeBlocks(0, 4)
        f.manual.advance(seconds: 100)
        #expect(f.engine.spillStep() == 0)
        #expect(f.engine.waitForSpillWork(timeoutNanos: engMS) == false)
    }

    struct SpillFailure: Sendable, CustomTestStringConvertible {
        let name: String
        let limitBlocks: UInt64
        let injected: SpillError?
        let reasonContains: String
        var testDescription: String { name }
    }

    static let spillFailures: [SpillFailure] = [
        // The spill store holds 2 blocks; the third store fails with `full`.
        SpillFailure(name: "store limit", limitBlocks: 2, injected: nil, reasonContains: "limit of 8192 bytes"),
        // An I/O error on the next store.
        SpillFailure(name: "I/O error", limitBlocks: 1000, injected: .io("disk on fire"), reasonContains: "disk on fire"),
    ]

    @Test("A spill failure fails the session (fail open); live writes keep landing", arguments: spillFailures)
    func spillFailureFailsOpen(_ c: SpillFailure) throws {
        let store = MemorySpillStore(limit: c.limitBlocks * 4096)
        let f = EngFixture(memoryBlocks: 16, spill: store) { $0.spillAfterNanos = engSecond }
        try f.protect()
        try f.writeBlocks(0, 5, seed: 2)
        f.manual.advance(seconds: 2)
        store.failNextStore = c.injected
        f.engine.spillStep()
        #expect(f.phase == .failed)
        let reason = try #require(f.engine.failureReason)
        #expect(reason.contains(c.reasonContains))
        #expect(reason.contains("buffer files"))
        #expect(store.bytesInUse == 0)                       // removeAll
        #expect(f.status.bufferedBlocks == 0 && f.status.memoryBytes == 0)
        #expect(throws: EngineError.sessionFailed(reason)) { try f.snap(0, 4096) }
        try f.writeBlocks(2, 10, seed: 3)
        #expect(f.deviceBytes() == f.live)
        #expect(f.status.counters.sessionsFailed == 1)
    }

    @Test("A write waiting for room is released by a spill failure and lands")
    func waitingWriteReleasedBySpillFailure() throws {
        let store = MemorySpillStore(limit: 4096)            // room for one block only
        let f = EngFixture(memoryBlocks: 4, spill: store)
        try f.protect()
        try f.writeBlocks(0, 4, seed: 2)                     // the memory buffer is full
        let data = engBytes(offset: blk(10), count: 4096, seed: 3)
        let writer = engSpawn {
            do { try data.withUnsafeBytes { try f.engine.write(offset: blk(10), count: 4096, from: $0.baseAddress!) } }
            catch { Issue.record("the write failed: \(error)") }
        }
        Thread.sleep(forTimeInterval: 0.1)
        #expect(writer.wait(timeout: .now()) == .timedOut)   // waiting for the mover (manual clock: no timeout)
        #expect(f.status.counters.writeWaits == 1)
        #expect(f.phase == .protecting)
        f.engine.spillStep()                                  // one block moves, the second store fails
        #expect(engWait(writer))
        #expect(f.phase == .failed)
        #expect(Array(UnsafeRawBufferPointer(start: f.mem.bytes + Int(blk(10)), count: 4096)) == data)
    }

    // MARK: - The bounded write wait (real time)

    @Test("Memory full and no mover: the write waits maxWriteWaitNanos, fails the session, lands")
    func writeWaitTimesOut() throws {
        let f = EngFixture(memoryBlocks: 4, clock: MonotonicClock()) { $0.maxWriteWaitNanos = 50 * engMS }
        try f.protect()
        try f.writeBlocks(0, 4, seed: 2)
        let start = Date()
        try f.writeBlocks(10, 1, seed: 3)
        let elapsed = Date().timeIntervalSince(start)
        #expect(elapsed >= 0.045)
        #expect(elapsed < 1.0)
        #expect(f.phase == .failed)
        #expect(f.engine.failureReason?.contains("memory buffer stayed full for 50 ms") == true)
        #expect(f.status.counters.writeWaits == 1)
        #expect(f.status.counters.sessionsFailed == 1)
        #expect(f.deviceBytes() == f.live)
        #expect(throws: EngineError.self) { try f.snap(0, 4096) }
    }

    @Test("Memory full with a mover: the write waits for the spill and the session survives")
    func writeWaitRescuedByMover() throws {
        let f = EngFixture(memoryBlocks: 4, clock: MonotonicClock()) { $0.maxWriteWaitNanos = 5 * engSecond }
        try f.protect()
        try f.writeBlocks(0, 4, seed: 2)
        let mover = engSpawn {
            Thread.sleep(forTimeInterval: 0.03)
            while f.engine.spillStep() == 0 { Thread.sleep(forTimeInterval: 0.005) }
        }
        let start = Date()
        try f.writeBlocks(10, 1, seed: 3)
        #expect(Date().timeIntervalSince(start) >= 0.02)
        #expect(engWait(mover))
        #expect(f.phase == .protecting)
        #expect(f.status.counters.writeWaits == 1)
        #expect(f.status.counters.copies == 5)
        for b: UInt64 in [0, 1, 2, 3, 10] { #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)") }
        #expect(f.deviceBytes() == f.live)
    }

    @Test("A write larger than the whole buffer is copied in pieces while the mover spills; the session survives")
    func writeLargerThanBuffer() throws {
        let f = EngFixture(memoryBlocks: 4, clock: MonotonicClock()) { $0.maxWriteWaitNanos = 5 * engSecond }
        try f.protect()
        let mover = engSpawn {
            var moved = 0
            while moved < 10 { moved += f.engine.spillStep(); Thread.sleep(forTimeInterval: 0.002) }
        }
        try f.writeBlocks(0, 12, seed: 2)
        #expect(engWait(mover))
        #expect(f.phase == .protecting)
        #expect(f.status.counters.copies == 12)
        for b: UInt64 in 0..<12 { #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)") }
        #expect(f.deviceBytes() == f.live)
    }

    @Test("A write larger than the buffer with no mover fails the session after maxWriteWaitNanos and lands")
    func writeLargerThanBufferNoMover() throws {
        let f = EngFixture(memoryBlocks: 4, clock: MonotonicClock()) { $0.maxWriteWaitNanos = 200 * engMS }
        try f.protect()
        let start = Date()
        try f.writeBlocks(0, 12, seed: 2)
        #expect(Date().timeIntervalSince(start) < 2.0)
        #expect(f.phase == .failed)
        #expect(f.deviceBytes() == f.live)
    }

    // MARK: - Deadlines via tick()

    @Test("Heartbeat loss drops the session to idle and empties the spill store",
          arguments: [EngPhase.armed, .protecting])
    func heartbeatLoss(_ phase: EngPhase) throws {
        let f = EngFixture(memoryBlocks: 16) {
            $0.heartbeatTimeoutNanos = 10 * engSecond
            $0.spillAfterNanos = engSecond
        }
        try f.enter(phase)
        try f.writeBlocks(0, 4, seed: 2)
        f.manual.advance(seconds: 2)
        #expect(f.engine.spillStep() == 4)
        try f.writeBlocks(4, 2, seed: 2)
        #expect(f.spill.bytesInUse == 4 * 4096)
        f.engine.heartbeat()
        f.manual.advance(seconds: 9)
        #expect(f.engine.tick() == [])
        #expect(f.status.passthroughSinceNanos == nil)
        f.manual.advance(seconds: 2)
        let dropTime = f.manual.now()
        let events = f.engine.tick()
        #expect(f.status.passthroughSinceNanos == dropTime)
        #expect(events.count == 1)
        guard case .dropped(let reason)? = events.first else { Issue.record("not dropped: \(events)"); return }
        #expect(reason.contains("heartbeat"))
        #expect(f.phase == .idle)
        #expect(f.engine.failureReason == nil)
        #expect(f.spill.bytesInUse == 0)
        #expect(f.spill.fileCount == 0)
        let s = f.status
        #expect(s.bufferedBlocks == 0 && s.protectedBlocks == 0 && s.memoryBytes == 0)
        #expect(s.counters.sessionsFailed == 1)
        #expect(throws: EngineError.noSession) { try f.snap(0, 1) }
        #expect(f.engine.tick() == [])
        try f.writeBlocks(0, 2, seed: 4)                     // passthrough
        #expect(f.deviceBytes() == f.live)
    }

    @Test("While waiting for a pause no heartbeat is needed; the snapshot deadline bounds the wait")
    func noHeartbeatWhileWaiting() throws {
        let f = EngFixture {
            $0.heartbeatTimeoutNanos = 10 * engSecond
            $0.snapshotDeadlineNanos = 30 * engSecond
        }
        try f.engine.begin(consistency: .freeze)
        f.manual.advance(seconds: 20)
        #expect(f.engine.tick() == [])
        #expect(f.phase == .waiting)
        f.manual.advance(seconds: 11)
        let events = f.engine.tick()
        guard case .failed(let reason)? = events.first, events.count == 1 else { Issue.record("not failed: \(events)"); return }
        #expect(reason.contains("not complete within 30 s"))
        #expect(f.phase == .failed)
    }

    @Test("Arming counts as a heartbeat")
    func armingIsAHeartbeat() throws {
        let f = EngFixture {
            $0.heartbeatTimeoutNanos = 10 * engSecond
            $0.memoryDeadlineNanos = 100 * engSecond
        }
        try f.engine.begin(consistency: .freeze)
        f.manual.advance(seconds: 9)
        f.armAgain()
        f.manual.advance(seconds: 9)
        #expect(f.engine.tick() == [])
        #expect(f.phase == .armed)
        f.manual.advance(seconds: 2)
        #expect(f.engine.tick().count == 1)
        #expect(f.phase == .idle)
    }

    @Test("Heartbeats keep a session alive past the timeout")
    func heartbeatKeepsAlive() throws {
        let f = EngFixture { $0.heartbeatTimeoutNanos = 10 * engSecond }
        try f.protect()
        for _ in 0..<5 {
            f.manual.advance(seconds: 6)
            f.engine.heartbeat()
            #expect(f.engine.tick() == [])
        }
        #expect(f.phase == .protecting)
        f.manual.advance(seconds: 4)
        #expect(f.status.secondsSinceHeartbeat == 4)
        #expect(f.engine.tick() == [])
        f.manual.advance(seconds: 7)
        #expect(f.engine.tick().count == 1)
        #expect(f.phase == .idle)
    }

    @Test("A block older than the memory deadline in memory fails the session",
          arguments: [EngPhase.armed, .protecting])
    func memoryDeadline(_ phase: EngPhase) throws {
        let f = EngFixture {
            $0.memoryDeadlineNanos = 10 * engSecond
            $0.heartbeatTimeoutNanos = 100 * engSecond
            $0.snapshotDeadlineNanos = 100 * engSecond
            $0.spillAfterNanos = 100 * engSecond
        }
        try f.enter(phase)
        try f.writeBlocks(3, 1, seed: 2)
        f.manual.advance(seconds: 9)
        #expect(f.engine.tick() == [])
        #expect(f.status.oldestMemoryAgeMs == 9000)
        f.manual.advance(seconds: 2)
        let events = f.engine.tick()
        guard case .failed(let reason)? = events.first, events.count == 1 else { Issue.record("not failed: \(events)"); return }
        #expect(reason.contains("memory buffer"))
        #expect(f.phase == .failed)
        #expect(f.engine.failureReason == reason)
        #expect(f.status.memoryBytes == 0)
        #expect(f.engine.tick() == [])                       // failed: nothing more to report
    }

    @Test("Blocks moved to the spill store do not count against the memory deadline")
    func memoryDeadlineAfterSpill() throws {
        let f = EngFixture {
            $0.memoryDeadlineNanos = 10 * engSecond
            $0.heartbeatTimeoutNanos = 100 * engSecond
            $0.spillAfterNanos = engSecond
        }
        try f.protect()
        try f.writeBlocks(3, 2, seed: 2)
        f.manual.advance(seconds: 2)
        #expect(f.engine.spillStep() == 2)
        f.manual.advance(seconds: 30)
        #expect(f.engine.tick() == [])
        #expect(f.phase == .protecting)
    }

    @Test("Releasing a block removes it from the memory deadline")
    func memoryDeadlineAfterRelease() throws {
        let f = EngFixture {
            $0.memoryDeadlineNanos = 10 * engSecond
            $0.heartbeatTimeoutNanos = 100 * engSecond
            $0.spillAfterNanos = 100 * engSecond
        }
        try f.protect()
        try f.writeBlocks(3, 2, seed: 2)
        f.manual.advance(seconds: 5)
        try f.engine.release(offset: blk(3), length: blk(2))
        f.manual.advance(seconds: 30)
        #expect(f.engine.tick() == [])
        #expect(f.status.oldestMemoryAgeMs == nil)
    }

    @Test("The snapshot deadline fails a session that is not protecting in time",
          arguments: [EngPhase.waiting, .armed])
    func snapshotDeadline(_ phase: EngPhase) throws {
        let f = EngFixture {
            $0.snapshotDeadlineNanos = 30 * engSecond
            $0.heartbeatTimeoutNanos = 100 * engSecond
            $0.memoryDeadlineNanos = 100 * engSecond
        }
        try f.enter(phase)
        f.manual.advance(seconds: 29)
        #expect(f.engine.tick() == [])
        f.manual.advance(seconds: 2)
        let events = f.engine.tick()
        guard case .failed(let reason)? = events.first, events.count == 1 else { Issue.record("not failed: \(events)"); return }
        #expect(reason.contains("not complete within 30 s"))
        #expect(f.phase == .failed)
        #expect(f.engine.failureReason == reason)
    }

    @Test("No snapshot deadline once protecting")
    func noSnapshotDeadlineWhenProtecting() throws {
        let f = EngFixture {
            $0.snapshotDeadlineNanos = 30 * engSecond
            $0.heartbeatTimeoutNanos = 100 * engSecond
        }
        try f.protect()
        f.manual.advance(seconds: 90)
        #expect(f.engine.tick() == [])
        #expect(f.phase == .protecting)
    }

    @Test("tick in idle and failed reports nothing", arguments: [EngPhase.idle, .failed])
    func tickWhenInactive(_ phase: EngPhase) throws {
        let f = EngFixture()
        try f.enter(phase)
        f.manual.advance(seconds: 1000)
        #expect(f.engine.tick() == [])
        #expect(f.phase.rawValue == phase.rawValue)
    }

    // MARK: - Status

    @Test("Counters: copies, writes, spills, archived blocks and peaks")
    func counters() throws {
        let f = EngFixture(memoryBlocks: 16) { $0.spillAfterNanos = engSecond }
        try f.protect()
        try f.writeBlocks(0, 4, seed: 2)
        var c = f.status.counters
        #expect(c.copies == 4 && c.writesDuringSession == 1)
        #expect(c.peakMemoryBytes == 4 * 4096)
        f.manual.advance(seconds: 2)
        f.engine.spillStep()
        c = f.status.counters
        #expect(c.spilledBlocks == 4)
        #expect(c.peakSpillBytes == 4 * 4096)
        try f.writeBlocks(4, 2, seed: 2)
        try f.writeBlocks(4, 2, seed: 3)                     // no new copies
        c = f.status.counters
        #expect(c.copies == 6 && c.writesDuringSession == 3)
        #expect(c.peakMemoryBytes == 4 * 4096)               // 2 in memory now; the peak stays
        #expect(try f.engine.release(offset: 0, length: blk(2)) == 2)
        c = f.status.counters
        #expect(c.archivedBlocks == 2)
        #expect(c.peakSpillBytes == 4 * 4096)                // the spill shrank; the peak stays
        #expect(f.spill.bytesInUse == 2 * 4096)
        try f.writeBlocks(0, 1, seed: 4)                     // released: no copy
        c = f.status.counters
        #expect(c.copies == 6 && c.writesDuringSession == 4)
        #expect(c.writeWaits == 0 && c.sessionsFailed == 0)
        // A new session starts from zero.
        f.engine.end()
        try f.engine.begin(consistency: .freeze)
        #expect(f.status.counters == EngineCounters())
    }

    @Test("Status reports the session's shape and clocks")
    func statusFields() throws {
        let f = EngFixture {
            $0.snapshotDeadlineNanos = 30 * engSecond
            $0.memoryDeadlineNanos = 5 * engSecond
            $0.heartbeatTimeoutNanos = 20 * engSecond
            $0.pauseNanos = 300 * engMS
        }
        try f.engine.begin(consistency: .wip)
        f.manual.advance(seconds: 3)
        f.engine.heartbeat()
        f.manual.advance(nanos: 1500 * engMS)
        var s = f.status
        #expect(s.phase == .waiting && s.consistency == .wip)
        #expect(s.secondsSinceBegin == 4.5)
        #expect(s.secondsSinceHeartbeat == 1.5)
        #expect(s.armedAtNanos == nil)
        #expect(s.deadlines.snapshotSeconds == 30)
        #expect(s.deadlines.memorySeconds == 5)
        #expect(s.deadlines.heartbeatSeconds == 20)
        #expect(s.deadlines.pauseMs == 300)
        #expect(s.blockSize == 4096)
        f.armAgain()
        try f.writeBlocks(64, 1)
        s = f.status
        #expect(s.armedAtNanos != nil)
        #expect(s.memoryBlocks == 1 && s.memoryBytes == 4096)
        #expect(s.mapMemoryBytes > 0)
        #expect(f.engine.bufferedRanges() == [blk(64)..<f.size])  // the partial block ends at the device end
        f.engine.end()
        s = f.status
        #expect(s.consistency == nil && s.secondsSinceBegin == nil && s.secondsSinceHeartbeat == nil)
    }

    @Test("bufferedRanges lists runs lowest first, at most `limit`")
    func bufferedRangesLimit() throws {
        let f = EngFixture()
        try f.protect()
        try f.writeBlocks(2, 2)
        try f.writeBlocks(7, 1)
        try f.writeBlocks(9, 3)
        #expect(f.engine.bufferedRanges() == [blk(2)..<blk(4), blk(7)..<blk(8), blk(9)..<blk(12)])
        #expect(f.engine.bufferedRanges(limit: 2) == [blk(2)..<blk(4), blk(7)..<blk(8)])
    }
}
