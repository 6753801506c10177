// The dm-snapshot watchdog (every tick while a snapshot exists, and before
// each status answer): reads the snapshot's fill, grows the COW store by
// another hb file when CowGrowthPolicy says so, and fails the session when
// the kernel invalidated the snapshot (the store overflowed). The origin
// keeps running throughout.
import HotControl
import HotCore
import HotOS
import Logging

extension DMBackend {
    /// Reads the snapshot's state; returns the failure when it turned invalid
    /// (the session is failed and the snapshot torn down by then).
    func watchCOW(_ s: DMSnapshotStack) -> String? {
        watching.withLock { watchCOWLocked(s, now: session.clock.now()) }
    }

    private func watchCOWLocked(_ s: DMSnapshotStack, now: UInt64) -> String? {
        let st: DMSnapshotState
        do { st = try s.state() } catch {
            logger.warning("reading the snapshot status: \(error)")
            return nil
        }
        switch st {
        case .usage(let used, let total, _):
            let u = used * 512, t = total * 512
            let rate = m.withLock { () -> Double in
                cowUsed = u
                cowTotal = t
                cowPeak = max(cowPeak, u)
                snapState = st.description
                return fillRate.add(nanos: now, bytes: u)
            }
            if case .grow(let to) = growth.decide(usedBytes: u, totalBytes: t, bytesPerSecond: rate),
               m.withLock({ growthFailure == nil }) {
                grow(s, to: to, used: u, total: t, rate: rate)
            }
            return nil
        case .invalid, .overflow:
            let (total, gf) = m.withLock { (cowTotal, growthFailure) }
            var why = "the snapshot's copy-on-write store (\(total >> 20) MiB, limit \(options.bufferLimitBytes >> 20) MiB) overflowed and the kernel invalidated the snapshot; the live volume is unaffected"
            if let gf { why += " (growing it failed: \(gf))" }
            m.withLock { snapState = st.description }
            session.fail(why)
            teardown()
            return why
        case .mergeFailed, .unknown:
            m.withLock { snapState = st.description }
            return nil
        }
    }

    private func grow(_ s: DMSnapshotStack, to: UInt64, used u: UInt64, total t: UInt64, rate: Double) {
        do {
            let grown = try ops.withLock { () -> (UInt64, [HBPiece])? in
                guard m.withLock({ stack === s }) else { return nil }
                let n = try s.grow(toBytes: to)
                return (n, s.pieces)
            }
            if let (n, pieces) = grown, n > t {
                m.withLock {
                    growths += 1
                    cowTotal = n
                    hbPaths = pieces.map(\.path)
                    loopPaths = pieces.map(\.loop)
                }
                logger.info("COW store grown to \(n >> 20) MiB in \(pieces.count) hb file(s) (\(u >> 20) MiB used, filling at \(Int(rate / 1e6)) MB/s)")
            }
        } catch {
            m.withLock { growthFailure = "\(error)" }
            logger.error("cannot grow the COW store: \(error); the session fails if it fills")
        }
    }

    // MARK: status

    func status(bufferLimitBytes: UInt64) -> (SessionStatus, BackendDetail) {
        // Read the snapshot's state now: a reader that just got EIO asks
        // why, and must hear "overflowed" even between two ticks.
        if let s = m.withLock({ stack }), session.currentPhase.copiesOnWrite {
            if let why = watchCOW(s) { logger.error("session failed: \(why)") }
        }
        let f = session.facts
        let (used, total, peak, ss, g, s, hbs, loops) = m.withLock {
            (cowUsed, cowTotal, cowPeak, snapState, growths, stack, hbPaths, loopPaths)
        }
        let dm = DMSessionStatus(
            origin: originName,
            originTable: s?.originTable.map(\.description) ?? ((try? DeviceMapper.table(name: originName)) ?? []).map(\.description),
            transient: options.transient, snapshotDevice: s?.snapshotDevice, snapshotState: ss,
            cowUsedBytes: used, cowTotalBytes: s == nil ? 0 : total, cowLimitBytes: options.bufferLimitBytes, cowPeakBytes: peak,
            hbFileBytes: options.hbFileBytes, hbFiles: s == nil ? [] : hbs, loops: s == nil ? [] : loops,
            growths: g, persistent: false, chunkBytes: 4096)
        let shared = SessionStatus(phase: f.phase, failure: f.failure, lastFailure: f.lastFailure, consistency: f.consistency,
                             blockSize: 4096, deviceBytes: sizeBytes, usedBlocks: f.usedBlocks, armedAtNanos: f.armedAtNanos,
                             secondsSinceBegin: f.secondsSinceBegin, secondsSinceHeartbeat: f.secondsSinceHeartbeat,
                             bufferedBytes: f.phase.copiesOnWrite ? used : 0, peakBufferedBytes: peak,
                             bufferLimitBytes: bufferLimitBytes, sessionsFailed: f.sessionsFailed,
                             snapshotDeadlineSeconds: Double(options.snapshotDeadlineNanos) / 1e9,
                             heartbeatTimeoutSeconds: Double(options.heartbeatTimeoutNanos) / 1e9)
        return (shared, .dm(dm))
    }
}
