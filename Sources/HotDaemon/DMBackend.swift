// The dm-snapshot backend: the kernel does the copy-on-write
// (DMSnapshotStack.swift); this backend builds and removes the snapshot,
// watches its COW store and grows it (DMBackend+Watch.swift), with the
// session's phases and deadlines in HotCore's KernelCOWSession. The daemon
// undoes everything when the client dies or stops heart-beating, so the
// imager can never leave a snapshot behind.
//
// How the control ops map:
//   hello      protectedDevice = the origin (the dm device to mount and back up)
//   begin      freeze (FIFREEZE on mountPoint) or raw (unmounted), then build
//              the stack; reply armedAtNanos, frozen, snapshotDevice. wip is
//              refused: the cut is the suspend of the origin.
//   map        records the used map (for status) → protecting; the daemon thaws
//   archived   accepted, no effect: dm-snapshot cannot shrink its protection
//   buffered   always empty: there is no buffer the imager could drain first
//
// Two lives: `attach --via dm` (a linear device hotimage-NAME over DEVICE,
// the daemon stays until detach) and transient (`backup` of an existing dm
// device such as an LVM LV: the daemon exits when its one session ends).
// What it adds to the run directory: loops (LOOP FILE per hb file, for the
// cleanup after a kill, DMLeftovers.swift).
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
    public var runDir = Defaults.runDir
    /// attach --via dm: the block device to stand a linear device over.
    public var baseDevice: String?
    /// Otherwise: an existing dm device (path) to snapshot.
    public var originDevice: String?
    public var transient = false
    public var bufferDir: String?
    public var hbFileBytes: UInt64 = Defaults.hbFileBytes
    public var bufferLimitBytes: UInt64 = Defaults.bufferLimitBytes
    public var snapshotDeadlineNanos: UInt64 = Defaults.snapshotDeadlineNanos
    public var heartbeatTimeoutNanos: UInt64 = Defaults.heartbeatTimeoutNanos
    /// A transient daemon that nobody begins a session with exits after this.
    public var idleExitNanos: UInt64 = 30_000_000_000

    public init(name: String) { self.name = name }

    public var dir: String { runDir + "/" + name }
    public var resolvedBufferDir: String { bufferDir ?? Defaults.bufferDir(name: name) }
}

extension SessionDaemon {
    /// A dm-snapshot daemon: `attach --via dm` (baseDevice) or transient
    /// for one backup of an existing dm device (originDevice).
    public static func dmSnapshot(_ o: DMDaemonOptions, clock: SessionClock = MonotonicClock(), logger: Logger) throws -> SessionDaemon {
        guard getuid() == 0 else { throw DaemonError.usage("the dm-snapshot backend must run as root") }
        guard DeviceMapper.available else {
            throw DaemonError.usage("this kernel has no device-mapper (/dev/mapper/control is missing; modprobe dm-mod dm-snapshot)")
        }
        guard !o.name.isEmpty, o.name.count <= DMOwner.maxNameLength,
              o.name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.+".contains($0)) }) else {
            throw DaemonError.usage("the name '\(o.name)' must be 1–\(DMOwner.maxNameLength) letters, digits or -_.+ for device-mapper")
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
        // Sessions of dead dm daemons are undone before anything is built.
        for line in DMLeftovers.clean(runDir: o.runDir) { logger.warning("\(line)") }
        let config = SessionDaemonConfig(name: o.name, runDir: o.runDir, bufferDir: o.resolvedBufferDir,
                                         bufferLimitBytes: o.bufferLimitBytes, transient: o.transient)
        let lockFD = try lockRunDirectory(config)
        unlink(config.dir + "/loops")
        var created: String?
        do {
            let originName: String
            if let base = o.baseDevice {
                let (n, made) = try DMBackend.linearOver(base, name: o.name)
                originName = n
                if made { created = n }
            } else if let dev = o.originDevice {
                guard let info = try DeviceMapper.info(path: dev) else {
                    throw DaemonError.usage("\(dev) is not a device-mapper device (an LVM LV or a dm-linear device); for any other device use 'hotimage attach \(dev) --via dm' first, or the HotCore backend")
                }
                if let own = DMOwner(uuid: info.uuid), own.role.isSession {
                    throw DaemonError.usage("\(dev) is a device of a hotimage snapshot session, not a volume")
                }
                originName = info.name
            } else {
                throw DaemonError.usage("no device given")
            }
            let size = try DMTable.sectors(try DeviceMapper.table(name: originName)) * 512
            let dirFD = try openCheckedBufferDirectory(config, devices: [DeviceMapper.nodePath(originName)] + (o.baseDevice.map { [$0] } ?? []))
            var d = KernelCOWDeadlines(snapshotNanos: o.snapshotDeadlineNanos, heartbeatNanos: o.heartbeatTimeoutNanos)
            if o.transient { d.idleExitNanos = o.idleExitNanos }
            let backend = DMBackend(options: o, originName: originName, sizeBytes: size,
                                    session: KernelCOWSession(clock: clock, deadlines: d), logger: logger)
            return SessionDaemon(config: config, backend: backend, lockFD: lockFD, bufferDirFD: dirFD, clock: clock, logger: logger)
        } catch {
            if let created { try? DeviceMapper.remove(name: created) }
            close(lockFD)
            throw error
        }
    }
}

final class DMBackend: SessionBackend, @unchecked Sendable {
    let options: DMDaemonOptions
    let logger: Logger
    /// dm name and path of the origin.
    let originName: String
    let originPath: String
    let sizeBytes: UInt64
    let growth: CowGrowthPolicy
    let session: KernelCOWSession

    // The snapshot and its COW store's facts, under `m`. Stack changes
    // (build, grow, teardown) run under `ops` too, outside `m`, so status
    // answers while they run.
    let m = Monitor()
    let ops = Monitor()
    /// One reader of the snapshot's status at a time (ticker, status).
    let watching = Monitor()
    var stack: DMSnapshotStack?
    var cowUsed: UInt64 = 0
    var cowTotal: UInt64 = 0
    var cowPeak: UInt64 = 0
    var snapState: String?
    var hbPaths: [String] = []
    var loopPaths: [String] = []
    var growths = 0
    var growthFailure: String?
    var fillRate = FillRate()

    init(options: DMDaemonOptions, originName: String, sizeBytes: UInt64, session: KernelCOWSession, logger: Logger) {
        self.options = options
        self.originName = originName
        originPath = DeviceMapper.nodePath(originName)
        self.sizeBytes = sizeBytes
        self.session = session
        self.logger = logger
        growth = CowGrowthPolicy(stepBytes: options.hbFileBytes, limitBytes: options.bufferLimitBytes)
    }

    var via: SessionVia { .dm }
    var device: String { options.baseDevice ?? originPath }
    var blockSize: Int { 4096 }
    var guardedDevices: [String] { [originPath] + (options.baseDevice.map { [$0] } ?? []) }
    var phase: SessionPhase { session.currentPhase }
    var snapshotURI: String? { nil }
    /// Every 20 ms while a snapshot exists: the kernel gives no warning
    /// before the COW store fills, so the first hb file must absorb what is
    /// written in one interval.
    var tickInterval: UInt32 { m.withLock { stack != nil } ? 20_000 : 100_000 }

    func refusal(of c: Consistency) -> String? {
        c == .wip ? "the dm-snapshot backend takes its cut by suspending the device: use consistency freeze (or raw when unmounted); wip is HotCore's" : nil
    }

    /// attach --via dm: a linear device hotimage-NAME over `base`, or the
    /// one a previous (killed) daemon of this name left, if it maps `base`.
    /// Returns its dm name and whether it was made now.
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

    func prepare() throws {}

    func start() throws -> String { originPath }

    func stop() {
        endSession()
        if options.baseDevice != nil {
            do {
                try DeviceMapper.remove(name: originName)
                logger.info("removed \(originName)")
            } catch { logger.error("removing \(originName): \(error)") }
        }
        unlink(options.dir + "/loops")
    }

    func detachRefusal() -> String? {
        if options.baseDevice != nil, let i = try? DeviceMapper.info(name: originName), i.openCount > 0 {
            return "\(originPath) is open by another program (\(i.openCount) opener(s))"
        }
        return nil
    }

    // MARK: the session

    func begin(_ req: BeginRequest, freeze: (String) throws -> Void) -> Result<BeginOutcome, BeginRefusal> {
        if req.hold && req.mountPoint == nil {
            return .failure(BeginRefusal(description: "dm-snapshot cannot hold writes for a set cut without freezing a mounted filesystem; mount it, or back this volume up on its own", keepsOwner: false))
        }
        if let why = session.begin(consistency: req.consistency) {
            return .failure(BeginRefusal(description: why, keepsOwner: false))
        }
        m.withLock {
            hbPaths = []; loopPaths = []
            cowUsed = 0; cowTotal = 0; cowPeak = 0; growths = 0; growthFailure = nil; snapState = nil
            fillRate = FillRate()
        }
        var cfg = DMStackConfig(name: options.name, bufferDir: options.resolvedBufferDir,
                                hbFileBytes: options.hbFileBytes, limitBytes: options.bufferLimitBytes)
        cfg.loopRecord = options.dir + "/loops"
        let result: Result<DMSnapshotStack, Error> = ops.withLock {
            if let mp = req.mountPoint {
                do { try freeze(mp) } catch { return .failure(DaemonError.failed("could not freeze \(mp): \(error)")) }
            }
            // Without a freeze of ours, the suspend flushes and locks the filesystem itself.
            do { return .success(try DMSnapshotStack.build(origin: originName, config: cfg, lockfs: req.mountPoint == nil, logger: logger)) }
            catch { return .failure(error) }
        }
        switch result {
        case .failure(let e):
            session.fail("snapshot failed: \(e)")
            return .failure(BeginRefusal(description: "\(e)", keepsOwner: true))
        case .success(let s):
            let alive = m.withLock { () -> Bool in
                guard session.built(cutNanos: s.cutNanos) else { return false }
                stack = s
                cowTotal = s.cowBytes
                hbPaths = s.pieces.map(\.path)
                loopPaths = s.pieces.map(\.loop)
                return true
            }
            if !alive {
                // The client went away while the snapshot was being built.
                ops.withLock { _ = s.teardown() }
                return .failure(BeginRefusal(description: "the session ended while the snapshot was taken", keepsOwner: false))
            }
            return .success(BeginOutcome(armedAtNanos: s.cutNanos, frozen: req.mountPoint != nil,
                                         snapshotURI: nil, snapshotDevice: s.snapshotDevice))
        }
    }

    func map(used: [Range<UInt64>], excluded: [Range<UInt64>]) throws -> MapOutcome {
        let blocks = used.reduce(UInt64(0)) { $0 + ($1.upperBound - $1.lowerBound + 4095) / 4096 }
        if let why = session.mapped(blocks: blocks) { throw DaemonError.failed(why) }
        logger.info("session: dm-snapshot copies any written chunk, not only the \(blocks) used blocks")
        return .protecting(usedBlocks: blocks, changes: nil)
    }

    /// dm-snapshot cannot shrink its protection: accepted, no effect.
    func archived(_ ranges: [Range<UInt64>]) throws -> UInt64 { 0 }

    func buffered(limit: Int) -> [Range<UInt64>] { [] }

    func heartbeat() { session.heartbeat() }

    func end() { endSession() }

    /// Tears the snapshot down and goes idle (end, a lost client, shutdown).
    func endSession() {
        session.end()
        teardown()
    }

    /// Removes the snapshot, if there is one; the session's phase is set by the caller.
    func teardown() {
        guard let s = m.withLock({ () -> DMSnapshotStack? in let s = stack; stack = nil; return s }) else { return }
        let errs = ops.withLock { s.teardown() }
        if errs.isEmpty {
            logger.info("session: snapshot removed, \(s.origin) restored")
        } else {
            logger.error("session: teardown incomplete: \(errs.joined(separator: "; "))")
        }
    }

    func tick() -> [BackendEvent] {
        switch session.tick() {
        case .failed(let r)?:
            teardown()
            return [.failed(r)]
        case .dropped(let r)?:
            teardown()
            return [.dropped(r + "; snapshot removed")]
        case .idleExit(let r)?:
            return [.exit(r)]
        case nil:
            break
        }
        guard let s = m.withLock({ stack }), session.currentPhase.copiesOnWrite else { return [] }
        return watchCOW(s).map { [.failed($0)] } ?? []
    }
}
