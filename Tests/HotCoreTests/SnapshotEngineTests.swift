import Foundation
import Testing
import HotCore

// Tests of SnapshotEngine, the copy-on-write core. This file holds the shared
// fixture (internal, `Eng`-prefixed so it cannot clash with other test files) and
// the session state machine: passthrough, begin, the write-inactivity pause, arming,
// the snapshot deadline, end/begin from every phase, wrong-phase and range errors.
//
// Other aspects live in SnapshotEngine+<Aspect>Tests.swift:
//   +PointInTime  overwrites, zero/TRIM, unaligned snapshot reads
//   +Narrow       the used-block map, holes, extents, wip retry
//   +Release      archived blocks
//   +Buffer       spilling, spill failure, the bounded write wait, deadlines, counters
//   +Stress       real threads: writers, snapshot readers, mover, releaser
//
// Time: every test except the write-wait and stress tests uses ManualClock, so
// deadlines move only when the test says so. `waitForPause` re-checks the clock at
// least every 50 ms of real time, so tests that need it to block drive it from a
// second thread.

// MARK: - Fixture

let engBS = 4096
let engMS: UInt64 = 1_000_000
let engSecond: UInt64 = 1_000_000_000

/// Byte offset of block `b` (4 KiB blocks).
func blk(_ b: UInt64) -> UInt64 { b * UInt64(engBS) }

/// Deterministic pseudo-random bytes: the content at device offset `offset` for `seed`.
/// Different seeds (and different offsets) give different bytes, so a block read from
/// the wrong place or the wrong time never matches by accident.
func engBytes(offset: UInt64, count: Int, seed: UInt64) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    var word: UInt64 = 0
    var wordIndex: UInt64 = .max
    for i in 0..<count {
        let pos = offset + UInt64(i)
        if pos >> 3 != wordIndex {
            wordIndex = pos >> 3
            var z = wordIndex &+ seed &* 0x9E37_79B9_7F4A_7C15 &+ 0x1234_5678
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            word = z ^ (z >> 31)
        }
        out[i] = UInt8(truncatingIfNeeded: word >> ((pos & 7) * 8))
    }
    return out
}

/// A lock-protected value shared with other threads.
final class EngBox<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var v: T
    init(_ v: T) { self.v = v }
    var value: T {
        get { lock.lock(); defer { lock.unlock() }; return v }
        set { lock.lock(); v = newValue; lock.unlock() }
    }
    func update<R>(_ body: (inout T) -> R) -> R { lock.lock(); defer { lock.unlock() }; return body(&v) }
}

/// Runs `body` on a new thread; the semaphore is signalled when it returns.
@discardableResult
func engSpawn(_ body: @escaping () -> Void) -> DispatchSemaphore {
    let done = DispatchSemaphore(value: 0)
    let t = Thread { body(); done.signal() }
    t.stackSize = 1 << 20
    t.start()
    return done
}

func engWait(_ s: DispatchSemaphore, seconds: Double = 5) -> Bool {
    s.wait(timeout: .now() + seconds) == .success
}

/// A MemoryBlockIO whose next read and/or next write can be held: the operation
/// signals `entered` and blocks until `open()`. One-shot: later operations pass.
final class GatedBlockIO: BlockIO, @unchecked Sendable {
    let inner: MemoryBlockIO
    private let lock = NSLock()
    private var holdRead = false
    private var holdWrite = false
    let entered = DispatchSemaphore(value: 0)
    private let proceed = DispatchSemaphore(value: 0)

    init(size: UInt64) { inner = MemoryBlockIO(size: size) }
    var size: UInt64 { inner.size }

    func holdNextRead() { lock.lock(); holdRead = true; lock.unlock() }
    func holdNextWrite() { lock.lock(); holdWrite = true; lock.unlock() }
    func open() { proceed.signal() }

    private func gate(_ isRead: Bool) {
        lock.lock()
        let hold = isRead ? holdRead : holdWrite
        if hold { if isRead { holdRead = false } else { holdWrite = false } }
        lock.unlock()
        if hold { entered.signal(); proceed.wait() }
    }

    func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
        gate(true)
        try inner.read(into: buf, count: count, offset: offset)
    }
    func write(from buf: UnsafeRawPointer, count: Int, offset: UInt64) throws {
        gate(false)
        try inner.write(from: buf, count: count, offset: offset)
    }
    func zero(offset: UInt64, length: UInt64, unmap: Bool) throws {
        try inner.zero(offset: offset, length: length, unmap: unmap)
    }
    func flush() throws {}
}

/// A session phase a test can put the engine in.
enum EngPhase: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case idle, waiting, armed, protecting, failed
    var testDescription: String { rawValue }
}

/// An engine over an in-memory device pre-filled with `image` (seed 1), a
/// MemorySpillStore and (by default) a ManualClock. `live` models what the device
/// must hold after the writes made through the fixture.
final class EngFixture {
    static let defaultSize: UInt64 = 64 * 4096 + 1000   // 65 blocks, the last one partial

    let clock: SessionClock
    let mem: MemoryBlockIO
    let spill: MemorySpillStore
    let engine: SnapshotEngine
    let image: [UInt8]
    var live: [UInt8]
    var size: UInt64 { mem.size }
    var blockCount: UInt64 { engine.blockCount }
    var manual: ManualClock { clock as! ManualClock }

    init(size: UInt64 = EngFixture.defaultSize, memoryBlocks: Int = 256,
         spill: MemorySpillStore = MemorySpillStore(), clock: SessionClock = ManualClock(),
         gated: GatedBlockIO? = nil, tweak: (inout EngineConfig) -> Void = { _ in }) {
        var c = EngineConfig()
        c.blockSize = engBS
        c.memoryBufferBytes = memoryBlocks * engBS
        tweak(&c)
        let device: BlockIO
        if let gated {
            mem = gated.inner
            device = gated
        } else {
            mem = MemoryBlockIO(size: size)
            device = mem
        }
        let img = engBytes(offset: 0, count: Int(mem.size), seed: 1)
        let bytes = mem.bytes
        img.withUnsafeBytes { bytes.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        image = img
        live = img
        self.clock = clock
        self.spill = spill
        engine = SnapshotEngine(device: device, spill: spill, config: c, clock: clock)
    }

    var phase: SessionPhase { engine.currentPhase }
    var status: EngineStatus { engine.status() }

    /// begin, then arm at once (the pause is made to have passed on the manual clock).
    func arm(_ consistency: Consistency = .freeze) throws {
        try engine.begin(consistency: consistency)
        armAgain()
    }

    /// From waiting: lets the pause pass and arms.
    func armAgain() {
        if let m = clock as? ManualClock { m.advance(nanos: engine.config.pauseNanos + engMS) }
        let pause = clock is ManualClock ? engine.config.pauseNanos : 0
        let r = engine.waitForPause(pauseNanos: pause, arm: true)
        guard case .armed = r else { Issue.record("could not arm: \(r)"); return }
    }

    /// begin + arm + narrow (every byte used unless `used` is given).
    func protect(_ consistency: Consistency = .freeze, used: [Range<UInt64>]? = nil) throws {
        try arm(consistency)
        let r = try engine.narrow(used: used ?? [0..<size])
        guard case .protecting = r else { Issue.record("could not narrow: \(r)"); return }
    }

    /// Puts the engine in `phase`.
    func enter(_ phase: EngPhase) throws {
        switch phase {
        case .idle: break
        case .waiting: try engine.begin(consistency: .freeze)
        case .armed: try arm()
        case .protecting: try protect()
        case .failed:
            try protect()
            engine.fail("test failure")
        }
        #expect(self.phase.rawValue == phase.rawValue)
    }

    /// Writes pattern `seed` over [offset, offset+count) through the engine; returns the bytes.
    @discardableResult
    func write(_ offset: UInt64, _ count: Int, seed: UInt64) throws -> [UInt8] {
        let data = engBytes(offset: offset, count: count, seed: seed)
        try data.withUnsafeBytes { try engine.write(offset: offset, count: count, from: $0.baseAddress!) }
        live.replaceSubrange(Int(offset)..<Int(offset) + count, with: data)
        return data
    }

    /// Writes blocks [first, first+n) with pattern `seed`.
    func writeBlocks(_ first: UInt64, _ n: UInt64 = 1, seed: UInt64 = 2) throws {
        let end = min(blk(first + n), size)
        try write(blk(first), Int(end - blk(first)), seed: seed)
    }

    func zero(_ offset: UInt64, _ length: UInt64, unmap: Bool) throws {
        try engine.zero(offset: offset, length: length, unmap: unmap)
        live.replaceSubrange(Int(offset)..<Int(offset + length),
                             with: repeatElement(0, count: Int(length)))
    }

    func snap(_ offset: UInt64, _ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: count)
        try out.withUnsafeMutableBytes {
            try engine.snapshotRead(offset: offset, count: count, into: $0.baseAddress!)
        }
        return out
    }

    func snapBlock(_ b: UInt64) throws -> [UInt8] { try snap(blk(b), blockLen(b)) }

    func liveRead(_ offset: UInt64, _ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: count)
        try out.withUnsafeMutableBytes {
            try engine.read(offset: offset, count: count, into: $0.baseAddress!)
        }
        return out
    }

    func blockLen(_ b: UInt64) -> Int { Int(min(UInt64(engBS), size - blk(b))) }

    func imageBlock(_ b: UInt64) -> [UInt8] { Array(image[Int(blk(b))..<Int(blk(b)) + blockLen(b)]) }

    func deviceBytes() -> [UInt8] { Array(UnsafeRawBufferPointer(start: mem.bytes, count: Int(size))) }
}

// MARK: - Passthrough

@Suite("SnapshotEngine: session")
struct SnapshotEngineSessionTests {

    /// Phases in which the engine is pure passthrough: writes land, nothing is copied,
    /// and the snapshot export answers an error.
    @Test("Passthrough: writes reach the device, nothing is copied, no snapshot",
          arguments: [
              EngPhase.idle,      // no session at all
              EngPhase.waiting,   // begun, not armed: still passthrough
              EngPhase.failed,    // failed sessions fall back to passthrough
          ])
    func passthrough(_ phase: EngPhase) throws {
        let f = EngFixture()
        try f.enter(phase)
        try f.write(blk(3) + 100, 5000, seed: 7)
        try f.writeBlocks(64, seed: 8)          // the partial last block
        try f.zero(blk(10), 3 * 4096, unmap: true)
        #expect(f.deviceBytes() == f.live)
        #expect(try f.liveRead(0, Int(f.size)) == f.live)
        #expect(f.status.counters.copies == 0)
        #expect(f.status.bufferedBlocks == 0)
        #expect(f.status.memoryBytes == 0)
        if phase == .failed {
            #expect(throws: EngineError.sessionFailed("test failure")) { try f.snap(0, 4096) }
        } else {
            #expect(throws: EngineError.noSession) { try f.snap(0, 4096) }
            #expect(throws: EngineError.noSession) { try f.engine.snapshotExtents(offset: 0, length: 4096) }
        }
    }

    @Test("A fresh engine is idle with an empty map")
    func freshEngine() {
        let f = EngFixture()
        let s = f.status
        #expect(s.phase == .idle)
        #expect(s.failure == nil)
        #expect(s.consistency == nil)
        #expect(s.deviceBytes == EngFixture.defaultSize)
        #expect(f.engine.blockCount == 65)
        #expect(s.usedBlocks == 0 && s.protectedBlocks == 0 && s.bufferedBlocks == 0)
        #expect(s.memoryCapacityBytes == 256 * 4096)
        #expect(s.armedAtNanos == nil)
        #expect(f.engine.tick() == [])
    }

    // MARK: - Pause and arming

    @Test("The pause is judged from the end of the last write; arming gives the cut")
    func pauseFromLastWriteEnd() throws {
        let f = EngFixture()
        try f.engine.begin(consistency: .freeze)
        #expect(f.phase == .waiting)
        f.manual.advance(seconds: 1)
        try f.write(blk(1), 10, seed: 2)           // the last write ends now
        let t0 = f.manual.now()
        f.manual.advance(nanos: 150 * engMS)
        let result = EngBox<ArmResult?>(nil)
        let done = engSpawn { result.value = f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true) }
        Thread.sleep(forTimeInterval: 0.12)        // a few 50 ms re-checks
        #expect(result.value == nil)
        #expect(f.phase == .waiting)
        f.manual.advance(nanos: 49 * engMS)         // 199 ms quiet: not yet
        Thread.sleep(forTimeInterval: 0.12)
        #expect(result.value == nil)
        f.manual.advance(nanos: 1 * engMS)          // 200 ms quiet: the pause
        #expect(engWait(done))
        #expect(result.value == .armed(at: t0 + 200 * engMS))
        #expect(f.phase == .armed)
        #expect(f.status.armedAtNanos == t0 + 200 * engMS)
        #expect(f.status.usedBlocks == 65)
        #expect(f.status.protectedBlocks == 65)
    }

    @Test("A write during the wait restarts the pause")
    func writeRestartsPause() throws {
        let f = EngFixture()
        try f.engine.begin(consistency: .freeze)
        try f.write(0, 1, seed: 2)
        let t0 = f.manual.now()
        let result = EngBox<ArmResult?>(nil)
        let done = engSpawn { result.value = f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true) }
        f.manual.advance(nanos: 150 * engMS)
        try f.write(blk(2), 4096, seed: 3)          // passthrough, but resets the pause
        f.manual.advance(nanos: 100 * engMS)        // 250 ms after the first write, 100 after the second
        Thread.sleep(forTimeInterval: 0.12)
        #expect(result.value == nil)
        f.manual.advance(nanos: 100 * engMS)
        #expect(engWait(done))
        #expect(result.value == .armed(at: t0 + 350 * engMS))
        #expect(f.status.counters.copies == 0)      // the writes came before the cut
        #expect(try f.snap(0, Int(f.size)) == f.live)
    }

    @Test("A write in flight prevents arming, however long ago it started")
    func writeInFlightBlocksArming() throws {
        let g = GatedBlockIO(size: EngFixture.defaultSize)
        let f = EngFixture(gated: g)
        try f.engine.begin(consistency: .freeze)
        g.holdNextWrite()
        let writer = engSpawn { _ = try? f.write(blk(4), 4096, seed: 5) }
        #expect(engWait(g.entered))
        #expect(f.status.writesInFlight == 1)
        f.manual.advance(seconds: 5)
        let result = EngBox<ArmResult?>(nil)
        let waiter = engSpawn { result.value = f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true) }
        Thread.sleep(forTimeInterval: 0.12)
        #expect(result.value == nil)
        g.open()
        #expect(engWait(writer))
        let end = f.manual.now()
        Thread.sleep(forTimeInterval: 0.12)         // the write just ended: no pause yet
        #expect(result.value == nil)
        f.manual.advance(nanos: 200 * engMS)
        #expect(engWait(waiter))
        #expect(result.value == .armed(at: end + 200 * engMS))
        #expect(f.status.writesInFlight == 0)
    }

    @Test("maxWaitNanos: no pause within the bound answers noPause and the session keeps waiting")
    func maxWaitNoPause() throws {
        let f = EngFixture()
        try f.engine.begin(consistency: .freeze)
        try f.write(0, 1, seed: 2)
        let start = f.manual.now()
        let result = EngBox<ArmResult?>(nil)
        let waiter = engSpawn {
            result.value = f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true, maxWaitNanos: engSecond)
        }
        var finished = false
        for _ in 0..<40 {
            try f.write(blk(2), 512, seed: 3)
            f.manual.advance(nanos: 100 * engMS)
            if waiter.wait(timeout: .now() + 0.01) == .success { finished = true; break }
        }
        if !finished { finished = engWait(waiter) }
        #expect(finished)
        #expect(result.value == .noPause)
        #expect(f.manual.now() - start >= engSecond)
        #expect(f.phase == .waiting)
        #expect(f.engine.failureReason == nil)
        // A pause within the bound still arms.
        f.manual.advance(nanos: 200 * engMS)
        let t = f.manual.now()
        #expect(f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true, maxWaitNanos: engSecond) == .armed(at: t))
    }

    @Test("A pause that has already passed arms at once, at the current clock")
    func pauseAlreadyPassed() throws {
        let f = EngFixture()
        try f.engine.begin(consistency: .wip)
        f.manual.advance(seconds: 3)
        let now = f.manual.now()
        #expect(f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true) == .armed(at: now))
        #expect(f.phase == .armed)
        #expect(f.status.consistency == .wip)
    }

    @Test("waitForPause without arm only reports; arm(pauseNanos: 0) then arms")
    func reportThenArm() throws {
        let f = EngFixture()
        try f.engine.begin(consistency: .freeze)
        f.manual.advance(seconds: 1)
        let t = f.manual.now()
        #expect(f.engine.waitForPause(pauseNanos: 200 * engMS, arm: false) == .armed(at: t))
        #expect(f.phase == .waiting)
        try f.writeBlocks(1)                         // still passthrough: no copy
        #expect(f.status.counters.copies == 0)
        #expect(f.engine.arm(pauseNanos: 0) == .armed(at: t))   // the write ended at t (manual clock)
        #expect(f.phase == .armed)
        try f.writeBlocks(1, seed: 9)
        #expect(f.status.counters.copies == 1)
        #expect(try f.snapBlock(1) == engBytes(offset: blk(1), count: 4096, seed: 2))
    }

    @Test("waitForPause outside waiting answers notWaiting with the phase",
          arguments: [EngPhase.idle, .armed, .protecting, .failed])
    func waitForPauseWrongPhase(_ phase: EngPhase) throws {
        let f = EngFixture()
        try f.enter(phase)
        let expected = SessionPhase(rawValue: phase.rawValue)!
        #expect(f.engine.waitForPause(pauseNanos: 0, arm: true) == .notWaiting(expected))
        #expect(f.engine.arm() == .notWaiting(expected))
        #expect(f.phase == expected)
    }

    // MARK: - Snapshot deadline

    @Test("A pause that never comes: the snapshot deadline times the session out")
    func pauseNeverComes() throws {
        let f = EngFixture { $0.snapshotDeadlineNanos = 2 * engSecond }
        try f.engine.begin(consistency: .freeze)
        let began = f.manual.now()
        let result = EngBox<ArmResult?>(nil)
        let waiter = engSpawn { result.value = f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true) }
        // A writer that never pauses for 200 ms, on the manual clock.
        var finished = false
        for _ in 0..<60 {
            try f.write(blk(7), 512, seed: 4)
            f.manual.advance(nanos: 100 * engMS)
            if waiter.wait(timeout: .now() + 0.01) == .success { finished = true; break }
        }
        if !finished { finished = engWait(waiter) }
        #expect(finished)
        #expect(result.value == .timedOut)
        #expect(f.manual.now() - began >= 2 * engSecond)
        #expect(f.phase == .failed)
        let reason = try #require(f.engine.failureReason)
        #expect(reason.contains("not complete within 2 s"))
        #expect(f.status.failure == reason)
        #expect(f.status.counters.sessionsFailed == 1)
        #expect(throws: EngineError.sessionFailed(reason)) { try f.snap(0, 1) }
        #expect(throws: EngineError.sessionFailed(reason)) { try f.engine.narrow(used: []) }
    }

    @Test("The deadline already passed when waitForPause is called: timedOut, failed")
    func deadlineAlreadyPassed() throws {
        let f = EngFixture { $0.snapshotDeadlineNanos = 10 * engSecond }
        try f.engine.begin(consistency: .wip)
        f.manual.advance(seconds: 10)
        #expect(f.engine.waitForPause(pauseNanos: 200 * engMS, arm: true) == .timedOut)
        #expect(f.phase == .failed)
        #expect(f.engine.failureReason?.contains("200 ms") == true)
    }

    // MARK: - end / begin

    @Test("end() from every phase returns to idle and drops every buffer",
          arguments: EngPhase.allCases)
    func endFromEveryPhase(_ phase: EngPhase) throws {
        let f = EngFixture(memoryBlocks: 16) { $0.spillAfterNanos = engSecond }
        try f.enter(phase)
        if phase == .armed || phase == .protecting {
            try f.writeBlocks(0, 4)
            f.manual.advance(seconds: 2)
            #expect(f.engine.spillStep() == 4)
            try f.writeBlocks(10, 2)
            #expect(f.spill.bytesInUse == 4 * 4096)
            #expect(f.status.bufferedBlocks == 6)
        }
        f.engine.end()
        #expect(f.phase == .idle)
        let s = f.status
        #expect(s.failure == nil)
        #expect(s.bufferedBlocks == 0 && s.protectedBlocks == 0 && s.usedBlocks == 0)
        #expect(s.memoryBytes == 0)
        #expect(f.spill.bytesInUse == 0)
        #expect(throws: EngineError.noSession) { try f.snap(0, 1) }
        // Passthrough again, and a new session can begin.
        let copies = f.status.counters.copies
        try f.writeBlocks(20, seed: 11)
        #expect(f.status.counters.copies == copies)
        #expect(f.deviceBytes() == f.live)
        try f.arm()
        #expect(f.phase == .armed)
        #expect(f.status.counters.copies == 0)
        try f.writeBlocks(20, seed: 12)
        #expect(try f.snapBlock(20) == engBytes(offset: blk(20), count: 4096, seed: 11))
    }

    @Test("begin in a running session is a wrong-phase error and changes nothing",
          arguments: [EngPhase.waiting, .armed, .protecting])
    func beginTwice(_ phase: EngPhase) throws {
        let f = EngFixture()
        try f.enter(phase)
        let actual = SessionPhase(rawValue: phase.rawValue)!
        #expect(throws: EngineError.wrongPhase(expected: "idle", actual: actual)) {
            try f.engine.begin(consistency: .freeze)
        }
        #expect(f.phase == actual)
    }

    @Test("begin after a failure starts a clean session")
    func beginAfterFailure() throws {
        let f = EngFixture()
        try f.protect()
        try f.writeBlocks(5, 3)
        f.engine.fail("imager crashed")
        #expect(f.phase == .failed)
        #expect(f.engine.failureReason == "imager crashed")
        #expect(f.status.counters.sessionsFailed == 1)
        #expect(f.status.bufferedBlocks == 0)
        f.engine.fail("second reason")                 // a failed session keeps its first reason
        #expect(f.engine.failureReason == "imager crashed")
        let g1 = f.status
        try f.engine.begin(consistency: .raw)
        #expect(f.phase == .waiting)
        #expect(f.engine.failureReason == nil)
        #expect(f.status.counters == EngineCounters())
        #expect(f.status.consistency == .raw)
        #expect(g1.phase == .failed)
        f.armAgain()
        // The new cut is the device as it is now (with the earlier writes).
        try f.writeBlocks(5, 1, seed: 30)
        #expect(try f.snapBlock(5) == engBytes(offset: blk(5), count: 4096, seed: 2))
        #expect(try f.snapBlock(9) == f.imageBlock(9))
    }

    @Test("Each begin returns a new generation")
    func generations() throws {
        let f = EngFixture()
        let g1 = try f.engine.begin(consistency: .freeze)
        f.engine.end()
        let g2 = try f.engine.begin(consistency: .freeze)
        #expect(g2 != g1)
    }

    @Test("narrow and release outside their phase throw wrongPhase or sessionFailed")
    func wrongPhaseErrors() throws {
        let f = EngFixture()
        #expect(throws: EngineError.wrongPhase(expected: "armed", actual: .idle)) { try f.engine.narrow(used: []) }
        #expect(throws: EngineError.wrongPhase(expected: "protecting", actual: .idle)) { try f.engine.release(offset: 0, length: 4096) }
        try f.engine.begin(consistency: .freeze)
        #expect(throws: EngineError.wrongPhase(expected: "armed", actual: .waiting)) { try f.engine.narrow(used: []) }
        f.armAgain()
        #expect(throws: EngineError.wrongPhase(expected: "protecting", actual: .armed)) { try f.engine.release(offset: 0, length: 4096) }
        _ = try f.engine.narrow(used: [0..<f.size])
        #expect(throws: EngineError.wrongPhase(expected: "armed", actual: .protecting)) { try f.engine.narrow(used: []) }
        f.engine.fail("gone")
        #expect(throws: EngineError.sessionFailed("gone")) { try f.engine.release(offset: 0, length: 4096) }
        #expect(throws: EngineError.sessionFailed("gone")) { try f.engine.narrow(used: []) }
    }

    // MARK: - Ranges

    struct BadRange: Sendable, CustomTestStringConvertible {
        let name: String
        let offset: UInt64
        let length: UInt64
        var testDescription: String { name }
    }

    static let size = EngFixture.defaultSize
    static let badRanges: [BadRange] = [
        BadRange(name: "starts at the end", offset: size, length: 1),                    // one byte past the end
        BadRange(name: "straddles the end", offset: size - 1, length: 2),                // last byte plus one
        BadRange(name: "whole device plus one", offset: 0, length: size + 1),            // one byte too long
        BadRange(name: "far past the end", offset: 1 << 40, length: 4096),              // beyond the device
        BadRange(name: "offset max", offset: .max, length: 1),                           // offset + length overflows
        BadRange(name: "overflowing sum", offset: .max - 10, length: 20),                // wraps around to small
        BadRange(name: "length max", offset: 4096, length: .max),                        // wraps around to 4095
        BadRange(name: "huge, Int-sized", offset: 1, length: UInt64(Int.max)),           // too long for the device
    ]

    @Test("Out-of-range and overflowing ranges throw outOfRange in every phase", arguments: badRanges)
    func outOfRange(_ r: BadRange) throws {
        let f = EngFixture()
        try f.protect()
        let err = EngineError.outOfRange(offset: r.offset, length: r.length, size: f.size)
        let count = Int(min(r.length, UInt64(Int.max)))
        let intErr = EngineError.outOfRange(offset: r.offset, length: UInt64(count), size: f.size)
        var buf = [UInt8](repeating: 0, count: 16)
        buf.withUnsafeMutableBytes { p in
            #expect(throws: intErr) { try f.engine.read(offset: r.offset, count: count, into: p.baseAddress!) }
            #expect(throws: intErr) { try f.engine.write(offset: r.offset, count: count, from: p.baseAddress!) }
            #expect(throws: intErr) { try f.engine.snapshotRead(offset: r.offset, count: count, into: p.baseAddress!) }
        }
        #expect(throws: err) { try f.engine.zero(offset: r.offset, length: r.length, unmap: true) }
        #expect(throws: err) { try f.engine.release(offset: r.offset, length: r.length) }
        #expect(throws: err) { try f.engine.snapshotExtents(offset: r.offset, length: r.length) }
        // Nothing happened: no copy, no release, the device unchanged.
        #expect(f.status.counters.copies == 0)
        #expect(f.status.counters.archivedBlocks == 0)
        #expect(f.status.counters.writesDuringSession == 0)
        #expect(f.deviceBytes() == f.image)
        #expect(f.status.writesInFlight == 0)
        // The same in idle (passthrough) for the live path.
        f.engine.end()
        _ = buf.withUnsafeMutableBytes { p in
            #expect(throws: intErr) { try f.engine.write(offset: r.offset, count: count, from: p.baseAddress!) }
        }
        #expect(throws: err) { try f.engine.zero(offset: r.offset, length: r.length, unmap: false) }
    }

    @Test("Zero-length requests at the very end of the device are valid no-ops")
    func zeroLengthAtEnd() throws {
        let f = EngFixture()
        try f.protect()
        var b: UInt8 = 0
        try f.engine.write(offset: f.size, count: 0, from: &b)
        try f.engine.zero(offset: f.size, length: 0, unmap: true)
        try f.engine.snapshotRead(offset: f.size, count: 0, into: &b)
        #expect(try f.engine.release(offset: f.size, length: 0) == 0)
        #expect(f.status.counters.copies == 0)
        #expect(f.status.protectedBlocks == 65)
    }

    @Test("narrow rejects map ranges outside the device instead of crashing",
          arguments: [
              [EngFixture.defaultSize + 4096 ..< EngFixture.defaultSize + 8192],   // wholly past the end, a block later
              [(1 << 40) ..< (1 << 40) + 4096],                                     // far past the end
              [0 ..< EngFixture.defaultSize + 1],                                   // one byte too long
          ])
    func narrowOutOfRange(_ used: [Range<UInt64>]) throws {
        let f = EngFixture()
        try f.arm()
        #expect(throws: EngineError.self) { try f.engine.narrow(used: used) }
        #expect(throws: EngineError.self) { try f.engine.narrow(used: [0..<4096], excluded: [(UInt64.max - 100)..<UInt64.max]) }
        #expect(f.phase == .armed)                     // still armed: the client may send a good map
        #expect(try f.engine.narrow(used: [0..<f.size]) == .protecting(usedBlocks: 65))
    }
}
