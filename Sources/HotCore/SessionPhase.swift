// The session state machine of HotCore.
//
//            begin                 pause seen (+freeze)          map received
//   idle ───────────► waiting ───────────────────────► armed ────────────────► protecting
//    ▲                  ▲  │                             │  (wip: a write          │
//    │                  │  │ snapshot deadline           │   landed while the      │ end
//    │                  │  ▼                             │   map was read → retry) │
//    │                  └──────────────────────────────◄─┘                         │
//    │     end / heartbeat lost          failed ◄── any deadline, buffer limit     │
//    └───────────────────────────────── (reason) ◄─────────────────────────────────┘
//
// - idle: passthrough; no per-write work beyond a counter.
// - waiting: passthrough; the engine watches for a write-inactivity pause.
// - armed: copy-on-write for *every* block (the map is not known yet); the
//   cut is the instant of arming, taken under the engine lock with no write
//   in flight.
// - protecting: copy-on-write only for used blocks not yet archived.
// - failed: passthrough again, buffers dropped, the snapshot export answers
//   errors; the client learns the reason and ends the session.

public enum SessionPhase: String, Sendable, Codable {
    case idle
    case waiting
    case armed
    case protecting
    case failed

    /// Whether writes must copy originals first.
    public var copiesOnWrite: Bool { self == .armed || self == .protecting }
}

/// How the consistent point is taken.
public enum Consistency: String, Sendable, Codable {
    /// The filesystem is frozen around arming and the map read.
    case freeze
    /// Write-inactivity pause only; a write during the map read means retry.
    case wip
    /// No filesystem: arm at a pause; the client maps every block.
    case raw
}

public struct EngineConfig: Sendable, Equatable {
    /// Copy-on-write granularity in bytes (a power of two, ≥ 512).
    public var blockSize: Int = 4096
    /// Memory tier of the COW buffer.
    public var memoryBufferBytes: Int = Defaults.memoryBufferBytes
    /// Above this share of the memory tier the mover spills to hb files.
    public var highWater: Double = 0.5
    /// Blocks older than this leave memory even below the high-water mark.
    public var spillAfterNanos: UInt64 = 2_000_000_000
    /// The snapshot must be complete (protecting) within this after begin.
    public var snapshotDeadlineNanos: UInt64 = Defaults.snapshotDeadlineNanos
    /// No block may stay in the memory buffer longer than this.
    public var memoryDeadlineNanos: UInt64 = Defaults.memoryDeadlineNanos
    /// No heartbeat for this long: the session is dropped.
    public var heartbeatTimeoutNanos: UInt64 = Defaults.heartbeatTimeoutNanos
    /// Write-inactivity pause length.
    public var pauseNanos: UInt64 = Defaults.pauseNanos
    /// With a freeze, how long to wait for a pause before freezing anyway
    /// (the freeze alone makes the point consistent; the pause only keeps
    /// the frozen time short, as HotBackup did).
    public var freezePauseWaitNanos: UInt64 = 5_000_000_000
    /// Longest a live write waits for room in the memory buffer before the
    /// session is failed and the write goes ahead.
    public var maxWriteWaitNanos: UInt64 = 1_000_000_000
    /// A set cut holds new writes from arm to map; past this the hold is
    /// released and the session failed (fail open: no write waits longer).
    public var holdDeadlineNanos: UInt64 = Defaults.holdDeadlineNanos
    /// Keep the change map: every cluster a WRITE, TRIM or WRITE_ZEROES
    /// touches (SnapshotEngine+Changes.swift), for incremental backups.
    public var trackChanges = true
    /// Granularity of the change map in bytes (a power of two ≥ blockSize).
    public var changeClusterBytes: Int = 65536

    public init() {}
}

public enum EngineError: Error, Equatable, CustomStringConvertible {
    case wrongPhase(expected: String, actual: SessionPhase)
    case noSession
    case sessionFailed(String)
    case archived(block: UInt64)
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    case timedOut(String)
    /// A change map of another geometry than the engine's.
    case changeMapMismatch(String)

    public var description: String {
        switch self {
        case .wrongPhase(let e, let a): return "the session is \(a.rawValue), expected \(e)"
        case .noSession: return "no backup session is active"
        case .sessionFailed(let r): return "the session failed: \(r)"
        case .archived(let b): return "block \(b) was archived and released; the snapshot no longer holds it"
        case .outOfRange(let o, let l, let s): return "range \(o)+\(l) is outside the device (\(s) bytes)"
        case .timedOut(let s): return s
        case .changeMapMismatch(let s): return s
        }
    }
}
