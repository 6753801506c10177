// A pipe for splice(2): bytes of a file go to a socket inside the kernel.
// Splicing a file into a pipe takes references to its page-cache pages
// instead of copying them, and splicing the pipe into a unix socket hands
// those references on, so the only copy left is the peer's own read. A
// READ served this way costs the server no memcpy at all, where pread plus
// send costs two.
//
// The pages are referenced, not copied: what the peer reads is the page as
// it is when the peer reads it. That is right for a live device (a write
// racing a read of the same block may land either side of it anyway) and
// wrong for anything that must stay frozen, such as a snapshot view.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public final class SplicePipe {
    /// Bytes the pipe holds at most; `fill` takes at most this many.
    public let capacity: Int
    /// Bytes in the pipe, filled and not yet drained.
    public private(set) var buffered = 0
    private var fds: (read: Int32, write: Int32)

    /// A pipe of at least `capacity` bytes (rounded up by the kernel to a
    /// power of two pages). Fails where the size is over
    /// /proc/sys/fs/pipe-max-size for an unprivileged caller.
    public init(capacity: Int) throws {
        var p: [Int32] = [-1, -1]
        _ = try syscall("pipe") { pipe(&p) }
        fds = (p[0], p[1])
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(p[1], F_SETFD, FD_CLOEXEC)
        let got = hs_pipe_set_size(p[1], Int32(capacity))
        if got < 0 {
            let e = errno
            Glibc.close(p[0]); Glibc.close(p[1])
            throw OSError("fcntl(F_SETPIPE_SZ)", errno: e, object: "\(capacity) bytes")
        }
        self.capacity = Int(got)
    }

    deinit { close() }

    public func close() {
        if fds.read >= 0 { Glibc.close(fds.read) }
        if fds.write >= 0 { Glibc.close(fds.write) }
        fds = (-1, -1)
    }

    /// The bytes of whole pages that `count` bytes at `offset` touch: what
    /// they take of a pipe's capacity, which counts one slot per page, so an
    /// unaligned range takes a page more than its size.
    public static func bytesSpanned(offset: UInt64, count: Int) -> Int {
        let page = UInt64(pageBytes)
        return Int((offset % page + UInt64(count) + page - 1) / page * page)
    }

    static let pageBytes = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Moves `count` bytes of `fd` from `offset` into the pipe. Throws
    /// EAGAIN if the pipe fills first (the pages took more slots than
    /// `fits` expected) and EIO if the file ends first; either way the pipe
    /// may hold part of the range: close it.
    public func fill(from fd: Int32, offset: UInt64, count: Int) throws {
        var done = 0
        while done < count {
            let n = try syscall("splice", "file to pipe") {
                hs_splice_from_file(fd, offset + UInt64(done), fds.write, UInt(count - done))
            }
            if n == 0 { throw OSError("splice", errno: EIO, object: "file ended at \(offset + UInt64(done))") }
            done += n
            buffered += n
        }
    }

    /// Moves everything in the pipe to `fd` (a socket). On a throw the peer
    /// got part of it; the connection is no longer in step.
    public func drain(to fd: Int32) throws {
        while buffered > 0 {
            let n = try syscall("splice", "pipe to socket") { hs_splice_to(fds.read, fd, UInt(buffered)) }
            if n == 0 { throw OSError("splice", errno: EPIPE, object: "socket took nothing") }
            buffered -= n
        }
    }
}
