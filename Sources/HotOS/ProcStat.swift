// Process identity that survives pid reuse: the pid plus the process's start
// time (field 22 of /proc/PID/stat, in clock ticks since boot). Device-mapper
// devices of a session carry both in their UUID, so a later run can tell a
// leftover of a dead daemon from a device a live one still uses.
#if canImport(Glibc)
import Glibc
#endif

public enum ProcStat {
    /// The start time of process `pid`, or nil if it does not exist.
    public static func startTime(pid: Int32) -> UInt64? {
        guard let text = readSmallFile("/proc/\(pid)/stat") else { return nil }
        return parseStartTime(text)
    }

    /// This process's (pid, start time).
    public static func current() -> (pid: Int32, startTime: UInt64) {
        let pid = getpid()
        return (pid, startTime(pid: pid) ?? 0)
    }

    /// Whether the process `pid` that started at `startTime` still runs.
    public static func isAlive(pid: Int32, startTime: UInt64) -> Bool {
        self.startTime(pid: pid) == startTime
    }

    /// Whether `pid` is a zombie: exited, not yet reaped (state Z, field 3).
    public static func isZombie(pid: Int32) -> Bool {
        guard let text = readSmallFile("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return false }
        return text[text.index(after: close)...].split(separator: " ").first == "Z"
    }

    /// Field 22 of a /proc/PID/stat line. The command name (field 2) is in
    /// parentheses and may contain spaces and ')': fields are counted from
    /// the last ')'.
    public static func parseStartTime(_ stat: String) -> UInt64? {
        guard let close = stat.lastIndex(of: ")") else { return nil }
        let rest = stat[stat.index(after: close)...].split(separator: " ")
        // rest[0] is field 3 (state); field 22 is rest[19].
        guard rest.count > 19 else { return nil }
        return UInt64(rest[19])
    }
}

/// Reads a small text file (procfs, sysfs) whole; nil if it cannot be read.
public func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = read(fd, &buf, buf.count)
        if n > 0 { out.append(contentsOf: buf[0..<n]); continue }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { return nil }
        break
    }
    return String(decoding: out, as: UTF8.self)
}
