// The HotCore backend: the real device opened exclusively, the
// SnapshotEngine over it with hb files in the buffer directory, the NBD
// server (exports "live" and "snapshot"), two movers (memory tier → hb
// files) and the Frontend that presents the live export as the protected
// device. What it adds to the run directory:
//
//   RUN/NAME/nbd.sock      the NBD server
//   RUN/NAME/fuse/disk     nbdfuse's file (--via fuse)
//   RUN/NAME/nbd-index     "INDEX CONNECTIONS" of /dev/nbdINDEX (--via nbd); kept
//                          when the daemon dies, for `attach --reconnect`
//   /dev/hotimage/NAME     symlink to the protected device (stable for fstab)
//   RUN/NAME/changes.bin   the cut's change map, from `map` to the session's end
//   BUFFERDIR.cbt          the change map's state file (ChangeTracking.swift)
import Foundation
import HotControl
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

public struct AttachOptions: Sendable {
    public var device: String
    public var name: String
    public var via: SessionVia = .fuse
    public var runDir: String = Defaults.runDir
    public var bufferDir: String?
    public var hbFileBytes: UInt64 = Defaults.hbFileBytes
    public var bufferLimitBytes: UInt64 = Defaults.bufferLimitBytes
    public var engine = EngineConfig()
    public var workers = 8
    /// --via nbd: sockets between the kernel and HotCore.
    public var nbdConnections = 2
    /// --via nbd: how long the kernel holds I/O for a restarted daemon.
    public var deadConnTimeoutSeconds: UInt64 = 120
    /// --via nbd: the kernel's per-request timeout (see KernelNBDFrontend).
    public var nbdRequestTimeoutSeconds: UInt64 = 30
    /// --via nbd: re-attach the /dev/nbdN a dead daemon of this name left.
    public var reconnect = false

    public init(device: String, name: String) {
        self.device = device
        self.name = name
    }

    public var dir: String { runDir + "/" + name }
    public var resolvedBufferDir: String { bufferDir ?? Defaults.bufferDir(name: name) }
}

extension SessionDaemon {
    /// A HotCore daemon for `attach --via fuse|nbd`. Opens everything up to
    /// (not including) the frontend; throws clear errors.
    public static func hotCore(_ o: AttachOptions, logger: Logger) throws -> SessionDaemon {
        guard getuid() == 0 else { throw DaemonError.usage("hotimage attach must run as root") }
        guard o.via.isHotCore else { throw DaemonError.usage("--via must be fuse or nbd") }
        if o.via == .nbd && !KernelNBD.available {
            throw DaemonError.usage("--via nbd needs the kernel's nbd driver, which this kernel does not have (modprobe nbd); use --via fuse")
        }
        if o.reconnect && o.via != .nbd { throw DaemonError.usage("--reconnect applies to --via nbd only") }
        if let m = Mounts.of(device: o.device).first { throw DaemonError.mounted(o.device, m.mountPoint) }
        let config = SessionDaemonConfig(name: o.name, runDir: o.runDir, bufferDir: o.resolvedBufferDir,
                                         bufferLimitBytes: o.bufferLimitBytes)
        let lockFD = try lockRunDirectory(config)
        do {
            let device = try BlockDevice(path: o.device, exclusive: true)
            guard device.size >= UInt64(o.engine.blockSize) else {
                throw DaemonError.failed("\(o.device) is too small (\(device.size) bytes)")
            }
            let dirFD = try openCheckedBufferDirectory(config, devices: [o.device])
            let backend = HotCoreBackend(options: o, device: device, bufferDirFD: dirFD, logger: logger)
            // The change map, before anything can write (the NBD server
            // starts in prepare).
            backend.tracker.load(persistRefusal: stateFileRefusal(o))
            return SessionDaemon(config: config, backend: backend, lockFD: lockFD, bufferDirFD: dirFD, logger: logger)
        } catch {
            close(lockFD)
            throw error
        }
    }
}

extension SessionDaemon {
    /// Why the change map's state file may not be kept beside the buffer
    /// directory: its directory lies on the tracked volume (nil: it may).
    static func stateFileRefusal(_ o: AttachOptions) -> String? {
        let dir = (ChangeStateFile.path(bufferDir: o.resolvedBufferDir) as NSString).deletingLastPathComponent
        let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return "cannot open \(dir) for the state file: \(String(cString: strerror(errno)))" }
        defer { close(fd) }
        if bufferDirectoryRefusal(path: dir, fd: fd, name: o.name, devices: [o.device]) != nil {
            return "the state file's directory \(dir) is on the tracked volume; the map is not kept across restarts"
        }
        return nil
    }
}

final class HotCoreBackend: SessionBackend, @unchecked Sendable {
    let options: AttachOptions
    let logger: Logger
    let realDevice: BlockDevice
    let hb: HBFileStore
    let engine: SnapshotEngine
    let nbd: NBDServer
    let frontend: Frontend
    let tracker: ChangeTracker
    private let m = Monitor()
    private var stopping = false
    private var presented = false
    /// The current failed session was logged (tick).
    private var failureReported = false

    init(options: AttachOptions, device: BlockDevice, bufferDirFD: Int32, logger: Logger) {
        self.options = options
        self.logger = logger
        realDevice = device
        // The test switch opens hb files by path, so a test can put them on
        // the protected volume (SessionDaemon+BufferDir.swift).
        hb = HBFileStore(directory: options.resolvedBufferDir, directoryFD: allowBufferOnVolumeForTests ? -1 : bufferDirFD,
                         slotBytes: options.engine.blockSize, fileBytes: options.hbFileBytes,
                         limitBytes: options.bufferLimitBytes, deferDeletes: true)
        hb.removeAll()
        // Stale hb files of a previous daemon of this name.
        for i in 0..<100 { hb.unlinkFile(HBFileStore.fileName(i)) }
        // HOTIMAGE_NO_TRACKING=1 turns changed-block tracking off (for A/B
        // benchmarks of its cost on the write path).
        var engineConfig = options.engine
        if ProcessInfo.processInfo.environment["HOTIMAGE_NO_TRACKING"] == "1" { engineConfig.trackChanges = false }
        engine = SnapshotEngine(device: device, spill: hb, config: engineConfig)
        let stateFile = SessionDaemon.stateFileRefusal(options) == nil ? ChangeStateFile.path(bufferDir: options.resolvedBufferDir) : nil
        tracker = ChangeTracker(engine: engine, identity: DeviceIdentity.of(path: options.device, size: device.size),
                                stateFile: stateFile, logger: logger)
        // HOTIMAGE_NO_SPLICE=1 copies every READ (for A/B benchmarks).
        let splice = ProcessInfo.processInfo.environment["HOTIMAGE_NO_SPLICE"] == nil
        nbd = NBDServer(socketPath: options.dir + "/nbd.sock", engine: engine, logger: logger, workers: options.workers,
                        spliceFD: splice ? device.fd : nil)
        if options.via == .nbd {
            frontend = KernelNBDFrontend(runDir: options.dir, logger: logger, options: options)
        } else {
            frontend = FuseFrontend(runDir: options.dir, logger: logger)
        }
    }

    var via: SessionVia { options.via }
    var device: String { options.device }
    var sizeBytes: UInt64 { realDevice.size }
    var blockSize: Int { engine.config.blockSize }
    var guardedDevices: [String] { [options.device] }
    var phase: SessionPhase { engine.currentPhase }
    var snapshotURI: String? { "nbd+unix:///snapshot?socket=\(options.dir)/nbd.sock" }
    var tickInterval: UInt32 { 100_000 }

    func refusal(of consistency: Consistency) -> String? { nil }

    /// The NBD server, and the process settings the data path needs: an I/O
    /// flusher (its writes are memory reclaim's) and large buffers kept in
    /// the heap (mlockall then locks them once, not on every allocation).
    func prepare() throws {
        try nbd.start()
        do { try ProcessControl.setIOFlusher() } catch { logger.warning("\(error) (continuing without PR_SET_IO_FLUSHER)") }
        ProcessControl.keepLargeAllocationsInHeap()
    }

    func start() throws -> String {
        for i in 0..<2 { Threads.start(name: "mover-\(i)") { [self] in moverLoop() } }
        let dev = try frontend.start(server: nbd, size: realDevice.size, sectorSize: realDevice.sectorSize)
        HotCoreBackend.linkStableName(options.name, to: dev)
        m.withLock { presented = true }
        return dev
    }

    func stop() {
        frontend.stop()
        HotCoreBackend.unlinkStableName(options.name)
        m.withLock { stopping = true }
        nbd.stop()
        hb.removeAll()
        hb.collectGarbage()
        removeChangesFile()
        // Nothing writes the device any more: flushed, its counter read
        // after, the map saved clean.
        do {
            try realDevice.flush()
            tracker.saveClean()
        } catch { logger.error("changes: flushing \(options.device) failed (\(error)); the map is not saved clean") }
        // After a failed start nbdfuse's log says why; it stays.
        if m.withLock({ presented }) { unlink(options.dir + "/nbdfuse.log") }
    }


    func detachRefusal() -> String? { nil }

    /// /dev/hotimage/NAME -> the protected device: a path that stays the same
    /// across reboots for fstab (the nbd or loop number may not).
    static func linkStableName(_ name: String, to dev: String) {
        mkdir("/dev/hotimage", 0o755)
        unlink("/dev/hotimage/" + name)
        symlink(dev, "/dev/hotimage/" + name)
    }

    static func unlinkStableName(_ name: String) {
        unlink("/dev/hotimage/" + name)
        rmdir("/dev/hotimage")
    }

    private func moverLoop() {
        while !m.withLock({ stopping }) {
            if engine.waitForSpillWork(timeoutNanos: 100_000_000) {
                while engine.spillStep(maxBlocks: 1024) > 0 {}
            }
            // Closes and unlinks of hb files, never under the engine's lock.
            hb.collectGarbage()
        }
    }

    // MARK: the session

    func begin(_ req: BeginRequest, freeze: (String) throws -> Void) -> Result<BeginOutcome, BeginRefusal> {
        do { _ = try engine.begin(consistency: req.consistency) } catch {
            return .failure(BeginRefusal(description: "\(error)", keepsOwner: false))
        }
        let pause = req.pauseNanos ?? engine.config.pauseNanos
        var frozenNow = false
        if let mp = req.mountPoint {
            switch engine.waitForPause(pauseNanos: pause, arm: false, maxWaitNanos: engine.config.freezePauseWaitNanos) {
            case .armed: break
            case .noPause:
                logger.info("session: no pause of \(pause / 1_000_000) ms within \(engine.config.freezePauseWaitNanos / 1_000_000_000) s; freezing anyway")
            case .timedOut:
                return .failure(BeginRefusal(description: engine.failureReason ?? "no write-inactivity pause before the snapshot deadline", keepsOwner: true))
            case .notWaiting(let p):
                return .failure(BeginRefusal(description: "the session became \(p.rawValue) while waiting for a pause", keepsOwner: true))
            }
            do { try freeze(mp) } catch {
                engine.fail("could not freeze \(mp): \(error)")
                return .failure(BeginRefusal(description: "could not freeze \(mp): \(error)", keepsOwner: true))
            }
            frozenNow = true
        }
        let r = engine.arm(pauseNanos: frozenNow ? 0 : pause, hold: req.hold)
        guard case .armed(let at) = r else {
            return .failure(BeginRefusal(description: engine.failureReason ?? "could not arm: \(r)", keepsOwner: true))
        }
        return .success(BeginOutcome(armedAtNanos: at, frozen: frozenNow, snapshotURI: snapshotURI, snapshotDevice: nil))
    }

    func map(used: [Range<UInt64>], excluded: [Range<UInt64>]) throws -> MapOutcome {
        switch try engine.narrow(used: used, excluded: excluded) {
        case .protecting(let n): return .protecting(usedBlocks: n, changes: cutChanges())
        case .retry(let w): return .retry(writes: w)
        }
    }

    func archived(_ ranges: [Range<UInt64>]) throws -> UInt64 {
        var total: UInt64 = 0
        for r in ranges { total += try engine.release(offset: r.lowerBound, length: r.upperBound - r.lowerBound) }
        return total
    }

    func buffered(limit: Int) -> [Range<UInt64>] { engine.bufferedRanges(limit: limit) }

    func heartbeat() { engine.heartbeat() }

    func end() { _ = end(commit: nil) }

    func end(commit: String?) -> Bool {
        let committed = engine.endSession(commit: commit != nil)
        removeChangesFile()
        if committed, let id = commit { tracker.committed(id) }
        return committed
    }

    var changesFile: String { options.dir + "/changes.bin" }

    func removeChangesFile() { unlink(changesFile) }

    /// The cut's changes for the `map` reply, written to RUN/NAME/changes.bin.
    func cutChanges() -> ChangeInfo? {
        guard let cut = engine.cutChanges() else { return nil }
        do {
            // Streamed: a 4 TiB map is 8 MiB flat, never held so at once.
            try ChangeStateFile.writeAtomically(changesFile) { put in try cut.forEachLittleEndianChunk { try put($0) } }
            var info = tracker.info(cut: cut, path: changesFile)
            // A session that failed (or was dropped) since the map merged
            // its cut back: what was read may be short. It can no longer
            // commit either, so nothing is lost; the reply says so.
            if engine.currentPhase != .protecting {
                info.trusted = false
                info.since = nil
                info.reason = "the session ended while the change map was read"
            }
            return info
        } catch {
            logger.error("changes: \(error)")
            var info = tracker.info(cut: cut, path: nil)
            info.trusted = false
            info.since = nil
            info.reason = "the daemon could not write the change map: \(error)"
            return info
        }
    }

    var tracking: TrackingStatus? { tracker.status() }

    func tick() -> [BackendEvent] {
        var events: [BackendEvent] = engine.tick().map {
            switch $0 {
            case .failed(let r): return .failed(r)
            case .dropped(let r): return .dropped(r)
            }
        }
        if events.contains(where: { if case .dropped = $0 { return true } else { return false } }) { removeChangesFile() }
        // A failure outside the deadlines (a mover that could not spill, a
        // write that waited too long) is reported once, as the deadlines are.
        let failed = engine.currentPhase == .failed
        m.withLock {
            if !failed { failureReported = false; return }
            if failureReported { return }
            failureReported = true
            if !events.contains(where: { if case .failed = $0 { return true } else { return false } }) {
                events.append(.failed(engine.failureReason ?? "unknown reason"))
            }
        }
        return events
    }

    func status(bufferLimitBytes: UInt64) -> (SessionStatus, BackendDetail) {
        let e = engine.status()
        return (SessionStatus(engine: e, lastFailure: nil, bufferLimitBytes: bufferLimitBytes),
                .hotCore(engine: e, nbdSocket: nbd.socketPath, snapshotURI: snapshotURI ?? "",
                         connections: nbd.connectionCount, reads: nbd.pipes.counters))
    }
}
