// hotimage: the command line. Commands are thin: they parse, validate and
// call the daemon or the control protocol; errors become one line on
// stderr and a documented exit code.
import ArgumentParser
import Foundation
import HotControl
import HotCore
import HotDaemon
import HotImager
import HotOS
import Logging

@main
struct HotImage: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hotimage",
        abstract: "Online block-level imaging of live Linux filesystems.",
        discussion: """
        HotCore, the write interceptor, stands in front of a block device as a \
        userspace NBD proxy ('attach'). While idle it passes I/O through; during a \
        backup session it keeps a point-in-time view of the used blocks by \
        copy-on-write and serves it as the read-only NBD export "snapshot". \
        'backup' images the used blocks into a compressed qcow2 file that qemu-img \
        and every virtualisation tool read; 'restore' writes it back.

        Typical use (as root):
          hotimage attach /dev/sdb1 --name data   # prints the protected device
          mount /dev/loop3 /srv/data              # use it (here /dev/loop3) now
          hotimage backup data -o /backup/data.qcow2   # online, apps writing
          hotimage verify /backup/data.qcow2
          hotimage restore /backup/data.qcow2 /dev/sdc1
          hotimage snapshot data -- \\
              nbdcopy '$HOTIMAGE_SNAPSHOT_URI' /backup/data.raw
          hotimage status data
          umount /srv/data && hotimage detach data

        \(ExitCodes.help(ExitCodes.overview, title: "EXIT CODES (each command's help lists its own)"))
        """,
        version: hotimageVersion,
        subcommands: [Attach.self, Detach.self, Status.self, Snapshot.self,
                      BackupCommand.self, RestoreCommand.self, InfoCommand.self, VerifyCommand.self, MergeCommand.self,
                      VMCommand.self, WritersCommand.self, WriterExecCommand.self])

    /// As ParsableCommand's, but usage errors exit with the usage kind's code
    /// (2, documented) instead of ArgumentParser's 64.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error).rawValue == 64 {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(ExitCodes.code(.usage))
            }
            exit(withError: error)
        }
    }
}

/// Options every command that talks to a daemon shares.
struct RunDirOptions: ParsableArguments {
    @Option(name: .customLong("run-dir"), help: ArgumentHelp("Directory of the daemons' sockets.", valueName: "dir"))
    var runDir: String = Defaults.runDir
}

/// Parses 64M, 1G, 512K, 4096 (bytes; binary multiples).
func parseSize(_ s: String) -> UInt64? {
    let t = s.trimmingCharacters(in: .whitespaces).uppercased()
    var digits = t
    var mult: UInt64 = 1
    for (suffix, m) in [("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
                        ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40), ("B", 1)] as [(String, UInt64)] {
        if t.hasSuffix(suffix) { digits = String(t.dropLast(suffix.count)); mult = m; break }
    }
    guard let v = UInt64(digits), v <= UInt64.max / mult else { return nil }
    return v * mult
}

func makeLogger(_ label: String, level: Logger.Level = .info) -> Logger {
    LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
    var l = Logger(label: label)
    l.logLevel = level
    return l
}

/// Finds the daemon directory for a name, a protected device or a mount point.
func daemonDir(_ target: String, runDir: String) -> String? { findDaemon(target, runDir: runDir) }
