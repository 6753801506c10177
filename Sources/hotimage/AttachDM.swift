// `attach --via dm` (a dm-linear device over DEVICE, or with --once a
// transient daemon for one backup of an existing dm device) and the
// foreground run every daemon goes through (SessionDaemon, HotDaemon).
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
        if once {
            o.originDevice = device
            o.transient = true
        } else {
            o.baseDevice = device
        }
        o.bufferDir = bufferDir
        o.hbFileBytes = parseSize(hbFileSize)!
        o.bufferLimitBytes = parseSize(bufferLimit)!
        o.snapshotDeadlineNanos = UInt64(snapshotDeadline * 1e9)
        o.heartbeatTimeoutNanos = UInt64(heartbeatTimeout * 1e9)
        return o
    }
}

/// Runs a daemon in this process: signals blocked first, one clear error
/// line (exit 2 for usage), the device path printed once it is usable (or
/// said to the launcher, DaemonLauncher.swift).
func runInForeground(label: String, make: (Logger) throws -> SessionDaemon) throws {
    let signals = SignalWaiter()
    let logger = makeLogger(label)
    let daemon: SessionDaemon
    do { daemon = try make(logger) } catch {
        logger.error("\(error)")
        let kind = (error as? DaemonError)?.kind ?? .failed
        if DaemonLauncher.launched { DaemonLauncher.sayFailed(refused: kind == .usage || kind == .refused, "\(error)") }
        throw CLIExit.fail(kind, "\(error)")
    }
    let dev: String
    do { dev = try daemon.start() } catch {
        logger.error("\(error)")
        if DaemonLauncher.launched { DaemonLauncher.sayFailed(refused: false, "\(error)") }
        throw CLIExit.fail("\(error)")
    }
    if DaemonLauncher.launched {
        DaemonLauncher.sayReady(dev)
    } else {
        print(dev)
        fflush(stdout)
    }
    daemon.waitForShutdown(signals: signals)
}

/// What `backup` uses to start a transient dm-snapshot daemon: `attach
/// DEVICE --via dm --once` in the background.
struct CLISessionLauncher: TransientSessionLauncher {
    func launchTransientDM(_ r: TransientDMRequest) throws -> String {
        var args = ["attach", r.device, "--via", "dm", "--once", "--name", r.name, "--run-dir", r.runDir,
                    "--hb-file-size", "\(r.hbFileBytes)", "--buffer-limit", "\(r.bufferLimitBytes)", "--foreground"]
        if let b = r.bufferDir { args += ["--buffer-dir", b] }
        let dir = r.runDir + "/" + r.name
        do {
            _ = try DaemonLauncher.launch(arguments: args, dir: dir, within: 30)
        } catch let f as DaemonLauncher.Failure {
            throw TransientLaunchFailure(refused: f.refused, description: f.description)
        }
        return dir
    }
}
