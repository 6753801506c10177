// Starting a session daemon in the background: `attach` without
// --foreground, and `backup` of a device-mapper volume (a transient
// `attach --via dm --once`) both come here.
//
// The launcher runs this executable with the daemon's own command line
// (ending in --foreground) in a session of its own, so the daemon outlives
// its starter, as a watchdog must. Its stderr (the log) goes to
// RUN/NAME/daemon.log; its stdout is a pipe back to the launcher on which
// the daemon says, once, one line:
//
//   ready DEVICE            the protected device is usable
//   refused MESSAGE         a usage error or refusal (nothing was set up)
//   failed MESSAGE          setting up failed (the daemon undid what it did)
//
// The daemon knows it was launched by HOTIMAGE_LAUNCHED=1 in its
// environment; run by hand with --foreground it prints the device path
// alone, as always. The pipe closing without a line means the daemon died
// on the way (its exit status and log say more).
import Foundation
import HotOS
#if canImport(Glibc)
import Glibc
#endif

public enum DaemonLauncher {
    public struct Ready: Sendable {
        public var pid: Int32
        public var device: String
        public var logPath: String
    }

    public struct Failure: Error, CustomStringConvertible {
        /// A usage error or refusal (the daemon's exit code 2), not a failure.
        public var refused: Bool
        public var description: String
    }

    static let environmentKey = "HOTIMAGE_LAUNCHED"

    /// Starts `arguments` (this executable's command line, without the
    /// program) as a background daemon whose run directory is `dir`; waits
    /// up to `within` seconds for its answer.
    /// `executable`: this one unless a test gives another.
    public static func launch(arguments: [String], dir: String, within seconds: Double,
                              executable: String? = nil) throws -> Ready {
        mkdir((dir as NSString).deletingLastPathComponent, 0o700)
        mkdir(dir, 0o700)
        let logPath = dir + "/daemon.log"
        let logFD = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard logFD >= 0 else {
            throw Failure(refused: false, description: "cannot open \(logPath): \(String(cString: strerror(errno)))")
        }
        defer { close(logFD) }
        let exe = executable ?? (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let child: (pid: pid_t, stdin: Int32, stdout: Int32, stderr: Int32)
        do {
            child = try ProcessControl.spawnPiped([exe] + arguments, environment: [environmentKey: "1"], stderrFD: logFD)
        } catch {
            throw Failure(refused: false, description: "starting the daemon: \(error)")
        }
        close(child.stdin)
        defer { close(child.stdout) }
        let line = readLine(child.stdout, within: seconds)
        switch line {
        case .line(let l) where l.hasPrefix("ready "):
            return Ready(pid: child.pid, device: String(l.dropFirst("ready ".count)), logPath: logPath)
        case .line(let l) where l.hasPrefix("refused "):
            _ = ProcessControl.waitExit(child.pid, timeout: 5)
            throw Failure(refused: true, description: String(l.dropFirst("refused ".count)))
        case .line(let l) where l.hasPrefix("failed "):
            _ = ProcessControl.waitExit(child.pid, timeout: 5)
            throw Failure(refused: false, description: String(l.dropFirst("failed ".count)))
        case .line(let l):
            kill(child.pid, SIGTERM)
            throw Failure(refused: false, description: "the daemon said '\(l)' instead of ready; see \(logPath)")
        case .closed:
            let code = ProcessControl.waitExit(child.pid, timeout: 5).map { "status \($0)" } ?? "killed"
            throw Failure(refused: false, description: "the daemon exited (\(code)) before the device was ready; see \(logPath)")
        case .timedOut:
            kill(child.pid, SIGTERM)
            throw Failure(refused: false, description: "the daemon did not become ready within \(Int(seconds)) s (log: \(logPath))")
        }
    }

    enum LineResult: Equatable { case line(String), closed, timedOut }

    /// The first line from `fd`, waiting up to `seconds` for it.
    static func readLine(_ fd: Int32, within seconds: Double) -> LineResult {
        var got: [UInt8] = []
        let deadline = monotonicNanos() + UInt64(seconds * 1e9)
        while true {
            if let nl = got.firstIndex(of: 0x0a) { return .line(String(decoding: got[..<nl], as: UTF8.self)) }
            let now = monotonicNanos()
            guard now < deadline else { return .timedOut }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32(min(1000, (deadline - now) / 1_000_000 + 1)))
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { continue }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return got.isEmpty ? .closed : .line(String(decoding: got, as: UTF8.self)) }
            got.append(contentsOf: buf[0..<n])
        }
    }

    // MARK: in the daemon

    /// Whether this process was started by `launch` (and must answer on stdout).
    public static var launched: Bool { getenv(environmentKey) != nil }

    /// Tells the launcher the device is usable; stdout then goes to /dev/null
    /// (the launcher has gone).
    public static func sayReady(_ device: String) {
        say("ready \(device)")
        let null = open("/dev/null", O_WRONLY | O_CLOEXEC)
        if null >= 0 { dup2(null, 1); close(null) }
    }

    /// Tells the launcher why the daemon stops before it was ready.
    public static func sayFailed(refused: Bool, _ message: String) {
        say((refused ? "refused " : "failed ") + message.replacingOccurrences(of: "\n", with: " "))
    }

    private static func say(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBufferPointer { write(1, $0.baseAddress, $0.count) }
    }
}
