// A new file whose space is reserved up front (fallocate), so that a full
// filesystem shows up as ENOSPC when the file is made, not later as a write
// error deep inside a loop device.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public enum ReservedFile {
    /// Creates `path` (which must not exist) with `bytes` allocated.
    /// On failure nothing is left behind.
    public static func create(path: String, bytes: UInt64) throws {
        let fd = try syscall("open", path) { open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        defer { close(fd) }
        if hs_fallocate(fd, 0, 0, bytes) != 0 {
            let e = errno
            unlink(path)
            throw OSError("fallocate", errno: e, object: path)
        }
    }
}
