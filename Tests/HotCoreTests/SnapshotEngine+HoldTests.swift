import Foundation
import Testing
import HotCore

// arm(hold: true), the engine's part of a coherent set cut (issue 16): from
// the arm until narrow, a new write (or zero/TRIM) waits in `mutate`; it
// counts as a write since arm; narrow, end, fail and the hold deadline in
// tick all let it go. Writes run on their own threads and every wait is
// bounded, so a broken hold fails a test instead of hanging it.

@Suite("SnapshotEngine: hold (set cut)")
struct SnapshotEngineHoldTests {

    /// begin, then arm at once (pause 0) with or without hold.
    static func armHolding(_ f: EngFixture, _ c: Consistency = .freeze, hold: Bool = true) throws {
        try f.engine.begin(consistency: c)
        let r = f.engine.arm(pauseNanos: 0, hold: hold)
        guard case .armed = r else { Issue.record("could not arm: \(r)"); return }
    }

    /// A write of pattern `seed` over block `b` on its own thread; `done` is
    /// signalled when it returns, `error` keeps what it threw.
    final class BackgroundWrite: @unchecked Sendable {
        let done: DispatchSemaphore
        let data: [UInt8]
        let error = EngBox<Error?>(nil)
        let finished = EngBox(false)
        init(_ f: EngFixture, block b: UInt64, seed: UInt64) {
            let n = f.blockLen(b)
            let bytes = engBytes(offset: blk(b), count: n, seed: seed)
            data = bytes
            let engine = f.engine
            let err = error, fin = finished
            done = engSpawn {
                do {
                    try bytes.withUnsafeBytes { try engine.write(offset: blk(b), count: n, from: $0.baseAddress!) }
                } catch { err.value = error }
                fin.value = true
            }
        }
        /// Whether the write returned within `seconds` (true again once it has).
        func returned(within seconds: Double = 5) -> Bool { finished.value || engWait(done, seconds: seconds) }
    }

    /// A zero (TRIM) of block `b` on its own thread.
    static func backgroundZero(_ f: EngFixture, block b: UInt64) -> DispatchSemaphore {
        let engine = f.engine
        let n = UInt64(f.blockLen(b))
        return engSpawn { try? engine.zero(offset: blk(b), length: n, unmap: true) }
    }

    /// Waits (bounded) until `n` writes are held; false if they never were.
    static func waitHeld(_ f: EngFixture, _ n: UInt64, seconds: Double = 5) -> Bool {
        let limit = Date().addingTimeInterval(seconds)
        while Date() < limit {
            if f.status.counters.heldWrites >= n { return true }
            usleep(1000)
        }
        return false
    }

    /// Byte equality without printing whole blocks when it fails.
    func same(_ a: [UInt8], _ b: [UInt8]) -> Bool { a == b }

    func deviceBlock(_ f: EngFixture, _ b: UInt64) -> [UInt8] {
        Array(f.deviceBytes()[Int(blk(b))..<Int(blk(b)) + f.blockLen(b)])
    }

    @Test("arm(hold): a write and a TRIM wait until narrow, then land with their originals protected")
    func heldUntilNarrow() throws {
        let f = EngFixture()
        defer { f.engine.end() }
        try Self.armHolding(f)
        let w = BackgroundWrite(f, block: 3, seed: 7)
        let z = Self.backgroundZero(f, block: 5)
        #expect(Self.waitHeld(f, 2), "the write and the TRIM were never held")
        // Held: neither returns, the device is unchanged, nothing copied yet.
        #expect(!w.returned(within: 0.2), "the write went on while armed with hold")
        #expect(!engWait(z, seconds: 0.05), "the TRIM went on while armed with hold")
        #expect(same(deviceBlock(f, 3), f.imageBlock(3)))
        #expect(same(deviceBlock(f, 5), f.imageBlock(5)))
        #expect(f.status.counters.copies == 0)
        #expect(f.phase == .armed)

        let r = try f.engine.narrow(used: [0..<f.size])
        #expect(r == .protecting(usedBlocks: f.blockCount))
        #expect(w.returned(), "the held write was not released by narrow")
        #expect(engWait(z), "the held TRIM was not released by narrow")
        #expect(w.error.value == nil)
        // They landed on the device, and the snapshot still reads the originals.
        #expect(same(deviceBlock(f, 3), w.data))
        #expect(same(deviceBlock(f, 5), [UInt8](repeating: 0, count: f.blockLen(5))))
        #expect(same(try f.snapBlock(3), f.imageBlock(3)))
        #expect(same(try f.snapBlock(5), f.imageBlock(5)))
        let c = f.status.counters
        #expect(c.heldWrites == 2)
        #expect(c.copies == 2)
        #expect(c.writesDuringSession == 2)
        // The hold ended with narrow: a later write goes straight through (and is copied).
        let later = BackgroundWrite(f, block: 9, seed: 8)
        #expect(later.returned(), "a write after narrow was blocked")
        #expect(f.status.counters.heldWrites == 2)
        #expect(same(try f.snapBlock(9), f.imageBlock(9)))
    }

    @Test("A held write counts as a write since arm: under wip narrow answers retry and the write passes through")
    func heldWriteMeansWipRetry() throws {
        let f = EngFixture()
        defer { f.engine.end() }
        try Self.armHolding(f, .wip)
        let w = BackgroundWrite(f, block: 4, seed: 11)
        #expect(Self.waitHeld(f, 1), "the write was never held")
        #expect(!w.returned(within: 0.1), "the write went on while armed with hold")

        let r = try f.engine.narrow(used: [0..<f.size])
        #expect(r == .retry(writes: 1))
        #expect(w.returned(), "the held write was not released by a retry")
        #expect(w.error.value == nil)
        // Back to waiting: passthrough, nothing copied or protected.
        #expect(f.phase == .waiting)
        #expect(same(deviceBlock(f, 4), w.data))
        #expect(f.status.counters.copies == 0)
        #expect(f.status.protectedBlocks == 0)
        // The next try without hold: writes are not held and are copied.
        let again = f.engine.arm(pauseNanos: 0)
        guard case .armed = again else { Issue.record("could not arm again: \(again)"); return }
        let w2 = BackgroundWrite(f, block: 6, seed: 12)
        #expect(w2.returned(), "a write was held after an arm without hold")
        #expect(f.status.counters.heldWrites == 1)
        #expect(try f.engine.narrow(used: [0..<f.size]) == .retry(writes: 1))
    }

    @Test("The hold deadline: tick fails the session past holdDeadlineNanos and the held write goes on")
    func holdDeadline() throws {
        let f = EngFixture()
        defer { f.engine.end() }
        let deadline = f.engine.config.holdDeadlineNanos
        #expect(deadline < f.engine.config.heartbeatTimeoutNanos, "the heartbeat would fire first")
        try Self.armHolding(f)
        let w = BackgroundWrite(f, block: 2, seed: 21)
        #expect(Self.waitHeld(f, 1), "the write was never held")

        // Just before the deadline nothing happens and the write still waits.
        f.manual.advance(nanos: deadline)
        #expect(f.engine.tick() == [])
        #expect(f.phase == .armed)
        #expect(!w.returned(within: 0.1), "the write went on before the hold deadline")

        f.manual.advance(nanos: engMS)
        let events = f.engine.tick()
        #expect(events.count == 1)
        if case .failed(let why)? = events.first {
            #expect(why.contains("held"), "reason: \(why)")
        } else {
            Issue.record("tick did not fail the session: \(events)")
        }
        #expect(f.phase == .failed)
        #expect(w.returned(), "the held write stayed blocked after the hold deadline")
        #expect(w.error.value == nil)
        #expect(same(deviceBlock(f, 2), w.data))
        // No write stays blocked: another one passes straight through.
        let w2 = BackgroundWrite(f, block: 7, seed: 22)
        #expect(w2.returned(), "a write after the hold deadline was blocked")
        #expect(f.status.counters.heldWrites == 1)
        // The map comes too late.
        #expect(throws: EngineError.self) { try f.engine.narrow(used: [0..<f.size]) }
    }

    enum Stop: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case end, fail
        var testDescription: String { rawValue }
    }

    @Test("end() and fail() while holding release the held writes", arguments: Stop.allCases)
    func endOrFailReleases(_ stop: Stop) throws {
        let f = EngFixture()
        defer { f.engine.end() }
        try Self.armHolding(f)
        let ws = [BackgroundWrite(f, block: 1, seed: 31), BackgroundWrite(f, block: 10, seed: 32)]
        #expect(Self.waitHeld(f, 2), "the writes were never held")
        #expect(!ws[0].returned(within: 0.1), "a write went on while armed with hold")
        switch stop {
        case .end: f.engine.end()
        case .fail: f.engine.fail("the set cut failed")
        }
        #expect(f.phase == (stop == .end ? .idle : .failed))
        for (w, b) in zip(ws, [UInt64(1), 10]) {
            #expect(w.returned(), "a held write stayed blocked after \(stop)")
            #expect(w.error.value == nil)
            #expect(same(deviceBlock(f, b), w.data))
        }
        #expect(f.status.counters.copies == 0)
        // A new session without hold does not hold.
        try Self.armHolding(f, hold: false)
        let w3 = BackgroundWrite(f, block: 12, seed: 33)
        #expect(w3.returned(), "a write was held in a session armed without hold")
    }

    @Test("Control: arm without hold does not block writes")
    func noHoldNoBlock() throws {
        let f = EngFixture()
        defer { f.engine.end() }
        try Self.armHolding(f, hold: false)
        let w = BackgroundWrite(f, block: 3, seed: 41)
        #expect(w.returned(), "a write was blocked without hold")
        #expect(w.error.value == nil)
        #expect(f.status.counters.heldWrites == 0)
        #expect(f.status.counters.copies == 1)
        #expect(same(deviceBlock(f, 3), w.data))
        #expect(try f.engine.narrow(used: [0..<f.size]) == .protecting(usedBlocks: f.blockCount))
        #expect(same(try f.snapBlock(3), f.imageBlock(3)))
    }
}
