// The device (or regular file) the writer stamps and the checker reads.
//
// TRIM and ZERO use fallocate(2), which is not variadic (ioctl is, and Swift cannot
// call variadic C functions):
//   block device: PUNCH_HOLE|KEEP_SIZE is the kernel's discard-and-zero path,
//                 ZERO_RANGE|KEEP_SIZE is BLKZEROOUT; both read back as zeros.
//   regular file: the same modes punch a hole / zero the range. When the filesystem
//                 refuses them (EOPNOTSUPP) the block is overwritten with zeros instead,
//                 said once on stderr.
import CHotShim
import Glibc
import HotSync

final class BlockTarget {
    let path: String
    let fd: Int32
    let isBlockDevice: Bool
    let isDirect: Bool
    private let zeroBuffer = AlignedBuffer(bytes: Stamp.blockSize)
    private var fallbackWarned = false
    private let lock = Lock()

    private init(path: String, fd: Int32, isBlockDevice: Bool, isDirect: Bool) {
        self.path = path
        self.fd = fd
        self.isBlockDevice = isBlockDevice
        self.isDirect = isDirect
    }

    deinit { close(fd) }

    /// Opens for stamping: O_RDWR|O_DIRECT. A regular file on a filesystem that refuses
    /// O_DIRECT (EINVAL) is reopened without it, said on stderr; a device never is.
    static func openForWriting(_ path: String) throws -> BlockTarget {
        var st = stat()
        guard stat(path, &st) == 0 else { throw StampError.errno("cannot stat \(path)") }
        let kind = st.st_mode & S_IFMT
        guard kind == S_IFBLK || kind == S_IFREG else {
            throw StampError("\(path) is neither a block device nor a regular file")
        }
        let isBlock = kind == S_IFBLK
        var fd = open(path, O_RDWR | O_CLOEXEC | HS_O_DIRECT)
        var direct = true
        if fd < 0 && errno == EINVAL && !isBlock {
            warn("stamp: \(path): filesystem refuses O_DIRECT; writing through the page cache")
            fd = open(path, O_RDWR | O_CLOEXEC)
            direct = false
        }
        guard fd >= 0 else { throw StampError.errno("cannot open \(path)") }
        return BlockTarget(path: path, fd: fd, isBlockDevice: isBlock, isDirect: direct)
    }

    /// Opens read-only through the page cache (the checker does not need O_DIRECT).
    static func openForReading(_ path: String) throws -> BlockTarget {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw StampError.errno("cannot open \(path)") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw StampError.errno("cannot stat \(path)", e)
        }
        return BlockTarget(path: path, fd: fd, isBlockDevice: st.st_mode & S_IFMT == S_IFBLK, isDirect: false)
    }

    /// Size in bytes (lseek to the end works for block devices and files alike).
    func size() throws -> UInt64 {
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else { throw StampError.errno("cannot size \(path)") }
        return UInt64(end)
    }

    /// Makes sure `bytes` are addressable: a short regular file is extended with zeros,
    /// a short device is an error.
    func ensureSize(_ bytes: UInt64) throws {
        let current = try size()
        guard current < bytes else { return }
        guard !isBlockDevice else {
            throw StampError("\(path) has \(current) bytes, the block range needs \(bytes)")
        }
        guard ftruncate(fd, off_t(bytes)) == 0 else { throw StampError.errno("cannot extend \(path)") }
    }

    /// Writes `count` bytes from `buffer` at `offset`. Returns 0 or the errno value
    /// (EIO for a write that made no progress).
    func write(_ buffer: UnsafeRawPointer, count: Int, at offset: UInt64) -> Int32 {
        var done = 0
        while done < count {
            let n = pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if n == 0 { return EIO }
            done += n
        }
        return 0
    }

    /// Reads exactly `count` bytes at `offset`; returns the number read (short at end of file).
    func read(into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws -> Int {
        var done = 0
        while done < count {
            let n = pread(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw StampError.errno("cannot read \(path) at \(offset + UInt64(done))")
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// TRIM: discard the range; it reads back as zeros. Returns 0 or errno.
    func discard(at offset: UInt64, length: UInt64) -> Int32 {
        allocate(mode: HS_FALLOC_PUNCH_HOLE, offset: offset, length: length)
    }

    /// ZERO: zero the range (BLKZEROOUT semantics). Returns 0 or errno.
    func zeroOut(at offset: UInt64, length: UInt64) -> Int32 {
        allocate(mode: HS_FALLOC_ZERO_RANGE, offset: offset, length: length)
    }

    private func allocate(mode: Int32, offset: UInt64, length: UInt64) -> Int32 {
        let rc = Sys.fallocate(fd, mode: mode, offset: offset, length: length)
        guard rc == EOPNOTSUPP, !isBlockDevice else { return rc }
        lock.withLock {
            if !fallbackWarned {
                fallbackWarned = true
                warn("stamp: \(path): fallocate mode \(mode) unsupported here; writing zeros instead")
            }
        }
        var at = offset
        while at < offset + length {
            let rc = write(zeroBuffer.pointer, count: Stamp.blockSize, at: at)
            if rc != 0 { return rc }
            at += UInt64(Stamp.blockSize)
        }
        return 0
    }
}
