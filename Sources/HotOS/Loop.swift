// Loop devices through /dev/loop-control and LOOP_CONFIGURE, so the loop
// that stands over nbdfuse's file is created with direct I/O in one step:
// with direct I/O the loop driver keeps no page cache of its own, so a write
// that completed on the loop device has reached the FUSE file and HotCore.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public enum Loop {
    /// Attaches `file` to a free loop device and returns its path.
    public static func attach(file: String, directIO: Bool, readOnly: Bool = false) throws -> String {
        let ctl = try syscall("open", "/dev/loop-control") { open("/dev/loop-control", O_RDWR | O_CLOEXEC) }
        defer { close(ctl) }
        let backing = try syscall("open", file) { open(file, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | (directIO ? HS_O_DIRECT : 0)) }
        defer { close(backing) }
        // Another program may take the free device between GET_FREE and
        // CONFIGURE (EBUSY): try again a few times.
        for _ in 0..<16 {
            let n = try syscall("LOOP_CTL_GET_FREE", "/dev/loop-control") { hs_loop_ctl_get_free(ctl) }
            let path = "/dev/loop\(n)"
            let lfd = try syscall("open", path) { open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC) }
            let r = hs_loop_configure(lfd, backing, directIO ? 1 : 0, readOnly ? 1 : 0, 0, file)
            let e = errno
            close(lfd)
            if r == 0 { return path }
            if e != EBUSY { throw OSError("LOOP_CONFIGURE", errno: e, object: path) }
        }
        throw OSError("LOOP_CONFIGURE", errno: EBUSY, object: file)
    }

    /// Whether the loop device at `path` does direct I/O.
    public static func isDirectIO(_ path: String) throws -> Bool {
        let fd = try syscall("open", path) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        return try syscall("LOOP_GET_STATUS64", path) { hs_loop_is_direct_io(fd) } == 1
    }

    /// Detaches the loop device (the kernel finishes once the last opener closes).
    public static func detach(_ path: String) throws {
        let fd = try syscall("open", path) { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        try syscall("LOOP_CLR_FD", path) { hs_loop_clr_fd(fd) }
    }
}
