// What each control op does (the protocol is HotControl's ControlProtocol.swift).
import HotControl
import HotCore
import HotOS
import Logging
#if canImport(Glibc)
import Glibc
#endif

extension Daemon {
    func handle(_ id: Int, _ req: ControlRequest) -> ControlReply {
        switch req.op {
        case .hello:
            var r = ControlReply(ok: true)
            r.version = hotimageVersion
            r.device = options.device
            r.protectedDevice = currentProtectedDevice
            r.size = device.size
            r.blockSize = engine.config.blockSize
            r.phase = engine.currentPhase.rawValue
            r.snapshotURI = snapshotURI
            return r
        case .status:
            var r = ControlReply(ok: true)
            r.status = daemonStatus()
            return r
        case .begin:
            return begin(id, req)
        case .map, .archived, .buffered, .heartbeat, .end:
            guard isOwner(id) else {
                return .failure("this connection does not own a session (begin one first)")
            }
            return sessionOp(id, req)
        case .detach:
            if let why = detachRefusal(force: req.force ?? false) { return .failure(why) }
            requestStop()
            return ControlReply(ok: true)
        }
    }

    var snapshotURI: String { "nbd+unix:///snapshot?socket=\(options.dir)/nbd.sock" }

    func daemonStatus() -> DaemonStatus {
        DaemonStatus(name: options.name, device: options.device, protectedDevice: currentProtectedDevice,
                     via: options.via, pid: getpid(), bufferDir: options.resolvedBufferDir,
                     nbdSocket: nbd.socketPath, snapshotURI: snapshotURI,
                     connections: nbd.connectionCount, frozen: frozenMountPoint,
                     bufferLimitBytes: options.bufferLimitBytes, engine: engine.status(),
                     reads: nbd.pipes.counters, lastFreezeSeconds: lastFreezeSeconds, peakRSSBytes: procStatusBytes("VmHWM"),
                     fileRSSBytes: procStatusBytes("RssFile"))
    }

    private func begin(_ id: Int, _ req: ControlRequest) -> ControlReply {
        guard let consistency = Consistency(rawValue: req.consistency ?? "freeze") else {
            return .failure("consistency must be freeze, wip or raw")
        }
        if consistency == .freeze {
            guard let mp = req.mountPoint else { return .failure("consistency freeze needs mountPoint") }
            guard let mnt = Mounts.at(mountPoint: mp) else { return .failure("\(mp) is not a mount point") }
            guard let dev = currentProtectedDevice,
                  Mounts.of(device: dev).contains(where: { $0.mountPoint == mnt.mountPoint }) else {
                return .failure("\(mp) is not mounted from the protected device \(currentProtectedDevice ?? "?")")
            }
        }
        // hb files through the volume they protect would wedge it.
        if let why = bufferDirectoryRefusalNow() {
            logger.error("session: refused: \(why)")
            return .failure(why)
        }
        if let other = claimOwner(id) { return .failure(other) }
        do { try engine.begin(consistency: consistency) } catch {
            releaseOwner(id)
            return .failure("\(error)")
        }
        let pause = req.pauseMs.map { UInt64(max(0, $0) * 1e6) } ?? engine.config.pauseNanos
        logger.info("session: begin (\(consistency.rawValue)\(req.mountPoint.map { " " + $0 } ?? ""), pause \(pause / 1_000_000) ms)")
        var frozenNow = false
        if consistency == .freeze, let mp = req.mountPoint {
            switch engine.waitForPause(pauseNanos: pause, arm: false, maxWaitNanos: engine.config.freezePauseWaitNanos) {
            case .armed: break
            case .noPause:
                logger.info("session: no pause of \(pause / 1_000_000) ms within \(engine.config.freezePauseWaitNanos / 1_000_000_000) s; freezing anyway")
            case .timedOut: return .failure(engine.failureReason ?? "no write-inactivity pause before the snapshot deadline")
            case .notWaiting(let p): return .failure("the session became \(p.rawValue) while waiting for a pause")
            }
            do {
                let f = try FrozenFilesystem(mountPoint: mp)
                setFrozen(f)
                frozenNow = true
            } catch {
                engine.fail("could not freeze \(mp): \(error)")
                return .failure("could not freeze \(mp): \(error)")
            }
        }
        let r = engine.arm(pauseNanos: frozenNow ? 0 : pause)
        guard case .armed(let at) = r else {
            thawNow()
            return .failure(engine.failureReason ?? "could not arm: \(r)")
        }
        logger.info("session: armed at \(at) ns\(frozenNow ? " (frozen)" : "")")
        var reply = ControlReply(ok: true)
        reply.armedAtNanos = at
        reply.frozen = frozenNow
        reply.snapshotURI = snapshotURI
        return reply
    }

    private func sessionOp(_ id: Int, _ req: ControlRequest) -> ControlReply {
        engine.heartbeat()
        switch req.op {
        case .heartbeat:
            return ControlReply(ok: true)
        case .map:
            defer { thawNow() }
            do {
                let used = try toRanges(req.used)
                let excluded = try toRanges(req.excluded)
                switch try engine.narrow(used: used, excluded: excluded) {
                case .protecting(let n):
                    logger.info("session: protecting \(n) used blocks")
                    var r = ControlReply(ok: true)
                    r.result = "protecting"
                    r.usedBlocks = n
                    return r
                case .retry(let w):
                    logger.info("session: \(w) writes during the map read; waiting for the next pause")
                    return .failure("\(w) writes landed while the map was read without a freeze; begin again", retry: true)
                }
            } catch {
                return .failure("\(error)")
            }
        case .archived:
            do {
                var total: UInt64 = 0
                for r in try toRanges(req.ranges) {
                    total += try engine.release(offset: r.lowerBound, length: r.upperBound - r.lowerBound)
                }
                var r = ControlReply(ok: true)
                r.released = total
                return r
            } catch { return .failure("\(error)") }
        case .buffered:
            var r = ControlReply(ok: true)
            r.ranges = engine.bufferedRanges(limit: req.limit ?? 1024).map { [$0.lowerBound, $0.upperBound] }
            return r
        case .end:
            engine.end()
            thawNow()
            releaseOwner(id)
            logger.info("session: ended")
            return ControlReply(ok: true)
        case .hello, .begin, .status, .detach:
            return .failure("\(req.op.rawValue) is not a session op")
        }
    }
}
