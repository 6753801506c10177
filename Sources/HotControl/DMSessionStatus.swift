// What `status` reports about a dm-snapshot daemon beyond the session
// (SessionStatus) every backend fills.
public struct DMSessionStatus: Codable, Sendable, Equatable {
    /// dm name of the origin (the device the filesystem is mounted from).
    public var origin: String
    /// The origin's original table, e.g. "0 131072 linear 7:0 0".
    public var originTable: [String]
    /// The daemon ends with its session (spawned by `backup`), or lives on (`attach --via dm`).
    public var transient: Bool
    public var snapshotDevice: String?
    /// The snapshot's status line ("USED/TOTAL META" sectors, "Invalid", ...).
    public var snapshotState: String?
    public var cowUsedBytes: UInt64
    public var cowTotalBytes: UInt64
    public var cowLimitBytes: UInt64
    public var cowPeakBytes: UInt64
    public var hbFileBytes: UInt64
    public var hbFiles: [String]
    public var loops: [String]
    public var growths: Int
    public var persistent: Bool
    public var chunkBytes: Int

    public init(origin: String, originTable: [String], transient: Bool, snapshotDevice: String?,
                snapshotState: String?, cowUsedBytes: UInt64, cowTotalBytes: UInt64, cowLimitBytes: UInt64,
                cowPeakBytes: UInt64, hbFileBytes: UInt64, hbFiles: [String], loops: [String], growths: Int,
                persistent: Bool, chunkBytes: Int) {
        self.origin = origin; self.originTable = originTable; self.transient = transient
        self.snapshotDevice = snapshotDevice; self.snapshotState = snapshotState
        self.cowUsedBytes = cowUsedBytes; self.cowTotalBytes = cowTotalBytes; self.cowLimitBytes = cowLimitBytes
        self.cowPeakBytes = cowPeakBytes; self.hbFileBytes = hbFileBytes; self.hbFiles = hbFiles
        self.loops = loops; self.growths = growths; self.persistent = persistent; self.chunkBytes = chunkBytes
    }
}
