// A block device's I/O counters from /sys/dev/block/MAJ:MIN/stat (the
// kernel's Documentation/block/stat.rst): what a set cut watches to find a
// write-inactivity pause common to several volumes, whatever stands behind
// each (HotCore's loop or nbd device, a dm device).
import Foundation

public struct BlockIOStat: Equatable, Sendable {
    /// Completed write requests.
    public var writes: UInt64
    /// Completed discard requests (0 on kernels before 4.18).
    public var discards: UInt64
    /// Requests issued to the driver and not yet completed.
    public var inFlight: UInt64

    public init(writes: UInt64, discards: UInt64, inFlight: UInt64) {
        self.writes = writes; self.discards = discards; self.inFlight = inFlight
    }

    /// Parses the stat file's text: whitespace-separated counters, writes
    /// completed 5th, in flight 9th, discards completed 12th.
    public static func parse(_ text: String) -> BlockIOStat? {
        let f = text.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).compactMap { UInt64($0) }
        guard f.count >= 11 else { return nil }
        return BlockIOStat(writes: f[4], discards: f.count >= 15 ? f[11] : 0, inFlight: f[8])
    }

    /// The counters of the block device node `path` (nil: not a block device,
    /// or no stat file).
    public static func read(device path: String) -> BlockIOStat? {
        guard let d = DevNum(blockDevice: path),
              let t = try? String(contentsOfFile: "/sys/dev/block/\(d.major):\(d.minor)/stat", encoding: .utf8) else { return nil }
        return parse(t)
    }

    /// Whether the device wrote (or discarded) anything since `earlier`, or
    /// has requests in flight now.
    public func active(since earlier: BlockIOStat) -> Bool {
        inFlight > 0 || writes != earlier.writes || discards != earlier.discards
    }
}
