// FITHAW without a FrozenFilesystem: for cleaning up after a process that
// froze a filesystem and died (the kernel keeps it frozen until someone
// thaws it).
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

extension FrozenFilesystem {
    /// Thaws the filesystem at `mountPoint`; false if it was not frozen or
    /// could not be opened.
    public static func thawIfFrozen(mountPoint: String) -> Bool {
        let fd = open(mountPoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return hs_fithaw(fd) == 0
    }
}
