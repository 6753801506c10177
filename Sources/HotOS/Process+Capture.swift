// Running a tool (virsh, qemu-img) to completion with its stdout and stderr
// kept apart and a time limit: a writer parses stdout and shows stderr, and a
// libvirt call that hangs (a wedged daemon, a guest agent that never answers)
// must not hang the backup. On timeout the tool's whole process group is
// killed (it runs in its own session), so helpers it started go too.
#if canImport(Glibc)
import Glibc
#endif
import Foundation

public struct CapturedRun: Sendable {
    /// Exit code (128+signal if killed); nil when it did not start.
    public var status: Int32?
    public var stdout: String
    public var stderr: String
    public var timedOut: Bool
    public var ok: Bool { status == 0 && !timedOut }
    /// stderr, else stdout, trimmed: what to show when it failed.
    public var message: String {
        let e = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        return e.isEmpty ? stdout.trimmingCharacters(in: .whitespacesAndNewlines) : e
    }
}

extension ProcessControl {
    /// Runs `argv` (looked up in PATH) with stdin from nothing; `environment`
    /// is added to ours. Returns when it exits, or after `timeout` seconds
    /// (then it is killed, `timedOut` set). `interruptGrace` > 0: at the
    /// timeout send SIGINT first and give it that long to clean up (virsh
    /// aborts its job on SIGINT), then kill. A command that cannot be
    /// started gives status 127 and the reason in stderr, like a shell.
    public static func capture(_ argv: [String], environment: [String: String] = [:],
                               timeout: Double, interruptGrace: Double = 0) -> CapturedRun {
        let p: (pid: pid_t, stdin: Int32, stdout: Int32, stderr: Int32)
        do { p = try spawnPiped(argv, environment: environment, pipeStderr: true) } catch {
            return CapturedRun(status: nil, stdout: "", stderr: "\(error)", timedOut: false)
        }
        close(p.stdin)
        var out: [UInt8] = [], err: [UInt8] = []
        var open: [Int32] = [p.stdout, p.stderr]
        var deadline = monotonicNanos() + UInt64(max(0, timeout) * 1e9)
        var timedOut = false
        var buf = [UInt8](repeating: 0, count: 65536)
        while !open.isEmpty {
            let now = monotonicNanos()
            if now >= deadline {
                if !timedOut && interruptGrace > 0 {
                    timedOut = true
                    kill(p.pid, SIGINT)
                    deadline = now + UInt64(interruptGrace * 1e9)
                    continue
                }
                timedOut = true
                break
            }
            var pfds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let r = poll(&pfds, nfds_t(pfds.count), Int32(min(1000, (deadline - now) / 1_000_000 + 1)))
            if r <= 0 { continue }
            for pf in pfds where pf.revents != 0 {
                let n = read(pf.fd, &buf, buf.count)
                if n > 0 {
                    if pf.fd == p.stdout { out.append(contentsOf: buf[0..<n]) } else { err.append(contentsOf: buf[0..<n]) }
                } else if !(n < 0 && (errno == EINTR || errno == EAGAIN)) {
                    open.removeAll { $0 == pf.fd }
                }
            }
        }
        close(p.stdout); close(p.stderr)
        if timedOut { kill(-p.pid, SIGKILL); kill(p.pid, SIGKILL) }  // a no-op if it exited on SIGINT
        let code = wait(p.pid)
        return CapturedRun(status: code, stdout: String(decoding: out, as: UTF8.self),
                           stderr: String(decoding: err, as: UTF8.self), timedOut: timedOut)
    }

    /// The full path of `name` in PATH (or `name` itself if it has a slash
    /// and is executable), nil if absent.
    public static func which(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let p = "\(dir)/\(name)"
            if access(p, X_OK) == 0 { return p }
        }
        return nil
    }
}
