// The HotCore daemon behind `hotimage attach`: owns the real device, the
// engine, the NBD and control servers, the frontend that presents the
// protected device, and three housekeeping threads (deadline ticker, buffer
// mover, signal waiter). Run directory layout (root-only, 0700):
//
//   RUN/NAME/lock          flock held while the daemon lives
//   RUN/NAME/pid           daemon pid
//   RUN/NAME/nbd.sock      NBD server (exports "live" and "snapshot")
//   RUN/NAME/control.sock  control protocol (HotControl/ControlProtocol.swift)
//   RUN/NAME/device        the protected device path, written once usable
//   RUN/NAME/fuse/disk     nbdfuse's file (--via fuse)
//   RUN/NAME/nbd-index     "INDEX CONNECTIONS" of /dev/nbdINDEX (--via nbd); kept
//                          when the daemon dies, for `attach --reconnect`
//   /dev/hotimage/NAME     symlink to the protected device (stable for fstab)
//   RUN/NAME/daemon.log    the daemon's log when it runs in the background
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
    public var runDir: String = "/run/hotimage"
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

public enum DaemonError: Error, CustomStringConvertible {
    case usage(String)
    case alreadyAttached(String)
    case mounted(String, String)
    case failed(String)

    public var description: String {
        switch self {
        case .usage(let s): return s
        case .alreadyAttached(let n): return "a HotCore daemon named '\(n)' is already attached (see 'hotimage status \(n)')"
        case .mounted(let d, let m): return "\(d) is mounted on \(m): unmount it before attaching (HotCore must own the device exclusively)"
        case .failed(let s): return s
        }
    }
}

/// A daemon that `attach --foreground` runs: start presents the device (its
/// path is printed), then it serves until a signal or detach.
public protocol ForegroundDaemon: AnyObject {
    func start() throws -> String
    func waitForShutdown(signals: SignalWaiter)
}

public final class Daemon: ForegroundDaemon, @unchecked Sendable {
    public let options: AttachOptions
    let logger: Logger
    let device: BlockDevice
    let hb: HBFileStore
    /// The buffer directory, open from attach on (hb files are made relative to it).
    let bufferDirFD: Int32
    public let engine: SnapshotEngine
    let nbd: NBDServer
    let control: ControlServer
    var fuse: FuseFrontend?
    var kernelNBD: KernelNBDFrontend?
    private let m = Monitor()
    private var owner: Int?
    private var frozen: FrozenFilesystem?
    /// How long the last freeze lasted, FIFREEZE to FITHAW (status: lastFreezeSeconds).
    private var lastFreezeNanos: UInt64?
    private var protectedDevice: String?
    private var stopping = false
    private var lockFD: Int32 = -1

    /// Opens everything up to (not including) the frontend. Throws clear errors.
    public init(options: AttachOptions, logger: Logger) throws {
        self.options = options
        self.logger = logger
        guard getuid() == 0 else { throw DaemonError.usage("hotimage attach must run as root") }
        guard options.via.isHotCore else {
            throw DaemonError.usage("--via must be fuse or nbd")
        }
        if options.via == .nbd && !KernelNBD.available {
            throw DaemonError.usage("--via nbd needs the kernel's nbd driver, which this kernel does not have (modprobe nbd); use --via fuse")
        }
        if options.reconnect && options.via != .nbd {
            throw DaemonError.usage("--reconnect applies to --via nbd only")
        }
        if let m = Mounts.of(device: options.device).first {
            throw DaemonError.mounted(options.device, m.mountPoint)
        }
        mkdir(options.runDir, 0o700)
        mkdir(options.dir, 0o700)
        lockFD = open(options.dir + "/lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if lockFD < 0 || flock(lockFD, LOCK_EX | LOCK_NB) != 0 {
            throw DaemonError.alreadyAttached(options.name)
        }
        device = try BlockDevice(path: options.device, exclusive: true)
        guard device.size >= UInt64(options.engine.blockSize) else {
            throw DaemonError.failed("\(options.device) is too small (\(device.size) bytes)")
        }
        let bdir = options.resolvedBufferDir
        bufferDirFD = try Daemon.openBufferDirectory(bdir)
        if let why = Daemon.bufferDirectoryRefusal(path: bdir, fd: bufferDirFD, name: options.name, devices: [options.device]) {
            close(bufferDirFD)
            throw DaemonError.usage(why)
        }
        // The test switch also opens hb files by path, as before issue 14, so
        // a test can put them on the protected volume.
        hb = HBFileStore(directory: bdir, directoryFD: allowBufferOnVolumeForTests ? -1 : bufferDirFD, slotBytes: options.engine.blockSize,
                         fileBytes: options.hbFileBytes, limitBytes: options.bufferLimitBytes, deferDeletes: true)
        hb.removeAll()
        // Stale hb files of a previous daemon of this name.
        for i in 0..<100 { hb.unlinkFile(HBFileStore.fileName(i)) }
        engine = SnapshotEngine(device: device, spill: hb, config: options.engine)
        // HOTIMAGE_NO_SPLICE=1 copies every READ (for A/B benchmarks).
        let splice = ProcessInfo.processInfo.environment["HOTIMAGE_NO_SPLICE"] == nil
        nbd = NBDServer(socketPath: options.dir + "/nbd.sock", engine: engine, logger: logger, workers: options.workers,
                        spliceFD: splice ? device.fd : nil)
        control = ControlServer(path: options.dir + "/control.sock", logger: logger)
    }

    /// Starts serving and presents the protected device; returns its path.
    public func start() throws -> String {
        try nbd.start()
        control.handler = { [unowned self] id, req in handle(id, req) }
        control.onClose = { [unowned self] id in connectionClosed(id) }
        try control.start()
        do { try ProcessControl.setIOFlusher() } catch { logger.warning("\(error) (continuing without PR_SET_IO_FLUSHER)") }
        ProcessControl.keepLargeAllocationsInHeap()
        do { try ProcessControl.lockMemory() } catch { logger.warning("\(error) (continuing without locked memory)") }
        Threads.start(name: "ticker") { [self] in tickLoop() }
        for i in 0..<2 { Threads.start(name: "mover-\(i)") { [self] in moverLoop() } }
        let dev: String
        if options.via == .nbd {
            let k = KernelNBDFrontend(runDir: options.dir, logger: logger)
            kernelNBD = k
            let backend = KernelNBDFrontend.backendID(name: options.name, device: options.device)
            var orphan: (index: Int, connections: Int)?
            if options.reconnect {
                orphan = KernelNBDFrontend.orphan(runDir: options.dir, backend: backend)
                if orphan == nil { logger.info("--reconnect: no device of '\(options.name)' is waiting; connecting a new one") }
            }
            do {
                dev = try k.start(server: nbd, size: device.size, sectorSize: device.sectorSize,
                                  connections: options.nbdConnections, requestTimeout: options.nbdRequestTimeoutSeconds,
                                  deadConnTimeout: options.deadConnTimeoutSeconds,
                                  backend: backend, reconnectTo: orphan)
            } catch {
                shutdownServers()
                throw error
            }
        } else {
            let f = FuseFrontend(runDir: options.dir, logger: logger)
            fuse = f
            let logFD = open(options.dir + "/nbdfuse.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            defer { if logFD >= 0 { close(logFD) } }
            do { dev = try f.start(socket: nbd.socketPath, size: device.size, logFD: logFD) } catch {
                f.stop()
                shutdownServers()
                throw error
            }
        }
        Daemon.linkStableName(options.name, to: dev)
        m.withLock { protectedDevice = dev }
        writeFileAtomically(options.dir + "/pid", "\(getpid())\n")
        writeFileAtomically(options.dir + "/device", dev + "\n")
        logger.info("attached \(options.device) as \(dev) (\(device.size) bytes, buffer \(options.resolvedBufferDir))")
        return dev
    }

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

    /// Blocks until SIGTERM/SIGINT or a detach request ends the daemon.
    public func waitForShutdown(signals: SignalWaiter) {
        while true {
            let sig = signals.wait(timeoutSeconds: 1)
            if m.withLock({ stopping }) { break }
            if let sig {
                if let reason = detachRefusal(force: false) {
                    logger.error("signal \(sig): not detaching: \(reason)")
                    continue
                }
                logger.info("signal \(sig): detaching")
                break
            }
        }
        teardown()
    }

    func teardown() {
        engine.end()
        thawIfFrozen()
        fuse?.stop()
        kernelNBD?.stop()
        Daemon.unlinkStableName(options.name)
        shutdownServers()
        hb.removeAll()
        hb.collectGarbage()
        // Only the directory opened at attach (a mount may cover its path now).
        var held = stat(), now = stat()
        if fstat(bufferDirFD, &held) == 0, stat(options.resolvedBufferDir, &now) == 0,
           held.st_dev == now.st_dev && held.st_ino == now.st_ino {
            rmdir(options.resolvedBufferDir)
        }
        for f in ["device", "pid", "nbdfuse.log", "lock"] { unlink(options.dir + "/" + f) }
        rmdir(options.dir)   // stays while daemon.log (background mode) is there
        logger.info("detached \(options.device)")
    }

    private func shutdownServers() {
        nbd.stop()
        control.stop()
    }

    // MARK: housekeeping threads

    private func tickLoop() {
        while !m.withLock({ stopping }) {
            for ev in engine.tick() {
                switch ev {
                case .failed(let r): logger.error("session failed: \(r)")
                case .dropped(let r):
                    logger.error("session dropped: \(r)")
                    m.withLock { owner = nil }
                }
            }
            // Never leave a filesystem frozen without an armed session.
            if !engine.currentPhase.copiesOnWrite { thawIfFrozen() }
            // A client that vanished while its `begin` waits for a pause: its
            // handler is blocked, so only the socket tells (else the session
            // would wait out the snapshot deadline).
            if engine.currentPhase == .waiting, let id = m.withLock({ owner }), control.peerClosed(id) {
                logger.warning("session client vanished while waiting for a pause: back to passthrough")
                engine.end()
                thawIfFrozen()
            }
            usleep(100_000)
        }
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

    func thawIfFrozen() {
        let f = m.withLock { () -> FrozenFilesystem? in let f = frozen; frozen = nil; return f }
        guard let f else { return }
        do { try f.thaw(); logger.info("thawed \(f.mountPoint)") } catch { logger.error("thaw \(f.mountPoint): \(error)") }
        let held = monotonicNanos() &- f.startedNanos
        m.withLock { lastFreezeNanos = held }
        logger.info("\(f.mountPoint) was frozen for \(held / 1_000_000) ms")
    }

    private func connectionClosed(_ id: Int) {
        let was = m.withLock { () -> Bool in
            guard owner == id else { return false }
            owner = nil
            return true
        }
        if was {
            let phase = engine.currentPhase
            if phase != .idle {
                logger.warning("session client vanished (\(phase.rawValue)): back to passthrough, buffer files deleted")
            }
            engine.end()
            thawIfFrozen()
        }
    }

    var currentProtectedDevice: String? { m.withLock { protectedDevice } }
    var frozenMountPoint: String? { m.withLock { frozen?.mountPoint } }
    var lastFreezeSeconds: Double? { m.withLock { lastFreezeNanos.map { Double($0) / 1e9 } } }

    func isOwner(_ id: Int) -> Bool { m.withLock { owner == id } }

    /// Makes `id` the session owner; returns why not.
    func claimOwner(_ id: Int) -> String? {
        m.withLock {
            if let o = owner, o != id { return "another client owns the session (\(engine.currentPhase.rawValue))" }
            owner = id
            return nil
        }
    }

    func releaseOwner(_ id: Int) { m.withLock { if owner == id { owner = nil } } }
    func setFrozen(_ f: FrozenFilesystem) { m.withLock { frozen = f } }
    func thawNow() { thawIfFrozen() }

    func requestStop() { m.withLock { stopping = true } }

    func detachRefusal(force: Bool) -> String? {
        guard let dev = m.withLock({ protectedDevice }) else { return nil }
        if let mnt = Mounts.of(device: dev).first {
            return "\(dev) is mounted on \(mnt.mountPoint); unmount it first"
        }
        if !force && engine.currentPhase != .idle {
            return "a backup session is \(engine.currentPhase.rawValue); end it first (or detach --force)"
        }
        return nil
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in every thread (call before starting
/// any) and lets one thread wait for them.
public final class SignalWaiter: @unchecked Sendable {
    private var set = sigset_t()

    public init() {
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGHUP)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGPIPE, SIG_IGN)
    }

    public func wait(timeoutSeconds: Int) -> Int32? {
        var ts = timespec(tv_sec: timeoutSeconds, tv_nsec: 0)
        let r = sigtimedwait(&set, nil, &ts)
        return r > 0 ? r : nil
    }
}
