// The imager: reads the protected (used) ranges of a source cluster by
// cluster, compresses on every core, writes the clusters into the qcow2
// writer and reports archived ranges to HotCore as it goes, so the
// protection area shrinks behind it.
//
// Workers (default 4 on any machine: reading waits on I/O, compressing
// does not) each take a *unit* — up to `unitClusters` consecutive clusters
// that hold used data — read only its used 4 KiB blocks (one request per
// contiguous run, zeros elsewhere), encode each cluster and hand it to the
// writer. Units come in ascending order (the streamlined pass) unless
// emergency mode has queued clusters that hold buffered originals: those go
// first. Each cluster is claimed once, so nothing is imaged twice.
//
// Emergency mode (online only): a monitor polls HotCore's status every
// 250 ms. When the hb files pass `emergencyBytes`, or grow faster than the
// imager reads while holding at least a quarter of it, the monitor fetches
// the buffered ranges and queues their clusters first; the episode ends when
// nothing buffered is left unclaimed. Episodes are logged and counted.
import Foundation
import HotControl
import HotCore
import HotErrors
import HotOS
import HotSync
import QCow2

public struct ImagerConfig: Sendable {
    public var workers = 4
    public var unitClusters = 16
    /// Enter emergency mode when the hb files hold this many bytes.
    public var emergencyBytes: UInt64 = Defaults.emergencyBytes
    public var reportIntervalNanos: UInt64 = 100_000_000
    public var statusIntervalNanos: UInt64 = 250_000_000
    /// Read at most this many bytes per second (0: no limit), to spare a
    /// busy production volume.
    public var maxBytesPerSecond: UInt64 = 0
    public init() {}
}

public struct EmergencyEpisode: Codable, Sendable {
    public var startSeconds: Double     // since the imager started
    public var seconds: Double
    public var clusters: UInt64
    public var reason: String
}

public struct ImagerProgress: Sendable {
    public var doneBytes: UInt64        // used bytes read and written
    public var totalBytes: UInt64
    public var imageBytes: UInt64
    public var elapsed: Double
    public var emergency: Bool
    public var bufferBytes: UInt64      // memory + hb files, last status
    public var bufferLimit: UInt64
}

public struct ImagerResult: Sendable {
    public var clusters: UInt64
    public var bytesRead: UInt64
    public var seconds: Double
    public var episodes: [EmergencyEpisode]
    public var peakBufferBytes: UInt64
    public var peakSpillBytes: UInt64
    /// Incremental: clusters read and found equal to the base (not written).
    public var unchangedClusters: UInt64 = 0
}

/// An incremental's base, for the imager: a cluster read whose digest
/// equals the base's (or that is all zeros where the base holds nothing)
/// is not written; its digest is recorded (Incremental.swift).
public struct ImagerDelta: @unchecked Sendable {
    public let base: ClusterDigestTable
    public init(base: ClusterDigestTable) { self.base = base }
}

public struct ImagerError: CodedError {
    public var description: String
    /// sessionFailed: the HotCore session failed; failed: reading or writing.
    public var kind: FailureKind
}

public final class Imager: @unchecked Sendable {
    let source: BlockSource
    let ranges: [Range<UInt64>]
    let writer: QCow2Writer
    let compression: QCow2Compression
    let clusterSize: UInt64
    let config: ImagerConfig
    let session: SessionClient?
    let log: (String) -> Void
    let delta: ImagerDelta?

    private let m = Monitor()
    private var claimed: [UInt64]
    private let clusterCount: UInt64
    private var rangeIndex = 0
    private var cursor: UInt64 = 0          // next cluster of the streamlined pass
    private var urgent: [UInt64] = []       // emergency clusters, consumed from the front
    private var urgentHead = 0
    private var failure: ImagerError?
    private var finished = false
    private var activeWorkers = 0
    private var done: UInt64 = 0
    private var clustersWritten: UInt64 = 0
    private var unchanged: UInt64 = 0
    private var pendingArchived: [Range<UInt64>] = []
    private var emergency: (start: UInt64, clusters: UInt64, reason: String)?
    private var episodes: [EmergencyEpisode] = []
    private var lastBuffer: (bytes: UInt64, limit: UInt64) = (0, 0)
    private var peakBuffer: UInt64 = 0
    private var peakSpill: UInt64 = 0
    private let start = monotonicNanos()
    private var rateNext: UInt64 = 0          // token bucket for maxBytesPerSecond
    let totalBytes: UInt64

    public init(source: BlockSource, ranges: [Range<UInt64>], writer: QCow2Writer, compression: QCow2Compression,
                clusterSize: Int, config: ImagerConfig, session: SessionClient?, delta: ImagerDelta? = nil,
                log: @escaping (String) -> Void) {
        self.source = source
        self.ranges = RangeSet.normalize(ranges.map { $0.clamped(to: 0..<source.size) })
        self.writer = writer
        self.compression = compression
        self.clusterSize = UInt64(clusterSize)
        self.config = config
        self.session = session
        self.log = log
        self.delta = delta
        clusterCount = (source.size + UInt64(clusterSize) - 1) / UInt64(clusterSize)
        claimed = [UInt64](repeating: 0, count: Int((clusterCount + 63) / 64))
        totalBytes = RangeSet.total(self.ranges)
        if let f = self.ranges.first { cursor = f.lowerBound / UInt64(clusterSize) }
    }

    // MARK: running

    public func run(progress: @escaping (ImagerProgress) -> Void) throws -> ImagerResult {
        let workers = max(1, config.workers)
        m.withLock { activeWorkers = workers }
        for i in 0..<workers {
            Threads.start(name: "imager-\(i)", stackBytes: 1 << 20) { [self] in
                worker()
                m.withLock { activeWorkers -= 1; m.broadcast() }
            }
        }
        var lastReport = monotonicNanos()
        var lastStatus: UInt64 = 0
        var lastProgress: UInt64 = 0
        var spillSamples: [(t: UInt64, bytes: UInt64)] = []
        while true {
            let running = m.withLock { () -> Int in
                if activeWorkers > 0 { _ = m.wait(timeoutNanos: 50_000_000) }
                return activeWorkers
            }
            let now = monotonicNanos()
            if now - lastReport >= config.reportIntervalNanos || running == 0 {
                lastReport = now
                flushArchived()
            }
            if let s = session, now - lastStatus >= config.statusIntervalNanos, running > 0 {
                lastStatus = now
                watch(s, now: now, samples: &spillSamples)
            }
            if now - lastProgress >= 200_000_000 || running == 0 {
                lastProgress = now
                progress(snapshotProgress())
            }
            if running == 0 { break }
        }
        flushArchived()
        if let e = session?.lastError, m.withLock({ failure == nil }) {
            m.withLock { failure = ImagerError(description: "the session failed: \(e)", kind: .sessionFailed) }
        }
        m.withLock { endEpisode(now: monotonicNanos()) }
        if let f = m.withLock({ failure }) { throw f }
        return m.withLock {
            ImagerResult(clusters: clustersWritten, bytesRead: done, seconds: Double(monotonicNanos() - start) / 1e9,
                         episodes: episodes, peakBufferBytes: peakBuffer, peakSpillBytes: peakSpill,
                         unchangedClusters: unchanged)
        }
    }

    /// The emergency episodes so far (all of them once run() has returned or
    /// thrown: a failed backup still reports that emergency mode engaged).
    public var recordedEpisodes: [EmergencyEpisode] { m.withLock { episodes } }

    /// Stops the imager from another thread; run() throws `reason`.
    public func cancel(_ reason: String) {
        fail(ImagerError(description: reason, kind: .failed))
    }

    private func fail(_ e: ImagerError) {
        m.withLock {
            if failure == nil { failure = e }
            finished = true
            m.broadcast()
        }
    }

    private func snapshotProgress() -> ImagerProgress {
        m.withLock {
            ImagerProgress(doneBytes: done, totalBytes: totalBytes, imageBytes: writer.hostBytesWritten,
                           elapsed: Double(monotonicNanos() - start) / 1e9, emergency: emergency != nil,
                           bufferBytes: lastBuffer.bytes, bufferLimit: lastBuffer.limit)
        }
    }

    // MARK: work units

    private func isClaimed(_ c: UInt64) -> Bool { claimed[Int(c >> 6)] & (1 << (c & 63)) != 0 }
    private func claim(_ c: UInt64) { claimed[Int(c >> 6)] |= 1 << (c & 63) }

    /// Does cluster `c` overlap the used ranges? Advances `rangeIndex`
    /// (monotone: the streamlined cursor only moves forward).
    private func streamUsed(_ c: UInt64) -> Bool {
        let lo = c * clusterSize, hi = lo + clusterSize
        while rangeIndex < ranges.count && ranges[rangeIndex].upperBound <= lo { rangeIndex += 1 }
        return rangeIndex < ranges.count && ranges[rangeIndex].lowerBound < hi
    }

    /// The next run of clusters to image, or nil when all is done.
    private func nextUnit() -> Range<UInt64>? {
        m.withLock {
            if finished { return nil }
            // Emergency clusters first.
            while urgentHead < urgent.count {
                let c = urgent[urgentHead]
                urgentHead += 1
                if isClaimed(c) { continue }
                claim(c)
                var end = c + 1
                while urgentHead < urgent.count, urgent[urgentHead] == end, end - c < UInt64(config.unitClusters),
                      !isClaimed(end) {
                    claim(end); end += 1; urgentHead += 1
                }
                if let e = emergency { emergency = (e.start, e.clusters + (end - c), e.reason) }
                return c..<end
            }
            // The streamlined pass.
            while cursor < clusterCount {
                if rangeIndex >= ranges.count { cursor = clusterCount; break }
                let next = max(cursor, ranges[rangeIndex].lowerBound / clusterSize)
                cursor = next
                if !streamUsed(cursor) { cursor += 1; continue }
                if isClaimed(cursor) { cursor += 1; continue }
                let first = cursor
                claim(first)
                cursor += 1
                while cursor < clusterCount, cursor - first < UInt64(config.unitClusters),
                      !isClaimed(cursor), streamUsed(cursor) {
                    claim(cursor); cursor += 1
                }
                return first..<cursor
            }
            return nil
        }
    }

    /// The index of the first range ending after `lo` (binary search).
    private func firstRange(endingAfter lo: UInt64) -> Int {
        var a = 0, b = ranges.count
        while a < b { let mid = (a + b) / 2; if ranges[mid].upperBound <= lo { a = mid + 1 } else { b = mid } }
        return a
    }

    /// Does cluster `c` overlap the ranges to read?
    private func overlapsRanges(_ c: UInt64) -> Bool {
        let i = firstRange(endingAfter: c * clusterSize)
        return i < ranges.count && ranges[i].lowerBound < (c + 1) * clusterSize
    }

    /// Used byte ranges inside clusters `u`, rounded out to 4 KiB.
    private func usedRuns(in u: Range<UInt64>) -> [Range<UInt64>] {
        let lo = u.lowerBound * clusterSize, hi = min(source.size, u.upperBound * clusterSize)
        var out: [Range<UInt64>] = []
        var i = firstRange(endingAfter: lo)
        while i < ranges.count && ranges[i].lowerBound < hi {
            let s = max(lo, ranges[i].lowerBound) & ~4095
            let e = min(hi, (min(hi, ranges[i].upperBound) + 4095) & ~4095)
            if let l = out.last, s <= l.upperBound { out[out.count - 1] = l.lowerBound..<max(l.upperBound, e) } else { out.append(s..<e) }
            i += 1
        }
        return out
    }

    private func worker() {
        let unitBytes = Int(clusterSize) * config.unitClusters
        let buf = UnsafeMutableRawPointer.allocate(byteCount: unitBytes, alignment: 4096)
        defer { buf.deallocate() }
        let encoder = ClusterEncoder(compression: compression, clusterSize: Int(clusterSize))
        let zeroDigest = ClusterDigest.zeros(clusterSize: Int(clusterSize))
        let reader: BlockReader
        do { reader = try source.makeReader() } catch {
            fail(ImagerError(description: "\(error)", kind: .failed)); return
        }
        defer { reader.close() }
        while let u = nextUnit() {
            let base = u.lowerBound * clusterSize
            let bytes = Int(min(source.size, u.upperBound * clusterSize) - base)
            if config.maxBytesPerSecond > 0 { throttle(bytes) }
            var at = 0
            var readBytes: UInt64 = 0
            var same: UInt64 = 0
            do {
                for r in usedRuns(in: u) {
                    let off = Int(r.lowerBound - base)
                    if off > at { memset(buf + at, 0, off - at) }
                    try reader.read(into: buf + off, count: Int(r.count), offset: r.lowerBound)
                    at = off + Int(r.count)
                    readBytes += UInt64(r.count)
                }
                if bytes > at { memset(buf + at, 0, bytes - at) }
                var c = u.lowerBound
                while c < u.upperBound {
                    let off = Int((c - u.lowerBound) * clusterSize)
                    let n = min(Int(clusterSize), bytes - off)
                    let data = UnsafeRawBufferPointer(start: buf + off, count: n)
                    if let d = delta {
                        // Equal to the base (or zeros where it holds nothing): the base has it.
                        let digest = ClusterDigest.of(data, clusterSize: Int(clusterSize))
                        let was = d.base[cluster: c]
                        if digest == zeroDigest ? was == nil : was == digest {
                            if digest != zeroDigest { writer.setDigest(cluster: c, digest) }
                            same += 1
                            c += 1
                            continue
                        }
                    }
                    try writer.write(encoder.encode(index: c, data: data))
                    c += 1
                }
            } catch {
                // A read of the snapshot fails when the session has failed:
                // say why, as a session failure.
                if let s = session, let st = try? s.status(), st.session.phase == .failed {
                    fail(ImagerError(description: "the session failed: \(st.session.failure ?? "unknown reason")", kind: .sessionFailed))
                } else if let e = session?.lastError ?? session?.sessionLost() {
                    fail(ImagerError(description: "the session failed: \(e) (\(error))", kind: .sessionFailed))
                } else {
                    fail(ImagerError(description: "\(error)", kind: .failed))
                }
                return
            }
            m.withLock {
                done += readBytes
                clustersWritten += UInt64(u.count) - same
                unchanged += same
                let r = base..<(base + UInt64(bytes))
                pendingArchived.append(r)
            }
        }
    }

    /// Sleeps so that reads average at most maxBytesPerSecond.
    private func throttle(_ bytes: Int) {
        let cost = UInt64(bytes) * 1_000_000_000 / config.maxBytesPerSecond
        let at = m.withLock { () -> UInt64 in
            let now = monotonicNanos()
            rateNext = max(rateNext, now) + cost
            return rateNext - cost
        }
        let now = monotonicNanos()
        if at > now { usleep(UInt32(min(UInt64(UInt32.max), (at - now) / 1000))) }
    }

    private func flushArchived() {
        guard let s = session else { m.withLock { pendingArchived.removeAll() }; return }
        let batch = m.withLock { () -> [Range<UInt64>] in
            defer { pendingArchived.removeAll() }
            return RangeSet.normalize(pendingArchived)
        }
        guard !batch.isEmpty else { return }
        do { try s.archived(batch) } catch {
            fail(ImagerError(description: "reporting archived ranges: \(error)", kind: .sessionFailed))
        }
    }

    // MARK: emergency mode

    private func watch(_ s: SessionClient, now: UInt64, samples: inout [(t: UInt64, bytes: UInt64)]) {
        let st: DaemonStatus
        do { st = try s.status() } catch {
            fail(ImagerError(description: "the session daemon stopped answering: \(error)", kind: .sessionFailed))
            return
        }
        if st.session.phase == .failed {
            fail(ImagerError(description: "the session failed: \(st.session.failure ?? "unknown reason")", kind: .sessionFailed))
            return
        }
        // HotCore: memory tier and hb files apart; dm-snapshot: the COW store.
        let spill = st.engine?.spillBytes ?? st.session.bufferedBytes
        let memory = st.engine?.memoryBytes ?? 0
        let total = spill + memory
        samples.append((now, spill))
        samples.removeAll { now - $0.t > 2_000_000_000 }
        let rate: Double = {
            guard let f = samples.first, now > f.t, spill > f.bytes else { return 0 }
            return Double(spill - f.bytes) / (Double(now - f.t) / 1e9)
        }()
        let imagingRate = m.withLock { Double(done) / max(0.001, Double(now - start) / 1e9) }
        m.withLock {
            lastBuffer = (total, (st.bufferLimitBytes ?? 0) + (st.engine?.memoryCapacityBytes ?? 0))
            peakBuffer = max(peakBuffer, total)
            peakSpill = max(peakSpill, spill)
        }
        let inEpisode = m.withLock { emergency != nil }
        var reason: String?
        if spill >= config.emergencyBytes {
            reason = "hb files hold \(spill >> 20) MiB (threshold \(config.emergencyBytes >> 20) MiB)"
        } else if spill >= config.emergencyBytes / 4 && rate > imagingRate {
            reason = String(format: "hb files grow at %.0f MB/s, faster than imaging (%.0f MB/s)", rate / 1e6, imagingRate / 1e6)
        }
        if reason == nil && !inEpisode { return }
        // Queue the clusters holding buffered originals (not yet claimed).
        let buffered = (try? s.buffered(limit: 65536)) ?? []
        m.withLock {
            var fresh: [UInt64] = []
            for r in buffered {
                var c = r.lowerBound / clusterSize
                while c * clusterSize < r.upperBound && c < clusterCount {
                    // Only clusters this imager reads: an incremental leaves
                    // the rest to its base (reading one here would image
                    // zeros over the base's data).
                    if !isClaimed(c) && overlapsRanges(c) { fresh.append(c) }
                    c += 1
                }
            }
            if urgentHead > 0 { urgent.removeFirst(urgentHead); urgentHead = 0 }
            let queued = Set(urgent)
            let new = fresh.filter { !queued.contains($0) }
            urgent.append(contentsOf: new)
            if !urgent.isEmpty && emergency == nil {
                emergency = (now, 0, reason ?? "buffered blocks pending")
                log("emergency mode: \(emergency!.reason); archiving \(urgent.count) buffered clusters first")
            } else if urgent.isEmpty && emergency != nil && reason == nil {
                endEpisode(now: now)
            }
        }
    }

    /// Closes the running episode (lock held).
    private func endEpisode(now: UInt64) {
        guard let e = emergency else { return }
        let ep = EmergencyEpisode(startSeconds: Double(e.start - start) / 1e9, seconds: Double(now - e.start) / 1e9,
                                  clusters: e.clusters, reason: e.reason)
        episodes.append(ep)
        emergency = nil
        log(String(format: "emergency mode ended after %.1f s (%llu clusters archived out of order)", ep.seconds, ep.clusters))
    }
}
