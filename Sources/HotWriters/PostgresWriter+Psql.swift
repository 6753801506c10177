// A psql coprocess: one server session held open from freeze to thaw. A
// non-exclusive backup belongs to the session that started it; the server
// aborts it when that session ends, which is also what makes a writer that
// dies (killed by hotimage, or hotimage gone) harmless to the live cluster.
//
// Framing: psql runs its stdin in order and flushes after each command, so
// every command is sent followed by `\echo MARKER`, and the lines before
// the marker line are that command's whole answer. psql runs with -X (no
// psqlrc), -q (no command tags), -A -t (unaligned rows, no headers, `|`
// between fields) and ON_ERROR_STOP=1: the first SQL error ends psql
// (exit 3) instead of going on in a state we did not ask for; its message
// is on stderr, which is collected for the report.
import Foundation
import HotOS

/// Splits psql's stdout into answers: lines up to a marker line. Pure.
public struct PsqlFraming: Sendable {
    private var partial: [UInt8] = []
    private var lines: [String] = []
    public init() {}

    public mutating func feed<S: Sequence>(_ bytes: S) where S.Element == UInt8 {
        for b in bytes {
            if b == 10 { lines.append(String(decoding: partial, as: UTF8.self)); partial.removeAll(keepingCapacity: true) } else { partial.append(b) }
        }
    }

    /// The complete answer ended by `marker`, consumed; nil while the
    /// marker line has not arrived.
    public mutating func answer(marker: String) -> [String]? {
        guard let i = lines.firstIndex(of: marker) else { return nil }
        let a = Array(lines[..<i])
        lines.removeSubrange(...i)
        return a
    }
}

public final class PsqlSession: @unchecked Sendable {
    public let pid: pid_t
    private let stdinFD: Int32
    private let stdoutFD: Int32
    private let stderrFD: Int32
    private var framing = PsqlFraming()
    private var errors: [UInt8] = []
    private var exitCode: Int32?
    private var closed = false
    private var sequence = 0
    private let markerBase = "__hotimage_psql_\(getpid())_\(UInt32.random(in: 0...UInt32.max))"

    /// Starts `argv` (psql, perhaps behind setpriv, which execs it: the pid
    /// is psql's). It shares our process group, so hotimage killing the
    /// writer's group kills it too.
    public init(_ argv: [String]) throws {
        do {
            let p = try ProcessControl.spawnPiped(argv, pipeStderr: true, newSession: false)
            pid = p.pid; stdinFD = p.stdin; stdoutFD = p.stdout; stderrFD = p.stderr
        } catch { throw WriterError("cannot start \(argv.joined(separator: " ")): \(error)") }
    }

    deinit { close() }

    /// Runs one SQL command (`what` names it in errors); its output lines.
    /// Throws when psql ends first (an SQL error, the server or the session
    /// gone) or at `deadline` (monotonic nanoseconds; psql is killed then).
    public func run(_ sql: String, what: String, deadline: UInt64) throws -> [String] {
        guard !closed else { throw WriterError("the psql session is closed") }
        sequence += 1
        let marker = "\(markerBase)_\(sequence)__"
        let saved = signal(SIGPIPE, SIG_IGN)
        writeAll(stdinFD, Array("\(sql)\n\\echo \(marker)\n".utf8))
        signal(SIGPIPE, saved)
        while true {
            if let a = framing.answer(marker: marker) { return a }
            let now = monotonicNanos()
            if now >= deadline {
                kill(pid, SIGKILL)
                throw WriterError(String(format: "psql gave no answer to %@ in time: killed", what))
            }
            var fds = [pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0), pollfd(fd: stderrFD, events: Int16(POLLIN), revents: 0)]
            let r = poll(&fds, 2, Int32(min(200, (deadline - now) / 1_000_000 + 1)))
            if r < 0 && errno != EINTR { throw WriterError("poll: \(String(cString: strerror(errno)))") }
            if r <= 0 { continue }
            if fds[1].revents != 0 { drainErrors() }
            guard fds[0].revents != 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 16384)
            let n = read(stdoutFD, &chunk, chunk.count)
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n > 0 { framing.feed(chunk[0..<n]); continue }
            // End of file: psql has ended.
            let code = waitExit(timeout: 2)
            drainErrors()
            let why = stderrText.isEmpty ? "" : ": \(stderrText)"
            throw WriterError("psql ended (\(code.map { "exit \($0)" } ?? "killed")) before answering \(what)\(why)")
        }
    }

    /// What psql wrote to stderr so far, on one line.
    public var stderrText: String {
        String(decoding: errors, as: UTF8.self).split(whereSeparator: \.isNewline)
            .map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
    }

    private func drainErrors() {
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            var p = pollfd(fd: stderrFD, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 0) > 0 else { return }
            let n = read(stderrFD, &chunk, chunk.count)
            if n <= 0 { return }
            if errors.count < 8192 { errors.append(contentsOf: chunk[0..<n]) }
        }
    }

    /// psql's exit code within `timeout` seconds, else nil (it is killed).
    @discardableResult
    public func waitExit(timeout: Double) -> Int32? {
        if let c = exitCode { return c >= 0 ? c : nil }
        let c = ProcessControl.waitExit(pid, timeout: timeout)
        exitCode = c ?? -1   // -1: killed here
        return c
    }

    /// Ends the session: end of input makes psql disconnect (and the server
    /// abort a backup still running in it).
    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(stdinFD)
        waitExit(timeout: 5)
        Glibc.close(stdoutFD); Glibc.close(stderrFD)
    }
}
