// `backup --backend`: which session backend stands behind an online backup.
//
//   hotcore      the HotCore daemon of an attachment (attach --via fuse|nbd)
//   dm-snapshot  the kernel's dm-snapshot, driven by a dm session daemon:
//                that of an attachment made with `attach --via dm`, or a
//                transient one spawned here for an existing device-mapper
//                volume (an LVM LV, any dm-linear device) that exits with
//                the session
//   (default)    by what SOURCE is: an attachment uses its own backend; a
//                device-mapper volume that is not attached uses dm-snapshot
//
// The session protocol is the same for both; a dm-snapshot session names a
// snapshot block device that the imager reads with O_DIRECT, instead of an
// NBD export.
import Foundation
import HotControl
import HotCore
import HotErrors
import HotOS

public enum BackupBackend: String, Sendable, CaseIterable {
    case hotcore
    case dmSnapshot = "dm-snapshot"
}

/// The COW store of a transient dm-snapshot daemon.
public struct DMBackupOptions: Sendable {
    public var bufferDir: String?
    public var hbFileBytes: UInt64 = Defaults.hbFileBytes
    public var bufferLimitBytes: UInt64 = Defaults.bufferLimitBytes
    public init() {}
}

/// A transient dm-snapshot daemon to start for one backup.
public struct TransientDMRequest: Sendable {
    public var device: String
    /// The daemon's name: the dm device's name.
    public var name: String
    public var runDir: String
    public var bufferDir: String?
    public var hbFileBytes: UInt64
    public var bufferLimitBytes: UInt64
}

public struct TransientLaunchFailure: Error, CustomStringConvertible {
    /// Refused (bad input, a device that cannot be snapshotted), not failed.
    public var refused: Bool
    public var description: String
    public init(refused: Bool, description: String) { self.refused = refused; self.description = description }
}

/// Starts session daemons for the imager (the CLI gives one: the imager
/// does not know how a daemon process is made).
public protocol TransientSessionLauncher: Sendable {
    /// Starts the daemon and waits until it serves; returns its run directory.
    func launchTransientDM(_ request: TransientDMRequest) throws -> String
}

extension BackupJob {
    /// Refuses a backend that the attachment does not have.
    func checkBackend(_ vol: AttachedVolume) throws {
        guard let b = o.backend else { return }
        let isDM = vol.via == .dm
        if b == .dmSnapshot && !isDM {
            throw BackupFailure(kind: .refused, description: "'\(vol.name)' is attached via \(vol.via.rawValue) (HotCore); --backend dm-snapshot needs a device-mapper volume (attach it with --via dm, or back up a dm device directly)")
        }
        if b == .hotcore && isDM {
            throw BackupFailure(kind: .refused, description: "'\(vol.name)' is attached via dm; its backend is dm-snapshot (drop --backend hotcore)")
        }
    }

    /// What the imager reads during an online backup. A snapshot that
    /// cannot be opened because the session failed meanwhile (a buffer that
    /// overflowed at once: HotCore no longer offers the export, dm removed
    /// the device) is a session failure, said as such.
    func snapshotSource(_ plan: Plan, _ snap: TakenSnapshot, _ session: SessionClient?) throws -> BlockSource {
        do {
            guard let dev = snap.snapshotDevice else { return try NBDSource(uri: plan.volume!.snapshotURI) }
            return try DeviceSource(path: dev, exclusive: false)
        } catch {
            if let st = try? session?.status(), st.session.phase == .failed {
                throw ImagerError(description: "the session failed: \(st.session.failure ?? "unknown reason")", kind: .sessionFailed)
            }
            throw error
        }
    }

    /// An online backup of a device-mapper volume that no daemon serves:
    /// spawns a transient dm-snapshot daemon for it. Nil when SOURCE is not
    /// such a case (the caller goes on with HotCore or offline).
    func resolveDMVolume() throws -> Plan? {
        if o.backend == .hotcore { return nil }
        var device = o.source
        var mount: MountEntry?
        if let me = Mounts.at(mountPoint: o.source) {
            mount = me
            device = me.source
        } else {
            mount = Mounts.of(device: o.source).first
        }
        var st = stat()
        let isBlock = stat(device, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
        let info = isBlock && getuid() == 0 && DeviceMapper.available ? (try? DeviceMapper.info(path: device)) ?? nil : nil
        guard let info else {
            if o.backend == .dmSnapshot {
                let why = !DeviceMapper.available ? "this kernel has no device-mapper (modprobe dm-mod dm-snapshot)"
                    : getuid() != 0 ? "the dm-snapshot backend must run as root"
                    : "\(device) is not a device-mapper device (an LVM LV or a dm-linear device); use 'hotimage attach \(device) --via dm' first"
                throw BackupFailure(kind: .refused, description: why)
            }
            return nil
        }
        // In use (mounted read-write, stacked on, held open): online in auto.
        // A quiet one goes offline below.
        var inUse = mount.map { !$0.readOnly } ?? false
        if !inUse && o.mode == .auto, let u = DeviceUsers.scan(path: device) {
            inUse = !u.active.isEmpty
        }
        guard onlineRequired || (o.mode == .auto && inUse) else { return nil }
        try checkOutput(mount: mount, device: device)
        let dir = try spawnDMDaemon(device: device, name: info.name)
        let vol: AttachedVolume
        do { vol = try SessionClient.locate(runDir: dir) } catch { throw BackupFailure(kind: .failed, description: "\(error)") }
        r.log("\(device) is a device-mapper volume: dm-snapshot session daemon started (log \(dir)/daemon.log)")
        return Plan(daemon: dir, volume: vol, readDevice: vol.protectedDevice, realDevice: nil, mount: mount, online: true, size: vol.size,
                    transient: true)
    }

    /// Starts a transient dm-snapshot daemon through the injected launcher.
    private func spawnDMDaemon(device: String, name: String) throws -> String {
        guard let launcher = o.launcher else {
            throw BackupFailure(kind: .failed, description: "no way to start a dm-snapshot daemon was given (BackupOptions.launcher)")
        }
        let req = TransientDMRequest(device: device, name: name, runDir: o.runDir, bufferDir: o.dm.bufferDir,
                                     hbFileBytes: o.dm.hbFileBytes, bufferLimitBytes: o.dm.bufferLimitBytes)
        do { return try launcher.launchTransientDM(req) } catch let f as TransientLaunchFailure {
            throw BackupFailure(kind: f.refused ? .refused : .failed, description: f.description)
        } catch {
            throw BackupFailure(kind: .failed, description: "starting the dm-snapshot daemon: \(error)")
        }
    }
}
