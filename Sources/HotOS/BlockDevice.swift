// The real device behind HotCore (a block device, or a regular file for
// tests): opened once, exclusively, and accessed with positional I/O from
// many threads at once. A block device opened with O_EXCL fails with EBUSY
// while it is mounted or held by another exclusive opener (device-mapper,
// md, another hotimage), which is exactly the refusal `attach` needs.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public final class BlockDevice: @unchecked Sendable {
    public let path: String
    public let fd: Int32
    public let size: UInt64
    public let sectorSize: Int
    public let isBlockDevice: Bool
    public let readOnly: Bool

    public enum OpenError: Error, CustomStringConvertible {
        case busy(String)
        case notADevice(String)
        case os(OSError)

        public var description: String {
            switch self {
            case .busy(let p):
                return "\(p) is busy: it is mounted or held by another program (device-mapper, md, another hotimage); unmount it first, or back up through the device that 'hotimage attach' prints"
            case .notADevice(let p):
                return "\(p) is neither a block device nor a regular file"
            case .os(let e):
                return e.description
            }
        }
    }

    /// Opens `path`; `exclusive` adds O_EXCL for block devices.
    public init(path: String, readOnly: Bool = false, exclusive: Bool = true, direct: Bool = false) throws {
        var st = stat()
        if stat(path, &st) != 0 { throw OpenError.os(OSError("stat", errno: errno, object: path)) }
        let mode = st.st_mode & S_IFMT
        guard mode == S_IFBLK || mode == S_IFREG else { throw OpenError.notADevice(path) }
        isBlockDevice = mode == S_IFBLK
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if exclusive && isBlockDevice { flags |= O_EXCL }
        if direct { flags |= HS_O_DIRECT }
        let fd = open(path, flags)
        if fd < 0 {
            let e = errno
            if e == EBUSY { throw OpenError.busy(path) }
            throw OpenError.os(OSError("open", errno: e, object: path))
        }
        self.fd = fd
        self.path = path
        self.readOnly = readOnly
        var sz: UInt64 = 0
        var ss: Int32 = 512
        if isBlockDevice {
            if hs_blk_getsize64(fd, &sz) != 0 { close(fd); throw OpenError.os(OSError("BLKGETSIZE64", errno: errno, object: path)) }
            _ = hs_blk_sszget(fd, &ss)
        } else {
            sz = UInt64(st.st_size)
        }
        size = sz
        sectorSize = Int(ss)
    }

    deinit { close(fd) }

    /// Reads exactly `count` bytes at `offset` (short reads are continued;
    /// reading past the end is an error).
    public func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
        var done = 0
        while done < count {
            let n = try syscall("pread", path) { pread(fd, buf + done, count - done, off_t(offset) + off_t(done)) }
            if n == 0 { throw OSError("pread", errno: EIO, object: "\(path) (short read at \(offset + UInt64(done)))") }
            done += n
        }
    }

    /// Reads consecutive bytes from `offset` into several buffers with
    /// preadv (IOV_MAX at a time), continuing short reads.
    public func read(into buffers: [(UnsafeMutableRawPointer, Int)], offset: UInt64) throws {
        var iov = buffers.map { iovec(iov_base: $0.0, iov_len: $0.1) }
        var off = offset
        var start = 0
        while start < iov.count {
            let n = min(iov.count - start, 1024)
            let got = try iov.withUnsafeMutableBufferPointer { p in
                try syscall("preadv", path) { preadv(fd, p.baseAddress! + start, Int32(n), off_t(off)) }
            }
            if got == 0 { throw OSError("preadv", errno: EIO, object: "\(path) (short read at \(off))") }
            // A short read resumes mid-buffer.
            off += UInt64(got)
            advance(&iov, start: &start, by: got)
        }
    }

    public func write(from buf: UnsafeRawPointer, count: Int, offset: UInt64) throws {
        var done = 0
        while done < count {
            let n = try syscall("pwrite", path) { pwrite(fd, buf + done, count - done, off_t(offset) + off_t(done)) }
            if n == 0 { throw OSError("pwrite", errno: EIO, object: path) }
            done += n
        }
    }

    public func flush() throws {
        try syscall("fdatasync", path) { fdatasync(fd) }
    }

    /// Makes [offset, offset+length) read as zeros. `unmap` lets the device
    /// deallocate (punch a hole / discard-and-zero) when it can.
    public func zero(offset: UInt64, length: UInt64, unmap: Bool) throws {
        if isBlockDevice {
            // fallocate on a block device: PUNCH_HOLE = discard with zeroing
            // guaranteed, ZERO_RANGE = write zeroes (Linux >= 4.9).
            let mode = unmap ? HS_FALLOC_PUNCH_HOLE : HS_FALLOC_ZERO_RANGE
            if hs_fallocate(fd, mode, offset, length) == 0 { return }
            if errno != EOPNOTSUPP && errno != EINVAL {
                throw OSError("fallocate", errno: errno, object: path)
            }
            try syscall("BLKZEROOUT", path) { hs_blk_zeroout(fd, offset, length) }
        } else {
            let mode = unmap ? HS_FALLOC_PUNCH_HOLE : HS_FALLOC_ZERO_RANGE
            if hs_fallocate(fd, mode, offset, length) == 0 { return }
            // Filesystems without fallocate modes: write zeros.
            let chunk = 1 << 20
            let z = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { z.deallocate() }
            memset(z, 0, chunk)
            var off = offset
            let end = offset + length
            while off < end {
                let n = Int(min(UInt64(chunk), end - off))
                try write(from: z, count: n, offset: off)
                off += UInt64(n)
            }
        }
    }
}
