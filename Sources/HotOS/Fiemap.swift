// Where a file's data lives on its block device, from FS_IOC_FIEMAP. A
// backup uses this to leave out blocks it need not copy (a swap file, an
// excluded directory): every extent a caller excludes must be a byte range
// that holds that file's data and nothing else.
//
// What a physical offset means depends on the filesystem: on ext2/3/4 and
// XFS it is a byte offset on the filesystem's (data) device; on btrfs it is
// a btrfs logical address, which is NOT a device offset. Only use these
// extents for exclusion on ext* and XFS.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

/// One extent of a file: `length` bytes of the file from `logical` live on
/// the device from `physical`.
public struct FileExtent: Equatable, Hashable, Sendable {
    public var logical: UInt64   // bytes from the start of the file
    public var physical: UInt64  // bytes from the start of the device
    public var length: UInt64    // bytes
    public var flags: Flags

    public init(logical: UInt64, physical: UInt64, length: UInt64, flags: Flags = []) {
        self.logical = logical
        self.physical = physical
        self.length = length
        self.flags = flags
    }

    /// FIEMAP_EXTENT_* flags.
    public struct Flags: OptionSet, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }

        /// The last extent of the file.
        public static let last = Flags(rawValue: HS_FIEMAP_EXTENT_LAST)
        /// The location of the data is not known: `physical` means nothing.
        public static let unknown = Flags(rawValue: HS_FIEMAP_EXTENT_UNKNOWN)
        /// Delayed allocation: the data has no blocks yet (also sets `unknown`).
        public static let delalloc = Flags(rawValue: HS_FIEMAP_EXTENT_DELALLOC)
        /// The data is stored encoded (compressed...): the on-disk bytes are
        /// not `length` long and cannot be read directly.
        public static let encoded = Flags(rawValue: HS_FIEMAP_EXTENT_ENCODED)
        /// The data is encrypted by the filesystem (the location is valid).
        public static let encrypted = Flags(rawValue: HS_FIEMAP_EXTENT_DATA_ENCRYPTED)
        /// Offsets may not be block aligned: the block holds other data too.
        public static let notAligned = Flags(rawValue: HS_FIEMAP_EXTENT_NOT_ALIGNED)
        /// The data lives inside metadata (an inode, a btree block).
        public static let inline = Flags(rawValue: HS_FIEMAP_EXTENT_DATA_INLINE)
        /// The data is packed into a block with other files' tails.
        public static let tail = Flags(rawValue: HS_FIEMAP_EXTENT_DATA_TAIL)
        /// Allocated but never written: the file reads zeros there.
        public static let unwritten = Flags(rawValue: HS_FIEMAP_EXTENT_UNWRITTEN)
        /// The filesystem has no real extents; this is a merge of blocks.
        public static let merged = Flags(rawValue: HS_FIEMAP_EXTENT_MERGED)
        /// The blocks are shared with another file or snapshot (reflink).
        public static let shared = Flags(rawValue: HS_FIEMAP_EXTENT_SHARED)

        static let names: [(Flags, String)] = [
            (.last, "last"), (.unknown, "unknown"), (.delalloc, "delalloc"),
            (.encoded, "encoded"), (.encrypted, "encrypted"), (.notAligned, "not_aligned"),
            (.inline, "inline"), (.tail, "tail"), (.unwritten, "unwritten"),
            (.merged, "merged"), (.shared, "shared"),
        ]

        public var description: String {
            var parts = Flags.names.filter { contains($0.0) }.map { $0.1 }
            let known = Flags.names.reduce(Flags()) { $0.union($1.0) }
            let rest = subtracting(known).rawValue
            if rest != 0 { parts.append("0x" + String(rest, radix: 16)) }
            return "[" + parts.joined(separator: ",") + "]"
        }
    }

    /// Flags that make an extent unsafe to leave out of a backup:
    /// - `unknown`, `delalloc`: no reliable physical location (sync the
    ///   file, which `fileExtents` already asks for, and map it again; or
    ///   keep those blocks in the backup);
    /// - `inline`, `tail`, `notAligned`: the bytes share blocks with
    ///   metadata or other files;
    /// - `encoded`: `length` is the decoded size, not the on-disk size;
    /// - `shared`: the blocks also belong to another file or snapshot.
    public static let notExcludable: Flags = [.unknown, .delalloc, .inline, .tail, .notAligned, .encoded, .shared]

    /// Whether a backup may leave these device bytes out because they hold
    /// this file's data alone (see `notExcludable`).
    public var isExcludable: Bool { flags.isDisjoint(with: FileExtent.notExcludable) && length > 0 }

    /// The device bytes of the extent.
    public var physicalRange: Range<UInt64> { physical ..< physical + length }
}

/// The extents of the regular file at `path`, in file order. The file's
/// dirty data is written first (FIEMAP_FLAG_SYNC), so delayed allocations
/// normally get their blocks; a file that is being written while it is
/// mapped can still show `unknown`/`delalloc` extents, which have no
/// reliable physical location. Holes have no extent. See
/// `FileExtent.isExcludable` before leaving any extent out of a backup.
public func fileExtents(path: String) throws -> [FileExtent] {
    let fd = try syscall("open", path) { open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK) }
    defer { close(fd) }
    var st = stat()
    try syscall("fstat", path) { fstat(fd, &st) }
    guard (st.st_mode & S_IFMT) == S_IFREG else {
        throw OSError("FS_IOC_FIEMAP", errno: EINVAL, object: "\(path) (not a regular file)")
    }
    return try fileExtents(fd: fd, name: path)
}

/// The extents of the regular file open on `fd` (see `fileExtents(path:)`);
/// `name` is only used in errors. `batch` extents are asked for per ioctl.
public func fileExtents(fd: Int32, name: String = "", batch: Int = Int(HS_FIEMAP_BATCH_MAX)) throws -> [FileExtent] {
    let max = UInt32(Swift.max(1, Swift.min(batch, Int(HS_FIEMAP_BATCH_MAX))))
    var buf = [hs_fiemap_extent](repeating: hs_fiemap_extent(), count: Int(max))
    var out: [FileExtent] = []
    var start: UInt64 = 0
    var flags = HS_FIEMAP_FLAG_SYNC   // the first call syncs; later ones need not
    while true {
        var mapped: UInt32 = 0
        _ = try buf.withUnsafeMutableBufferPointer { p in
            try syscall("FS_IOC_FIEMAP", name) {
                hs_fiemap(fd, start, UInt64.max - start, flags, p.baseAddress!, max, &mapped)
            }
        }
        flags = 0
        if mapped == 0 { break }
        for e in buf[0 ..< Int(mapped)] {
            out.append(FileExtent(logical: e.logical, physical: e.physical, length: e.length,
                                  flags: FileExtent.Flags(rawValue: e.flags)))
        }
        let last = out[out.count - 1]
        if last.flags.contains(.last) { break }
        // Ask again from the end of the last extent; a filesystem that does
        // not move forward would loop for ever.
        let next = last.logical &+ last.length
        guard next > start, next > last.logical else {
            throw OSError("FS_IOC_FIEMAP", errno: EIO, object: "\(name) (extent map does not advance at \(start))")
        }
        start = next
    }
    return out
}

/// Extents of every regular file under `path` (a directory, or one regular
/// file), sorted by physical offset. Symbolic links are never followed;
/// with `oneFileSystem` the walk does not enter directories on another
/// device (other mounts), whose extents would be offsets on a different
/// device. `files` counts the regular files mapped (empty ones included;
/// a file with several hard links in the tree is mapped and counted once);
/// `skipped` lists what was not mapped, with the reason: symlinks, special
/// files, other filesystems, entries that could not be opened or mapped.
/// Errors about `path` itself throw; errors below it become skipped entries.
public func directoryExtents(path: String, oneFileSystem: Bool = true)
    throws -> (extents: [FileExtent], files: Int, skipped: [(String, String)]) {
    var st = stat()
    try syscall("lstat", path) { lstat(path, &st) }
    let rootDev = st.st_dev
    switch st.st_mode & S_IFMT {
    case S_IFREG:
        return (try fileExtents(path: path), 1, [])
    case S_IFDIR:
        break
    default:
        throw OSError("open", errno: ENOTDIR, object: "\(path) (neither a directory nor a regular file)")
    }

    var extents: [FileExtent] = []
    var files = 0
    var skipped: [(String, String)] = []
    var seenLinks = Set<[UInt64]>()   // (dev, ino) of files with more than one link
    var pending = [path]   // directories still to read (depth first, no recursion)
    while let dir = pending.popLast() {
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if dfd < 0 {
            let e = OSError("open", errno: errno, object: dir)
            if dir == path { throw e }
            skipped.append((dir, "cannot open directory: \(e.message)"))
            continue
        }
        guard let dp = fdopendir(dfd) else {
            let e = OSError("fdopendir", errno: errno, object: dir)
            close(dfd)
            if dir == path { throw e }
            skipped.append((dir, "cannot read directory: \(e.message)"))
            continue
        }
        defer { closedir(dp) }
        let prefix = dir.hasSuffix("/") ? dir : dir + "/"
        while true {
            errno = 0
            guard let ent = readdir(dp) else {
                if errno != 0 { skipped.append((dir, "reading the directory failed: \(OSError("readdir", errno: errno).message)")) }
                break
            }
            let name = withUnsafeBytes(of: ent.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            if name == "." || name == ".." { continue }
            let child = prefix + name
            var cst = stat()
            if fstatat(dfd, name, &cst, AT_SYMLINK_NOFOLLOW) != 0 {
                skipped.append((child, "cannot stat: \(OSError("fstatat", errno: errno).message)"))
                continue
            }
            let kind = cst.st_mode & S_IFMT
            if oneFileSystem && cst.st_dev != rootDev {
                skipped.append((child, "on another filesystem (not crossed)"))
                continue
            }
            switch kind {
            case S_IFDIR:
                pending.append(child)
            case S_IFREG:
                let fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)
                if fd < 0 {
                    skipped.append((child, "cannot open: \(OSError("open", errno: errno).message)"))
                    continue
                }
                defer { close(fd) }
                // The entry may have been replaced between fstatat and openat.
                var fst = stat()
                guard fstat(fd, &fst) == 0, (fst.st_mode & S_IFMT) == S_IFREG,
                      !oneFileSystem || fst.st_dev == rootDev else {
                    skipped.append((child, "changed while being read"))
                    continue
                }
                if fst.st_nlink > 1 && !seenLinks.insert([UInt64(fst.st_dev), UInt64(fst.st_ino)]).inserted {
                    continue   // another name of a file already mapped
                }
                do {
                    extents += try fileExtents(fd: fd, name: child)
                    files += 1
                } catch let e as OSError {
                    skipped.append((child, "cannot map extents: \(e.message)"))
                }
            case S_IFLNK:
                skipped.append((child, "symbolic link (not followed)"))
            case S_IFBLK, S_IFCHR:
                skipped.append((child, "device node"))
            case S_IFIFO:
                skipped.append((child, "fifo"))
            case S_IFSOCK:
                skipped.append((child, "socket"))
            default:
                skipped.append((child, "unknown file type"))
            }
        }
    }
    extents.sort { ($0.physical, $0.logical) < ($1.physical, $1.logical) }
    return (extents, files, skipped)
}
