// hb_NN.tmp: the file tier of the COW buffer. Fixed-size slots in files of
// `fileBytes` each, created on demand in the buffer directory (never on a
// volume being backed up) up to `limitBytes` in all. A slot's location is
// (file index << 32 | slot index). Freed slots are reused lowest file
// first; a last file whose slots are all free is deleted, so the files
// shrink as the imager archives. `removeAll` deletes every file.
//
// The files are written and read with O_DIRECT when the slot size allows
// (a multiple of 4 KiB): an hb file is scratch written once and read at most
// once, so the page cache gains nothing from it, while buffered writes would
// evict the live workload's cache and add to the dirty pages the kernel
// throttles the application's own writes against. A file system that
// refuses O_DIRECT (at open, or EINVAL at the first write) gets buffered
// files instead; `directIO` tells which is in use.
//
// Given `directoryFD` (the daemon opens the buffer directory once, at
// attach), files are created and deleted relative to that descriptor
// (openat/unlinkat): a file system mounted later over the directory's path
// (or a parent of it) cannot redirect the hb files onto another volume. The
// files are 0600 whatever the umask: they hold the volume's data.
//
// No file-system call runs under the store's mutex: the engine calls `free`
// and `removeAll` under its own lock, so an unlink, close or open that
// blocks (a slow or wedged buffer disk, or one whose writes need the very
// volume HotCore protects) would stop every live write. New files
// are opened outside the mutex (a placeholder reserves the index); with
// `deferDeletes`, closes and unlinks are queued and `collectGarbage` (the
// daemon's movers) does them; a name waiting for its unlink is not reused.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim
import HotSync

public final class HBFileStore: @unchecked Sendable {
    public let directory: String
    /// The buffer directory, held open (not owned: the caller closes it); -1: by path.
    public let directoryFD: Int32
    public let slotBytes: Int
    public let fileBytes: UInt64
    public let limitBytes: UInt64
    private let mutex = Lock()

    private struct HBFile {
        var fd: Int32
        var path: String
        var name: String { String(path.split(separator: "/").last ?? "") }
        var nextUnused: UInt32    // slots below this have been handed out at least once
        var free: [UInt32]
        var live: Int
        var direct: Bool
        var opening = false       // placeholder while the file is opened outside the mutex
    }
    private var files: [HBFile?] = []
    /// I/O running outside the lock, and descriptors whose close waits for it:
    /// closing a descriptor under a running pread/pwrite could let the number
    /// be reused by another open and the I/O land in the wrong file.
    private var ioInFlight = 0
    private var pendingClose: [Int32] = []
    /// Files to delete (deferDeletes), and those being deleted now.
    private var pendingUnlink: [String] = []
    private var unlinking: Set<String> = []
    /// Bumped by removeAll, so a file opened meanwhile is not installed.
    private var epoch = 0
    /// Queue closes and unlinks for `collectGarbage` instead of doing them.
    public let deferDeletes: Bool
    private let slotsPerFile: UInt32
    /// O_DIRECT for new files (guarded by the mutex); turned off for good
    /// when the directory's file system refuses it.
    private var wantDirect: Bool
    /// Tests only (@testable): the next O_DIRECT write fails with EINVAL
    /// without being tried, as on a file system that takes O_DIRECT at open
    /// and refuses it at the first write.
    var refuseNextDirectWrite = false
    /// Alignment O_DIRECT needs of buffers, offsets and lengths.
    static let directAlignment = 4096

    public enum StoreError: Error, CustomStringConvertible {
        case full(limit: UInt64)
        case os(OSError)
        public var description: String {
            switch self {
            case .full(let l): return "the buffer files reached their limit of \(l) bytes"
            case .os(let e): return e.description
            }
        }
    }

    /// `directIO` asks for O_DIRECT files; it is used only when `slotBytes`
    /// is a multiple of 4 KiB and the file system accepts it.
    public init(directory: String, directoryFD: Int32 = -1, slotBytes: Int, fileBytes: UInt64, limitBytes: UInt64,
                directIO: Bool = true, deferDeletes: Bool = false) {
        self.directory = directory
        self.directoryFD = directoryFD
        self.deferDeletes = deferDeletes
        wantDirect = directIO && slotBytes % HBFileStore.directAlignment == 0
        self.slotBytes = slotBytes
        self.fileBytes = max(fileBytes, UInt64(slotBytes))
        self.limitBytes = limitBytes
        slotsPerFile = UInt32(min(self.fileBytes / UInt64(slotBytes), UInt64(UInt32.max)))
    }

    deinit { removeAll(); collectGarbage() }

    private func locked<T>(_ body: () throws -> T) rethrows -> T {
        try mutex.withLock(body)
    }

    /// Takes a file's descriptor for I/O outside the lock; pair with `endIO`.
    private func beginIO(_ i: Int) -> (fd: Int32, direct: Bool) {
        locked {
            guard i < files.count, let f = files[i] else { return (-1, false) }
            ioInFlight += 1
            return (f.fd, f.direct)
        }
    }

    private func endIO() {
        locked {
            ioInFlight -= 1
            if ioInFlight == 0 && !deferDeletes { for fd in pendingClose { close(fd) }; pendingClose.removeAll() }
        }
    }

    /// Closes now, or once the I/O in flight is done. Lock held.
    private func closeLater(_ fd: Int32) {
        if fd < 0 { return }
        if ioInFlight == 0 && !deferDeletes { close(fd) } else { pendingClose.append(fd) }
    }

    /// Deletes file `name` now, or queues it (deferDeletes). Lock held.
    private func doom(_ name: String) {
        if deferDeletes { pendingUnlink.append(name) } else { unlinkFile(name) }
    }

    /// Does the queued closes and unlinks, outside every lock (deferDeletes).
    public func collectGarbage() {
        let (fds, names) = locked { () -> ([Int32], [String]) in
            var fds: [Int32] = []
            if ioInFlight == 0 { fds = pendingClose; pendingClose.removeAll() }
            let names = pendingUnlink
            pendingUnlink.removeAll()
            unlinking.formUnion(names)
            return (fds, names)
        }
        if fds.isEmpty && names.isEmpty { return }
        for n in names { unlinkFile(n) }
        for fd in fds { close(fd) }
        locked { unlinking.subtract(names) }
    }

    /// Files waiting to be closed or deleted (tests).
    public var pendingGarbage: Int { locked { pendingClose.count + pendingUnlink.count } }

    public static func fileName(_ i: Int) -> String {
        i < 10 ? "hb_0\(i).tmp" : "hb_\(i).tmp"
    }

    /// Opens (creates) hb file `name` in the buffer directory, 0600.
    private func openFile(_ name: String, _ flags: Int32) -> Int32 {
        let fd = directoryFD >= 0 ? openat(directoryFD, name, flags, 0o600) : open(directory + "/" + name, flags, 0o600)
        // O_TRUNC keeps the mode of a stale file a previous run left.
        if fd >= 0 { _ = fchmod(fd, 0o600) }
        return fd
    }

    /// Deletes hb file `name` (no error if it is missing).
    public func unlinkFile(_ name: String) {
        if directoryFD >= 0 { unlinkat(directoryFD, name, 0) } else { unlink(directory + "/" + name) }
    }

    private func allocate() throws -> UInt64 {
        let reserved = try locked { () -> (loc: UInt64?, index: Int, epoch: Int) in
            for i in files.indices {
                guard var f = files[i], !f.opening else { continue }
                if let s = f.free.popLast() {
                    f.live += 1; files[i] = f
                    return (UInt64(i) << 32 | UInt64(s), i, epoch)
                }
                if f.nextUnused < slotsPerFile {
                    let s = f.nextUnused
                    f.nextUnused += 1; f.live += 1; files[i] = f
                    return (UInt64(i) << 32 | UInt64(s), i, epoch)
                }
            }
            // A new file, if the limit allows one more.
            let count = UInt64(files.compactMap { $0 }.count)
            if (count + 1) * fileBytes > limitBytes && count > 0 || fileBytes > limitBytes {
                throw StoreError.full(limit: limitBytes)
            }
            // The lowest free index whose name is not waiting to be deleted.
            var i = 0
            while i < files.count && files[i] != nil || pendingUnlink.contains(HBFileStore.fileName(i))
                    || unlinking.contains(HBFileStore.fileName(i)) { i += 1 }
            let f = HBFile(fd: -1, path: directory + "/" + HBFileStore.fileName(i), nextUnused: 1, free: [], live: 1,
                           direct: false, opening: true)
            while files.count <= i { files.append(nil) }
            files[i] = f
            return (nil, i, epoch)
        }
        if let loc = reserved.loc { return loc }
        // Open the new file outside the mutex.
        let i = reserved.index
        let name = HBFileStore.fileName(i)
        let path = directory + "/" + name
        var fd: Int32 = -1
        var direct = locked { wantDirect }
        if direct {
            fd = openFile(name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW | HS_O_DIRECT)
            if fd < 0 && errno == EINVAL { direct = false; locked { wantDirect = false } }
        }
        if fd < 0 && !direct { fd = openFile(name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW) }
        let e = errno
        return try locked {
            let ours = reserved.epoch == epoch && i < files.count && files[i]?.opening == true
            if fd < 0 {
                if ours { files[i] = nil; while let l = files.last, l == nil { files.removeLast() } }
                throw StoreError.os(OSError("open", errno: e, object: path))
            }
            guard ours else {
                // removeAll ran meanwhile: this file is not wanted.
                closeLater(fd); doom(name)
                throw StoreError.os(OSError("open", errno: ECANCELED, object: path))
            }
            files[i] = HBFile(fd: fd, path: path, nextUnused: 1, free: [], live: 1, direct: direct && wantDirect)
            return UInt64(i) << 32
        }
    }

    /// Stores one slot's bytes; returns its location.
    public func store(_ data: UnsafeRawPointer, count: Int) throws -> UInt64 {
        precondition(count <= slotBytes)
        let loc = try allocate()
        do { try writeRun(loc, [(data, count)]) } catch {
            free(loc)
            throw error
        }
        return loc
    }

    /// Stores several slots: fresh contiguous slots where possible, written
    /// with one pwritev per contiguous run. All or nothing.
    public func store(batch: [(UnsafeRawPointer, Int)]) throws -> [UInt64] {
        var locs: [UInt64] = []
        locs.reserveCapacity(batch.count)
        do {
            while locs.count < batch.count {
                locs.append(contentsOf: try allocateRun(batch.count - locs.count))
            }
            // Write runs of consecutive slots in one file together.
            var i = 0
            while i < locs.count {
                var j = i
                while j + 1 < locs.count && locs[j + 1] == locs[j] + 1 && batch[j].1 == slotBytes { j += 1 }
                try writeRun(locs[i], Array(batch[i...j]))
                i = j + 1
            }
        } catch {
            for l in locs { free(l) }
            throw error
        }
        return locs
    }

    /// Up to `n` fresh consecutive slots of one file (at least one slot).
    private func allocateRun(_ n: Int) throws -> [UInt64] {
        let run: [UInt64]? = locked {
            for i in files.indices {
                guard var f = files[i], !f.opening, f.nextUnused < slotsPerFile, f.free.isEmpty else { continue }
                let k = UInt32(min(UInt64(n), UInt64(slotsPerFile - f.nextUnused)))
                let first = f.nextUnused
                f.nextUnused += k; f.live += Int(k); files[i] = f
                return (0..<UInt64(k)).map { UInt64(i) << 32 | (UInt64(first) + $0) }
            }
            return nil
        }
        if let run { return run }
        return [try allocate()]
    }

    private func writeRun(_ first: UInt64, _ items: [(UnsafeRawPointer, Int)]) throws {
        let i = Int(first >> 32)
        let (fd, direct) = beginIO(i)
        guard fd >= 0 else { throw StoreError.os(OSError("pwritev", errno: EBADF, object: HBFileStore.fileName(i))) }
        defer { endIO() }
        let off = off_t(first & 0xffff_ffff) * off_t(slotBytes)
        if direct {
            // Whole aligned slots only: a short or unaligned item goes
            // through a zero-padded bounce slot.
            let align = HBFileStore.directAlignment
            let odd = items.indices.filter { Int(bitPattern: items[$0].0) % align != 0 || items[$0].1 != slotBytes }
            let bounce = odd.isEmpty ? nil : UnsafeMutableRawPointer.allocate(byteCount: odd.count * slotBytes, alignment: align)
            defer { bounce?.deallocate() }
            var iov = items.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.0), iov_len: slotBytes) }
            for (k, j) in odd.enumerated() {
                let slot = bounce! + k * slotBytes
                slot.copyMemory(from: items[j].0, byteCount: items[j].1)
                memset(slot + items[j].1, 0, slotBytes - items[j].1)
                iov[j].iov_base = slot
            }
            let refused = locked { () -> Bool in
                defer { refuseNextDirectWrite = false }
                return refuseNextDirectWrite
            }
            let e = refused ? EINVAL : pwritevAll(fd, &iov, off)
            if e == 0 { return }
            guard e == EINVAL else { throw StoreError.os(OSError("pwritev", errno: e, object: directory + "/" + HBFileStore.fileName(i))) }
            // The file system took O_DIRECT at open but not this write.
            dropDirect(i, fd)
        }
        var iov = items.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.0), iov_len: $0.1) }
        let e = pwritevAll(fd, &iov, off)
        if e != 0 { throw StoreError.os(OSError("pwritev", errno: e, object: directory + "/" + HBFileStore.fileName(i))) }
    }

    /// Writes every iovec at `offset`; 0 or the errno.
    private func pwritevAll(_ fd: Int32, _ iov: inout [iovec], _ offset: off_t) -> Int32 {
        var off = offset
        var start = 0
        while start < iov.count {
            let n = min(iov.count - start, 1024)
            let put = iov.withUnsafeMutableBufferPointer { p in pwritev(fd, p.baseAddress! + start, Int32(n), off) }
            if put < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if put == 0 { return EIO }
            off += off_t(put)
            advance(&iov, start: &start, by: put)
        }
        return 0
    }

    /// Turns O_DIRECT off for file `i` and for files yet to be made.
    private func dropDirect(_ i: Int, _ fd: Int32) {
        locked {
            wantDirect = false
            if i < files.count, var f = files[i], f.fd == fd {
                f.direct = false
                files[i] = f
            }
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~HS_O_DIRECT)
    }

    public func load(_ location: UInt64, into buf: UnsafeMutableRawPointer, count: Int) throws {
        let i = Int(location >> 32)
        let (fd, direct) = beginIO(i)
        guard fd >= 0 else { throw StoreError.os(OSError("pread", errno: EBADF, object: "hb slot \(location)")) }
        defer { endIO() }
        let off = off_t(location & 0xffff_ffff) * off_t(slotBytes)
        if direct {
            let align = HBFileStore.directAlignment
            let whole = Int(bitPattern: buf) % align == 0 && count == slotBytes
            let target = whole ? buf : UnsafeMutableRawPointer.allocate(byteCount: slotBytes, alignment: align)
            defer { if !whole { target.deallocate() } }
            let e = preadAll(fd, target, slotBytes, off)
            if e == 0 {
                if !whole { buf.copyMemory(from: target, byteCount: count) }
                return
            }
            guard e == EINVAL else { throw StoreError.os(OSError("pread", errno: e, object: directory + "/" + HBFileStore.fileName(i))) }
            dropDirect(i, fd)
        }
        let e = preadAll(fd, buf, count, off)
        if e != 0 { throw StoreError.os(OSError("pread", errno: e, object: directory + "/" + HBFileStore.fileName(i))) }
    }

    /// Reads exactly `count` bytes at `offset`; 0 or the errno (EIO for a short file).
    private func preadAll(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: off_t) -> Int32 {
        var done = 0
        while done < count {
            let n = pread(fd, buf + done, count - done, offset + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if n == 0 { return EIO }
            done += n
        }
        return 0
    }

    /// Whether new buffer files use O_DIRECT (false once the file system refused it).
    public var directIO: Bool { locked { wantDirect } }

    public func free(_ location: UInt64) {
        locked {
            let i = Int(location >> 32)
            guard i < files.count, var f = files[i] else { return }
            f.free.append(UInt32(location & 0xffff_ffff))
            f.live -= 1
            files[i] = f
            // Shrink: delete trailing files with nothing live.
            while let last = files.last, let lf = last, lf.live == 0 {
                closeLater(lf.fd); doom(lf.name)
                files.removeLast()
                while let l = files.last, l == nil { files.removeLast() }
            }
        }
    }

    public var bytesInUse: UInt64 {
        locked { files.reduce(0) { $0 + UInt64($1?.live ?? 0) } * UInt64(slotBytes) }
    }

    /// Bytes the files occupy (high-water slot of each file).
    public var bytesAllocated: UInt64 {
        locked { files.reduce(0) { $0 + UInt64($1?.nextUnused ?? 0) } * UInt64(slotBytes) }
    }

    public var fileCount: Int { locked { files.compactMap { $0 }.count } }

    public func removeAll() {
        locked {
            // A file still being opened is closed and deleted by its opener.
            for f in files.compactMap({ $0 }) where !f.opening { closeLater(f.fd); doom(f.name) }
            files.removeAll()
            epoch &+= 1
        }
    }
}
