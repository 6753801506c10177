// hotimage's side of one writer process: start it with a verb, send and
// read JSON lines with deadlines, kill its process group when it hangs.
import Foundation
import HotOS

public final class WriterProcess: @unchecked Sendable {
    public let argv: [String]
    public let pid: pid_t
    private var stdinFD: Int32
    private let stdoutFD: Int32
    private var buffer: [UInt8] = []
    /// The exit code once reaped (-1: killed when it would not exit).
    private var exitCode: Int32?

    /// `quiet`: ask it not to say that its application is not on this host.
    public init(_ argv: [String], volumes: [String], quiet: Bool = false) throws {
        self.argv = argv
        var env = [
            "HOTIMAGE_VOLUMES": volumes.joined(separator: " "),
            "HOTIMAGE_WRITER_PROTOCOL": String(writerProtocolVersion),
        ]
        if quiet { env[writerQuietVariable] = "1" }
        let p = try ProcessControl.spawnPiped(argv, environment: env)
        pid = p.pid; stdinFD = p.stdin; stdoutFD = p.stdout
    }

    /// Closing its pipes is end of file for the writer: a frozen writer
    /// thaws and exits by itself. It is not killed here, since a killed
    /// writer could leave a component frozen for good; a hung one has been
    /// killed already where the hang was noticed.
    deinit {
        if stdinFD >= 0 { close(stdinFD) }
        close(stdoutFD)
        if exitCode == nil { _ = ProcessControl.reap(pid) }
    }

    /// Sends one line. A writer that has gone away is noticed when its answer is read.
    public func send(_ line: String) {
        guard stdinFD >= 0 else { return }
        let saved = signal(SIGPIPE, SIG_IGN)
        writeAll(stdinFD, Array((line + "\n").utf8))
        signal(SIGPIPE, saved)
    }

    /// Closes its stdin: end of file, which a frozen writer takes as "thaw now".
    public func closeInput() {
        if stdinFD >= 0 { close(stdinFD); stdinFD = -1 }
    }

    /// The next line of stdout within `timeout` seconds. Throws on timeout
    /// (after killing the process group) or when the writer exits first.
    public func readLine(timeout: Double, what: String) throws -> String {
        let deadline = monotonicNanos() + UInt64(max(0, timeout) * 1e9)
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                if line.trimmingCharacters(in: .whitespaces).isEmpty { continue }
                return line
            }
            let now = monotonicNanos()
            if now >= deadline {
                killGroup()
                throw WriterError(String(format: "no %@ answer within %.0f s: killed", what, timeout))
            }
            var p = pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32(min(200, (deadline - now) / 1_000_000 + 1)))
            if r < 0 && errno != EINTR { throw WriterError("poll: \(String(cString: strerror(errno)))") }
            if r <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = read(stdoutFD, &chunk, chunk.count)
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 {
                let code = waitExit(timeout: 2)
                throw WriterError("exited (\(code.map { "exit \($0)" } ?? "still running") ) before its \(what) answer")
            }
            buffer.append(contentsOf: chunk[0..<n])
        }
    }

    public func killGroup() {
        kill(-pid, SIGKILL)
        kill(pid, SIGKILL)
    }

    /// Waits up to `timeout` seconds for the writer to exit; its exit code,
    /// or nil (then it is killed).
    @discardableResult
    public func waitExit(timeout: Double) -> Int32? {
        if let c = exitCode { return c >= 0 ? c : nil }
        let c = ProcessControl.waitExit(pid, timeout: timeout, killGroup: true)
        exitCode = c ?? -1
        return c
    }
}
