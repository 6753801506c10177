// The dm-snapshot session daemon: the watchdog of the device-mapper backend.
// The kernel does the copy-on-write (DMSnapshotStack.swift); this process
// builds and removes the snapshot, watches its COW store, grows it, and
// undoes everything when the client dies or stops heart-beating, so the
// imager can never leave a snapshot behind. It speaks the control protocol
// of HotControl (ControlProtocol.swift) on RUN/NAME/control.sock:
//
//   hello      protectedDevice = the origin (the dm device to mount and back up)
//   begin      freeze (FIFREEZE on mountPoint) or raw (unmounted), then build
//              the stack; reply armedAtNanos, frozen, snapshotDevice. wip is
//              refused: the cut is the suspend of the origin.
//   map        records the used map (for status), thaws → protecting
//   archived   accepted, no effect: dm-snapshot cannot shrink its protection
//   buffered   always empty: there is no buffer the imager could drain first
//   heartbeat, status, end, detach as for HotCore
//
// Deadlines (ticker, every 100 ms): snapshot complete (map received) within
// --snapshot-deadline of begin; no heartbeat for --heartbeat-timeout while
// protecting → teardown; the owning connection closing → teardown at once.
// A snapshot that turns Invalid (COW store overflowed) fails the session and
// is torn down; the origin keeps running throughout.
//
// Two lives: `attach --via dm` (a linear device hotimage-NAME over DEVICE,
// the daemon stays until detach) and transient (`backup --backend
// dm-snapshot` on an existing dm device such as an LVM LV: the daemon
// exits when its one session ends).
//
// Run directory (0700): lock, pid, via ("dm"), device (the origin path),
// control.sock, loops (LOOP FILE per hb file, for cleanups after a kill),
// daemon.log.
import HotControl
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

public struct DMDaemonOptions: Sendable {
    public var name: String
    public var runDir = "/run/hotimage"
    /// attach --via dm: the block device to stand a linear device over.
    public var baseDevice: String?
    /// Otherwise: an existing dm device (path) to snapshot.
    public var originDevice: String?
    public var transient = false
    public var bufferDir: String?
    public var hbFileBytes: UInt64 = Defaults.hbFileBytes
    public var bufferLimitBytes: UInt64 = Defaults.bufferLimitBytes
    public var snapshotDeadlineNanos: UInt64 = 60_000_000_000
    public var heartbeatTimeoutNanos: UInt64 = 10_000_000_000
    /// A transient daemon that nobody begins a session with exits after this.
    public var idleExitNanos: UInt64 = 30_000_000_000

    public init(name: String) { self.name = name }

    public var dir: String { runDir + "/" + name }
    public var resolvedBufferDir: String { bufferDir ?? Defaults.bufferDir(name: name) }
}

public final class DMDaemon: ForegroundDaemon, @unchecked Sendable {
    public let options: DMDaemonOptions
    let logger: Logger
    let control: ControlServer
    /// dm name and path of the origin.
    let originName: String
    let originPath: String
    let sizeBytes: UInt64
    let createdLinear: Bool
    let growth: CowGrowthPolicy
    private var lockFD: Int32 = -1

    // Session state, under `m`. Stack changes (build, grow, teardown) run
    // under `ops` too, outside `m`, so status answers while they run.
    let m = Monitor()
    let ops = Monitor()
    /// One reader of the snapshot's status at a time (ticker, status op).
    let watching = Monitor()
    var phase: SessionPhase = .idle
    var failure: String?
    var lastFailure: String?
    var owner: Int?
    var consistency: Consistency?
    var frozen: FrozenFilesystem?
    var stack: DMSnapshotStack?
    var beganAt: UInt64 = 0
    var armedAt: UInt64 = 0
    var lastHeartbeat: UInt64 = 0
    var usedBlocks: UInt64 = 0
    var cowUsed: UInt64 = 0
    var cowTotal: UInt64 = 0
    var cowPeak: UInt64 = 0
    var snapState: String?
    var hbPaths: [String] = []
    var loopPaths: [String] = []
    var growths = 0
    var growthFailure: String?
    var fillRate = FillRate()
    var counters = EngineCounters()
    var sessionsBegun = 0
    var stopping = false
    let startedAt = monotonicNanos()

    public init(options: DMDaemonOptions, logger: Logger) throws {
        self.options = options
        self.logger = logger
        guard getuid() == 0 else { throw DaemonError.usage("the dm-snapshot backend must run as root") }
        guard DeviceMapper.available else {
            throw DaemonError.usage("this kernel has no device-mapper (/dev/mapper/control is missing; modprobe dm-mod dm-snapshot)")
        }
        guard !options.name.isEmpty, options.name.count <= DMOwner.maxNameLength,
              options.name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.+".contains($0)) }) else {
            throw DaemonError.usage("the name '\(options.name)' must be 1–\(DMOwner.maxNameLength) letters, digits or -_.+ for device-mapper")
        }
        let log = logger
        DeviceMapper.setLogHandler { msg in
            let text = "libdevmapper: \(msg.message)"
            switch msg.level {
            case ...3: log.error("\(text)")
            case 4: log.warning("\(text)")
            case 5, 6: log.info("\(text)")
            default: log.trace("\(text)")
            }
        }
        for line in DMLeftovers.clean(runDir: options.runDir) { logger.warning("\(line)") }

        mkdir(options.runDir, 0o700)
        mkdir(options.dir, 0o700)
        lockFD = open(options.dir + "/lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if lockFD < 0 || flock(lockFD, LOCK_EX | LOCK_NB) != 0 {
            throw DaemonError.alreadyAttached(options.name)
        }
        unlink(options.dir + "/loops")

        if let base = options.baseDevice {
            (originName, createdLinear) = try DMDaemon.linearOver(base, name: options.name)
            originPath = DeviceMapper.nodePath(originName)
        } else if let dev = options.originDevice {
            guard let info = try DeviceMapper.info(path: dev) else {
                throw DaemonError.usage("\(dev) is not a device-mapper device (an LVM LV or a dm-linear device); for any other device use 'hotimage attach \(dev) --via dm' first, or the HotCore backend")
            }
            if let o = DMOwner(uuid: info.uuid), o.role.isSession {
                throw DaemonError.usage("\(dev) is a device of a hotimage snapshot session, not a volume")
            }
            originName = info.name
            originPath = DeviceMapper.nodePath(info.name)
            createdLinear = false
        } else {
            throw DaemonError.usage("no device given")
        }
        let table = try DeviceMapper.table(name: originName)
        sizeBytes = try DMTable.sectors(table) * 512

        let bdir = options.resolvedBufferDir
        if mkdir(bdir, 0o700) != 0 && errno != EEXIST {
            throw DaemonError.failed("cannot create buffer directory \(bdir): \(String(cString: strerror(errno)))")
        }
        if let info = try DeviceMapper.info(name: originName), let h = Mounts.holding(path: bdir),
           h.major == info.major && h.minor == info.minor {
            throw DaemonError.usage("the buffer directory \(bdir) is on the volume being protected (\(h.mountPoint)); put --buffer-dir on another volume")
        }
        growth = CowGrowthPolicy(stepBytes: options.hbFileBytes, limitBytes: options.bufferLimitBytes)
        control = ControlServer(path: options.dir + "/control.sock", logger: logger)
    }

    /// attach --via dm: a linear device hotimage-NAME over `base`, or the
    /// one a previous (killed) daemon of this name left, if it maps `base`.
    static func linearOver(_ base: String, name: String) throws -> (String, Bool) {
        var st = stat()
        guard stat(base, &st) == 0 else { throw DaemonError.usage("\(base): \(String(cString: strerror(errno)))") }
        guard (st.st_mode & S_IFMT) == S_IFBLK else {
            throw DaemonError.usage("\(base) is not a block device (--via dm needs one; put a loop device over a file first)")
        }
        let (ma, mi) = try DeviceMapper.deviceNumber(base)
        let dmName = DMOwner.deviceName(name, .attach)
        let want = DMOwner(role: .attach, name: name)
        if let existing = try DeviceMapper.info(name: dmName) {
            let table = try DeviceMapper.table(name: dmName)
            guard existing.uuid == want.uuid, table.count == 1, table[0].type == "linear",
                  table[0].params == "\(ma):\(mi) 0" else {
                throw DaemonError.alreadyAttached(name)
            }
            return (dmName, false)   // adopt it
        }
        if let m = Mounts.of(device: base).first {
            throw DaemonError.failed("\(base) is mounted on \(m.mountPoint): unmount it before attaching (the dm-linear device must stand in front of every user of it)")
        }
        let size: UInt64
        do {
            let d = try BlockDevice(path: base, readOnly: true, exclusive: true)
            size = d.size
        } catch { throw DaemonError.failed("\(error)") }
        guard size >= 4096 else { throw DaemonError.failed("\(base) is too small (\(size) bytes)") }
        try DeviceMapper.create(name: dmName, uuid: want.uuid,
                                table: [.linear(length: size / 512, device: "\(ma):\(mi)")])
        return (dmName, true)
    }

    /// Starts serving; returns the origin's path (the device to mount).
    public func start() throws -> String {
        control.handler = { [unowned self] id, req in handle(id, req) }
        control.onClose = { [unowned self] id in connectionClosed(id) }
        do { try control.start() } catch {
            if createdLinear { try? DeviceMapper.remove(name: originName) }
            throw error
        }
        do { try ProcessControl.lockMemory() } catch { logger.warning("\(error) (continuing without locked memory)") }
        Threads.start(name: "dm-ticker") { [self] in tickLoop() }
        writeRunFile("pid", "\(getpid())\n")
        writeRunFile("via", SessionVia.dm.rawValue + "\n")
        writeRunFile("device", originPath + "\n")
        logger.info("dm-snapshot daemon for \(originPath) (\(sizeBytes) bytes, buffer \(options.resolvedBufferDir)\(options.transient ? ", transient" : ""))")
        return originPath
    }

    func writeRunFile(_ name: String, _ s: String) {
        let path = options.dir + "/" + name
        let fd = open(path + ".tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        _ = s.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        rename(path + ".tmp", path)
    }

    /// Blocks until a signal, detach, or (transient) the end of the session.
    public func waitForShutdown(signals: SignalWaiter) {
        while true {
            let sig = signals.wait(timeoutSeconds: 1)
            if m.withLock({ stopping }) { break }
            if let sig {
                if !options.transient, let reason = detachRefusal(force: false) {
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
        endSession(reason: nil)
        control.stop()
        if options.baseDevice != nil {
            do {
                try DeviceMapper.remove(name: originName)
                logger.info("removed \(originName)")
            } catch { logger.error("removing \(originName): \(error)") }
        }
        rmdir(options.resolvedBufferDir)
        for f in ["device", "pid", "via", "loops", "lock"] { unlink(options.dir + "/" + f) }
        rmdir(options.dir)
        logger.info("dm-snapshot daemon for \(originPath) stopped")
    }

    func requestStop() { m.withLock { stopping = true } }

    func detachRefusal(force: Bool) -> String? {
        if let mnt = Mounts.of(device: originPath).first {
            return "\(originPath) is mounted on \(mnt.mountPoint); unmount it first"
        }
        if !force && m.withLock({ phase != .idle }) {
            return "a backup session is \(m.withLock { phase.rawValue }); end it first (or detach --force)"
        }
        if options.baseDevice != nil, let i = try? DeviceMapper.info(name: originName), i.openCount > 0 {
            return "\(originPath) is open by another program (\(i.openCount) opener(s))"
        }
        return nil
    }
}
