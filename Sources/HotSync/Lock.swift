// The project's two synchronisation primitives: `Lock`, a mutex with
// `withLock` (optionally recursive), and `Monitor`, a mutex with one
// condition variable whose timed wait runs on the monotonic clock. Every
// mutex and condition in Sources is one of these two.
//
// Why a module of its own: every layer needs them. HotCore and QCow2 are
// pure Swift cores that must build and test without HotOS (which links
// libdevmapper and libext2fs through CHotShim), and HotOS, the servers, the
// imager and hotimage-stamp need them too. So `HotSync` sits at the bottom,
// beside CHotShim, and depends on nothing but Glibc; it has no logic beyond
// the pthread calls.
//
// Storage: the pthread objects live in heap storage of their own, allocated
// once in `init` and freed in `deinit`. A pthread mutex or condition must
// not move once initialised, and Swift does not promise a stable address
// for a stored property (`&storedMutex` may pass a temporary); swift-nio's
// NIOLock keeps its mutex in ManagedBuffer storage for the same reason.
//
// Cost: `withLock`, `lock` and `unlock` are `@inlinable`, so a client module
// compiles them to the bare pthread_mutex_lock/unlock calls around its
// closure, with no allocation and no call through this module.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A mutex. `recursive: true` lets the thread that holds it take it again
/// (libdevmapper's log callback re-enters the dm lock); it must then be
/// released as many times as it was taken.
public final class Lock: @unchecked Sendable {
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init(recursive: Bool = false) {
        mutex = makeMutex(recursive: recursive)
    }

    deinit { freeMutex(mutex) }

    @inlinable @inline(__always)
    public func lock() { pthread_mutex_lock(mutex) }

    @inlinable @inline(__always)
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inlinable @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// A mutex with one condition variable. `wait` and `broadcast` are called
/// with the mutex held (inside `withLock`, or between `lock` and `unlock`).
public final class Monitor: @unchecked Sendable {
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @usableFromInline let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = makeMutex(recursive: false)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        #if os(Linux)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        #endif
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        cond.deinitialize(count: 1)
        cond.deallocate()
        freeMutex(mutex)
    }

    @inlinable @inline(__always)
    public func lock() { pthread_mutex_lock(mutex) }

    @inlinable @inline(__always)
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inlinable @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (lock held) until woken or `timeoutNanos` pass on the monotonic
    /// clock; returns false on timeout. Wake-ups may be spurious: callers
    /// re-check their condition in a loop.
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

    /// Wakes every waiter.
    @inlinable @inline(__always)
    public func broadcast() { pthread_cond_broadcast(cond) }
}

/// A mutex in storage that never moves.
private func makeMutex(recursive: Bool) -> UnsafeMutablePointer<pthread_mutex_t> {
    let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    m.initialize(to: pthread_mutex_t())
    var attr = pthread_mutexattr_t()
    pthread_mutexattr_init(&attr)
    if recursive { pthread_mutexattr_settype(&attr, Int32(PTHREAD_MUTEX_RECURSIVE)) }
    let rc = pthread_mutex_init(m, &attr)
    pthread_mutexattr_destroy(&attr)
    precondition(rc == 0, "pthread_mutex_init: \(rc)")
    return m
}

private func freeMutex(_ m: UnsafeMutablePointer<pthread_mutex_t>) {
    pthread_mutex_destroy(m)
    m.deinitialize(count: 1)
    m.deallocate()
}
