// Hook commands around the snapshot, as HotBackup ran them.
//
// Each hook is run by `/bin/sh -c CMD` with stdin from /dev/null and its
// output on our stderr, in its own process group (killed whole after the
// hook timeout, which counts as a failure), with:
//   HOTIMAGE_PHASE    before-snapshot | after-snapshot | after-backup
//   HOTIMAGE_ERROR    0 or the error code so far (0..65535; the exit code
//                     the backup will return)
//   HOTIMAGE_VOLUMES  the volumes being backed up, space separated (mount
//                     points of mounted volumes, devices otherwise)
//   HOTIMAGE_FREEZE   yes when the filesystem is frozen for the snapshot
//   HOTIMAGE_IMAGE    the image file being written
//
// The routine (DESIGN-BRIEF "Hooks"):
//   before-snapshot fails  → abort at once: no snapshot, no other hook.
//   the snapshot fails     → no data; after-snapshot and after-backup still
//                            run (with HOTIMAGE_ERROR set); abort.
//   otherwise              → after-snapshot runs; the data is backed up
//                            whatever it returned; after-backup runs with
//                            the backup's error code.
// Within a phase, hooks run in order (config file first, then command line);
// a failing before-snapshot hook stops the ones after it, the other phases
// run every hook.
import Foundation
import HotOS
import HotWriters

public enum HookPhase: String, Codable, Sendable, CaseIterable {
    case beforeSnapshot = "before-snapshot"
    case afterSnapshot = "after-snapshot"
    case afterBackup = "after-backup"
}

public struct HookResult: Codable, Sendable {
    public var phase: HookPhase
    public var command: String
    public var exitCode: Int32
    public var seconds: Double
    public var timedOut: Bool
    public var ok: Bool { exitCode == 0 && !timedOut }
}

public struct HookSet: Sendable {
    public var commands: [HookPhase: [String]] = [:]
    public var timeoutSeconds: Double = 600
    public init() {}
    public func of(_ p: HookPhase) -> [String] { commands[p] ?? [] }
    public mutating func add(_ p: HookPhase, _ cmds: [String]) { commands[p, default: []].append(contentsOf: cmds) }
}

public struct HookContext: Sendable {
    public var volumes: [String]
    public var freeze: Bool
    public var image: String
    public init(volumes: [String], freeze: Bool, image: String) {
        self.volumes = volumes; self.freeze = freeze; self.image = image
    }
}

public enum HookRunner {
    /// Runs every hook of `phase`; stops at the first failure when
    /// `stopOnFailure`. `log` gets one line per hook.
    public static func run(_ set: HookSet, _ phase: HookPhase, error: Int32, context: HookContext,
                           stopOnFailure: Bool, log: (String) -> Void,
                           cancelled: () -> Bool = { false }) -> [HookResult] {
        var out: [HookResult] = []
        for cmd in set.of(phase) {
            let r = runOne(cmd, phase: phase, error: error, context: context, timeout: set.timeoutSeconds, cancelled: cancelled)
            out.append(r)
            let how = r.timedOut ? String(format: "timed out after %.0f s (killed)", r.seconds)
                                 : String(format: "exit %d after %.1f s", r.exitCode, r.seconds)
            log("hook \(phase.rawValue) '\(cmd)': \(how)")
            if !r.ok && stopOnFailure { break }
        }
        return out
    }

    /// Runs one hook; `cancelled` (the backup was interrupted) kills its
    /// process group as a timeout does.
    static func runOne(_ cmd: String, phase: HookPhase, error: Int32, context: HookContext, timeout: Double,
                       cancelled: () -> Bool = { false }) -> HookResult {
        let env = [
            "HOTIMAGE_PHASE=\(phase.rawValue)",
            "HOTIMAGE_ERROR=\(max(0, min(65535, error)))",
            "HOTIMAGE_VOLUMES=\(context.volumes.joined(separator: " "))",
            "HOTIMAGE_FREEZE=\(context.freeze ? "yes" : "no")",
            "HOTIMAGE_IMAGE=\(context.image)",
        ]
        let t0 = monotonicNanos()
        let pid: pid_t
        do {
            pid = try ProcessControl.spawn(["/usr/bin/env"] + env + ["/bin/sh", "-c", cmd], logFD: 2, newSession: true)
        } catch {
            return HookResult(phase: phase, command: cmd, exitCode: 127, seconds: 0, timedOut: false)
        }
        let deadline = t0 + UInt64(timeout * 1e9)
        while true {
            if let st = ProcessControl.reap(pid) {
                return HookResult(phase: phase, command: cmd, exitCode: ProcessControl.exitCode(st),
                                  seconds: Double(monotonicNanos() - t0) / 1e9, timedOut: false)
            }
            if monotonicNanos() >= deadline || cancelled() {
                kill(-pid, SIGKILL)
                let code = ProcessControl.wait(pid)
                return HookResult(phase: phase, command: cmd, exitCode: code,
                                  seconds: Double(monotonicNanos() - t0) / 1e9, timedOut: true)
            }
            usleep(10_000)
        }
    }
}

/// /etc/hotimage/hotimage.conf: `key = value` lines, `#` comments. Keys:
///   before-snapshot, after-snapshot, after-backup   a hook command (repeatable)
///   hook-timeout                                    seconds
///   compress                                        zstd[:LEVEL] | zlib[:LEVEL] | none
///   consistency                                     freeze | wip
///   exclude                                         a path (repeatable)
///   writers                                         all | none | NAME,NAME…
///   writer-timeout                                  seconds (freeze, and thaw)
///   allow-unfrozen                                  yes | no
///   freeze-partial                                  yes | no
///   writers-dir                                     external writers' directory
///   container, container-freeze-wait, libvirt-*,    settings of the built-in
///   vm-*, postgresql-*                              writers (passed to them)
/// Unknown keys are an error naming the line, so typos do not pass silently.
public struct HotimageConfig: Sendable {
    public var hooks = HookSet()
    public var compress: String?
    public var consistency: String?
    public var excludes: [String] = []
    public var writers = WriterConfig()
    public var allowUnfrozen = false
    public init() {}

    /// Keys passed through to the built-in writers as settings.
    static func isWriterSetting(_ key: String) -> Bool {
        key.hasPrefix("container") || key.hasPrefix("libvirt-") || key.hasPrefix("vm-")
            || key.hasPrefix("postgresql-")
    }

    public static let defaultPath = "/etc/hotimage/hotimage.conf"

    public static func load(path: String, required: Bool) throws -> HotimageConfig {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            if required || FileManager.default.fileExists(atPath: path) {
                throw SessionError("cannot read the configuration file \(path)")
            }
            return HotimageConfig()
        }
        return try parse(text, path: path)
    }

    public static func parse(_ text: String, path: String) throws -> HotimageConfig {
        var c = HotimageConfig()
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let eq = line.firstIndex(of: "=") else {
                throw SessionError("\(path):\(i + 1): expected 'key = value'")
            }
            let key = line[..<eq].trimmingCharacters(in: .whitespaces)
            let value = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            guard !value.isEmpty else { throw SessionError("\(path):\(i + 1): '\(key)' has no value") }
            switch key {
            case "before-snapshot", "after-snapshot", "after-backup":
                c.hooks.add(HookPhase(rawValue: key)!, [value])
            case "hook-timeout":
                guard let t = Double(value), t > 0 else { throw SessionError("\(path):\(i + 1): hook-timeout must be seconds > 0") }
                c.hooks.timeoutSeconds = t
            case "compress": c.compress = value
            case "consistency":
                guard value == "freeze" || value == "wip" else { throw SessionError("\(path):\(i + 1): consistency must be freeze or wip") }
                c.consistency = value
            case "exclude": c.excludes.append(value)
            case "writers": c.writers.selection = WriterSelection(parsing: value)
            case "writers-dir": c.writers.directory = value
            case "writer-timeout":
                guard let t = Double(value), t > 0 else { throw SessionError("\(path):\(i + 1): writer-timeout must be seconds > 0") }
                c.writers.timeout = t
            case "allow-unfrozen", "freeze-partial":
                guard let b = ["yes": true, "no": false][value] else { throw SessionError("\(path):\(i + 1): \(key) must be yes or no") }
                if key == "allow-unfrozen" { c.allowUnfrozen = b } else { c.writers.freezePartial = b }
            case _ where isWriterSetting(key): c.writers.settings.set(key, value)
            default:
                throw SessionError("\(path):\(i + 1): unknown key '\(key)'")
            }
        }
        return c
    }
}
