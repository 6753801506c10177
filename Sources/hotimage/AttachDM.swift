// `attach --via dm` (the foreground daemon) and the hidden `dm-session`
// command that `backup` spawns for an existing device-mapper volume. Both
// run a DMDaemon (HotDaemon/DMDaemon.swift), the watchdog of the
// dm-snapshot backend.
import ArgumentParser
import Foundation
import HotCore
import HotDaemon
import HotImager
import HotOS
import Logging

extension Attach {
    func dmOptions() -> DMDaemonOptions {
        var o = DMDaemonOptions(name: resolvedName)
        o.runDir = paths.runDir
        o.baseDevice = device
        o.bufferDir = bufferDir
        o.hbFileBytes = parseSize(hbFileSize)!
        o.bufferLimitBytes = parseSize(bufferLimit)!
        o.snapshotDeadlineNanos = UInt64(snapshotDeadline * 1e9)
        o.heartbeatTimeoutNanos = UInt64(heartbeatTimeout * 1e9)
        return o
    }

    func runForegroundDM() throws {
        try runDMDaemon(dmOptions(), label: "dm.\(resolvedName)")
    }
}

/// Runs a dm-snapshot daemon in the foreground until it stops.
func runDMDaemon(_ options: DMDaemonOptions, label: String) throws {
    try runInForeground(label: label) { try DMDaemon(options: options, logger: $0) }
}

/// Runs a daemon in this process: signals blocked first, one clear error
/// line (exit 2 for usage), the device path printed once it is usable.
func runInForeground(label: String, make: (Logger) throws -> ForegroundDaemon) throws {
    let signals = SignalWaiter()
    let logger = makeLogger(label)
    let daemon: ForegroundDaemon
    do { daemon = try make(logger) } catch {
        logger.error("\(error)")
        throw CLIExit.fail("\(error)", code: (error as? DaemonError).map { if case .usage = $0 { return 2 } else { return 1 } } ?? 1)
    }
    let dev: String
    do { dev = try daemon.start() } catch {
        logger.error("\(error)")
        throw CLIExit.fail("\(error)")
    }
    print(dev)
    fflush(stdout)
    daemon.waitForShutdown(signals: signals)
}

/// `hotimage dm-session DEVICE`: a transient dm-snapshot daemon for one
/// backup of an existing device-mapper volume (spawned by `backup`; not in
/// the help).
struct DMSessionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dm-session",
        abstract: "Serve one dm-snapshot backup session for a device-mapper volume (used by 'backup').",
        shouldDisplay: false)

    @Argument var device: String
    @Option var name: String
    @Option var bufferDir: String?
    @Option var hbFileSize: String = Defaults.sizeText(Defaults.hbFileBytes)
    @Option var bufferLimit: String = Defaults.sizeText(Defaults.bufferLimitBytes)
    @Option var snapshotDeadline: Double = 60
    @Option var heartbeatTimeout: Double = 10
    @OptionGroup var paths: RunDirOptions

    func run() throws {
        guard let hb = parseSize(hbFileSize), hb > 0, let lim = parseSize(bufferLimit), lim > 0 else {
            throw CLIExit.fail("--hb-file-size and --buffer-limit must be sizes", code: 2)
        }
        var o = DMDaemonOptions(name: name)
        o.runDir = paths.runDir
        o.originDevice = device
        o.transient = true
        o.bufferDir = bufferDir
        o.hbFileBytes = hb
        o.bufferLimitBytes = lim
        o.snapshotDeadlineNanos = UInt64(snapshotDeadline * 1e9)
        o.heartbeatTimeoutNanos = UInt64(heartbeatTimeout * 1e9)
        try runDMDaemon(o, label: "dm.\(name)")
    }
}
