// What a session backend does; SessionDaemon does everything else.
//
//   SessionDaemon (run directory, lock, control server, session owner,
//   │              freeze and thaw, ticker, shutdown, status)
//   ├─ HotCoreBackend   the SnapshotEngine in userspace: NBD server, hb
//   │                   files, movers; the device presented by a Frontend
//   │                   (FuseFrontend: nbdfuse + loop; KernelNBDFrontend)
//   └─ DMBackend        the kernel's dm-snapshot: the snapshot stack over
//                       an origin, the COW store's growth watchdog
//
// The daemon calls a backend from the control handler threads and from its
// ticker; a backend locks its own state. Freezing is the daemon's: a backend
// gets a `freeze` closure in `begin` and calls it at the moment its cut needs
// the filesystem frozen (HotCore after a write pause, dm before the suspend).
import HotControl
import HotCore
import HotOS

/// A `begin` as the daemon hands it to a backend (checked: the consistency
/// is one the backend takes; freeze has a mount point on the protected device).
public struct BeginRequest: Sendable {
    public var consistency: Consistency
    public var mountPoint: String?
    /// The write-inactivity pause the client asked for (HotCore).
    public var pauseNanos: UInt64?
    /// A set cut: writes wait from arm until map (HotCore); a backend that
    /// cannot hold refuses unless the freeze does it.
    public var hold = false
}

/// A session that is armed: the cut is taken.
public struct BeginOutcome: Sendable {
    public var armedAtNanos: UInt64
    public var frozen: Bool
    /// HotCore: the NBD export of the snapshot.
    public var snapshotURI: String?
    /// dm-snapshot: the snapshot block device.
    public var snapshotDevice: String?
}

/// Why a session did not begin. `keepsOwner`: the session exists (failed)
/// and the client still owns it (it ends it); else the claim is undone.
public struct BeginRefusal: Error, CustomStringConvertible {
    public var description: String
    public var keepsOwner: Bool
}

/// What the used map did.
public enum MapOutcome: Sendable {
    /// `changes`: HotCore's change map up to this cut (nil: not tracked).
    case protecting(usedBlocks: UInt64, changes: ChangeInfo?)
    /// wip only: writes landed while the map was read; begin again.
    case retry(writes: UInt64)
}

/// What a tick found.
public enum BackendEvent: Equatable, Sendable {
    /// The session failed; the client learns why from status.
    case failed(String)
    /// The client stopped heart-beating: back to idle, the owner is gone.
    case dropped(String)
    /// A transient daemon has nothing more to do.
    case exit(String)
}

public protocol SessionBackend: AnyObject, Sendable {
    var via: SessionVia { get }
    /// The device the admin named (the real device, or the dm origin).
    var device: String { get }
    var sizeBytes: UInt64 { get }
    var blockSize: Int { get }
    /// The consistencies this backend can take, in the words of a refusal.
    func refusal(of consistency: Consistency) -> String?
    /// Devices the buffer directory must not be on, besides the protected device.
    var guardedDevices: [String] { get }
    var phase: SessionPhase { get }
    /// HotCore: the snapshot export, for `hello`.
    var snapshotURI: String? { get }

    /// Starts serving and sets the process up (before the daemon locks its
    /// memory); nothing is presented yet.
    func prepare() throws
    /// Presents the protected device; returns its path.
    func start() throws -> String
    /// Undoes `start`; the session has been ended.
    func stop()
    /// Why the protected device cannot go away now, beyond what the daemon checks.
    func detachRefusal() -> String?

    func begin(_ req: BeginRequest, freeze: (String) throws -> Void) -> Result<BeginOutcome, BeginRefusal>
    func map(used: [Range<UInt64>], excluded: [Range<UInt64>]) throws -> MapOutcome
    func archived(_ ranges: [Range<UInt64>]) throws -> UInt64
    func buffered(limit: Int) -> [Range<UInt64>]
    func heartbeat()
    /// Ends the session (any phase) and drops what it holds.
    func end()
    /// The same; with `commit` (an image id), a session that reached
    /// protecting commits its cut to the change map (HotCore). Returns
    /// whether it did.
    func end(commit: String?) -> Bool
    /// HotCore: changed-block tracking for status.
    var tracking: TrackingStatus? { get }
    /// Deadlines and watchdogs; called about every 100 ms.
    func tick() -> [BackendEvent]
    /// How soon the ticker should call again, in microseconds.
    var tickInterval: UInt32 { get }

    /// The session in shared terms and the backend's own part of `status`,
    /// read once.
    func status(bufferLimitBytes: UInt64) -> (SessionStatus, BackendDetail)
}

/// What `status` says of one backend beyond the session.
public enum BackendDetail: Sendable {
    case hotCore(engine: EngineStatus, nbdSocket: String, snapshotURI: String, connections: Int, reads: ReadCounters)
    case dm(DMSessionStatus)
}

extension SessionBackend {
    /// A backend without change tracking (dm) never commits.
    func end(commit: String?) -> Bool { end(); return false }
    var tracking: TrackingStatus? { nil }
}
