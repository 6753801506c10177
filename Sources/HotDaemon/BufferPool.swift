// Request buffers for the NBD server: page-aligned, 1 MiB each, reused
// through a small free list. WRITE payloads are read from the socket
// straight into one and READ replies are built in one, so a request costs
// no allocation (and, under mlockall, no fresh locked mapping). Requests
// larger than a pool buffer get a buffer of their own, freed afterwards.
#if canImport(Glibc)
import Glibc
#endif

final class BufferPool: @unchecked Sendable {
    static let bufferBytes = 1 << 20
    static let alignment = 4096
    private var mutex = pthread_mutex_t()
    private var free: [UnsafeMutableRawPointer] = []
    /// Buffers kept for reuse at most; more in use at once are allocated
    /// and released as needed.
    let keep: Int

    init(keep: Int) {
        self.keep = keep
        free.reserveCapacity(keep)
        pthread_mutex_init(&mutex, nil)
    }

    deinit {
        for p in free { p.deallocate() }
        pthread_mutex_destroy(&mutex)
    }

    /// A buffer of at least `bytes` (and at least 1) bytes; give it back with `put`.
    func get(_ bytes: Int) -> UnsafeMutableRawPointer {
        if bytes > BufferPool.bufferBytes {
            return UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: BufferPool.alignment)
        }
        pthread_mutex_lock(&mutex)
        let p = free.popLast()
        pthread_mutex_unlock(&mutex)
        return p ?? UnsafeMutableRawPointer.allocate(byteCount: BufferPool.bufferBytes, alignment: BufferPool.alignment)
    }

    /// Returns a buffer `get(bytes)` handed out, with the same `bytes`.
    func put(_ p: UnsafeMutableRawPointer, _ bytes: Int) {
        if bytes > BufferPool.bufferBytes { p.deallocate(); return }
        pthread_mutex_lock(&mutex)
        let kept = free.count < keep
        if kept { free.append(p) }
        pthread_mutex_unlock(&mutex)
        if !kept { p.deallocate() }
    }
}
