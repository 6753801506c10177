// What a daemon answers to `status` (and `hotimage status --json` prints as
// is): the daemon's facts, the engine-shaped session status every backend
// fills, and the backend's own detail (`dm` for dm-snapshot, `reads` for
// HotCore's NBD server).
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
    public var nbdSocket: String
    public var snapshotURI: String
    public var connections: Int
    public var frozen: String?
    /// The hb files may hold at most this many bytes before the session fails.
    public var bufferLimitBytes: UInt64?
    public var engine: EngineStatus
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

    public init(name: String, device: String, protectedDevice: String?, via: SessionVia, pid: Int32,
                bufferDir: String, nbdSocket: String, snapshotURI: String, connections: Int, frozen: String?,
                bufferLimitBytes: UInt64?, engine: EngineStatus, dm: DMSessionStatus? = nil,
                reads: ReadCounters? = nil, lastFreezeSeconds: Double? = nil, peakRSSBytes: UInt64? = nil,
                fileRSSBytes: UInt64? = nil) {
        self.name = name; self.device = device; self.protectedDevice = protectedDevice; self.via = via
        self.pid = pid; self.bufferDir = bufferDir; self.nbdSocket = nbdSocket; self.snapshotURI = snapshotURI
        self.connections = connections; self.frozen = frozen; self.bufferLimitBytes = bufferLimitBytes
        self.engine = engine; self.dm = dm; self.reads = reads; self.lastFreezeSeconds = lastFreezeSeconds
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
