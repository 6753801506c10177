import ArgumentParser
import Foundation
import HotControl
import HotCore
import HotDaemon
import HotErrors
import HotImager
import HotOS
import HotWriters
import QCow2

struct BackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up a volume, online or offline, into a qcow2 image.",
        discussion: """
        SOURCE is an attachment name, the protected device that 'attach' printed, \
        the device behind an attachment, a mount point, or a device or image \
        file for an offline backup.

        MODES (chosen by what uses the volume, not by whether it is mounted)
          online   a session: a write-inactivity pause, a freeze (or the pause
                   alone with --consistency wip), the used-block map, then
                   copy-on-write of the used blocks while the image is
                   written; applications keep writing. Without a mounted
                   filesystem the cut is taken at a pause and every block is
                   imaged (raw map).
          offline  the volume is read directly, without a session, and must
                   be quiet: O_EXCL succeeds, and nothing is mounted
                   read-write, stacked (loop, dm, md) or open (any process,
                   from /proc/PID/fd) on the device, a partition of it, or
                   anything stacked on it. Otherwise it is refused (exit \(ExitCodes.code(.refused))),
                   naming the processes or holders. A read-only mount is
                   quiet. Uses that begin while it is read fail the backup.
          auto     (default) an attached volume: online, mounted or not, as
                   only a session gives one point in time while a program
                   may write. A device or LV in use (mounted read-write, or
                   held open): online through dm-snapshot for a dm device,
                   else refused with what to do. A quiet one: offline.
        --consistency (freeze or wip) asks for online; with --mode offline it
        is a usage error (exit \(ExitCodes.code(.usage))). A whole disk whose partition is mounted is
        in use.

        BACKENDS (online; --backend, default: by what SOURCE is)
          hotcore      HotCore, the userspace interceptor of 'attach' (--via fuse or
                       nbd): protects only used blocks, and each block only until
                       it is in the image (the protected area shrinks as the
                       backup goes).
          dm-snapshot  the kernel's dm-snapshot, for a device-mapper volume: an
                       attachment made with 'attach --via dm', or any LVM LV or
                       dm-linear device given directly (a session daemon is started
                       for it and exits with the backup). The filesystem is frozen,
                       the device suspended and switched to snapshot-origin, and the
                       imager reads used blocks from /dev/mapper/hotimage-NAME-snap.
                       Every chunk written during the backup is copied once into a
                       copy-on-write store of hb_NN.tmp files in --buffer-dir, which
                       grows by --hb-file-size up to --buffer-limit and cannot shrink;
                       if it overflows the snapshot is dropped and the backup fails
                       (exit \(ExitCodes.code(.sessionFailed))), the live volume untouched. If this process dies or
                       stops heart-beating, the snapshot and its files are removed
                       within 10 s. --consistency wip is HotCore's only.

        COHERENT SETS (two or more SOURCEs, -o DIR)
          One point in time for several volumes, whatever backend each is
          behind (HotCore fuse or nbd, dm-snapshot; a quiet volume offline).
          DIR is created if missing and must hold no images; each volume
          becomes DIR/NAME.qcow2 (NAME: the attachment name, else the device's
          name; a clash gets -2, -3…), and every image records the set: its id,
          the members (name, source, device, size, filesystem UUID) and the
          one cut time ('hotimage info DIR', 'verify DIR', 'restore DIR').
          Hooks run once (HOTIMAGE_VOLUMES lists every member, HOTIMAGE_IMAGE
          is DIR); writers are asked once with every member's mount point, so
          a component spread over the set is covered whole and frozen once.
          The cut: a write-inactivity pause common to all members (a write to
          any restarts the wait; skipped when writers froze components and
          every member is frozen), then every filesystem frozen and every
          member armed (HotCore holds an unmounted member's new writes until all are
          armed), the maps read, all thawed. The 60 s snapshot deadline covers
          the set. All or nothing: a member that fails, before or after the
          cut, fails the set (exit \(ExitCodes.code(.sessionFailed))), every member released and every image
          removed; --keep-partial keeps them all, the failed marked incomplete.
          The imagers run side by side and share --workers. A dm-snapshot
          member must hold a mounted filesystem (its freeze holds the cut).
          --exclude takes absolute paths in a set.

        INCREMENTALS (--base PREV)
          The image holds only the clusters that differ from PREV's point in
          time; PREV becomes its qcow2 backing file (its file name when both
          are in one directory, else its absolute path), so qemu-img, qemu
          and libvirt read the chain as one disk. Clusters PREV holds that
          the volume no longer uses are zero clusters: the chain carries no
          stale data. Every image records its id; an incremental records its
          base's id and cut, and how the changes were found:
            tracked   HotCore marks every cluster written, trimmed or zeroed
                      while attached; at each cut the map is handed over
                      with the cut. It is used when it continues from
                      PREV's cut and is trusted: kept across a clean
                      detach/attach in the same boot when nothing wrote the
                      device meanwhile ('hotimage status' shows it). Only
                      changed clusters are read.
            compared  anything else (the map untrusted after a crash or a
                      change while detached, PREV not the last backup of
                      this attachment, dm-snapshot, offline): every used
                      cluster is read and only those whose digest (XXH3-128,
                      stored per cluster in every image) differs from PREV's
                      are written. Slower to read, never wrong.
          PREV must be a complete hotimage image of this volume (same size,
          cluster size and filesystem UUID); otherwise refused (exit \(ExitCodes.code(.refused))).
          For a set, --base DIR names the previous set's directory: each
          member's base is DIR/NAME.qcow2. --full makes a full image even
          with --base (a schedule's weekly full); --compare compares even when
          the map is trusted. 'hotimage info' shows the
          chain, 'verify' checks every link (by id, and every cluster's
          digest through the chain), 'restore' restores the newest link, and
          'merge' folds a link into its base.

        WHAT IS IMAGED
          Mounted ext4/XFS (and any filesystem with FS_IOC_GETFSMAP): the used blocks.
          Unmounted ext2/3/4: the used blocks from libext2fs. Anything else:
          every block ("raw"), said in the output. Swap files on the volume are
          always left out; --exclude leaves out a file or directory (its
          extents, read with FIEMAP).
          The image records what was left out. Unused blocks stay unallocated.

        HOOKS (also from the configuration file; run by /bin/sh -c)
          --before-snapshot CMD   a failure aborts the backup (exit \(ExitCodes.code(.hookAborted)))
          --after-snapshot CMD    runs after the snapshot, or after a failed one
          --after-backup CMD      runs last, with HOTIMAGE_ERROR set
          Environment: HOTIMAGE_PHASE, HOTIMAGE_ERROR, HOTIMAGE_VOLUMES,
          HOTIMAGE_FREEZE (yes|no), HOTIMAGE_IMAGE. A failing after-snapshot or
          after-backup hook does not stop the backup (exit \(ExitCodes.code(.completeWithWarnings)) if all else worked).

        WRITERS (application consistency; 'hotimage writers' lists them)
          Before the snapshot of a mounted volume, every writer is asked which of
          its components (libvirt guests, containers, PostgreSQL clusters, and
          the sites' own writers in /etc/hotimage/writers.d) keep files on it;
          those fully or partially covered are frozen, all writers in parallel,
          each within --writer-timeout: guests through their agent or by managed
          save, containers with cgroup.freeze, PostgreSQL with pg_backup_start.
          They are thawed as soon as the snapshot is taken. The image records,
          per component, its coverage, how it was frozen and thawed, and files
          the restore needs (PostgreSQL's backup_label).
          A component that cannot be frozen (an error, a writer that hangs and
          is killed) aborts the backup before anything is imaged (exit \(ExitCodes.code(.writerFreezeFailed)); what
          was frozen is thawed, after-snapshot and after-backup hooks run), or
          with --allow-unfrozen the backup goes on crash-consistent for it,
          recorded. A failed thaw is reported and recorded; the filesystem is
          thawed regardless; the backup exits \(ExitCodes.code(.completeWithWarnings)). If hotimage dies while
          components are frozen, each writer sees its input close and thaws.
          --writers none     no writers (the filesystem freeze alone)
          --writers LIST     only these, e.g. containers,postgresql
          --writer-setting   a built-in's setting: container=CGROUP [ROOT],
                             container-freeze-wait, libvirt-uri, vm-wait,
                             vm-cdrom-counts, vm-resume-wait, postgresql-…

        CONFIGURATION FILE (/etc/hotimage/hotimage.conf, or --config)
          key = value lines: before-snapshot, after-snapshot, after-backup
          (repeatable), hook-timeout, compress, consistency (for online
          backups), exclude (repeatable), writers, writer-timeout,
          allow-unfrozen, freeze-partial (yes: freeze partially covered
          components too, the default), writers-dir, and the writers'
          settings (container, vm-…, libvirt-…, postgresql-…). Command-line
          options come after (hooks, settings) or override (the rest) the
          file.

        OUTPUT
          A progress bar on a terminal (bytes, rate, ETA, COW buffer fill,
          mode), a summary at the end (time, used bytes, image bytes, ratio,
          COW peak, emergency episodes). --json prints one JSON object per
          line on stdout instead (events start, snapshot, log, progress,
          summary, error; snapshot carries the cut on CLOCK_MONOTONIC).
          The image is mode 0600 whatever the umask; --group G: 0640, group G.

        \(ExitCodes.help(ExitCodes.backup))
        On failure the partial image is removed, or kept with --keep-partial and
        marked incomplete (restore refuses it).

        Examples:
          hotimage backup data -o /backup/data.qcow2
          hotimage backup /srv/db -o /backup/db.qcow2 \\
              --before-snapshot 'psql -c checkpoint'
          hotimage backup data -o /backup/data-2.qcow2 --base /backup/data.qcow2
          hotimage backup /dev/sdc1 --mode offline -o /backup/sdc1.qcow2
          hotimage backup vmdisks /srv/vmconf -o /backup/vm-2026-12-06
          hotimage backup /dev/vg0/home -o /backup/home.qcow2 \\
              --backend dm-snapshot --buffer-dir /var/tmp/hb
        """)

    @Argument(help: ArgumentHelp("Attachment name, protected or real device, mount point, or (offline) a quiet device; two or more: a coherent set.", valueName: "source"))
    var sources: [String]

    @Option(name: [.customShort("o"), .long], help: ArgumentHelp("The qcow2 image to write; for a set, the directory of the images.", valueName: "image|dir"))
    var output: String

    @Option(help: "online, auto or offline.")
    var mode: String = "auto"

    @Option(help: "freeze (default when mounted) or wip (the write-inactivity pause alone); implies online.")
    var consistency: String?

    @Option(help: ArgumentHelp("zstd[:LEVEL] (default zstd:1), zlib[:LEVEL] or none.", valueName: "method"))
    var compress: String?

    @Option(help: ArgumentHelp("qcow2 cluster size: 4K to 2M, a power of two.", valueName: "size"))
    var clusterSize: String = "64K"

    @Option(help: ArgumentHelp("Leave out a file or directory on the volume (repeatable).", valueName: "path"))
    var exclude: [String] = []

    @Option(help: ArgumentHelp("Hook run before the snapshot (repeatable).", valueName: "cmd"))
    var beforeSnapshot: [String] = []

    @Option(help: ArgumentHelp("Hook run after the snapshot (repeatable).", valueName: "cmd"))
    var afterSnapshot: [String] = []

    @Option(help: ArgumentHelp("Hook run at the end (repeatable).", valueName: "cmd"))
    var afterBackup: [String] = []

    @Option(help: ArgumentHelp("Kill a hook after this many seconds (a failure).", valueName: "seconds"))
    var hookTimeout: Double?

    @Option(help: ArgumentHelp("Configuration file (default /etc/hotimage/hotimage.conf if it exists).", valueName: "file"))
    var config: String?

    @Flag(help: "On failure keep the partial image, marked incomplete.")
    var keepPartial = false

    @Flag(help: "Overwrite an existing image file.")
    var force = false

    @Option(help: ArgumentHelp("Let this group read the image too (mode 0640, owner root); default: root only (0600).", valueName: "group"))
    var group: String?

    @Flag(help: "Also say what is not on this host (no libvirt, no PostgreSQL, no containers).")
    var verbose = false

    @Flag(help: "One JSON event per line on stdout.")
    var json = false

    @Option(help: "Write-inactivity pause in ms (default: the daemon's; none when writers froze components and the filesystem is frozen).")
    var pauseMs: Double?

    @Option(help: "Imager threads (reading and compressing).")
    var workers: Int = 4

    @Option(help: ArgumentHelp("Emergency mode when the hb files pass this size (default \(Defaults.sizeText(Defaults.emergencyBytes))).", valueName: "size"))
    var emergencyAt: String?

    @Option(help: ArgumentHelp("Read at most this much per second, e.g. 50M (default: no limit).", valueName: "size"))
    var maxRate: String?

    @Option(help: ArgumentHelp("hotcore or dm-snapshot (default: by what SOURCE is).", valueName: "backend"))
    var backend: String?

    @Option(help: ArgumentHelp("dm-snapshot of a volume given directly: directory of the hb_NN.tmp COW files (default \(Defaults.bufferDirHelp)).", valueName: "dir"))
    var bufferDir: String?

    @Option(help: ArgumentHelp("dm-snapshot: size of each hb file; the COW store grows by this much.", valueName: "size"))
    var hbFileSize: String = Defaults.sizeText(Defaults.hbFileBytes)

    @Option(help: ArgumentHelp("dm-snapshot: the COW store's largest size.", valueName: "size"))
    var bufferLimit: String = Defaults.sizeText(Defaults.bufferLimitBytes)

    @Option(help: ArgumentHelp("Writers to ask: all (default), none, or a comma-separated list of names.", valueName: "list"))
    var writers: String?

    @Option(help: ArgumentHelp("Seconds each writer has to freeze, and again to thaw (default 60).", valueName: "seconds"))
    var writerTimeout: Double?

    @Flag(help: "Go on crash-consistent when a component fails to freeze (recorded in the image).")
    var allowUnfrozen = false

    @Option(help: ArgumentHelp("A setting for the built-in writers, e.g. vm-wait=120 (repeatable).", valueName: "key=value"))
    var writerSetting: [String] = []

    @Option(help: ArgumentHelp("Directory of the external writers (default /etc/hotimage/writers.d).", valueName: "dir"))
    var writersDir: String?

    @Option(help: ArgumentHelp("An incremental: only what changed since this image (a set: the previous set's directory).", valueName: "prev"))
    var base: String?

    @Flag(help: "A full image, even with --base.")
    var full = false

    @Flag(help: "With --base: find the changes by comparing every used cluster's digest, even when HotCore's change map is trusted.")
    var compare = false

    @OptionGroup var paths: RunDirOptions

    func validate() throws {
        if sources.isEmpty { throw ValidationError("give the volume to back up (SOURCE), or two or more for a set") }
        if sources.count > 1 {
            if force { throw ValidationError("--force does not apply to a set: its directory must hold no images") }
            if let bad = exclude.first(where: { !$0.hasPrefix("/") }) {
                throw ValidationError("--exclude \(bad): in a set, give absolute paths (each is left out of the member mounted there)")
            }
        }
        if let b = backend, BackupBackend(rawValue: b) == nil { throw ValidationError("--backend must be hotcore or dm-snapshot") }
        for (flag, v) in [("--hb-file-size", hbFileSize), ("--buffer-limit", bufferLimit)] {
            guard let n = parseSize(v), n >= 1 << 20, n % 4096 == 0 else { throw ValidationError("\(flag) '\(v)' is not a size of at least 1M in 4K units") }
        }
        if let r = maxRate, (parseSize(r) ?? 0) == 0 { throw ValidationError("--max-rate: not a size: \(r)") }
        if BackupMode(rawValue: mode) == nil { throw ValidationError("--mode must be online, auto or offline") }
        if let c = consistency, c != "freeze" && c != "wip" { throw ValidationError("--consistency must be freeze or wip") }
        if consistency != nil && mode == "offline" {
            throw ValidationError("--consistency applies to online backups; --mode offline reads a quiet volume as it is (drop one of them)")
        }
        if let c = compress { do { _ = try QCow2Compression(parsing: c) } catch { throw ValidationError("--compress: \(error)") } }
        guard let cs = parseSize(clusterSize), cs >= 4096, cs <= 2 << 20, cs & (cs - 1) == 0 else {
            throw ValidationError("--cluster-size must be a power of two from 4K to 2M")
        }
        if workers < 1 || workers > 64 { throw ValidationError("--workers must be 1...64") }
        if let e = emergencyAt, parseSize(e) == nil { throw ValidationError("--emergency-at: not a size: \(e)") }
        if let t = writerTimeout, !(t > 0) { throw ValidationError("--writer-timeout must be seconds > 0") }
        do { _ = try WriterSettings.parse(arguments: writerSetting) } catch { throw ValidationError("--writer-setting: \(error)") }
        if let g = group, groupID(named: g) == nil { throw ValidationError("--group: no such group: \(g)") }
        if full && compare { throw ValidationError("--compare applies to an incremental; --full makes a full image (drop one of them)") }
        if base == nil && compare { throw ValidationError("--compare needs --base (the image to compare against)") }
    }

    func run() throws {
        let cfg: HotimageConfig
        do {
            cfg = try HotimageConfig.load(path: config ?? HotimageConfig.defaultPath, required: config != nil)
        } catch { throw CLIExit.fail(.usage, "\(error)") }
        var o = BackupOptions(source: sources[0], output: output, exitCode: { ExitCodes.code($0) })
        o.mode = BackupMode(rawValue: mode)!
        // --consistency asks for online; the configuration file's is a default
        // for online backups and does not apply offline.
        if let c = consistency ?? (o.mode == .offline ? nil : cfg.consistency) { o.consistency = Consistency(rawValue: c) }
        o.consistencyGiven = consistency != nil
        do { o.compression = try QCow2Compression(parsing: compress ?? cfg.compress ?? "zstd:1") } catch {
            throw CLIExit.fail(.usage, "compress: \(error)")
        }
        o.clusterBits = parseSize(clusterSize)!.trailingZeroBitCount
        o.excludes = cfg.excludes + exclude
        o.hooks = cfg.hooks
        o.hooks.add(.beforeSnapshot, beforeSnapshot)
        o.hooks.add(.afterSnapshot, afterSnapshot)
        o.hooks.add(.afterBackup, afterBackup)
        if let t = hookTimeout { o.hooks.timeoutSeconds = t }
        o.keepPartial = keepPartial
        o.overwrite = force
        o.imageAccess = DataFileAccess(group: group.flatMap(groupID(named:)))
        o.runDir = paths.runDir
        o.pauseMs = pauseMs
        o.imager.workers = workers
        if let e = emergencyAt { o.imager.emergencyBytes = parseSize(e)! }
        if let r = maxRate { o.imager.maxBytesPerSecond = parseSize(r)! }
        o.toolVersion = hotimageVersion
        o.backend = backend.flatMap(BackupBackend.init(rawValue:))
        o.dm.bufferDir = bufferDir
        o.launcher = CLISessionLauncher()
        o.dm.hbFileBytes = parseSize(hbFileSize)!
        o.dm.bufferLimitBytes = parseSize(bufferLimit)!
        o.writers = cfg.writers
        if let w = writers { o.writers.selection = WriterSelection(parsing: w) }
        if let t = writerTimeout { o.writers.timeout = t }
        if let d = writersDir { o.writers.directory = d }
        o.writers.settings.pairs += try! WriterSettings.parse(arguments: writerSetting).pairs
        o.allowUnfrozen = allowUnfrozen || cfg.allowUnfrozen
        o.base = base
        o.full = full
        o.compare = compare
        o.writers.quietUnavailable = !verbose
        let reporter: Reporter = json ? JSONReporter() : TerminalReporter()
        if sources.count > 1 {
            let job = SetBackupJob(sources: sources, options: o, reporter: reporter)
            let signals = SignalWaiter()
            Threads.start(name: "signals") {
                while true {
                    if let s = signals.wait(timeoutSeconds: 1) { job.interrupt("interrupted by signal \(s)") }
                }
            }
            let (outcome, _) = job.run()
            if outcome != nil { throw CLIExit.status(outcome) }
            return
        }
        let job = BackupJob(options: o, reporter: reporter)
        let signals = SignalWaiter()
        Threads.start(name: "signals") {
            while true {
                if let s = signals.wait(timeoutSeconds: 1) {
                    job.interrupt("interrupted by signal \(s)")
                }
            }
        }
        let (outcome, _) = job.run()
        if outcome != nil { throw CLIExit.status(outcome) }
    }
}
