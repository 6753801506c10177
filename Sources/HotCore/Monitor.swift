// A mutex with one condition variable: the engine's only synchronisation.
// The critical sections are short (bitmap and index updates); device and
// file I/O always happens outside them.
#if canImport(Glibc)
import Glibc
#endif

public final class Monitor: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()

    public init() {
        pthread_mutex_init(&mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    public func lock() { pthread_mutex_lock(&mutex) }
    public func unlock() { pthread_mutex_unlock(&mutex) }

    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }

    /// Waits (lock held) until signalled or `timeoutNanos` pass; returns false on timeout.
    @discardableResult
    public func wait(timeoutNanos: UInt64? = nil) -> Bool {
        guard let t = timeoutNanos else {
            pthread_cond_wait(&cond, &mutex)
            return true
        }
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = UInt64(now.tv_nsec) + t % 1_000_000_000
        var deadline = timespec()
        deadline.tv_sec = now.tv_sec + Int(t / 1_000_000_000) + Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(&cond, &mutex, &deadline) != ETIMEDOUT
    }

    public func broadcast() { pthread_cond_broadcast(&cond) }
}
