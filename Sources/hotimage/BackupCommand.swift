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
          hotimage backup /dev/sdc1 --mode offline -o /backup/sdc1.qcow2
          hotimage backup /dev/vg0/home -o /backup/home.qcow2 \\
              --backend dm-snapshot --buffer-dir /var/tmp/hb
        """)

    @Argument(help: "Attachment name, protected or real device, mount point, or (offline) a quiet device.")
    var source: String

    @Option(name: [.customShort("o"), .long], help: ArgumentHelp("The qcow2 image to write.", valueName: "image"))
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

    @OptionGroup var paths: RunDirOptions

    func validate() throws {
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
    }

    func run() throws {
        let cfg: HotimageConfig
        do {
            cfg = try HotimageConfig.load(path: config ?? HotimageConfig.defaultPath, required: config != nil)
        } catch { throw CLIExit.fail(.usage, "\(error)") }
        var o = BackupOptions(source: source, output: output, exitCode: { ExitCodes.code($0) })
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
        o.writers.quietUnavailable = !verbose
        let reporter: Reporter = json ? JSONReporter() : TerminalReporter()
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

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Write an image back to a block device or file.",
        discussion: """
        Verifies IMAGE (every checksum) and refuses a damaged one before touching \
        TARGET; then writes every allocated cluster of IMAGE to TARGET, discards (or zeroes) \
        the rest so TARGET reads exactly as the imaged volume, and flushes. A TARGET \
        that does not exist is created as a file of the volume's size.

        Refuses: an incomplete image (kept by --keep-partial), a mounted or busy \
        target, a target smaller than the volume, a target that already holds a \
        filesystem (unless --force).

        Files that writers handed over when they thawed (PostgreSQL's backup label, \
        as backup_label.hotimage in the data directory) are kept in \
        the image, and so are the files writers mark to leave out (PostgreSQL's \
        postmaster.pid and postmaster.opts); once the volume is written, TARGET is \
        mounted in a private directory (through a loop device if it is a file), the \
        former are written at their place, owned like their directory, mode 0600, the \
        latter removed (regular files on the imaged volume only), and TARGET is \
        unmounted (--no-writer-files skips this; 'hotimage info' shows them).

        \(ExitCodes.help(ExitCodes.restore))
        """)

    @Argument(help: "The qcow2 image.") var image: String
    @Argument(help: "Block device or file to write.") var target: String
    @Flag(help: "Overwrite a target that holds a filesystem.") var force = false
    @Flag(help: "Leave unused space as it is (faster on a target known to read as zeros).") var noDiscard = false
    @Flag(help: "Skip verifying the image before writing (faster; a damaged image is then noticed only where decompression fails).") var noVerify = false
    @Flag(help: "Do not write the writers' files (e.g. PostgreSQL's backup_label) into the restored filesystem, nor remove the files they leave out (postmaster.pid).") var noWriterFiles = false
    @Flag(help: "Print the summary as JSON on stdout.") var json = false

    func run() throws {
        var o = RestoreOptions(image: image, target: target)
        o.verifyFirst = !noVerify
        o.writerFiles = !noWriterFiles
        o.force = force
        o.discard = !noDiscard
        let r = TerminalReporter(quiet: json)
        do {
            let s = try RestoreJob.run(o, reporter: r)
            if json { printJSON(s) } else {
                r.log(String(format: "restored %@ (%llu clusters) to %@ in %.1f s; %@ of unused space %@", formatBytes(s.bytes),
                             s.clusters, s.target, s.seconds, formatBytes(s.zeroedBytes), s.discarded ? "discarded" : "left as it was"))
            }
        } catch let e as RestoreFailure {
            throw CLIExit.fail(e.kind, e.description)
        }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show what an image holds: size, compression, source, filesystem, snapshot.",
        discussion: """
        \(ExitCodes.help(ExitCodes.info))
        """)

    @Argument(help: "The qcow2 image.") var image: String
    @Flag(help: "Print JSON on stdout.") var json = false

    func run() throws {
        let info: ImageInfo
        do { info = try ImageInfo.read(image) } catch { throw CLIExit.fail(.failed, "\(error)") }
        if json { printJSON(info) } else { print(info.text, terminator: "") }
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every stored byte of an image against its checksums.",
        discussion: """
        Checks the qcow2 structures (header, L1/L2 tables, refcounts, as qemu-img \
        check does) and hotimage's checksums of the metadata and of every cluster \
        (each is decompressed); names the guest region of each problem.

        \(ExitCodes.help(ExitCodes.verify))
        """)

    @Argument(help: "The qcow2 image.") var image: String
    @Flag(help: "Print the report as JSON on stdout.") var json = false

    func run() throws {
        let rep: VerifyOutcome
        do { rep = try VerifyOutcome.run(image) } catch { throw CLIExit.fail(.refused, "\(error)") }
        if json { printJSON(rep) } else {
            for n in rep.notes { print("note: \(n)") }
            for p in rep.problems { print("problem: \(p)") }
            print(rep.problems.isEmpty ? "\(image): OK, \(rep.clustersChecked) clusters checked in \(String(format: "%.1f", rep.seconds)) s"
                                       : "\(image): \(rep.problems.count) problem(s)")
        }
        if !rep.problems.isEmpty { throw CLIExit.status(.failed) }
    }
}

func printJSON<T: Encodable>(_ v: T) {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    if let d = try? e.encode(v) { print(String(decoding: d, as: UTF8.self)) }
}
