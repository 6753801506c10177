// The control protocol between a session client (`hotimage snapshot`, the
// imager) and the HotCore daemon: one JSON object per line in each
// direction over a root-only unix socket (control.sock in the run
// directory). Every request gets exactly one reply line, {"ok":true,...} or
// {"ok":false,"error":"..."}. The session belongs to the connection that
// began it: if that connection closes, the session ends (passthrough,
// hb files deleted), and if it stays silent for the heartbeat timeout the
// engine drops it.
//
//   op          fields                           reply fields / effect
//   hello       -                                version, device, protectedDevice, size, blockSize, phase
//   begin       consistency (freeze|wip|raw),    armedAtNanos, frozen; the daemon waits for a write-
//               mountPoint (freeze), pauseMs     inactivity pause, freezes (freeze), arms COW for all blocks
//   map         used [[start,end)...] bytes,     result "protecting", usedBlocks; or ok:false with
//               excluded [[start,end)...]        retry:true (wip: writes during the map read). Thaws.
//   archived    ranges [[start,end)...]          released (blocks leave protection, copies freed)
//   buffered    limit                            ranges: buffered originals (emergency mode archives them first)
//   heartbeat   -                                -
//   status      -                                status: the engine status plus daemon facts
//   end         -                                the session ends; back to passthrough
//   detach      -                                refuses while a filesystem is mounted on the
//                                                protected device or a session runs; else the daemon exits
//
// The dm-snapshot session daemon (DMDaemon.swift) speaks the same protocol;
// its begin reply names snapshotDevice (a block device) instead of an export.
import Foundation
import HotCore

public struct ControlRequest: Codable, Sendable {
    public var op: String
    public var consistency: String?
    public var mountPoint: String?
    public var pauseMs: Double?
    public var used: [[UInt64]]?
    public var excluded: [[UInt64]]?
    public var ranges: [[UInt64]]?
    public var limit: Int?
    public var force: Bool?

    public init(op: String) { self.op = op }
}

public struct DaemonStatus: Codable, Sendable {
    public var name: String
    public var device: String
    public var protectedDevice: String?
    public var via: String
    public var pid: Int32
    public var bufferDir: String
    public var nbdSocket: String
    public var snapshotURI: String
    public var connections: Int
    public var frozen: String?
    /// The hb files may hold at most this many bytes before the session fails.
    public var bufferLimitBytes: UInt64?
    public var engine: EngineStatus
    /// dm-snapshot backend facts (DMStatus.swift); nil for HotCore.
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
}

/// A field of /proc/self/status in bytes ("VmHWM", "RssFile"), nil where /proc does not say.
public func procStatusBytes(_ field: String) -> UInt64? {
    guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = s.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }) else { return nil }
    let kb = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { UInt64($0) }
    return kb.map { $0 * 1024 }
}

/// How the NBD server answered READs: spliced from the live device's page
/// cache (no copy in the daemon) or copied through a buffer (the snapshot
/// export, READs over 1 MiB, or splicing off).
public struct ReadCounters: Codable, Sendable {
    public var spliced: UInt64
    public var copied: UInt64
    /// False when splicing was turned off (HOTIMAGE_NO_SPLICE, or refused).
    public var spliceEnabled: Bool
}

public struct ControlReply: Codable, Sendable {
    public var ok: Bool
    public var error: String?
    public var retry: Bool?
    public var version: String?
    public var device: String?
    public var protectedDevice: String?
    public var size: UInt64?
    public var blockSize: Int?
    public var phase: String?
    public var armedAtNanos: UInt64?
    public var frozen: Bool?
    public var result: String?
    public var usedBlocks: UInt64?
    public var released: UInt64?
    public var ranges: [[UInt64]]?
    public var status: DaemonStatus?
    public var snapshotURI: String?
    /// dm-snapshot backend: the point-in-time block device to read instead of an NBD export.
    public var snapshotDevice: String?

    public init(ok: Bool, error: String? = nil) { self.ok = ok; self.error = error }
    public static func failure(_ e: String, retry: Bool? = nil) -> ControlReply {
        var r = ControlReply(ok: false, error: e)
        r.retry = retry
        return r
    }
}

public let hotimageVersion = "0.1.0"

enum ControlCodec {
    static func encode<T: Encodable>(_ v: T) -> [UInt8] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        var data = (try? enc.encode(v)).map { Array($0) } ?? Array("{\"ok\":false,\"error\":\"encoding failed\"}".utf8)
        data.append(0x0a)
        return Array(data)
    }

    static func decode<T: Decodable>(_ t: T.Type, _ line: [UInt8]) throws -> T {
        try JSONDecoder().decode(t, from: Data(line))
    }
}

func toRanges(_ pairs: [[UInt64]]?) throws -> [Range<UInt64>] {
    guard let pairs else { return [] }
    return try pairs.map { p in
        guard p.count == 2, p[0] <= p[1] else {
            throw EngineError.outOfRange(offset: p.first ?? 0, length: 0, size: 0)
        }
        return p[0]..<p[1]
    }
}
