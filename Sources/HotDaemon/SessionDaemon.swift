// The session daemon: the process behind `hotimage attach` (and behind one
// backup of a device-mapper volume, as a transient daemon). It owns what
// every backend shares (SessionBackend.swift says what a backend does):
//
//   RUN/NAME/lock          flock held while the daemon lives
//   RUN/NAME/pid           daemon pid
//   RUN/NAME/via           fuse, nbd or dm
//   RUN/NAME/device        the protected device path, written once usable
//   RUN/NAME/control.sock  the control protocol (HotControl/ControlProtocol.swift)
//   RUN/NAME/daemon.log    the log when it runs in the background
//   (and what the backend adds: HotCoreBackend.swift, DMBackend.swift)
//
// - one session at a time, owned by one control connection; the owner
//   closing its connection ends the session (the backend drops it);
// - the freeze: held here, thawed after the used map, at the end, and by
//   the ticker whenever the session does not copy on write (never a
//   filesystem left frozen without an armed snapshot);
// - the ticker: the backend's deadlines and watchdogs, and a client that
//   vanished while its `begin` waits;
// - shutdown: on a signal (refused while mounted or in a session), on
//   `detach`, or when a transient daemon's one session ends.
import Foundation
import HotControl
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

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

/// The facts of a daemon that are not the backend's.
public struct SessionDaemonConfig: Sendable {
    public var name: String
    public var runDir: String
    public var bufferDir: String
    public var bufferLimitBytes: UInt64
    /// The daemon serves one session and exits (backup of a dm volume).
    public var transient = false

    public init(name: String, runDir: String, bufferDir: String, bufferLimitBytes: UInt64, transient: Bool = false) {
        self.name = name; self.runDir = runDir; self.bufferDir = bufferDir
        self.bufferLimitBytes = bufferLimitBytes; self.transient = transient
    }

    public var dir: String { runDir + "/" + name }
}

public final class SessionDaemon: @unchecked Sendable {
    public let config: SessionDaemonConfig
    let logger: Logger
    let clock: SessionClock
    let backend: SessionBackend
    let control: ControlServer
    /// The buffer directory, open from start (HotCore makes hb files relative to it).
    let bufferDirFD: Int32
    let lockFD: Int32

    private let m = Monitor()
    private var owner: Int?
    private var beginning = false
    private var frozen: FrozenFilesystem?
    private var frozenAt: UInt64 = 0
    private var lastFreezeNanos: UInt64?
    private var protectedDevice: String?
    private var stopping = false

    /// Takes the run directory's lock (`RUN/NAME/lock`) before a backend is
    /// made: a second daemon of the same name stops here.
    public static func lockRunDirectory(_ c: SessionDaemonConfig) throws -> Int32 {
        mkdir(c.runDir, 0o700)
        mkdir(c.dir, 0o700)
        let fd = open(c.dir + "/lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0 {
            if fd >= 0 { close(fd) }
            throw DaemonError.alreadyAttached(c.name)
        }
        return fd
    }

    /// `lockFD` from lockRunDirectory, `bufferDirFD` from
    /// BufferDirectory.open (both closed by the daemon from here on).
    init(config: SessionDaemonConfig, backend: SessionBackend, lockFD: Int32, bufferDirFD: Int32,
         clock: SessionClock = MonotonicClock(), logger: Logger) {
        self.config = config
        self.backend = backend
        self.lockFD = lockFD
        self.bufferDirFD = bufferDirFD
        self.clock = clock
        self.logger = logger
        control = ControlServer(path: config.dir + "/control.sock", logger: logger)
    }

    /// Starts the control server and the backend; returns the protected device.
    public func start() throws -> String {
        control.handler = { [unowned self] id, req in handle(id, req) }
        control.onClose = { [unowned self] id in connectionClosed(id) }
        try control.start()
        do { try backend.prepare() } catch {
            backend.stop()
            control.stop()
            throw error
        }
        do { try ProcessControl.lockMemory() } catch { logger.warning("\(error) (continuing without locked memory)") }
        Threads.start(name: "ticker") { [self] in tickLoop() }
        let dev: String
        do { dev = try backend.start() } catch {
            m.withLock { stopping = true }
            backend.stop()
            control.stop()
            throw error
        }
        m.withLock { protectedDevice = dev }
        writeFileAtomically(config.dir + "/pid", "\(getpid())\n")
        writeFileAtomically(config.dir + "/via", backend.via.rawValue + "\n")
        writeFileAtomically(config.dir + "/device", dev + "\n")
        logger.info("\(backend.via == .dm ? "dm-snapshot daemon for" : "attached") \(backend.device)\(backend.via == .dm ? "" : " as \(dev)") (\(backend.sizeBytes) bytes, buffer \(config.bufferDir)\(config.transient ? ", transient" : ""))")
        return dev
    }

    /// Blocks until a signal, `detach`, or (transient) the end of the session.
    public func waitForShutdown(signals: SignalWaiter) {
        while true {
            let sig = signals.wait(timeoutSeconds: 1)
            if m.withLock({ stopping }) { break }
            if let sig {
                if !config.transient, let reason = detachRefusal(force: false) {
                    logger.error("signal \(sig): not detaching: \(reason)")
                    continue
                }
                logger.info("signal \(sig): stopping")
                break
            }
        }
        shutdown()
    }

    func shutdown() {
        m.withLock { stopping = true }
        backend.end()
        thawIfFrozen()
        backend.stop()
        control.stop()
        // Only the directory opened at start (a mount may cover its path now).
        var held = stat(), now = stat()
        if fstat(bufferDirFD, &held) == 0, stat(config.bufferDir, &now) == 0,
           held.st_dev == now.st_dev && held.st_ino == now.st_ino {
            rmdir(config.bufferDir)
        }
        close(bufferDirFD)
        for f in ["device", "pid", "via", "lock"] { unlink(config.dir + "/" + f) }
        rmdir(config.dir)   // stays while daemon.log (background mode) is there
        logger.info("stopped: \(backend.device)")
    }

    func requestStop() { m.withLock { stopping = true } }

    // MARK: the ticker

    private func tickLoop() {
        while !m.withLock({ stopping }) {
            for ev in backend.tick() {
                switch ev {
                case .failed(let r): logger.error("session failed: \(r)")
                case .dropped(let r):
                    logger.error("session dropped: \(r)")
                    m.withLock { owner = nil }
                    if config.transient { requestStop() }
                case .exit(let r):
                    logger.info("\(r); exiting")
                    requestStop()
                }
            }
            // Never a filesystem frozen without an armed session (a begin
            // that is freezing and cutting now holds it on purpose).
            if !backend.phase.copiesOnWrite && !m.withLock({ beginning }) { thawIfFrozen() }
            // A client that vanished while its `begin` waits for a pause: its
            // handler is blocked, so only the socket tells (else the session
            // would wait out the snapshot deadline).
            if backend.phase == .waiting, let id = m.withLock({ owner }), control.peerClosed(id) {
                logger.warning("session client vanished while waiting for a pause: back to passthrough")
                backend.end()
                thawIfFrozen()
            }
            usleep(backend.tickInterval)
        }
    }

    // MARK: freeze

    func freeze(_ mountPoint: String) throws {
        let f = try FrozenFilesystem(mountPoint: mountPoint)
        m.withLock { frozen = f; frozenAt = clock.now() }
    }

    func thawIfFrozen() {
        let (f, at) = m.withLock { () -> (FrozenFilesystem?, UInt64) in let f = frozen; frozen = nil; return (f, frozenAt) }
        guard let f else { return }
        do { try f.thaw(); logger.info("thawed \(f.mountPoint)") } catch { logger.error("thaw \(f.mountPoint): \(error)") }
        let held = clock.now() &- at
        m.withLock { lastFreezeNanos = held }
        logger.info("\(f.mountPoint) was frozen for \(held / 1_000_000) ms")
    }

    // MARK: the owner

    func isOwner(_ id: Int) -> Bool { m.withLock { owner == id } }

    /// Makes `id` the session owner; returns why not.
    func claimOwner(_ id: Int) -> String? {
        m.withLock {
            if let o = owner, o != id { return "another client owns the session (\(backend.phase.rawValue))" }
            owner = id
            beginning = true
            return nil
        }
    }

    func beginDone(_ id: Int, keepOwner: Bool) {
        m.withLock {
            beginning = false
            if !keepOwner && owner == id { owner = nil }
        }
    }

    func releaseOwner(_ id: Int) { m.withLock { if owner == id { owner = nil } } }

    private func connectionClosed(_ id: Int) {
        let was = m.withLock { () -> Bool in
            guard owner == id else { return false }
            owner = nil
            return true
        }
        guard was else { return }
        let phase = backend.phase
        if phase != .idle {
            logger.warning("session client vanished (\(phase.rawValue)): back to passthrough, snapshot and buffers dropped")
        }
        backend.end()
        thawIfFrozen()
        if config.transient { requestStop() }
    }

    var currentProtectedDevice: String? { m.withLock { protectedDevice } }
    var frozenMountPoint: String? { m.withLock { frozen?.mountPoint } }
    var lastFreezeSeconds: Double? { m.withLock { lastFreezeNanos.map { Double($0) / 1e9 } } }

    func detachRefusal(force: Bool) -> String? {
        guard let dev = currentProtectedDevice else { return nil }
        if let mnt = Mounts.of(device: dev).first {
            return "\(dev) is mounted on \(mnt.mountPoint); unmount it first"
        }
        if !force && backend.phase != .idle {
            return "a backup session is \(backend.phase.rawValue); end it first (or detach --force)"
        }
        return backend.detachRefusal()
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
