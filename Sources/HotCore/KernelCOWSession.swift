// The session state machine of a backend whose copy-on-write the kernel
// does (dm-snapshot): no blocks and no buffers here, only the phases and the
// deadlines, on a SessionClock so tests drive time by hand.
//
//   idle ─begin─► waiting ─built─► armed ─mapped─► protecting ─end─► idle
//                  │ build failed    │ snapshot deadline       │ heartbeat lost → idle (dropped)
//                  └──────► failed ◄─┘                         │ fail (COW store full) → failed
//   failed ─begin─► waiting …     failed ─end─► idle
//
// - waiting: the filesystem is being frozen and the snapshot stack built.
// - armed: the snapshot exists (the cut is the origin's suspend); the client
//   reads the used map; it must send it within the snapshot deadline of begin.
// - protecting: the kernel copies every written chunk; the client must
//   heart-beat within the heartbeat timeout or the session is dropped.
// - A transient daemon (one session, then exit) that sees no begin within
//   the idle-exit time after it started says so once.
//
// The daemon holds the snapshot itself and tears it down on every event this
// type reports; this type only decides.
import HotSync

public struct KernelCOWDeadlines: Sendable, Equatable {
    public var snapshotNanos: UInt64
    public var heartbeatNanos: UInt64
    /// Only for a transient daemon: exit when no session began by then.
    public var idleExitNanos: UInt64?

    public init(snapshotNanos: UInt64 = Defaults.snapshotDeadlineNanos, heartbeatNanos: UInt64 = Defaults.heartbeatTimeoutNanos, idleExitNanos: UInt64? = nil) {
        self.snapshotNanos = snapshotNanos
        self.heartbeatNanos = heartbeatNanos
        self.idleExitNanos = idleExitNanos
    }
}

/// What a tick found; the daemon acts on it.
public enum KernelCOWEvent: Equatable, Sendable {
    /// The session failed (the reason is its failure); tear the snapshot down.
    case failed(String)
    /// The client stopped heart-beating; tear down, back to idle, owner gone.
    case dropped(String)
    /// A transient daemon nobody began a session with: exit.
    case idleExit(String)
}

/// A copy of the session's facts, for status.
public struct KernelCOWFacts: Sendable, Equatable {
    public var phase: SessionPhase
    public var failure: String?
    public var lastFailure: String?
    public var consistency: Consistency?
    public var usedBlocks: UInt64
    public var armedAtNanos: UInt64?
    public var secondsSinceBegin: Double?
    public var secondsSinceHeartbeat: Double?
    public var sessionsFailed: UInt64
}

public final class KernelCOWSession: @unchecked Sendable {
    public let clock: SessionClock
    public let deadlines: KernelCOWDeadlines
    private let m = Monitor()
    private let startedAt: UInt64
    private var phase: SessionPhase = .idle
    private var failure: String?
    private var lastFailure: String?
    private var consistency: Consistency?
    private var beganAt: UInt64 = 0
    private var armedAt: UInt64 = 0
    private var lastHeartbeat: UInt64 = 0
    private var usedBlocks: UInt64 = 0
    private var sessionsBegun = 0
    private var sessionsFailed: UInt64 = 0
    private var idleExitSaid = false

    public init(clock: SessionClock, deadlines: KernelCOWDeadlines) {
        self.clock = clock
        self.deadlines = deadlines
        startedAt = clock.now()
    }

    public var currentPhase: SessionPhase { m.withLock { phase } }

    /// idle or failed → waiting; nil, or why not.
    public func begin(consistency c: Consistency) -> String? {
        m.withLock {
            guard phase == .idle || phase == .failed else { return "a session is \(phase.rawValue) already" }
            phase = .waiting
            failure = nil
            consistency = c
            beganAt = clock.now()
            lastHeartbeat = beganAt
            usedBlocks = 0
            armedAt = 0
            sessionsBegun += 1
            return nil
        }
    }

    /// The snapshot exists (cut at `cutNanos`): waiting → armed. False when
    /// the session was ended or failed meanwhile (the caller tears down).
    public func built(cutNanos: UInt64) -> Bool {
        m.withLock {
            guard phase == .waiting else { return false }
            phase = .armed
            armedAt = cutNanos
            return true
        }
    }

    /// The used map arrived: armed → protecting; nil, or why not.
    public func mapped(blocks: UInt64) -> String? {
        m.withLock {
            guard phase == .armed else {
                return "the session is \(phase.rawValue)\(failure.map { ": \($0)" } ?? ""), expected armed"
            }
            phase = .protecting
            usedBlocks = blocks
            lastHeartbeat = clock.now()
            return nil
        }
    }

    public func heartbeat() { m.withLock { lastHeartbeat = clock.now() } }

    /// Back to idle (end, the client gone).
    public func end() { m.withLock { phase = .idle; failure = nil } }

    /// The session fails with `reason` (counted once per session).
    public func fail(_ reason: String) {
        m.withLock {
            if phase != .idle && phase != .failed { sessionsFailed += 1 }
            phase = .failed
            failure = reason
            lastFailure = reason
        }
    }

    /// Applies the deadlines; at most one event a tick.
    public func tick() -> KernelCOWEvent? {
        let ev: KernelCOWEvent? = m.withLock {
            // Read under the lock, and never less than the last heartbeat: a
            // heartbeat that lands between reading the clock and comparing
            // must not look like one from the far past.
            let now = max(clock.now(), lastHeartbeat, beganAt)
            switch phase {
            case .armed where now - beganAt > deadlines.snapshotNanos:
                return .failed("the snapshot was not complete within \(secondsText(deadlines.snapshotNanos)) s (no used-block map from the client)")
            case .protecting where now - lastHeartbeat > deadlines.heartbeatNanos:
                return .dropped("no heartbeat for \(secondsText(deadlines.heartbeatNanos)) s")
            case .idle where sessionsBegun == 0 && !idleExitSaid:
                guard let limit = deadlines.idleExitNanos, now >= startedAt, now - startedAt > limit else { return nil }
                idleExitSaid = true
                return .idleExit("no session began within \(secondsText(limit)) s")
            default:
                return nil
            }
        }
        switch ev {
        case .failed(let r)?: fail(r)
        case .dropped?: end()
        default: break
        }
        return ev
    }

    public var facts: KernelCOWFacts {
        let now = clock.now()
        return m.withLock {
            let active = phase != .idle
            return KernelCOWFacts(phase: phase, failure: failure, lastFailure: lastFailure,
                                  consistency: active ? consistency : nil, usedBlocks: usedBlocks,
                                  armedAtNanos: phase.copiesOnWrite ? armedAt : nil,
                                  secondsSinceBegin: active ? Double(max(now, beganAt) - beganAt) / 1e9 : nil,
                                  secondsSinceHeartbeat: active ? Double(max(now, lastHeartbeat) - lastHeartbeat) / 1e9 : nil,
                                  sessionsFailed: sessionsFailed)
        }
    }
}

/// Nanoseconds as seconds for messages: whole seconds, or one decimal below 10 s.
public func secondsText(_ nanos: UInt64) -> String {
    nanos % 1_000_000_000 == 0 || nanos >= 10_000_000_000 ? "\(nanos / 1_000_000_000)" : "\(Double(nanos / 100_000_000) / 10)"
}
