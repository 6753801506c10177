// Request buffers for the NBD server: page-aligned, 1 MiB each, reused
// through a small free list. WRITE payloads are read from the socket
// straight into one and READ replies are built in one, so a request costs
// no allocation (and, under mlockall, no fresh locked mapping). Requests
// larger than a pool buffer get a buffer of their own, freed afterwards.
#if canImport(Glibc)
import Glibc
#endif
import HotSync

final class BufferPool: @unchecked Sendable {
    static let bufferBytes = 1 << 20
    static let alignment = 4096
    private let mutex = Lock()
    private var free: [UnsafeMutableRawPointer] = []
    /// Buffers kept for reuse at most; more in use at once are allocated
    /// and released as needed.
    let keep: Int

    init(keep: Int) {
        self.keep = keep
        free.reserveCapacity(keep)
    }

    deinit {
        for p in free { p.deallocate() }
    }

    /// A buffer of at least `bytes` (and at least 1) bytes; give it back with `put`.
    func get(_ bytes: Int) -> UnsafeMutableRawPointer {
        if bytes > BufferPool.bufferBytes {
            return UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: BufferPool.alignment)
        }
        let p = mutex.withLock { free.popLast() }
        return p ?? UnsafeMutableRawPointer.allocate(byteCount: BufferPool.bufferBytes, alignment: BufferPool.alignment)
    }

    /// Returns a buffer `get(bytes)` handed out, with the same `bytes`.
    func put(_ p: UnsafeMutableRawPointer, _ bytes: Int) {
        if bytes > BufferPool.bufferBytes { p.deallocate(); return }
        let kept = mutex.withLock { () -> Bool in
            guard free.count < keep else { return false }
            free.append(p)
            return true
        }
        if !kept { p.deallocate() }
    }
}
