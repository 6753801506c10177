// What a daemon answers to `status` (and `hotimage status --json` prints as
// is): the daemon's facts, the session in terms every backend shares
// (`session`), and the backend's own detail: `engine`, `reads` and the NBD
// fields for HotCore, `dm` for dm-snapshot.
import HotCore

/// How an attachment presents the protected device: HotCore behind
/// nbdfuse and a loop device (fuse) or the kernel NBD client (nbd), or a
/// dm-snapshot origin (dm). The raw values are the wire strings.
public enum SessionVia: String, Codable, Sendable, CaseIterable {
    case fuse, nbd, dm

    /// The HotCore backend (fuse or nbd) rather than dm-snapshot.
    public var isHotCore: Bool { self != .dm }
}

public struct DaemonStatus: Codable, Sendable {
    public var name: String
    public var device: String
    public var protectedDevice: String?
    public var via: SessionVia
    public var pid: Int32
    public var bufferDir: String
    /// HotCore: the NBD server's socket, the snapshot export, its clients.
    public var nbdSocket: String?
    public var snapshotURI: String?
    public var connections: Int?
    public var frozen: String?
    /// The hb files may hold at most this many bytes before the session fails.
    public var bufferLimitBytes: UInt64?
    /// The session, the same for every backend.
    public var session: SessionStatus
    /// HotCore's engine (blocks, memory tier, hb files, counters); nil for dm.
    public var engine: EngineStatus?
    /// dm-snapshot backend facts (DMSessionStatus.swift); nil for HotCore.
    public var dm: DMSessionStatus? = nil
    /// READ replies of the NBD server since it started; nil for dm.
    public var reads: ReadCounters? = nil
    /// How long the last filesystem freeze lasted (FIFREEZE to FITHAW).
    public var lastFreezeSeconds: Double? = nil
    /// The daemon's peak resident set (VmHWM in /proc/self/status).
    public var peakRSSBytes: UInt64? = nil
    /// Of the resident set, pages of mapped files (RssFile): the executable
    /// and its libraries, all resident because the daemon runs under
    /// mlockall, so constant; peakRSSBytes minus this is the peak of the
    /// daemon's own memory (heap, stacks, the memory buffer).
    public var fileRSSBytes: UInt64? = nil
    /// HotCore: changed-block tracking (ControlChanges.swift); nil for dm.
    public var tracking: TrackingStatus? = nil

    public init(name: String, device: String, protectedDevice: String?, via: SessionVia, pid: Int32,
                bufferDir: String, nbdSocket: String? = nil, snapshotURI: String? = nil, connections: Int? = nil,
                frozen: String?, bufferLimitBytes: UInt64?, session: SessionStatus, engine: EngineStatus? = nil,
                dm: DMSessionStatus? = nil,
                reads: ReadCounters? = nil, lastFreezeSeconds: Double? = nil, peakRSSBytes: UInt64? = nil,
                fileRSSBytes: UInt64? = nil) {
        self.name = name; self.device = device; self.protectedDevice = protectedDevice; self.via = via
        self.pid = pid; self.bufferDir = bufferDir; self.nbdSocket = nbdSocket; self.snapshotURI = snapshotURI
        self.connections = connections; self.frozen = frozen; self.bufferLimitBytes = bufferLimitBytes
        self.session = session; self.engine = engine; self.dm = dm; self.reads = reads; self.lastFreezeSeconds = lastFreezeSeconds
        self.peakRSSBytes = peakRSSBytes; self.fileRSSBytes = fileRSSBytes
    }
}

/// How the NBD server answered READs: spliced from the live device's page
/// cache (no copy in the daemon) or copied through a buffer (the snapshot
/// export, READs over 1 MiB, or splicing off).
public struct ReadCounters: Codable, Sendable, Equatable {
    public var spliced: UInt64
    public var copied: UInt64
    /// False when splicing was turned off (HOTIMAGE_NO_SPLICE, or refused).
    public var spliceEnabled: Bool

    public init(spliced: UInt64, copied: UInt64, spliceEnabled: Bool) {
        self.spliced = spliced; self.copied = copied; self.spliceEnabled = spliceEnabled
    }
}

/// A session as every backend reports it (HotCore's engine or the
/// dm-snapshot watchdog): what the imager and `status` read.
public struct SessionStatus: Codable, Sendable, Equatable {
    public var phase: SessionPhase
    /// Why the session failed (while failed).
    public var failure: String?
    /// Why the last session failed, kept after the client ended it.
    public var lastFailure: String?
    public var consistency: Consistency?
    public var blockSize: Int
    public var deviceBytes: UInt64
    /// Blocks of the used map the session protects (0 before the map).
    public var usedBlocks: UInt64
    /// The cut, on the daemon's monotonic clock (while armed or protecting).
    public var armedAtNanos: UInt64?
    public var secondsSinceBegin: Double?
    public var secondsSinceHeartbeat: Double?
    /// Originals held for the snapshot now: HotCore's memory tier and hb
    /// files, dm-snapshot's COW store in use.
    public var bufferedBytes: UInt64
    public var peakBufferedBytes: UInt64
    public var bufferLimitBytes: UInt64
    public var sessionsFailed: UInt64
    public var snapshotDeadlineSeconds: Double
    public var heartbeatTimeoutSeconds: Double

    public init(phase: SessionPhase, failure: String?, lastFailure: String?, consistency: Consistency?, blockSize: Int,
                deviceBytes: UInt64, usedBlocks: UInt64, armedAtNanos: UInt64?, secondsSinceBegin: Double?,
                secondsSinceHeartbeat: Double?, bufferedBytes: UInt64, peakBufferedBytes: UInt64,
                bufferLimitBytes: UInt64, sessionsFailed: UInt64, snapshotDeadlineSeconds: Double,
                heartbeatTimeoutSeconds: Double) {
        self.phase = phase; self.failure = failure; self.lastFailure = lastFailure; self.consistency = consistency
        self.blockSize = blockSize; self.deviceBytes = deviceBytes; self.usedBlocks = usedBlocks
        self.armedAtNanos = armedAtNanos; self.secondsSinceBegin = secondsSinceBegin
        self.secondsSinceHeartbeat = secondsSinceHeartbeat; self.bufferedBytes = bufferedBytes
        self.peakBufferedBytes = peakBufferedBytes; self.bufferLimitBytes = bufferLimitBytes
        self.sessionsFailed = sessionsFailed; self.snapshotDeadlineSeconds = snapshotDeadlineSeconds
        self.heartbeatTimeoutSeconds = heartbeatTimeoutSeconds
    }
}

extension SessionStatus {
    /// HotCore's session in the shared terms.
    public init(engine e: EngineStatus, lastFailure: String?, bufferLimitBytes: UInt64) {
        self.init(phase: e.phase, failure: e.failure, lastFailure: lastFailure, consistency: e.consistency,
                  blockSize: e.blockSize, deviceBytes: e.deviceBytes, usedBlocks: e.usedBlocks,
                  armedAtNanos: e.armedAtNanos, secondsSinceBegin: e.secondsSinceBegin,
                  secondsSinceHeartbeat: e.secondsSinceHeartbeat,
                  bufferedBytes: e.memoryBytes + e.spillBytes,
                  peakBufferedBytes: e.counters.peakMemoryBytes + e.counters.peakSpillBytes,
                  bufferLimitBytes: bufferLimitBytes, sessionsFailed: e.counters.sessionsFailed,
                  snapshotDeadlineSeconds: e.deadlines.snapshotSeconds,
                  heartbeatTimeoutSeconds: e.deadlines.heartbeatSeconds)
    }
}
