// The control protocol between a session client (`hotimage snapshot`,
// `status`, `detach`, the imager) and a session daemon (HotCore or
// dm-snapshot): one JSON object per line in each direction over a root-only
// unix socket (control.sock in the run directory). Every request gets
// exactly one reply line, {"ok":true,...} or {"ok":false,"error":"..."}. The
// session belongs to the connection that began it: if that connection
// closes, the session ends, and if it stays silent for the heartbeat timeout
// the daemon drops it.
//
//   op          fields                           reply fields / effect
//   hello       -                                version, device, protectedDevice, size, blockSize, phase
//   begin       consistency (freeze|wip|raw),    armedAtNanos, frozen; the daemon waits for a write-
//               mountPoint (freeze), pauseMs,    inactivity pause, freezes (freeze), arms COW for all blocks;
//               hold                             hold: new writes wait until map (a set cut, HotCore)
//   map         used [[start,end)...] bytes,     result "protecting", usedBlocks; or ok:false with
//               excluded [[start,end)...]        retry:true (wip: writes during the map read). Thaws.
//                                                HotCore: changes (ChangeInfo, ControlChanges.swift):
//                                                trusted, since, reason, clusterBytes, changedClusters,
//                                                path (RUN/NAME/changes.bin, the clusters written
//                                                since the image `since` up to this cut)
//   archived    ranges [[start,end)...]          released (blocks leave protection, copies freed)
//   buffered    limit                            ranges: buffered originals (emergency mode archives them first)
//   heartbeat   -                                -
//   status      -                                status: a DaemonStatus (ControlStatus.swift);
//                                                HotCore: status.tracking (TrackingStatus)
//   end         again, commit                    the session ends; back to passthrough (a transient
//                                                daemon exits, unless again: a set cut begins anew).
//                                                commit (HotCore): the id of the image this session
//                                                completed; if the session reached protecting and did
//                                                not fail, its changes are dropped and the map
//                                                continues from that image (trusted); reply committed.
//                                                Never with again. Without: the changes stay.
//   detach      force                            refuses while a filesystem is mounted on the
//                                                protected device or a session runs; else the daemon exits
//
// The dm-snapshot daemon's begin reply names snapshotDevice (a block device)
// instead of an export. This module holds the types, the codec and the
// client; what each op does is the daemon's (HotDaemon).
import Foundation

/// A control operation; the raw values are the wire strings.
public enum ControlOp: String, Codable, Sendable, CaseIterable {
    case hello, begin, map, archived, buffered, heartbeat, status, end, detach
}

public struct ControlRequest: Codable, Sendable, Equatable {
    public var op: ControlOp
    public var consistency: String?
    public var mountPoint: String?
    public var pauseMs: Double?
    public var used: [[UInt64]]?
    public var excluded: [[UInt64]]?
    public var ranges: [[UInt64]]?
    public var limit: Int?
    public var force: Bool?
    /// begin: hold new writes from arm until map (every member of a set armed).
    public var hold: Bool?
    /// end: the client begins again on this connection (a transient daemon stays).
    public var again: Bool?
    /// end (HotCore): the id of the image this session completed; the
    /// change map continues from it (ControlChanges.swift).
    public var commit: String?

    public init(op: ControlOp) { self.op = op }

    enum CodingKeys: String, CodingKey {
        case op, consistency, mountPoint, pauseMs, used, excluded, ranges, limit, force, hold, again, commit
    }

    /// An op this side does not know is `ControlProtocolError.unknownOp`
    /// naming it (the server answers it with an error reply).
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let raw = try c.decode(String.self, forKey: .op)
        guard let op = ControlOp(rawValue: raw) else { throw ControlProtocolError.unknownOp(raw) }
        self.op = op
        consistency = try c.decodeIfPresent(String.self, forKey: .consistency)
        mountPoint = try c.decodeIfPresent(String.self, forKey: .mountPoint)
        pauseMs = try c.decodeIfPresent(Double.self, forKey: .pauseMs)
        used = try c.decodeIfPresent([[UInt64]].self, forKey: .used)
        excluded = try c.decodeIfPresent([[UInt64]].self, forKey: .excluded)
        ranges = try c.decodeIfPresent([[UInt64]].self, forKey: .ranges)
        limit = try c.decodeIfPresent(Int.self, forKey: .limit)
        force = try c.decodeIfPresent(Bool.self, forKey: .force)
        hold = try c.decodeIfPresent(Bool.self, forKey: .hold)
        again = try c.decodeIfPresent(Bool.self, forKey: .again)
        commit = try c.decodeIfPresent(String.self, forKey: .commit)
    }
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
    /// map (HotCore): the clusters written since the image the map continues from.
    public var changes: ChangeInfo?
    /// end with commit (HotCore): whether the cut was committed.
    public var committed: Bool?

    public init(ok: Bool, error: String? = nil) { self.ok = ok; self.error = error }
    public static func failure(_ e: String, retry: Bool? = nil) -> ControlReply {
        var r = ControlReply(ok: false, error: e)
        r.retry = retry
        return r
    }
}

/// The version a daemon names in its hello reply (and the tool's version).
public let hotimageVersion = "0.1.0"
