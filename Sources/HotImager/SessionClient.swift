// The client side of a HotCore backup session: take the snapshot (begin →
// used-block map → map, repeated under --consistency wip when writes land
// during the map read), keep the session alive with heartbeats, report
// archived ranges, ask for buffered ranges, end. Shared by `hotimage
// snapshot` and `hotimage backup`.
import Foundation
import HotControl
import HotCore
import HotErrors
import HotOS
import HotSync

/// The daemon refused or could not serve a session request, or did not
/// answer.
public struct SessionError: CodedError {
    public var description: String
    public var kind: FailureKind { .failed }
    public init(_ d: String) { description = d }
}

/// Where the daemon of an attachment lives and what it protects.
public struct AttachedVolume: Sendable {
    public var runDir: String          // RUN/NAME
    public var name: String
    public var protectedDevice: String
    /// The device HotCore stands in front of.
    public var realDevice: String?
    public var size: UInt64
    public var blockSize: Int
    public var snapshotURI: String
    /// fuse or nbd (HotCore), or dm (the dm-snapshot backend).
    public var via: SessionVia = .fuse
    public var nbdSocket: String { runDir + "/nbd.sock" }
}

/// The snapshot as taken: the cut and the map protected by HotCore.
public struct TakenSnapshot: Sendable {
    public var armedAtNanos: UInt64
    public var wallTime: Date
    public var frozen: Bool
    public var attempts: Int
    /// Used byte ranges minus exclusions, sorted and merged.
    public var protected: [Range<UInt64>]
    public var usedBytes: UInt64
    public var excludedBytes: UInt64
    /// dm-snapshot backend: the point-in-time block device (else read the NBD export).
    public var snapshotDevice: String? = nil
    /// HotCore: the clusters written since the image the change map
    /// continues from, up to this cut (nil: dm, or an older daemon). Read
    /// the map with `SessionClient.readChanges`.
    public var changes: ChangeInfo? = nil
    /// Used byte ranges left out (excluded and swap files): zeros in the
    /// image though in use. An incremental of this image reads them again.
    public var notImaged: [Range<UInt64>] = []
}

public final class SessionClient: @unchecked Sendable {
    public let volume: AttachedVolume
    let client: ControlClient
    private let m = Monitor()
    private var beating = false
    private var stopBeat = false
    private(set) public var lastError: String?
    /// The `changes` of the last `map` reply that protected (HotCore).
    private(set) public var lastChanges: ChangeInfo?

    public init(volume: AttachedVolume) throws {
        self.volume = volume
        client = try ControlClient(path: volume.runDir + "/control.sock")
    }

    /// Reads a daemon's facts (hello).
    public static func locate(runDir: String) throws -> AttachedVolume {
        let c = try ControlClient(path: runDir + "/control.sock")
        defer { c.close() }
        let h = try c.call(.hello)
        guard h.ok, let dev = h.protectedDevice, let size = h.size else {
            throw SessionError("the HotCore daemon in \(runDir) is not ready: \(h.error ?? "no protected device yet")")
        }
        let st = (try? c.call(.status))?.status
        return AttachedVolume(runDir: runDir, name: (runDir as NSString).lastPathComponent,
                              protectedDevice: dev, realDevice: st?.device, size: size, blockSize: h.blockSize ?? 4096,
                              snapshotURI: h.snapshotURI ?? "nbd+unix:///snapshot?socket=\(runDir)/nbd.sock",
                              via: st?.via ?? .fuse)
    }

    /// The daemon's answer to begin: armed (the cut is taken on this volume).
    public struct Armed: Sendable {
        public var atNanos: UInt64
        public var wallTime: Date
        public var frozen: Bool
        public var snapshotDevice: String?
    }

    /// The daemon's answer to map.
    public enum MapAnswer: Sendable, Equatable {
        case protecting
        /// wip: writes landed during the map read; begin again.
        case retry(String)
    }

    /// begin: the daemon waits for a pause (pauseMs; nil: its own), freezes
    /// (freeze), arms; with `hold`, new writes wait until `map` (a set cut).
    public func begin(consistency: Consistency, mountPoint: String?, pauseMs: Double?, hold: Bool = false) throws -> Armed {
        var req = ControlRequest(op: .begin)
        req.consistency = consistency.rawValue
        req.mountPoint = mountPoint
        req.pauseMs = pauseMs
        if hold { req.hold = true }
        let b = try client.call(req)
        guard b.ok, let at = b.armedAtNanos else { throw SessionError(b.error ?? "no reply to begin") }
        return Armed(atNanos: at, wallTime: Date(), frozen: b.frozen ?? false, snapshotDevice: b.snapshotDevice)
    }

    /// map: narrows the protection to the used map (and thaws, releases a hold).
    public func sendMap(used: [Range<UInt64>], excluded: [Range<UInt64>]) throws -> MapAnswer {
        var mreq = ControlRequest(op: .map)
        mreq.used = used.map { [$0.lowerBound, $0.upperBound] }
        mreq.excluded = excluded.map { [$0.lowerBound, $0.upperBound] }
        let r = try client.call(mreq)
        if r.ok {
            m.withLock { lastChanges = r.changes }
            return .protecting
        }
        if r.retry == true { return .retry(r.error ?? "writes during the map read") }
        throw SessionError(r.error ?? "no reply to map")
    }

    /// The snapshot as taken, from begin's answer and the map sent.
    static func taken(_ a: Armed, attempts: Int, used: [Range<UInt64>], excluded: [Range<UInt64>]) -> TakenSnapshot {
        let u = RangeSet.normalize(used)
        let prot = RangeSet.subtract(u, RangeSet.normalize(excluded))
        let usedBytes = RangeSet.total(u)
        var t = TakenSnapshot(armedAtNanos: a.atNanos, wallTime: a.wallTime, frozen: a.frozen, attempts: attempts,
                              protected: prot, usedBytes: usedBytes, excludedBytes: usedBytes - RangeSet.total(prot),
                              snapshotDevice: a.snapshotDevice)
        t.notImaged = RangeSet.subtract(u, prot)
        return t
    }

    /// Takes the snapshot. `readMap` runs inside the consistent window (the
    /// filesystem is frozen, or the pause holds) and returns the used and
    /// excluded byte ranges. Under wip a write during the map read means a
    /// new pause and another try, up to `retries` times.
    public func take(consistency: Consistency, mountPoint: String?, pauseMs: Double?, retries: Int = 20,
                     readMap: () throws -> (used: [Range<UInt64>], excluded: [Range<UInt64>]),
                     onRetry: (String) -> Void = { _ in }) throws -> TakenSnapshot {
        var attempt = 0
        while true {
            attempt += 1
            let a = try begin(consistency: consistency, mountPoint: mountPoint, pauseMs: pauseMs)
            let used: [Range<UInt64>], excluded: [Range<UInt64>]
            do {
                (used, excluded) = try readMap()
            } catch {
                _ = try? client.call(.end)
                throw SessionError("reading the used-block map: \(error)")
            }
            let answer: MapAnswer
            do { answer = try sendMap(used: used, excluded: excluded) } catch {
                _ = try? client.call(.end)
                throw error
            }
            switch answer {
            case .protecting:
                var t = Self.taken(a, attempts: attempt, used: used, excluded: excluded)
                t.changes = m.withLock { lastChanges }
                return t
            case .retry(let why):
                if attempt < retries { onRetry(why); continue }
                _ = try? client.call(.end)
                throw SessionError(why)
            }
        }
    }

    /// Heart-beats every `interval` seconds on a thread until `end`.
    public func startHeartbeat(interval: Double = 1.0) {
        m.withLock { beating = true; stopBeat = false }
        Threads.start(name: "heartbeat") { [self] in
            while true {
                let stop = m.withLock { () -> Bool in
                    if !stopBeat { _ = m.wait(timeoutNanos: UInt64(interval * 1e9)) }
                    return stopBeat
                }
                if stop { break }
                do {
                    let h = try client.call(.heartbeat)
                    if !h.ok { m.withLock { if lastError == nil { lastError = h.error } } }
                } catch {
                    m.withLock { if lastError == nil { lastError = "\(error)" } }
                }
            }
            m.withLock { beating = false; m.broadcast() }
        }
    }

    /// Tells HotCore these byte ranges are in the image: they leave the
    /// protection area and their buffered copies are freed.
    public func archived(_ ranges: [Range<UInt64>]) throws {
        guard !ranges.isEmpty else { return }
        var req = ControlRequest(op: .archived)
        req.ranges = ranges.map { [$0.lowerBound, $0.upperBound] }
        let r = try client.call(req)
        if !r.ok { throw SessionError("archived: \(r.error ?? "refused")") }
    }

    /// Byte ranges whose originals sit in the COW buffer (oldest layout first).
    public func buffered(limit: Int = 4096) throws -> [Range<UInt64>] {
        var req = ControlRequest(op: .buffered)
        req.limit = limit
        let r = try client.call(req)
        if !r.ok { throw SessionError("buffered: \(r.error ?? "refused")") }
        return (r.ranges ?? []).compactMap { $0.count == 2 && $0[0] < $0[1] ? $0[0]..<$0[1] : nil }
    }

    /// Asks the daemon now whether the session is still ours (a heartbeat);
    /// nil if it is, else why not. The heartbeat thread may not have run
    /// since the session was dropped (a client that was stopped).
    public func sessionLost() -> String? {
        do {
            let h = try client.call(.heartbeat)
            if h.ok { return nil }
            return h.error ?? "the daemon refused the heartbeat"
        } catch { return "\(error)" }
    }

    public func status() throws -> DaemonStatus {
        let r = try client.call(.status)
        guard r.ok, let s = r.status else { throw SessionError("status: \(r.error ?? "no status")") }
        return s
    }

    /// Ends the session so that this connection begins again (a set cut
    /// that starts over: a transient daemon stays).
    public func endForAnotherTry() {
        var req = ControlRequest(op: .end)
        req.again = true
        _ = try? client.call(req)
    }

    /// Ends the session (back to passthrough) and stops heart-beating.
    public func end() { _ = end(commit: nil) }

    /// Ends the session; with `commit` (the id of the image this session
    /// just completed) HotCore's change map continues from that image.
    /// Returns whether the daemon committed (false: no commit asked, the
    /// session did not complete or failed, a backend without tracking, or
    /// no answer).
    @discardableResult
    public func end(commit: String?) -> Bool {
        m.withLock {
            stopBeat = true
            m.broadcast()
            while beating { _ = m.wait(timeoutNanos: 100_000_000) }
        }
        var req = ControlRequest(op: .end)
        req.commit = commit
        guard let r = try? client.call(req) else { return false }
        return r.ok && r.committed == true
    }

    /// The change map a `map` reply named: `clusters` = ceil(size /
    /// info.clusterBytes) bits as little-endian UInt64 words (bit i of word
    /// i/64 = cluster i). Throws unless the file has exactly
    /// ceil(clusters/64) words and no bit past `clusters`.
    public func readChanges(_ info: ChangeInfo, clusters: UInt64) throws -> [UInt64] {
        try SessionClient.readChanges(info, clusters: clusters)
    }

    public static func readChanges(_ info: ChangeInfo, clusters: UInt64) throws -> [UInt64] {
        guard let path = info.path else {
            throw SessionError("the daemon wrote no change map\(info.reason.map { " (\($0))" } ?? "")")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SessionError("cannot read the change map \(path)")
        }
        let n = Int((clusters + 63) / 64)
        guard data.count == n * 8 else {
            throw SessionError("the change map \(path) has \(data.count) bytes; \(clusters) clusters need exactly \(n * 8)")
        }
        var words = [UInt64](repeating: 0, count: n)
        data.withUnsafeBytes { raw in
            for i in 0..<n { words[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        }
        if clusters % 64 != 0, let last = words.last, last >> (clusters % 64) != 0 {
            throw SessionError("the change map \(path) marks clusters past the device's \(clusters)")
        }
        let set = words.reduce(UInt64(0)) { $0 + UInt64($1.nonzeroBitCount) }
        guard set == info.changedClusters else {
            throw SessionError("the change map \(path) marks \(set) clusters; the daemon said \(info.changedClusters)")
        }
        return words
    }

    public func close() { client.close() }

    /// Drops the connection at once from another thread (an interrupt while
    /// `take` waits in the daemon): a blocked call throws, and the daemon
    /// ends the session as for a client that vanished.
    public func abort() { client.shutdown() }
}

/// Byte-range set helpers over sorted, merged arrays.
public enum RangeSet {
    public static func normalize(_ rs: [Range<UInt64>]) -> [Range<UInt64>] {
        let s = rs.filter { !$0.isEmpty }.sorted { $0.lowerBound < $1.lowerBound }
        var out: [Range<UInt64>] = []
        for r in s {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// a minus b; both normalized.
    public static func subtract(_ a: [Range<UInt64>], _ b: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var j = 0
        for r in a {
            var lo = r.lowerBound
            while j < b.count && b[j].upperBound <= lo { j += 1 }
            var k = j
            while k < b.count && b[k].lowerBound < r.upperBound {
                if b[k].lowerBound > lo { out.append(lo..<b[k].lowerBound) }
                lo = max(lo, b[k].upperBound)
                k += 1
            }
            if lo < r.upperBound { out.append(lo..<r.upperBound) }
        }
        return out
    }

    public static func total(_ rs: [Range<UInt64>]) -> UInt64 { rs.reduce(0) { $0 + UInt64($1.count) } }

    /// Rounds ranges out to multiples of `unit` (clipped to `limit`) and merges.
    public static func align(_ rs: [Range<UInt64>], unit: UInt64, limit: UInt64) -> [Range<UInt64>] {
        normalize(rs.map { r in
            let lo = r.lowerBound / unit * unit
            let hi = min(limit, (r.upperBound + unit - 1) / unit * unit)
            return lo..<max(lo, hi)
        })
    }
}
