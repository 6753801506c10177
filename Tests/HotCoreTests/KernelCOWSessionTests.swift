import XCTest
@testable import HotCore

/// The dm-snapshot session's phases and deadlines, on the manual clock.
final class KernelCOWSessionTests: XCTestCase {
    private func session(snapshot: Double = 60, heartbeat: Double = 10, idleExit: Double? = nil) -> (KernelCOWSession, ManualClock) {
        let clock = ManualClock()
        let d = KernelCOWDeadlines(snapshotNanos: UInt64(snapshot * 1e9), heartbeatNanos: UInt64(heartbeat * 1e9),
                                   idleExitNanos: idleExit.map { UInt64($0 * 1e9) })
        return (KernelCOWSession(clock: clock, deadlines: d), clock)
    }

    func testHappyPathWalksThePhases() {
        let (s, clock) = session()
        XCTAssertNil(s.begin(consistency: .freeze))
        XCTAssertEqual(s.currentPhase, .waiting)
        XCTAssertTrue(s.built(cutNanos: clock.now()))
        XCTAssertEqual(s.currentPhase, .armed)
        XCTAssertNil(s.mapped(blocks: 42))
        XCTAssertEqual(s.currentPhase, .protecting)
        XCTAssertEqual(s.facts.usedBlocks, 42)
        s.end()
        XCTAssertEqual(s.currentPhase, .idle)
        XCTAssertNil(s.facts.consistency)
    }

    func testSecondBeginIsRefusedWhileActive() {
        let (s, _) = session()
        XCTAssertNil(s.begin(consistency: .raw))
        XCTAssertEqual(s.begin(consistency: .raw), "a session is waiting already")
    }

    func testSnapshotDeadlineFailsAnArmedSessionOnlyAfterItPasses() {
        let (s, clock) = session(snapshot: 60)
        XCTAssertNil(s.begin(consistency: .freeze))
        XCTAssertTrue(s.built(cutNanos: clock.now()))
        clock.advance(seconds: 59.9)
        XCTAssertNil(s.tick())
        XCTAssertEqual(s.currentPhase, .armed)
        clock.advance(seconds: 0.2)
        guard case .failed(let why)? = s.tick() else { return XCTFail("no failure after the deadline") }
        XCTAssertTrue(why.contains("within 60 s"), why)
        XCTAssertEqual(s.currentPhase, .failed)
        XCTAssertEqual(s.facts.failure, why)
        XCTAssertEqual(s.facts.sessionsFailed, 1)
        // The map arriving late is refused and says why.
        XCTAssertNotNil(s.mapped(blocks: 1)?.range(of: "failed: the snapshot was not complete"))
    }

    func testSnapshotDeadlineCountsFromBeginNotFromTheCut() {
        let (s, clock) = session(snapshot: 10)
        XCTAssertNil(s.begin(consistency: .freeze))
        clock.advance(seconds: 8)          // a slow freeze and build
        XCTAssertTrue(s.built(cutNanos: clock.now()))
        clock.advance(seconds: 2.5)
        XCTAssertEqual(s.tick().map { if case .failed = $0 { return true } else { return false } }, true)
    }

    func testHeartbeatsKeepAProtectingSessionAndSilenceDropsIt() {
        let (s, clock) = session(heartbeat: 10)
        XCTAssertNil(s.begin(consistency: .raw))
        XCTAssertTrue(s.built(cutNanos: clock.now()))
        XCTAssertNil(s.mapped(blocks: 1))
        for _ in 0..<5 {               // 45 s with a heartbeat every 9 s
            clock.advance(seconds: 9)
            s.heartbeat()
            XCTAssertNil(s.tick())
        }
        clock.advance(seconds: 10.1)
        XCTAssertEqual(s.tick(), .dropped("no heartbeat for 10 s"))
        XCTAssertEqual(s.currentPhase, .idle, "a dropped session goes back to idle, not failed")
        XCTAssertEqual(s.facts.sessionsFailed, 0)
    }

    func testHeartbeatDeadlineDoesNotApplyWhileArmed() {
        // While armed only the snapshot deadline counts (the client may be
        // reading a large map without heart-beating).
        let (s, clock) = session(snapshot: 60, heartbeat: 10)
        XCTAssertNil(s.begin(consistency: .raw))
        XCTAssertTrue(s.built(cutNanos: clock.now()))
        clock.advance(seconds: 30)
        XCTAssertNil(s.tick())
        XCTAssertEqual(s.currentPhase, .armed)
    }

    func testBuiltAfterEndIsRefused() {
        let (s, clock) = session()
        XCTAssertNil(s.begin(consistency: .freeze))
        s.end()                         // the client went away during the build
        XCTAssertFalse(s.built(cutNanos: clock.now()))
        XCTAssertEqual(s.currentPhase, .idle)
    }

    func testFailedSessionCanBeginAgainAndKeepsLastFailure() {
        let (s, clock) = session()
        XCTAssertNil(s.begin(consistency: .raw))
        XCTAssertTrue(s.built(cutNanos: clock.now()))
        s.fail("overflowed")
        XCTAssertEqual(s.currentPhase, .failed)
        XCTAssertNil(s.begin(consistency: .raw))
        XCTAssertNil(s.facts.failure)
        XCTAssertEqual(s.facts.lastFailure, "overflowed")
    }

    func testIdleExitOnlyForATransientDaemonThatNeverBegan() {
        let (plain, c1) = session()
        c1.advance(seconds: 3600)
        XCTAssertNil(plain.tick(), "an attach daemon waits for sessions forever")

        let (t, c2) = session(idleExit: 30)
        c2.advance(seconds: 29)
        XCTAssertNil(t.tick())
        c2.advance(seconds: 2)
        XCTAssertEqual(t.tick(), .idleExit("no session began within 30 s"))
        XCTAssertNil(t.tick(), "said once")

        let (used, c3) = session(idleExit: 30)
        XCTAssertNil(used.begin(consistency: .raw))
        used.end()
        c3.advance(seconds: 60)
        XCTAssertNil(used.tick(), "a daemon that served its session ends by the session's end, not idle exit")
    }

    func testFactsReportTimesFromTheClock() {
        let (s, clock) = session()
        XCTAssertNil(s.facts.secondsSinceBegin)
        XCTAssertNil(s.begin(consistency: .raw))
        clock.advance(seconds: 1.5)
        let cut = clock.now()
        XCTAssertTrue(s.built(cutNanos: cut))
        clock.advance(seconds: 2)
        let f = s.facts
        XCTAssertEqual(f.secondsSinceBegin ?? -1, 3.5, accuracy: 1e-9)
        XCTAssertEqual(f.armedAtNanos, cut)
        XCTAssertEqual(f.consistency, .raw)
    }

    /// A clock that answers a script of times, then repeats the last.
    private final class ScriptedClock: SessionClock, @unchecked Sendable {
        private var times: [UInt64]
        init(_ seconds: [Double]) { times = seconds.map { UInt64($0 * 1e9) } }
        func now() -> UInt64 { times.count > 1 ? times.removeFirst() : times[0] }
    }

    func testAHeartbeatNewerThanTheTicksClockReadingIsNotAncient() {
        // The ticker reads the clock, a heartbeat lands (a later reading),
        // then the comparison runs: the difference must not wrap around.
        let clock = ScriptedClock([10, 10, 10, 12, 11])   // init, begin, mapped, heartbeat, tick
        let s = KernelCOWSession(clock: clock, deadlines: KernelCOWDeadlines(heartbeatNanos: 10_000_000_000))
        XCTAssertNil(s.begin(consistency: .raw))
        XCTAssertTrue(s.built(cutNanos: 10_000_000_000))
        XCTAssertNil(s.mapped(blocks: 1))
        s.heartbeat()
        XCTAssertNil(s.tick(), "a heartbeat 1 s 'after' the tick's reading dropped the session")
        XCTAssertEqual(s.currentPhase, .protecting)
    }
}
