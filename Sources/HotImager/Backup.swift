// `hotimage backup`: the HotBackup routine on Linux.
//
//   resolve SOURCE (attach name, protected device, mount point, device)
//   choose the mode (online: a HotCore session; offline: exclusive read)
//   before-snapshot hooks          (a failure aborts: hookAborted)
//   writers: list components, freeze those on the volume (HotWriters);
//                                  a failure: thaw, after-* hooks,
//                                  writerFreezeFailed
//                                  (or go on crash-consistent with
//                                  --allow-unfrozen, recorded)
//   snapshot: pause, freeze, used-block map minus exclusions, thaw
//   writers: thaw                  (a failure is recorded:
//                                   completeWithWarnings at the end)
//                                  (a failure: after-snapshot and
//                                   after-backup still run; sessionFailed)
//   after-snapshot hooks           (their result is recorded, never stops the backup)
//   the imager streams used clusters into the qcow2 image, archived ranges
//   shrink HotCore's protection, emergency mode when hb files grow
//   finish the image (metadata, checksums), end the session
//   after-backup hooks with the exit code so far
//
// Outcomes (FailureKind; the exit codes are the command line's table):
// nil done; failed reading or writing; refused (usage, a volume mounted
// read-write in offline mode, no HotCore for online mode, the image
// exists); sessionFailed the snapshot or the session (the live volume is
// unharmed); hookAborted a before-snapshot hook; writerFreezeFailed a
// writer could not freeze a component (nothing imaged);
// completeWithWarnings the image is complete but an after-snapshot or
// after-backup hook, or a writer's thaw, failed; interrupted.
import Foundation
import HotControl
import HotCore
import HotErrors
import HotOS
import HotSync
import HotWriters
import QCow2

public enum BackupMode: String, Sendable { case online, auto, offline }

public struct BackupOptions: Sendable {
    public var source: String
    public var output: String
    public var mode: BackupMode = .auto
    public var consistency: Consistency?
    /// --consistency was given on the command line: it asks for online.
    public var consistencyGiven = false
    public var compression: QCow2Compression = .zstd(level: 1)
    public var clusterBits = 16
    public var excludes: [String] = []
    public var hooks = HookSet()
    public var keepPartial = false
    public var overwrite = false
    /// Who may read the image (and a kept partial one): root only, or a group too.
    public var imageAccess = DataFileAccess.ownerOnly
    public var runDir = Defaults.runDir
    public var pauseMs: Double?
    public var imager = ImagerConfig()
    public var toolVersion = "0"
    /// hotcore, dm-snapshot, or nil: by what the source is (Backup+DM.swift).
    public var backend: BackupBackend?
    /// The transient dm-snapshot daemon's COW store (Backup+DM.swift).
    public var dm = DMBackupOptions()
    /// Starts transient dm-snapshot daemons (the CLI gives CLISessionLauncher).
    public var launcher: TransientSessionLauncher?
    /// Writers asked to freeze their components around the snapshot.
    public var writers = WriterConfig()
    /// Go on crash-consistent when a component fails to freeze.
    public var allowUnfrozen = false
    /// --base PREV: an incremental against PREV (Incremental.swift).
    public var base: String?
    /// --full: a full image even with --base.
    public var full = false
    /// --compare: find the changes by digest even when HotCore's map is trusted.
    public var compare = false
    /// The exit code of an outcome (nil: success), for the summary, the
    /// error events and the hooks' HOTIMAGE_ERROR: the caller's table.
    public var exitCode: @Sendable (FailureKind?) -> Int32
    public init(source: String, output: String, exitCode: @escaping @Sendable (FailureKind?) -> Int32) {
        self.source = source
        self.output = output
        self.exitCode = exitCode
    }
}

public struct BackupSummary: Codable, Sendable {
    public var image: String
    public var exitCode: Int32
    public var error: String?
    public var mode: String
    public var consistency: String
    public var mapMethod: String
    public var seconds: Double
    public var snapshotSeconds: Double
    public var usedBytes: UInt64
    public var imagedBytes: UInt64
    public var imageBytes: UInt64
    public var ratio: Double
    public var megabytesPerSecond: Double
    public var cowPeakBytes: UInt64
    public var spillPeakBytes: UInt64
    public var emergencyEpisodes: [EmergencyEpisode]
    public var hooks: [HookResult]
    public var components: [ComponentRecord]
    public var writerErrors: [String]
    public var partialKept: Bool
    /// How long the filesystem stayed frozen (HotCore's FIFREEZE to FITHAW).
    public var freezeSeconds: Double? = nil
    /// The HotCore daemon's peak resident set (VmHWM) at the end of the backup.
    public var daemonPeakRSSBytes: UInt64? = nil
    /// Of that, mapped files (the executable and libraries, locked by mlockall).
    public var daemonFileRSSBytes: UInt64? = nil
    /// An incremental: its link to the base.
    public var chain: ChainRecord? = nil
    /// The image's id (the next incremental's base id).
    public var imageId: String? = nil
}

struct BackupFailure: CodedError {
    var kind: FailureKind
    var description: String
}

/// Finds the daemon directory for an attachment name, a protected device
/// path, or a mount point of a protected device.
public func findDaemon(_ target: String, runDir: String) -> String? {
    let direct = runDir + "/" + target
    if !target.contains("/"), FileManager.default.fileExists(atPath: direct + "/control.sock") { return direct }
    let names = (try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? []
    let mount = Mounts.at(mountPoint: target)
    for n in names.sorted() {
        let d = runDir + "/" + n
        guard FileManager.default.fileExists(atPath: d + "/control.sock"),
              let raw = try? String(contentsOfFile: d + "/device", encoding: .utf8) else { continue }
        let dev = raw.trimmingCharacters(in: .whitespacesAndNewlines)
        if dev == target { return d }
        if let m = mount, Mounts.of(device: dev).contains(where: { $0.mountPoint == m.mountPoint }) { return d }
    }
    // The real device behind an attachment (or another node of it).
    guard target.hasPrefix("/"), let want = DevNum(blockDevice: target) else { return nil }
    for n in names.sorted() {
        let d = runDir + "/" + n
        guard FileManager.default.fileExists(atPath: d + "/control.sock") else { continue }
        if let dev = try? String(contentsOfFile: d + "/device", encoding: .utf8),
           DevNum(blockDevice: dev.trimmingCharacters(in: .whitespacesAndNewlines)) == want { return d }
        if let real = (try? SessionClient.locate(runDir: d))?.realDevice, DevNum(blockDevice: real) == want { return d }
    }
    return nil
}

public final class BackupJob: @unchecked Sendable {
    let o: BackupOptions
    let r: Reporter
    var imager: Imager?
    let m = Monitor()
    var interrupted = false
    var hookResults: [HookResult] = []
    var writers: FreezeSession?
    /// The session while `take` runs: an interrupt drops its connection.
    var taking: SessionClient?
    /// A member of a set: its share of the set's workers and emergency threshold.
    var imagerConfigOverride: ImagerConfig?
    /// A member of a set cancelled by another member's failure.
    var cancelled: String?
    var isInterrupted: Bool { m.withLock { interrupted } }

    public init(options: BackupOptions, reporter: Reporter) {
        o = options
        r = reporter
    }

    /// Called from a signal thread: stop, clean up, exit 130.
    /// Stops the imager (now, or as soon as it starts): a set whose other
    /// member failed.
    func cancelImager(_ why: String) {
        let im = m.withLock { () -> Imager? in cancelled = why; return imager }
        im?.cancel(why)
    }

    /// Whether cancelImager stopped this job (another member failed).
    var wasCancelled: Bool { m.withLock { cancelled != nil } }

    public func interrupt(_ why: String) {
        let s = m.withLock { () -> SessionClient? in interrupted = true; return taking }
        s?.abort()
        imager?.cancel(why)
    }

    struct Plan {
        var daemon: String?
        var volume: AttachedVolume?
        var readDevice: String        // what the imager reads (offline) or the protected device (online)
        var realDevice: String?
        var mount: MountEntry?
        var online: Bool
        var size: UInt64
        /// A dm-snapshot daemon started for this backup (it exits with the session).
        var transient = false
    }

    /// The HotBackup routine (this file's header); the steps are in
    /// Backup+Snapshot.swift and Backup+Image.swift. A step that ends the
    /// backup early throws BackupStop once the hooks that must run have run.
    /// nil: the image is complete and every step succeeded.
    public func run() -> (FailureKind?, BackupSummary?) {
        let t0 = monotonicNanos()
        do throws(BackupStop) {
            let plan = try resolveReporting()
            var inc = try openBase(plan).map { IncrementalState(base: $0) }
            let consistency = consistencyName(plan)
            let ctx = announce(plan, consistency: consistency)
            // 1. before-snapshot: a failure aborts at once.
            try runBeforeSnapshotHooks(ctx)
            let probe = (try? probeFilesystem(path: plan.readDevice)) ?? nil
            let image = try createImage(plan, ctx: ctx, backing: inc?.base.backingName)
            defer { image.partial.release() }
            try freezeWriters(plan, image: image, ctx: ctx)

            // 2. The snapshot (or, offline, the map); the writers thaw at once.
            let tSnap = monotonicNanos()
            var cut = try takeSnapshot(plan, image: image, ctx: ctx)
            let thawFailures = thawWriters()
            recordSnapshot(&cut, since: tSnap, consistency: consistency)

            // 3. after-snapshot: recorded, never stops the backup.
            let after = HookRunner.run(o.hooks, .afterSnapshot, error: 0, context: ctx, stopOnFailure: false, log: hookLog)
            hookResults += after

            // 4. The imager (an incremental: what changed since the base).
            var out: ImagingOutcome
            if inc != nil, let stop = prepareIncremental(&inc!, plan, cut, writer: image.writer) { out = stop } else {
                out = runImager(plan, cut, into: image.writer, incremental: inc)
            }

            // 5. Finish or discard the image; end the session (a complete
            // image's id commits HotCore's change map to this cut).
            var meta = imageMetadata(plan, cut, probe: probe, consistency: consistency, episodes: out.episodes)
            meta.id = UUID().uuidString.lowercased()
            meta.chain = inc.flatMap { chainRecord($0, out) }
            let partialKept = finishImage(image, &out, metadata: meta)
            let daemon = endSession(cut, out, partialKept: partialKept, commit: out.kind == nil ? meta.id : nil)

            // 6. after-backup, with the error code; the summary.
            runAfterBackupHooks(&out, ctx: ctx, afterSnapshot: after, thawFailures: thawFailures)
            let summary = summarize(plan, cut, out, consistency: consistency, partialKept: partialKept, daemon: daemon, since: t0,
                                    chain: meta.chain, imageId: out.kind == nil || out.kind == .completeWithWarnings ? meta.id : nil)
            return (out.kind, summary)
        } catch {
            return (error.kind, nil)
        }
    }

    func hookLog(_ s: String) {
        r.log(s)
    }

    func printSummary(_ s: BackupSummary, _ kind: FailureKind?) {
        var lines = [
            String(format: "summary: %@ in %.1f s (snapshot %.2f s), %@ used, %@ imaged at %.0f MB/s",
                   kind == nil || kind == .completeWithWarnings ? "image complete" : "FAILED", s.seconds, s.snapshotSeconds,
                   formatBytes(s.usedBytes), formatBytes(s.imagedBytes), s.megabytesPerSecond),
            String(format: "summary: image %@ (%.1f%% of the imaged data), COW buffer peak %@ (hb files %@)",
                   formatBytes(s.imageBytes), s.ratio * 100, formatBytes(s.cowPeakBytes), formatBytes(s.spillPeakBytes)),
        ]
        if let c = s.chain {
            lines.append("summary: incremental (\(c.method)) of image \(c.baseId) (\(c.baseFile)): \(c.changedClusters) cluster(s) written, \(c.zeroedClusters) zeroed, \(c.unchangedClusters) left to the base")
        }
        if s.emergencyEpisodes.isEmpty {
            lines.append("summary: no emergency mode")
        } else {
            let t = s.emergencyEpisodes.reduce(0) { $0 + $1.seconds }
            lines.append(String(format: "summary: emergency mode %d time(s), %.1f s in all", s.emergencyEpisodes.count, t))
        }
        if s.freezeSeconds != nil || s.daemonPeakRSSBytes != nil {
            lines.append("summary: " + [s.freezeSeconds.map { String(format: "filesystem frozen %.3f s", $0) },
                                        s.daemonPeakRSSBytes.map { "session daemon peak RSS \(formatBytes($0))"
                                            + (s.daemonFileRSSBytes.map { " (\(formatBytes($0)) of it its program and libraries)" } ?? "") }]
                .compactMap { $0 }.joined(separator: ", "))
        }
        for l in lines { r.log(l) }
    }

    // MARK: resolving the source

    /// Online is asked for: --mode online, or a --consistency given on the
    /// command line (a freeze or a pause only means something online).
    var onlineRequired: Bool { o.mode == .online || o.consistencyGiven }

    func resolve() throws -> Plan {
        if o.mode == .offline && o.consistencyGiven {
            throw BackupFailure(kind: .refused, description: "--consistency applies to online backups; --mode offline reads a quiet volume as it is (drop one of them)")
        }
        // An attachment (by name, protected device, mount point or real
        // device): always through it. Only a session gives a point in time
        // while the volume can be written, and HotCore is already there.
        if let d = findDaemon(o.source, runDir: o.runDir) {
            let vol: AttachedVolume
            do { vol = try SessionClient.locate(runDir: d) } catch { throw BackupFailure(kind: .failed, description: "\(error)") }
            try checkBackend(vol)
            let mount = Mounts.of(device: vol.protectedDevice).first
            let online: Bool
            switch o.mode {
            case .online, .auto: online = true
            case .offline:
                try requireQuiet(vol.protectedDevice, attachment: vol.name)
                online = false
            }
            if online, o.consistency == .freeze, mount == nil {
                throw BackupFailure(kind: .refused, description: "--consistency freeze: \(vol.protectedDevice) holds no mounted filesystem to freeze (use --consistency wip, or leave it out)")
            }
            try checkOutput(mount: mount, device: vol.protectedDevice)
            return Plan(daemon: d, volume: vol, readDevice: vol.protectedDevice, realDevice: vol.realDevice, mount: mount, online: online, size: vol.size)
        }
        // An existing device-mapper volume (LVM LV, dm-linear) online: a transient dm-snapshot daemon.
        if let p = try resolveDMVolume() { return p }
        // Not behind HotCore: a mount point or a device.
        var device = o.source
        var mount: MountEntry?
        if let me = Mounts.at(mountPoint: o.source) {
            mount = me
            device = me.source
        } else {
            mount = Mounts.of(device: o.source).first
        }
        var st = stat()
        guard stat(device, &st) == 0 else {
            throw BackupFailure(kind: .refused, description: "'\(o.source)' is neither an attachment in \(o.runDir), a mount point, nor a device")
        }
        guard (st.st_mode & S_IFMT) == S_IFBLK || (st.st_mode & S_IFMT) == S_IFREG else {
            throw BackupFailure(kind: .refused, description: "\(device) is not a block device or image file")
        }
        if let m = mount, !m.readOnly {
            throw BackupFailure(kind: .refused, description: o.mode == .offline
                ? "\(device) is mounted read-write at \(m.mountPoint): offline mode refuses it (unmount it, or attach it with 'hotimage attach \(device)' and back up online)"
                : "\(device) is mounted read-write at \(m.mountPoint) and not behind HotCore: attach it first (hotimage attach), or unmount it for an offline backup")
        }
        if onlineRequired {
            throw BackupFailure(kind: .refused, description: "\(device) is not behind HotCore: \(o.mode == .online ? "online mode" : "--consistency") needs 'hotimage attach \(device)' first (or --mode offline on a quiet volume)")
        }
        if (st.st_mode & S_IFMT) == S_IFBLK { try requireQuiet(device, attachment: nil) }
        try checkOutput(mount: mount, device: device)
        let size: UInt64
        do {
            let probeDev = try BlockDevice(path: device, readOnly: true, exclusive: false)
            size = probeDev.size
        } catch { throw BackupFailure(kind: .refused, description: "\(error)") }
        return Plan(daemon: nil, volume: nil, readDevice: device, realDevice: nil, mount: mount, online: false, size: size)
    }

    /// Offline needs a quiet volume: nothing mounted read-write, stacked on
    /// it, or holding it open (DeviceUsers). O_EXCL alone does not see a
    /// program that opened the device plainly. A read-only mount is quiet.
    func requireQuiet(_ device: String, attachment: String?) throws {
        guard let usage = DeviceUsers.scan(path: device) else { return }
        var users = usage.active
        // A probe that blkid or udev runs on a new device is gone a moment later.
        if !usage.processes.isEmpty && usage.processes.count == users.count {
            usleep(300_000)
            users = DeviceUsers.scan(path: device)?.active ?? []
        }
        guard !users.isEmpty else { return }
        let what = attachment.map { "back up online through the attachment ('hotimage backup \($0)', the default mode)" }
            ?? "stop them, or put the volume behind HotCore ('hotimage attach \(device)', then use the device it prints) and back up online"
        throw BackupFailure(kind: .refused, description: "\(device) is in use, and offline mode needs a quiet volume: "
            + users.map(\.description).joined(separator: "; ") + ". Either \(what)")
    }

    /// Whether anything began using an offline volume while it was read
    /// (a check before and after; the exclusive open keeps mounts away).
    func usersAppeared(_ plan: Plan) -> String? {
        guard !plan.online, let usage = DeviceUsers.scan(path: plan.readDevice) else { return nil }
        let users = usage.active
        return users.isEmpty ? nil : users.map(\.description).joined(separator: "; ")
    }

    /// The image must not live on the volume being backed up.
    func checkOutput(mount: MountEntry?, device: String) throws {
        let dir = (o.output as NSString).deletingLastPathComponent.isEmpty ? "." : (o.output as NSString).deletingLastPathComponent
        guard FileManager.default.fileExists(atPath: dir) else { throw BackupFailure(kind: .refused, description: "the image directory \(dir) does not exist") }
        if let m = mount, let h = Mounts.holding(path: dir), h.major == m.major && h.minor == m.minor {
            throw BackupFailure(kind: .refused, description: "the image \(o.output) would be written into the volume being backed up (\(m.mountPoint))")
        }
        if !o.overwrite && FileManager.default.fileExists(atPath: o.output) {
            throw BackupFailure(kind: .refused, description: "\(o.output) exists (use --force to overwrite it)")
        }
        if !o.excludes.isEmpty && mount == nil {
            throw BackupFailure(kind: .refused, description: "--exclude needs the filesystem mounted (it reads file extents with FIEMAP); \(device) is not mounted")
        }
    }

    // MARK: maps

    /// Used byte ranges and how they were found.
    func usedMap(_ p: Plan) throws -> ([Range<UInt64>], String) {
        if let mnt = p.mount {
            do {
                let ex = try FSMap.usedExtents(mountPoint: mnt.mountPoint, deviceBytes: p.size)
                return (ex.map { $0.offset..<($0.offset + $0.length) }, "getfsmap")
            } catch {
                // Filesystems without GETFSMAP: every block.
                return ([0..<p.size], "raw")
            }
        }
        if p.mount == nil, !p.online, let fs = try? probeFilesystem(path: p.readDevice), ["ext2", "ext3", "ext4"].contains(fs.type) {
            let m = try ext2UsedExtents(devicePath: p.readDevice)
            if m.needsRecovery {
                throw BackupFailure(kind: .refused, description: "\(p.readDevice): the ext journal needs recovery (mount it once, or run e2fsck) before an offline backup")
            }
            return (m.used, "ext2fs")
        }
        return ([0..<p.size], "raw")
    }

    /// Swap files on the volume (always) and --exclude paths, as device
    /// byte ranges, with what each covered.
    func exclusions(_ p: Plan) throws -> ([Range<UInt64>], [ImageMetadata.Excluded]) {
        guard let mnt = p.mount else { return ([], []) }
        var ranges: [Range<UInt64>] = []
        var list: [ImageMetadata.Excluded] = []
        var mst = stat()
        guard stat(mnt.mountPoint, &mst) == 0 else { return ([], []) }
        func add(_ ex: [FileExtent], path: String, reason: String, files: Int) {
            var bytes: UInt64 = 0
            for e in ex where e.isExcludable {
                ranges.append(e.physical..<(e.physical + e.length))
                bytes += e.length
            }
            list.append(.init(path: path, reason: reason, bytes: bytes, files: files))
        }
        for sw in swapFiles(onDevice: mst.st_dev) {
            add(try fileExtents(path: sw), path: sw, reason: "swap file", files: 1)
        }
        for path in o.excludes {
            let abs = path.hasPrefix("/") ? path : mnt.mountPoint + "/" + path
            var st = stat()
            guard lstat(abs, &st) == 0 else { throw BackupFailure(kind: .refused, description: "--exclude \(path): \(String(cString: strerror(errno)))") }
            guard st.st_dev == mst.st_dev else {
                throw BackupFailure(kind: .refused, description: "--exclude \(path) is not on the volume mounted at \(mnt.mountPoint)")
            }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                let d = try directoryExtents(path: abs)
                add(d.extents, path: abs, reason: "--exclude", files: d.files)
            } else if (st.st_mode & S_IFMT) == S_IFREG {
                add(try fileExtents(path: abs), path: abs, reason: "--exclude", files: 1)
            }
        }
        return (RangeSet.normalize(ranges), list)
    }
}
