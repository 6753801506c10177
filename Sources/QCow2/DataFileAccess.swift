// Who may read a file that holds a volume's bytes: an image, a partial
// image kept by --keep-partial, a file 'restore' creates.
//
// Such a file holds every file of the volume whatever that file's own
// permissions (/etc/shadow, a database's tables), so it is as secret as the
// disk: the owner only (0600), or with `backup --group` that group too
// (0640, owner root). The mode is set with fchmod right after the file is
// created (or truncated, when an existing image is overwritten), so the
// umask has no say either way; the file is created with 0600, so it is never
// more open than that between open and fchmod. A block device given as the
// target keeps its own mode and owner.
import Foundation

public struct DataFileAccess: Sendable, Equatable {
    /// The group that may read the file too (0640); nil: the owner only (0600).
    public var group: gid_t?

    public init(group: gid_t? = nil) { self.group = group }

    public static let ownerOnly = DataFileAccess()

    public var mode: mode_t { group == nil ? 0o600 : 0o640 }

    /// Opens `path` with `flags` (which must include O_CREAT) and gives it
    /// this access: owner the effective user, group `group` (or the effective
    /// group), mode `mode`. Returns the descriptor, or -1 with errno set; a
    /// file created with O_EXCL is removed again if its access cannot be set.
    public func open(_ path: String, flags: Int32) -> Int32 {
        let fd = Foundation.open(path, flags, 0o600)
        guard fd >= 0 else { return -1 }
        if let e = apply(to: fd) {
            close(fd)
            if flags & O_EXCL != 0 { unlink(path) }
            errno = e
            return -1
        }
        return fd
    }

    /// Sets owner, group and mode of the open regular file `fd`; returns the
    /// errno of the call that failed, or nil. Anything but a regular file is
    /// left alone.
    public func apply(to fd: Int32) -> Int32? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return errno }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        let gid = group ?? getegid()
        if st.st_uid != geteuid() || st.st_gid != gid {
            guard fchown(fd, geteuid(), gid) == 0 else { return errno }
        }
        guard fchmod(fd, mode) == 0 else { return errno }
        return nil
    }
}
