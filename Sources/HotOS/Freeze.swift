// FIFREEZE / FITHAW: the filesystem flushes and blocks new writes until
// thawed. A `FrozenFilesystem` thaws on `thaw()` and, as a last resort, in
// deinit, so no code path can leave a volume frozen.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public final class FrozenFilesystem: @unchecked Sendable {
    public let mountPoint: String
    private var fd: Int32
    private var frozen: Bool
    /// CLOCK_MONOTONIC just before FIFREEZE: how long the freeze lasted is
    /// measured from here to the thaw.
    public let startedNanos: UInt64

    /// Freezes the filesystem mounted at `mountPoint`.
    public init(mountPoint: String) throws {
        self.mountPoint = mountPoint
        startedNanos = monotonicNanos()
        fd = try syscall("open", mountPoint) { open(mountPoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        if hs_fifreeze(fd) != 0 {
            let e = errno
            close(fd)
            throw OSError("FIFREEZE", errno: e, object: mountPoint)
        }
        frozen = true
    }

    public func thaw() throws {
        guard frozen else { return }
        frozen = false
        defer { close(fd); fd = -1 }
        try syscall("FITHAW", mountPoint) { hs_fithaw(fd) }
    }

    deinit { try? thaw() }
}
