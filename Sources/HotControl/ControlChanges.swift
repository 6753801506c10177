// Changed-block tracking on the wire (HotCore only; issue 17): what a `map`
// reply says of the clusters written since the image the session continues
// from, and what `status` says of the tracking. Every field is optional on
// the wire (older daemons and clients leave them out).

/// The `changes` of a `map` reply: the clusters written between the last
/// committed cut (the image `since`) and this session's cut.
public struct ChangeInfo: Codable, Sendable, Equatable {
    /// The map covers every write since `since`: an incremental may copy
    /// only these clusters. False: compare (the map is incomplete).
    public var trusted: Bool
    /// The id of the image the map continues from (the last `end` with
    /// `commit`); nil when untrusted.
    public var since: String?
    /// Why the map is not trusted.
    public var reason: String?
    /// Bytes per cluster (a power of two; 65536 by default).
    public var clusterBytes: Int
    /// Clusters set in the map.
    public var changedClusters: UInt64
    /// RUN/NAME/changes.bin (0600): little-endian UInt64 words, bit i of
    /// word i/64 = cluster i changed; exactly ceil(clusters/64) words,
    /// clusters = ceil(size/clusterBytes). Removed when the session ends.
    /// nil if the daemon could not write it.
    public var path: String?

    public init(trusted: Bool, since: String?, reason: String?, clusterBytes: Int, changedClusters: UInt64, path: String?) {
        self.trusted = trusted; self.since = since; self.reason = reason
        self.clusterBytes = clusterBytes; self.changedClusters = changedClusters; self.path = path
    }
}

/// `status`'s `tracking` (HotCore): the change map now.
public struct TrackingStatus: Codable, Sendable, Equatable {
    public var trusted: Bool
    /// The image the map continues from; nil when untrusted.
    public var since: String?
    /// When that image's cut was committed (ISO 8601), nil when untrusted.
    public var sinceTime: String?
    /// Why the map is not trusted (one line).
    public var reason: String?
    /// Clusters written since `since` (or since tracking began).
    public var changedClusters: UInt64
    public var changedBytes: UInt64
    public var clusterBytes: Int
    /// The state file beside the buffer directory (nil: not persisted).
    public var stateFile: String?

    public init(trusted: Bool, since: String?, sinceTime: String?, reason: String?, changedClusters: UInt64,
                changedBytes: UInt64, clusterBytes: Int, stateFile: String?) {
        self.trusted = trusted; self.since = since; self.sinceTime = sinceTime; self.reason = reason
        self.changedClusters = changedClusters; self.changedBytes = changedBytes
        self.clusterBytes = clusterBytes; self.stateFile = stateFile
    }
}
