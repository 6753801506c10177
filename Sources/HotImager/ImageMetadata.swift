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

    public func encoded() -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return Array((try? e.encode(self)) ?? Data())
    }

    public static func decode(_ bytes: [UInt8]) -> ImageMetadata? {
        try? JSONDecoder().decode(ImageMetadata.self, from: Data(bytes))
    }
}

public func iso8601(_ d: Date) -> String {
    let f = ISO8601DateFormatter()
    f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return f.string(from: d)
}
