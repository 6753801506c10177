// Every system call of hotimage goes through `syscall(_:_:)`: it retries
// EINTR and turns a failure into an `OSError` that names the call and the
// object (path or device) it was made on, so the CLI can print one clear line.
#if canImport(Glibc)
import Glibc
#endif

public struct OSError: Error, CustomStringConvertible, Equatable, Sendable {
    public var call: String
    public var errno: Int32
    public var object: String

    public init(_ call: String, errno: Int32, object: String = "") {
        self.call = call
        self.errno = errno
        self.object = object
    }

    public var message: String { String(cString: strerror(errno)) }

    public var description: String {
        object.isEmpty ? "\(call): \(message)" : "\(call) \(object): \(message)"
    }
}

/// Runs `body` until it does not fail with EINTR; a negative result throws
/// an `OSError` naming `call` and `object`.
@discardableResult
public func syscall<T: SignedInteger>(_ call: String, _ object: String = "", _ body: () -> T) throws -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = Glibc.errno
        if e == EINTR { continue }
        throw OSError(call, errno: e, object: object)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock every process on the machine
/// shares, so a test tool can compare its own timestamps with the daemon's.
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Wall clock, seconds since the epoch.
public func wallSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Moves past `n` bytes that a readv/writev-style call transferred:
/// `start` skips finished buffers, a partly done one is trimmed in place.
func advance(_ iov: inout [iovec], start: inout Int, by n: Int) {
    var left = n
    while left > 0 && start < iov.count {
        if left >= iov[start].iov_len {
            left -= iov[start].iov_len
            start += 1
        } else {
            iov[start].iov_base = iov[start].iov_base! + left
            iov[start].iov_len -= left
            left = 0
        }
    }
}

/// The text of a small file (sysfs attributes, state files), without the
/// trailing newline; nil if it cannot be read.
public func readShortFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 4096)
    let n = read(fd, &buf, buf.count)
    guard n >= 0 else { return nil }
    var s = String(decoding: buf[0..<n], as: UTF8.self)
    while let l = s.last, l == "\n" || l == " " { s.removeLast() }
    return s
}

/// Replaces `path` with `text` atomically (a temporary file, then rename),
/// mode 0600.
public func writeFileAtomically(_ path: String, _ text: String) {
    let tmp = path + ".tmp"
    let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { return }
    _ = text.withCString { write(fd, $0, strlen($0)) }
    close(fd)
    rename(tmp, path)
}

/// write(2) until done or the descriptor fails (FileHandle.write traps on EPIPE).
public func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        off += n
    }
}

public func writeStderr(_ s: String) { writeAll(2, Array(s.utf8)) }
