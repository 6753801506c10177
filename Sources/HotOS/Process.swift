// Child processes and the process flags of a userspace block server.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim
import Foundation

public enum ProcessControl {
    /// PR_SET_IO_FLUSHER: memory reclaim in this process will not recurse
    /// into filesystem I/O, which could wait on this very server (deadlock).
    public static func setIOFlusher() throws {
        try syscall("prctl(PR_SET_IO_FLUSHER)") { hs_set_io_flusher() }
    }

    /// mlockall(MCL_CURRENT|MCL_FUTURE): the server's pages cannot be paged
    /// out, so serving a write never waits for a page-in from a device that
    /// may sit behind this server.
    public static func lockMemory() throws {
        try syscall("mlockall") { hs_lock_memory() }
    }

    /// Large request buffers come from the heap and are reused, instead of
    /// a fresh (locked, zeroed) mapping per request.
    public static func keepLargeAllocationsInHeap() { hs_malloc_keep_large() }

    public static func setParentDeathSignal(_ sig: Int32) {
        _ = hs_set_pdeathsig(sig)
    }

    /// Starts `argv` with stdin from /dev/null and stdout/stderr to `logFD`
    /// (-1: /dev/null; `inheritStdio`: the caller's). Returns the pid.
    public static func spawn(_ argv: [String], ioFlusher: Bool = false, logFD: Int32 = -1,
                             inheritStdio: Bool = false, newSession: Bool = true) throws -> pid_t {
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cargs.append(nil)
        defer { for p in cargs { free(p) } }
        let pid = hs_spawn(cargs, ioFlusher ? 1 : 0, inheritStdio ? -2 : logFD, newSession ? 1 : 0)
        if pid < 0 { throw OSError("fork", errno: errno, object: argv.first ?? "") }
        return pid
    }

    /// Starts `argv` with pipes to its stdin and from its stdout; its stderr
    /// goes to ours, or to `stderrFD`, or, with `pipeStderr`, to a third
    /// pipe. `environment` is added to ours. Returns the pid and our ends of
    /// the pipes (stderr -1 without `pipeStderr`), close-on-exec here; the
    /// caller closes them.
    public static func spawnPiped(_ argv: [String], environment: [String: String] = [:], pipeStderr: Bool = false,
                                  stderrFD: Int32? = nil,
                                  newSession: Bool = true) throws -> (pid: pid_t, stdin: Int32, stdout: Int32, stderr: Int32) {
        var inP: [Int32] = [0, 0], outP: [Int32] = [0, 0], errP: [Int32] = [-1, stderrFD ?? 2]
        try syscall("pipe") { pipe(&inP) }
        do {
            try syscall("pipe") { pipe(&outP) }
            if pipeStderr { do { try syscall("pipe") { pipe(&errP) } } catch { close(outP[0]); close(outP[1]); throw error } }
        } catch { close(inP[0]); close(inP[1]); throw error }
        // Our ends must not leak into other children (spawn closes all but stdio).
        for fd in [inP[1], outP[0], errP[0]] where fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        var cenv: [UnsafeMutablePointer<CChar>?] = env.map { strdup("\($0.key)=\($0.value)") }
        cenv.append(nil)
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cargs.append(nil)
        defer { for p in cargs { free(p) }; for p in cenv { free(p) } }
        let pid = hs_spawn_fds(cargs, cenv, inP[0], outP[1], errP[1], newSession ? 1 : 0)
        let e = errno
        close(inP[0]); close(outP[1])
        if pipeStderr { close(errP[1]) }
        if pid < 0 {
            close(inP[1]); close(outP[0])
            if pipeStderr { close(errP[0]) }
            throw OSError("fork", errno: e, object: argv.first ?? "")
        }
        return (pid, inP[1], outP[0], errP[0])
    }

    /// Waits up to `timeout` seconds for `pid` to exit and returns its exit
    /// code; past that it is killed (its process group too with
    /// `killGroup`), reaped, and nil is returned.
    public static func waitExit(_ pid: pid_t, timeout: Double, killGroup: Bool = false) -> Int32? {
        let deadline = monotonicNanos() + UInt64(max(0, timeout) * 1e9)
        while true {
            if let s = reap(pid) { return exitCode(s) }
            if monotonicNanos() >= deadline { break }
            usleep(5_000)
        }
        if killGroup { kill(-pid, SIGKILL) }
        kill(pid, SIGKILL)
        _ = reap(pid, block: true)
        return nil
    }

    /// waitpid without blocking: the exit status if the child has ended.
    public static func reap(_ pid: pid_t, block: Bool = false) -> Int32? {
        var status: Int32 = 0
        let r = waitpid(pid, &status, block ? 0 : WNOHANG)
        if r == pid { return status }
        return nil
    }

    /// Runs a command to completion and returns its exit status and output.
    public static func run(_ argv: [String]) throws -> (status: Int32, output: String) {
        var fds: [Int32] = [0, 0]
        try syscall("pipe") { pipe(&fds) }
        let pid: pid_t
        do { pid = try spawn(argv, logFD: fds[1]) } catch { close(fds[0]); close(fds[1]); throw error }
        close(fds[1])
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fds[0], &buf, buf.count)
            if n > 0 { out.append(contentsOf: buf[0..<n]); continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
        close(fds[0])
        return (wait(pid), String(decoding: out, as: UTF8.self))
    }

    /// Waits for `pid` and returns its exit code (128+signal if killed).
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return exitCode(status)
    }

    public static func exitCode(_ status: Int32) -> Int32 {
        (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}
