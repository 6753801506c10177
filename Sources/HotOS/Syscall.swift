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
