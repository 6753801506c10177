// The engine never reads a clock itself: every deadline is computed from a
// `SessionClock`, so unit tests drive time by hand and never sleep.
#if canImport(Glibc)
import Glibc
#endif
import HotSync

public protocol SessionClock: AnyObject, Sendable {
    /// Monotonic nanoseconds (CLOCK_MONOTONIC for the real clock).
    func now() -> UInt64
}

public final class MonotonicClock: SessionClock, @unchecked Sendable {
    public init() {}
    public func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// A clock that moves only when told to.
public final class ManualClock: SessionClock, @unchecked Sendable {
    private let m = Monitor()
    private var t: UInt64
    public init(start: UInt64 = 1_000_000_000) { t = start }
    public func now() -> UInt64 { m.withLock { t } }
    public func advance(nanos: UInt64) { m.withLock { t += nanos } }
    public func advance(seconds: Double) { advance(nanos: UInt64(seconds * 1e9)) }
}
