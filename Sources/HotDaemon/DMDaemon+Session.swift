// The dm-snapshot session: control ops, the watchdog ticker, COW growth.
//
//   idle ─begin─► armed ─map─► protecting ─end─► idle
//                   │ (snapshot deadline)   │ heartbeat lost / client gone → teardown → idle
//                   └──────────► failed ◄───┘ snapshot Invalid (COW full) → teardown
//   failed ─end/begin─► …
//
// armed: the filesystem is frozen and the snapshot exists; the client reads
// the used map. protecting: thawed; the kernel copies on write; the ticker
// reads the snapshot's status every 100 ms and grows the COW store.
import HotControl
import HotCore
import HotOS
import Logging
#if canImport(Glibc)
import Glibc
#endif

extension DMDaemon {
    func handle(_ id: Int, _ req: ControlRequest) -> ControlReply {
        switch req.op {
        case .hello:
            var r = ControlReply(ok: true)
            r.version = hotimageVersion
            r.device = options.baseDevice ?? originPath
            r.protectedDevice = originPath
            r.size = sizeBytes
            r.blockSize = 4096
            r.phase = m.withLock { phase.rawValue }
            return r
        case .status:
            // Read the snapshot's state now: a reader that just got EIO asks
            // why, and must hear "overflowed" even between two ticks.
            if let s = m.withLock({ stack }) { watchCOW(s, now: monotonicNanos()) }
            var r = ControlReply(ok: true)
            r.status = daemonStatus()
            return r
        case .begin:
            return begin(id, req)
        case .map, .archived, .buffered, .heartbeat, .end:
            guard m.withLock({ owner == id }) else {
                return .failure("this connection does not own a session (begin one first)")
            }
            m.withLock { lastHeartbeat = monotonicNanos() }
            return sessionOp(id, req)
        case .detach:
            if let why = detachRefusal(force: req.force ?? false) { return .failure(why) }
            requestStop()
            return ControlReply(ok: true)
        }
    }

    private func begin(_ id: Int, _ req: ControlRequest) -> ControlReply {
        guard let c = Consistency(rawValue: req.consistency ?? "freeze") else {
            return .failure("consistency must be freeze or raw")
        }
        if c == .wip {
            return .failure("the dm-snapshot backend takes its cut by suspending the device: use consistency freeze (or raw when unmounted); wip is HotCore's")
        }
        var mountPoint: String?
        if c == .freeze {
            guard let mp = req.mountPoint else { return .failure("consistency freeze needs mountPoint") }
            guard let mnt = Mounts.at(mountPoint: mp) else { return .failure("\(mp) is not a mount point") }
            guard Mounts.of(device: originPath).contains(where: { $0.mountPoint == mnt.mountPoint }) else {
                return .failure("\(mp) is not mounted from \(originPath)")
            }
            mountPoint = mnt.mountPoint
        }
        // hb files on the volume being protected would be frozen with it
        // (and copy themselves on write): refuse before touching anything.
        let bdir = options.resolvedBufferDir
        if let info = try? DeviceMapper.info(name: originName), let h = Mounts.holding(path: bdir),
           h.major == info.major && h.minor == info.minor {
            return .failure("the buffer directory \(bdir) is on the volume being backed up (\(h.mountPoint)); use a --buffer-dir on another volume")
        }
        let claim = m.withLock { () -> String? in
            if let o = owner, o != id { return "another client owns the session (\(phase.rawValue))" }
            if phase == .armed || phase == .protecting { return "a session is \(phase.rawValue) already" }
            owner = id
            phase = .waiting
            failure = nil
            consistency = c
            beganAt = monotonicNanos()
            lastHeartbeat = beganAt
            usedBlocks = 0
            hbPaths = []; loopPaths = []
            cowUsed = 0; cowTotal = 0; cowPeak = 0; growths = 0; growthFailure = nil; snapState = nil
            fillRate = FillRate()
            sessionsBegun += 1
            return nil
        }
        if let claim { return .failure(claim) }
        logger.info("session: begin (\(c.rawValue)\(mountPoint.map { " " + $0 } ?? ""))")

        var cfg = DMStackConfig(name: options.name, bufferDir: options.resolvedBufferDir,
                                hbFileBytes: options.hbFileBytes, limitBytes: options.bufferLimitBytes)
        cfg.loopRecord = options.dir + "/loops"
        let result: Result<DMSnapshotStack, Error> = ops.withLock {
            var fz: FrozenFilesystem?
            if let mp = mountPoint {
                do { fz = try FrozenFilesystem(mountPoint: mp) } catch {
                    return .failure(DaemonError.failed("could not freeze \(mp): \(error)"))
                }
                m.withLock { frozen = fz }
            }
            do {
                return .success(try DMSnapshotStack.build(origin: originName, config: cfg, lockfs: fz == nil, logger: logger))
            } catch {
                thawNow()
                return .failure(error)
            }
        }
        switch result {
        case .failure(let e):
            m.withLock {
                phase = .failed
                failure = "snapshot failed: \(e)"
                lastFailure = failure
                counters.sessionsFailed += 1
            }
            logger.error("session: snapshot failed: \(e)")
            return .failure("\(e)")
        case .success(let s):
            let at = s.cutNanos
            let alive = m.withLock { () -> Bool in
                guard owner == id, phase == .waiting else { return false }
                stack = s
                phase = .armed
                armedAt = at
                cowTotal = s.cowBytes
                hbPaths = s.pieces.map(\.path)
                loopPaths = s.pieces.map(\.loop)
                return true
            }
            if !alive {
                // The client went away while the snapshot was being built.
                ops.withLock { _ = s.teardown() }
                thawNow()
                return .failure("the session ended while the snapshot was taken")
            }
            logger.info("session: armed at \(at) ns\(mountPoint != nil ? " (frozen)" : "")")
            var r = ControlReply(ok: true)
            r.armedAtNanos = at
            r.frozen = mountPoint != nil
            r.snapshotDevice = s.snapshotDevice
            return r
        }
    }

    private func sessionOp(_ id: Int, _ req: ControlRequest) -> ControlReply {
        switch req.op {
        case .heartbeat:
            return ControlReply(ok: true)
        case .map:
            defer { thawNow() }
            let used: [Range<UInt64>]
            do { used = try toRanges(req.used) } catch { return .failure("\(error)") }
            let blocks = used.reduce(UInt64(0)) { $0 + ($1.upperBound - $1.lowerBound + 4095) / 4096 }
            let r = m.withLock { () -> String? in
                guard phase == .armed else { return "the session is \(phase.rawValue)\(failure.map { ": \($0)" } ?? ""), expected armed" }
                phase = .protecting
                usedBlocks = blocks
                lastHeartbeat = monotonicNanos()
                return nil
            }
            if let r { return .failure(r) }
            logger.info("session: protecting (the used map holds \(blocks) blocks; dm-snapshot copies any written chunk)")
            var reply = ControlReply(ok: true)
            reply.result = "protecting"
            reply.usedBlocks = blocks
            return reply
        case .archived:
            // dm-snapshot cannot shrink its protection: accepted, no effect.
            var r = ControlReply(ok: true)
            r.released = 0
            return r
        case .buffered:
            var r = ControlReply(ok: true)
            r.ranges = []
            return r
        case .end:
            endSession(reason: nil)
            m.withLock { owner = nil }
            logger.info("session: ended")
            if options.transient { requestStop() }
            return ControlReply(ok: true)
        case .hello, .begin, .status, .detach:
            return .failure("\(req.op.rawValue) is not a session op")
        }
    }

    func connectionClosed(_ id: Int) {
        let was = m.withLock { () -> SessionPhase? in
            guard owner == id else { return nil }
            owner = nil
            return phase
        }
        guard let p = was else { return }
        if p != .idle {
            logger.warning("session client vanished (\(p.rawValue)): snapshot removed, origin restored, hb files deleted")
            endSession(reason: nil)
        }
        if options.transient { requestStop() }
    }

    /// Tears the snapshot down. `reason` nil: back to idle (end, lost
    /// client); otherwise the session is failed with that reason.
    func endSession(reason: String?) {
        let s = m.withLock { () -> DMSnapshotStack? in
            let s = stack
            stack = nil
            if let reason {
                if phase != .idle && phase != .failed { counters.sessionsFailed += 1 }
                phase = .failed
                failure = reason
                lastFailure = reason
            } else {
                phase = .idle
                failure = nil
            }
            return s
        }
        thawNow()
        guard let s else { return }
        let errs = ops.withLock { s.teardown() }
        if errs.isEmpty {
            logger.info("session: snapshot removed, \(s.origin) restored")
        } else {
            logger.error("session: teardown incomplete: \(errs.joined(separator: "; "))")
        }
    }

    func thawNow() {
        let f = m.withLock { () -> FrozenFilesystem? in let f = frozen; frozen = nil; return f }
        guard let f else { return }
        do { try f.thaw(); logger.info("thawed \(f.mountPoint)") } catch { logger.error("thaw \(f.mountPoint): \(error)") }
    }

    // MARK: the watchdog

    /// Every 100 ms; every 20 ms while a snapshot exists, because the
    /// kernel gives no warning before the COW store fills: the first hb
    /// file must absorb what is written in one interval.
    func tickLoop() {
        while !m.withLock({ stopping }) {
            tick()
            usleep(m.withLock { stack != nil } ? 20_000 : 100_000)
        }
    }

    private func tick() {
        let (p, began, beat, s, began0, now) = m.withLock { (phase, beganAt, lastHeartbeat, stack, sessionsBegun, monotonicNanos()) }
        switch p {
        case .armed where now - began > options.snapshotDeadlineNanos:
            let why = "the snapshot was not complete within \(secs(options.snapshotDeadlineNanos)) s (no used-block map from the client)"
            logger.error("session failed: \(why)")
            endSession(reason: why)
            return
        case .protecting where now - beat > options.heartbeatTimeoutNanos:
            logger.error("session dropped: no heartbeat for \(secs(options.heartbeatTimeoutNanos)) s; snapshot removed")
            endSession(reason: nil)
            m.withLock { owner = nil }
            if options.transient { requestStop() }
            return
        case .idle where options.transient && began0 == 0 && now - startedAt > options.idleExitNanos:
            logger.info("no session began within \(options.idleExitNanos / 1_000_000_000) s; exiting")
            requestStop()
            return
        default: break
        }
        guard let s, p == .armed || p == .protecting else { return }
        watchCOW(s, now: now)
    }

    /// Reads the snapshot's fill; fails the session if it turned invalid,
    /// grows the store when the policy says so.
    func watchCOW(_ s: DMSnapshotStack, now: UInt64) {
        watching.withLock { watchCOWLocked(s, now: monotonicNanos()) }
    }

    private func watchCOWLocked(_ s: DMSnapshotStack, now: UInt64) {
        let st: DMSnapshotState
        do { st = try s.state() } catch {
            logger.warning("reading the snapshot status: \(error)")
            return
        }
        switch st {
        case .usage(let used, let total, _):
            let u = used * 512, t = total * 512
            let rate = m.withLock { () -> Double in
                cowUsed = u
                cowTotal = t
                cowPeak = max(cowPeak, u)
                snapState = st.description
                counters.copies = u / 4096
                counters.peakSpillBytes = cowPeak
                return fillRate.add(nanos: now, bytes: u)
            }
            if case .grow(let to) = growth.decide(usedBytes: u, totalBytes: t, bytesPerSecond: rate),
               m.withLock({ growthFailure == nil }) {
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
        case .invalid, .overflow:
            let (total, gf) = m.withLock { (cowTotal, growthFailure) }
            var why = "the snapshot's copy-on-write store (\(total >> 20) MiB, limit \(options.bufferLimitBytes >> 20) MiB) overflowed and the kernel invalidated the snapshot; the live volume is unaffected"
            if let gf { why += " (growing it failed: \(gf))" }
            logger.error("session failed: \(why)")
            m.withLock { snapState = st.description }
            endSession(reason: why)
        case .mergeFailed, .unknown:
            m.withLock { snapState = st.description }
        }
    }

    // MARK: status

    func daemonStatus() -> DaemonStatus {
        let (p, f, c, ub, used, total, peak, ss, g, s, at, began, beat, ctr, hbs, loops) = m.withLock {
            (phase, failure, consistency, usedBlocks, cowUsed, cowTotal, cowPeak, snapState, growths, stack,
             armedAt, beganAt, lastHeartbeat, counters, hbPaths, loopPaths)
        }
        let now = max(monotonicNanos(), began, beat)
        let active = p != .idle
        let engine = EngineStatus.reported(
            phase: p, failure: f, consistency: active ? c : nil, blockSize: 4096, deviceBytes: sizeBytes,
            usedBlocks: ub, protectedBlocks: p.copiesOnWrite ? sizeBytes / 4096 : 0,
            bufferedBlocks: used / 4096, memoryBlocks: 0, memoryBytes: 0, memoryCapacityBytes: 0,
            spillBytes: used, spillFiles: hbs.count, oldestMemoryAgeMs: nil,
            armedAtNanos: p.copiesOnWrite ? at : nil,
            secondsSinceBegin: active ? Double(now - began) / 1e9 : nil,
            secondsSinceHeartbeat: active ? Double(now - beat) / 1e9 : nil,
            mapMemoryBytes: 0, writesInFlight: 0, counters: ctr,
            deadlines: .reported(snapshotSeconds: Double(options.snapshotDeadlineNanos) / 1e9, memorySeconds: 0,
                             heartbeatSeconds: Double(options.heartbeatTimeoutNanos) / 1e9, pauseMs: 0))
        var dm = DMSessionStatus(
            origin: originName, originTable: s?.originTable.map(\.description) ?? ((try? DeviceMapper.table(name: originName)) ?? []).map(\.description),
            transient: options.transient, snapshotDevice: s?.snapshotDevice, snapshotState: ss,
            cowUsedBytes: used, cowTotalBytes: s == nil ? 0 : total, cowLimitBytes: options.bufferLimitBytes, cowPeakBytes: peak,
            hbFileBytes: options.hbFileBytes, hbFiles: s == nil ? [] : hbs, loops: s == nil ? [] : loops,
            growths: g, persistent: false, chunkBytes: 4096)
        dm.lastFailure = m.withLock { lastFailure }
        var st = DaemonStatus(name: options.name, device: options.baseDevice ?? originPath, protectedDevice: originPath,
                              via: .dm, pid: getpid(), bufferDir: options.resolvedBufferDir, nbdSocket: "",
                              snapshotURI: "", connections: 0, frozen: m.withLock { frozen?.mountPoint },
                              bufferLimitBytes: options.bufferLimitBytes, engine: engine)
        st.dm = dm
        return st
    }
}

/// Nanoseconds as whole seconds, for messages (at least one decimal below 10 s).
func secs(_ nanos: UInt64) -> String {
    nanos % 1_000_000_000 == 0 || nanos >= 10_000_000_000 ? "\(nanos / 1_000_000_000)" : "\(Double(nanos / 100_000_000) / 10)"
}
