// The device-mapper devices of one dm-snapshot session, built around an
// origin device (a dm device the filesystem is mounted from) and torn down
// again. The origin keeps its device number, so the mounted filesystem never
// notices; only its table changes for the length of the session.
//
//   idle                          during a session
//   ORIGIN  <its table T>         ORIGIN  snapshot-origin REAL     writes copy old chunks first
//                                 REAL    T                        (hotimage-NAME-real)
//                                 COW     linear loop0 ‖ loop1 …   (hotimage-NAME-cow)
//                                           └ hb_00.tmp, hb_01.tmp in the buffer directory
//                                 SNAP    snapshot REAL COW N 8    (hotimage-NAME-snap, read-only)
//
// build (the caller froze the filesystem, so suspending needs no lockfs):
//   1. REAL := a new device with ORIGIN's table T (both map the same
//      sectors; nothing writes while the filesystem is frozen)
//   2. hb_00.tmp (fallocated: a full buffer directory fails here) + loop,
//      COW := linear over the loop
//   3. SNAP := snapshot of REAL in COW, transient store, 4 KiB chunks,
//      created active (a snapshot must be active before the origin writes
//      through snapshot-origin; until then nothing writes: frozen)
//   4. suspend ORIGIN (skip lockfs: it is frozen already)     ← the cut
//   5. reload ORIGIN with snapshot-origin REAL, resume ORIGIN
// A failure at any step undoes the steps before it.
//
// grow: hb_NN.tmp + loop; reload COW with the longer concatenation, suspend
// and resume COW. The kernel reads the COW device's size at every chunk
// allocation (transient and persistent stores alike), so the snapshot uses
// the new space without being reloaded.
//
// teardown (end, failure, lost client): suspend ORIGIN, reload T, resume;
// remove SNAP (still open by a reader: load an error table so it releases
// REAL and COW, then a deferred remove); remove REAL and COW; detach the
// loops; delete the hb files. Idempotent; every step is tried even if an
// earlier one failed, and the errors are returned.
//
// Every device carries an owner UUID (DeviceMapper+Table.swift) so that a
// later run can find and undo the stack of a daemon that was killed.
import HotOS
import Logging
#if canImport(Glibc)
import Glibc
#endif

public struct DMStackConfig: Sendable {
    public var name: String
    public var bufferDir: String
    public var hbFileBytes: UInt64
    public var limitBytes: UInt64
    /// Snapshot chunk in 512-byte sectors (8 = 4 KiB).
    public var chunkSectors: UInt64 = 8
    /// Persistent (P) or transient (N) exception store. Transient by
    /// default: a session never outlives a reboot, and N spends no COW
    /// space or writes on metadata.
    public var persistent = false
    /// A file that lists "LOOP FILE" per hb file, for cleanups after a kill.
    public var loopRecord: String?

    public init(name: String, bufferDir: String, hbFileBytes: UInt64, limitBytes: UInt64) {
        self.name = name
        self.bufferDir = bufferDir
        self.hbFileBytes = hbFileBytes
        self.limitBytes = limitBytes
    }
}

struct HBPiece {
    var path: String
    var loop: String
    var devNumber: String
    var bytes: UInt64
}

final class DMSnapshotStack: @unchecked Sendable {
    let config: DMStackConfig
    let origin: String              // dm name of the origin
    let originTable: [DMTarget]
    let sectors: UInt64
    let logger: Logger
    private let owner: (pid: Int32, startTime: UInt64)
    private(set) var pieces: [HBPiece] = []
    /// CLOCK_MONOTONIC when the origin's suspend returned: every write that
    /// completed before it is in the snapshot, every later one is not.
    private(set) var cutNanos: UInt64 = 0
    private var realCreated = false, cowCreated = false, snapCreated = false
    private var originSwitched = false, originSuspended = false

    var realName: String { DMOwner.deviceName(config.name, .real) }
    var cowName: String { DMOwner.deviceName(config.name, .cow) }
    var snapName: String { DMOwner.deviceName(config.name, .snap) }
    var snapshotDevice: String { DeviceMapper.path(name: snapName) }
    var cowBytes: UInt64 { pieces.reduce(0) { $0 + $1.bytes } }

    private init(config: DMStackConfig, origin: String, table: [DMTarget], sectors: UInt64, logger: Logger) {
        self.config = config
        self.origin = origin
        self.originTable = table
        self.sectors = sectors
        self.logger = logger
        owner = ProcStat.current()
    }

    private func uuid(_ role: DMRole) -> String {
        DMOwner(role: role, name: config.name, pid: owner.pid, startTime: owner.startTime).uuid
    }

    /// Builds the stack around `origin` (see the header). `lockfs`: freeze
    /// through the suspend (only when the caller did not freeze).
    static func build(origin: String, config: DMStackConfig, lockfs: Bool, logger: Logger) throws -> DMSnapshotStack {
        let table = try DeviceMapper.table(name: origin)
        guard !table.isEmpty else { throw DaemonError.failed("\(origin) has no live table") }
        if table.contains(where: { $0.type == "snapshot-origin" || $0.type == "snapshot" }) {
            throw DaemonError.failed("\(origin) is already part of a dm snapshot (table: \(table.map(\.type).joined(separator: ", "))); end that snapshot first")
        }
        let sectors = try DMTable.sectors(table)
        let s = DMSnapshotStack(config: config, origin: origin, table: table, sectors: sectors, logger: logger)
        do { try s.buildSteps(lockfs: lockfs) } catch {
            let undo = s.teardown()
            if !undo.isEmpty { logger.error("undoing a failed snapshot: \(undo.joined(separator: "; "))") }
            throw error
        }
        return s
    }

    private func buildSteps(lockfs: Bool) throws {
        for n in [realName, cowName, snapName] where try DeviceMapper.info(name: n) != nil {
            throw DaemonError.failed("device-mapper device \(n) exists already (a session of '\(config.name)' is running, or a leftover: 'hotimage status' cleans those up)")
        }
        try DeviceMapper.create(name: realName, uuid: uuid(.real), table: originTable)
        realCreated = true
        guard let real = try DeviceMapper.info(name: realName) else { throw DaemonError.failed("\(realName) vanished after creation") }
        try addPiece(bytes: min(config.hbFileBytes, config.limitBytes))
        try DeviceMapper.create(name: cowName, uuid: uuid(.cow), table: cowTable())
        cowCreated = true
        guard let cow = try DeviceMapper.info(name: cowName) else { throw DaemonError.failed("\(cowName) vanished after creation") }

        // SNAP is created before the origin is suspended: libdevmapper makes
        // no /dev/mapper nodes while a device is suspended. Until the origin
        // is switched, writes still reach REAL's sectors directly, so SNAP
        // shows the state at the suspend below, which is the cut.
        try DeviceMapper.create(name: snapName, uuid: uuid(.snap),
                                table: [.snapshot(length: sectors, origin: real.devNumber, cow: cow.devNumber,
                                                  persistent: config.persistent, chunkSectors: config.chunkSectors)],
                                readOnly: true)
        snapCreated = true
        try DeviceMapper.suspend(name: origin, lockfs: lockfs)
        cutNanos = monotonicNanos()
        originSuspended = true
        try DeviceMapper.reload(name: origin, table: [.snapshotOrigin(length: sectors, origin: real.devNumber)])
        originSwitched = true
        try DeviceMapper.resume(name: origin)
        originSuspended = false
        logger.info("dm-snapshot: \(origin) → snapshot-origin \(realName); \(snapName) over \(cowName) (\(cowBytes >> 20) MiB in \(pieces.count) hb file(s))")
    }

    private func cowTable() -> [DMTarget] {
        DMTable.concatenation(pieces.map { ($0.devNumber, $0.bytes / 512) })
    }

    /// Creates the next hb file (space reserved with fallocate) and a loop over it.
    private func addPiece(bytes: UInt64) throws {
        let path = config.bufferDir + "/" + HBFileStore.fileName(pieces.count)
        if let user = Loop.all().first(where: { $0.file == path }) {
            throw DaemonError.failed("\(path) is in use by \(user.device) (another session with the same buffer directory?)")
        }
        unlink(path)
        do { try ReservedFile.create(path: path, bytes: bytes) } catch let e as OSError {
            if e.errno == ENOSPC || e.errno == EDQUOT {
                throw DaemonError.failed("the buffer directory \(config.bufferDir) is full: cannot reserve \(bytes >> 20) MiB for \(baseName(path))")
            }
            throw DaemonError.failed("\(e)")
        }
        let loop: String
        do {
            do { loop = try Loop.attach(file: path, directIO: true) } catch let err as OSError where err.errno == EINVAL {
                // tmpfs (and some others) refuse O_DIRECT: a buffered loop then.
                loop = try Loop.attach(file: path, directIO: false)
            }
        } catch {
            unlink(path)
            throw DaemonError.failed("cannot attach a loop device to \(path): \(error)")
        }
        let (ma, mi) = try DeviceMapper.deviceNumber(loop)
        pieces.append(HBPiece(path: path, loop: loop, devNumber: "\(ma):\(mi)", bytes: bytes))
        if let rec = config.loopRecord {
            let line = "\(loop) \(path)\n"
            let fd = open(rec, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            if fd >= 0 { _ = line.withCString { write(fd, $0, strlen($0)) }; close(fd) }
        }
    }

    /// Adds hb files until the store holds `toBytes` (or the limit), and
    /// extends COW over them. Returns the new size.
    func grow(toBytes: UInt64) throws -> UInt64 {
        let before = pieces.count
        while cowBytes < min(toBytes, config.limitBytes) {
            try addPiece(bytes: min(config.hbFileBytes, config.limitBytes - cowBytes))
        }
        guard pieces.count > before else { return cowBytes }
        do {
            try DeviceMapper.reload(name: cowName, table: cowTable())
            try DeviceMapper.suspend(name: cowName, lockfs: false)
            try DeviceMapper.resume(name: cowName)
        } catch {
            // Keep the files: COW may already map them; teardown removes them.
            throw DaemonError.failed("growing \(cowName): \(error)")
        }
        return cowBytes
    }

    /// The snapshot's state from its status line.
    func state() throws -> DMSnapshotState {
        guard let t = try DeviceMapper.status(name: snapName).first else { return .unknown("no status") }
        return DMSnapshotState(status: t.params)
    }

    /// Undoes everything built so far; returns what failed (empty: all undone).
    @discardableResult
    func teardown() -> [String] {
        var errors: [String] = []
        func attempt(_ what: String, _ body: () throws -> Void) {
            do { try body() } catch { errors.append("\(what): \(error)") }
        }
        if originSwitched {
            attempt("restoring \(origin)") {
                if !originSuspended { try DeviceMapper.suspend(name: origin, lockfs: false); originSuspended = true }
                try DeviceMapper.reload(name: origin, table: originTable)
                try DeviceMapper.resume(name: origin)
                originSuspended = false
                originSwitched = false
            }
        } else if originSuspended {
            attempt("resuming \(origin)") { try DeviceMapper.resume(name: origin); originSuspended = false }
        }
        if originSwitched {
            // The origin still maps through REAL: removing REAL or COW now
            // would fail anyway; leave all for a later cleanup.
            logger.error("dm-snapshot: \(origin) could not be restored; its session devices stay for 'hotimage status' to clean up")
            return errors
        }
        if snapCreated {
            attempt("removing \(snapName)") { try DMSnapshotStack.removeBusyTolerant(snapName, sectors: sectors) }
            snapCreated = false
        }
        if realCreated {
            attempt("removing \(realName)") { try DMSnapshotStack.removeBusyTolerant(realName, sectors: sectors) }
            realCreated = false
        }
        if cowCreated {
            attempt("removing \(cowName)") { try DMSnapshotStack.removeBusyTolerant(cowName, sectors: cowBytes / 512) }
            cowCreated = false
        }
        for p in pieces {
            attempt("detaching \(p.loop)") { if Loop.backingFile(major: devMajor(p.devNumber), minor: devMinor(p.devNumber)) == p.path { try Loop.detach(p.loop) } }
            unlink(p.path)
        }
        pieces.removeAll()
        if let rec = config.loopRecord { unlink(rec) }
        return errors
    }

    /// Removes a dm device; one still open (a reader holding the snapshot)
    /// gets an error table first, so it lets go of the devices below it,
    /// and is removed by the kernel when its last opener closes it.
    static func removeBusyTolerant(_ name: String, sectors: UInt64) throws {
        guard try DeviceMapper.info(name: name) != nil else { return }
        do { try DeviceMapper.remove(name: name) } catch let e as DMError where e.errno == EBUSY {
            try DeviceMapper.reload(name: name, table: [.error(length: max(1, sectors))])
            try DeviceMapper.resume(name: name)
            try DeviceMapper.remove(name: name, deferred: true)
        }
    }
}

func devMajor(_ mm: String) -> UInt32 { UInt32(mm.split(separator: ":").first ?? "") ?? 0 }
func devMinor(_ mm: String) -> UInt32 { UInt32(mm.split(separator: ":").last ?? "") ?? 0 }

func baseName(_ path: String) -> String { path.split(separator: "/").last.map(String.init) ?? path }
