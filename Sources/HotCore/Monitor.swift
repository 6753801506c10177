// A mutex with one condition variable: the engine's only synchronisation.
// The critical sections are short (bitmap and index updates); device and
// file I/O always happens outside them. The mutex and condition live in
// storage of their own: the address of a stored property of a class may
// move, and pthread objects must not.
#if canImport(Glibc)
import Glibc
#endif

public final class Monitor: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (lock held) until signalled or `timeoutNanos` pass; returns false on timeout.
    @discardableResult
    public func wait(timeoutNanos: UInt64? = nil) -> Bool {
        guard let t = timeoutNanos else {
            pthread_cond_wait(cond, mutex)
            return true
        }
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = UInt64(now.tv_nsec) + t % 1_000_000_000
        var deadline = timespec()
        deadline.tv_sec = now.tv_sec + Int(t / 1_000_000_000) + Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(cond, mutex, &deadline) != ETIMEDOUT
    }

    public func broadcast() { pthread_cond_broadcast(cond) }
}
