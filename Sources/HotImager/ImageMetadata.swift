// What an image says about itself: stored as JSON in the qcow2 file (the
// hotimage header extension's tail blob), shown by `hotimage info`.
import Foundation
import HotWriters

public struct ImageMetadata: Codable, Sendable {
    public struct Source: Codable, Sendable {
        public var device: String            // what was read: protected device or the device itself
        public var realDevice: String?       // the device behind HotCore, if attached
        public var attachName: String?
        public var mountPoint: String?
        public var deviceBytes: UInt64
    }
    public struct Filesystem: Codable, Sendable {
        public var type: String?
        public var uuid: String?
        public var label: String?
        public var blockSize: Int?
    }
    public struct Excluded: Codable, Sendable {
        public var path: String
        public var reason: String            // "swap file" or "--exclude"
        public var bytes: UInt64
        public var files: Int
    }
    public var tool = "hotimage"
    public var toolVersion: String
    public var host: String
    public var source: Source
    public var filesystem: Filesystem
    /// Wall-clock time of the consistent point (ISO 8601, UTC).
    public var snapshotTime: String
    /// freeze | wip | offline | raw
    public var consistency: String
    /// online | offline
    public var mode: String
    /// getfsmap | ext2fs | raw
    public var mapMethod: String
    public var blockSize: Int
    public var clusterSize: Int
    public var compression: String
    public var usedBytes: UInt64
    public var imagedBytes: UInt64
    public var excluded: [Excluded]
    public var hooks: [HookResult]
    public var emergencyEpisodes: [EmergencyEpisode]
    /// What each writer's component went through (nil: no writers ran).
    public var components: [ComponentRecord]?
    public var writerErrors: [String]?
    /// A member of a coherent set (`backup SRC SRC… -o DIR`): every image of
    /// the set records the whole set and which member it is.
    public var set: SetRecord?
    /// A random UUID naming this image's point in time. An incremental
    /// records its base's id, and `verify` checks every link against it (a
    /// file name proves nothing). A merge keeps the id of the point it
    /// keeps. Nil in images made before incrementals.
    public var id: String?
    /// An incremental image (`backup --base`): which image it continues.
    public var chain: ChainRecord?
    /// Byte ranges in use at the cut that the image does not hold (excluded
    /// and swap files; zeros in the image), as [start, end) pairs. A tracked
    /// incremental of this image reads the clusters they touch again.
    public var notImaged: [[UInt64]]?
    /// Ids of the images `hotimage merge` folded into this one (oldest last).
    public var merged: [String]?

    public func encoded() -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return Array((try? e.encode(self)) ?? Data())
    }

    public static func decode(_ bytes: [UInt8]) -> ImageMetadata? {
        try? JSONDecoder().decode(ImageMetadata.self, from: Data(bytes))
    }
}

/// An incremental's link to its base: the image's qcow2 backing file must
/// be the image with `baseId`, whose point in time was `baseCutTime`.
public struct ChainRecord: Codable, Sendable, Equatable {
    public var baseId: String
    public var baseCutTime: String
    /// The backing file name as stored in the image (relative to the
    /// image's directory, or absolute).
    public var baseFile: String
    /// tracked: HotCore's change map said which clusters changed;
    /// compared: every used cluster was read and its digest compared
    /// with the base's.
    public var method: String
    /// Why the changes were compared rather than tracked.
    public var reason: String?
    /// Clusters written with data, written as zero clusters (used in the
    /// base, unused now), and used but unchanged (left to the base).
    public var changedClusters: UInt64
    public var zeroedClusters: UInt64
    public var unchangedClusters: UInt64
    public init(baseId: String, baseCutTime: String, baseFile: String, method: String, reason: String?,
                changedClusters: UInt64, zeroedClusters: UInt64, unchangedClusters: UInt64) {
        self.baseId = baseId; self.baseCutTime = baseCutTime; self.baseFile = baseFile; self.method = method
        self.reason = reason; self.changedClusters = changedClusters; self.zeroedClusters = zeroedClusters
        self.unchangedClusters = unchangedClusters
    }
}

/// The set an image belongs to: the same in every member's image except
/// `member`. `snapshotTime` of each member's metadata is `cutTime`.
public struct SetRecord: Codable, Sendable, Equatable {
    public struct Member: Codable, Sendable, Equatable {
        /// Unique in the set; the image is DIR/NAME.qcow2.
        public var name: String
        /// What was given on the command line.
        public var source: String
        /// The device read (protected device, dm volume, device).
        public var device: String
        public var deviceBytes: UInt64
        public var filesystemUUID: String?
        public init(name: String, source: String, device: String, deviceBytes: UInt64, filesystemUUID: String?) {
            self.name = name; self.source = source; self.device = device; self.deviceBytes = deviceBytes; self.filesystemUUID = filesystemUUID
        }
    }
    /// A random UUID, one per set backup.
    public var id: String
    /// The one cut (ISO 8601, UTC): every member was armed with nothing in
    /// flight on any of them.
    public var cutTime: String
    /// Every member, in command-line order.
    public var members: [Member]
    /// Which member this image is.
    public var member: String
    public init(id: String, cutTime: String, members: [Member], member: String) {
        self.id = id; self.cutTime = cutTime; self.members = members; self.member = member
    }
    /// The image file of a member in the set's directory.
    public static func imageName(_ member: String) -> String { member + ".qcow2" }
}

public func iso8601(_ d: Date) -> String {
    let f = ISO8601DateFormatter()
    f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return f.string(from: d)
}
