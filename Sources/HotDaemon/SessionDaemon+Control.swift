// What each control op does (the protocol is HotControl's ControlProtocol.swift);
// the backend does the session's work.
import HotControl
import HotCore
import HotOS
import Logging
#if canImport(Glibc)
import Glibc
#endif

extension SessionDaemon {
    func handle(_ id: Int, _ req: ControlRequest) -> ControlReply {
        switch req.op {
        case .hello:
            var r = ControlReply(ok: true)
            r.version = hotimageVersion
            r.device = backend.device
            r.protectedDevice = currentProtectedDevice
            r.size = backend.sizeBytes
            r.blockSize = backend.blockSize
            r.phase = backend.phase.rawValue
            r.snapshotURI = backend.snapshotURI
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
            backend.heartbeat()
            return sessionOp(id, req)
        case .detach:
            if let why = detachRefusal(force: req.force ?? false) { return .failure(why) }
            requestStop()
            return ControlReply(ok: true)
        }
    }

    func daemonStatus() -> DaemonStatus {
        let (session, detail) = backend.status(bufferLimitBytes: config.bufferLimitBytes)
        var s = DaemonStatus(name: config.name, device: backend.device, protectedDevice: currentProtectedDevice,
                             via: backend.via, pid: getpid(), bufferDir: config.bufferDir, frozen: frozenMountPoint,
                             bufferLimitBytes: config.bufferLimitBytes, session: session,
                             lastFreezeSeconds: lastFreezeSeconds, peakRSSBytes: procStatusBytes("VmHWM"),
                             fileRSSBytes: procStatusBytes("RssFile"))
        s.tracking = backend.tracking
        switch detail {
        case .hotCore(let engine, let socket, let uri, let connections, let reads):
            s.engine = engine
            s.nbdSocket = socket
            s.snapshotURI = uri
            s.connections = connections
            s.reads = reads
        case .dm(let dm):
            s.dm = dm
        }
        return s
    }

    private func begin(_ id: Int, _ req: ControlRequest) -> ControlReply {
        guard let consistency = Consistency(rawValue: req.consistency ?? "freeze") else {
            return .failure("consistency must be freeze, wip or raw")
        }
        if let why = backend.refusal(of: consistency) { return .failure(why) }
        var mountPoint: String?
        if consistency == .freeze {
            guard let mp = req.mountPoint else { return .failure("consistency freeze needs mountPoint") }
            guard let mnt = Mounts.at(mountPoint: mp) else { return .failure("\(mp) is not a mount point") }
            guard let dev = currentProtectedDevice,
                  Mounts.of(device: dev).contains(where: { $0.mountPoint == mnt.mountPoint }) else {
                return .failure("\(mp) is not mounted from the protected device \(currentProtectedDevice ?? "?")")
            }
            mountPoint = mnt.mountPoint
        }
        // hb files through the volume they protect would wedge it (HotCore)
        // or be frozen with it and copy themselves on write (dm).
        if let why = bufferDirectoryRefusalNow() {
            logger.error("session: refused: \(why)")
            return .failure(why)
        }
        if let other = claimOwner(id) { return .failure(other) }
        let pause = req.pauseMs.map { UInt64(max(0, $0) * 1e6) }
        logger.info("session: begin (\(consistency.rawValue)\(mountPoint.map { " " + $0 } ?? "")\(req.hold == true ? ", holding writes for a set cut" : ""))")
        let result = backend.begin(BeginRequest(consistency: consistency, mountPoint: mountPoint, pauseNanos: pause, hold: req.hold ?? false),
                                   freeze: { [self] mp in try freeze(mp) })
        switch result {
        case .failure(let refusal):
            beginDone(id, keepOwner: refusal.keepsOwner)
            thawIfFrozen()
            logger.error("session: \(refusal.description)")
            return .failure(refusal.description)
        case .success(let b):
            beginDone(id, keepOwner: true)
            logger.info("session: armed at \(b.armedAtNanos) ns\(b.frozen ? " (frozen)" : "")")
            var reply = ControlReply(ok: true)
            reply.armedAtNanos = b.armedAtNanos
            reply.frozen = b.frozen
            reply.snapshotURI = b.snapshotURI
            reply.snapshotDevice = b.snapshotDevice
            return reply
        }
    }

    private func sessionOp(_ id: Int, _ req: ControlRequest) -> ControlReply {
        switch req.op {
        case .heartbeat:
            return ControlReply(ok: true)
        case .map:
            defer { thawIfFrozen() }
            do {
                switch try backend.map(used: try toRanges(req.used), excluded: try toRanges(req.excluded)) {
                case .protecting(let n, let changes):
                    logger.info("session: protecting \(n) used blocks\(changes.map { ", \($0.changedClusters) clusters changed \($0.trusted ? "since image \($0.since ?? "?")" : "(untrusted)")" } ?? "")")
                    var r = ControlReply(ok: true)
                    r.result = "protecting"
                    r.usedBlocks = n
                    r.changes = changes
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
                var r = ControlReply(ok: true)
                r.released = try backend.archived(try toRanges(req.ranges))
                return r
            } catch { return .failure("\(error)") }
        case .buffered:
            var r = ControlReply(ok: true)
            r.ranges = backend.buffered(limit: req.limit ?? 1024).map { [$0.lowerBound, $0.upperBound] }
            return r
        case .end:
            // A set cut that starts over never commits.
            let commit = req.again == true ? nil : req.commit
            let committed = backend.end(commit: commit)
            thawIfFrozen()
            releaseOwner(id)
            let why = backend.via.isHotCore ? "the session did not complete" : "this backend tracks no changes"
            logger.info("session: ended\(commit == nil ? "" : committed ? " (committed image \(commit!))" : " (not committed: \(why))")")
            if commit != nil {
                var r = ControlReply(ok: true)
                r.committed = committed
                if config.transient && req.again != true { requestStop() }
                return r
            }
            if config.transient && req.again != true { requestStop() }
            return ControlReply(ok: true)
        case .hello, .begin, .status, .detach:
            return .failure("\(req.op.rawValue) is not a session op")
        }
    }
}
