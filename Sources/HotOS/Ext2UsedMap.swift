// The used space of an UNMOUNTED ext2/3/4 filesystem, from its block
// bitmaps through libext2fs. (A mounted one is mapped with FS_IOC_GETFSMAP,
// see FSMap.swift: the on-disk bitmaps of a mounted filesystem are stale.)
#if canImport(Glibc)
import Glibc
#endif
import CExt2fs

/// A libext2fs error: the failing call, the device, the errcode_t and its
/// com_err text ("Bad magic number in super-block", ...).
public struct Ext2Error: Error, CustomStringConvertible, Equatable, Sendable {
    public var call: String
    public var code: Int
    public var object: String
    public var message: String

    public init(_ call: String, code: Int, object: String) {
        self.call = call
        self.code = code
        self.object = object
        self.message = ext2ErrorMessage(code)
    }

    public var description: String {
        "\(call) \(object): \(message) (ext2fs error \(code))"
    }
}

/// Used byte ranges of the ext2/3/4 filesystem on `devicePath` (a block
/// device or an image file), sorted and merged, read from the on-disk
/// block bitmaps. Everything before the first data block (the boot block of
/// a 1 KiB-block filesystem) and the superblock area (the first 2048 bytes)
/// always count as used. Ranges end at `totalBytes` (blocks × block size,
/// the filesystem's size, which can be less than the device's).
///
/// `needsRecovery` is the superblock's RECOVER flag: the journal holds
/// transactions not yet written to their home blocks, so the bitmaps may be
/// out of date; a caller should refuse (or replay the journal with e2fsck
/// first), or at least warn. The filesystem must not be mounted: the
/// on-disk bitmaps of a mounted filesystem lag behind the kernel's.
public func ext2UsedExtents(devicePath: String) throws
    -> (blockSize: Int, totalBytes: UInt64, used: [Range<UInt64>], needsRecovery: Bool) {
    ext2InitErrorTable()
    var fsOpt: ext2_filsys?
    // Read-only: no EXT2_FLAG_RW, so nothing is ever written back.
    let flags = Int32(EXT2_FLAG_64BITS)
    var err = ext2fs_open2(devicePath, nil, flags, 0, 0, unix_io_manager, &fsOpt)
    guard err == 0, let fs = fsOpt else {
        throw Ext2Error("ext2fs_open2", code: Int(err), object: devicePath)
    }
    var closing: ext2_filsys? = fs
    defer { ext2fs_close_free(&closing) }

    let sb = fs.pointee.super!
    let blockSize = Int(fs.pointee.blocksize)
    let blocks = UInt64(ext2fs_blocks_count(sb))
    let totalBytes = blocks * UInt64(blockSize)
    let needsRecovery = (sb.pointee.s_feature_incompat & UInt32(EXT3_FEATURE_INCOMPAT_RECOVER)) != 0

    err = ext2fs_read_block_bitmap(fs)
    guard err == 0 else { throw Ext2Error("ext2fs_read_block_bitmap", code: Int(err), object: devicePath) }
    let map = fs.pointee.block_map!

    var used: [Range<UInt64>] = []
    func add(_ r: Range<UInt64>) {
        let r = r.clamped(to: 0 ..< totalBytes)
        if r.isEmpty { return }
        if let last = used.last, last.upperBound >= r.lowerBound {
            used[used.count - 1] = last.lowerBound ..< max(last.upperBound, r.upperBound)
        } else {
            used.append(r)
        }
    }
    // Boot block and superblock: in use whatever the bitmap says (on a
    // 1 KiB-block filesystem block 0 is not in the bitmap at all).
    let firstData = UInt64(sb.pointee.s_first_data_block)
    add(0 ..< max(2048, firstData * UInt64(blockSize)))

    // Walk the bitmap run by run: the next set bit, then the next clear one.
    let bs = UInt64(blockSize)
    // In block numbers: with bigalloc the bitmap counts clusters, but the
    // *_block_bitmap2 calls take and return blocks (cluster-aligned runs).
    let end = blocks &- 1
    var b = firstData
    while blocks > 0 && b <= end {
        var first: blk64_t = 0
        err = ext2fs_find_first_set_block_bitmap2(map, blk64_t(b), blk64_t(end), &first)
        if err == ENOENT { break }
        guard err == 0 else { throw Ext2Error("ext2fs_find_first_set_block_bitmap2", code: Int(err), object: devicePath) }
        var clear: blk64_t = 0
        let runEnd: UInt64   // one past the last used block of the run
        if UInt64(first) >= end {
            runEnd = end + 1
        } else {
            err = ext2fs_find_first_zero_block_bitmap2(map, first + 1, blk64_t(end), &clear)
            if err == ENOENT {
                runEnd = end + 1
            } else if err == 0 {
                runEnd = UInt64(clear)
            } else {
                throw Ext2Error("ext2fs_find_first_zero_block_bitmap2", code: Int(err), object: devicePath)
            }
        }
        add(UInt64(first) * bs ..< runEnd * bs)
        b = runEnd
    }
    return (blockSize, totalBytes, used, needsRecovery)
}

// com_err: libext2fs needs libcom_err (a dependency of libext2fs.so, so it
// is loaded with it), but the link line only names ext2fs; error_message
// is therefore looked up at run time rather than linked.
private typealias ErrorMessageFn = @convention(c) (Int) -> UnsafePointer<CChar>?

private let errorMessageFn: ErrorMessageFn? = {
    guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "error_message") else { return nil }
    return unsafeBitCast(sym, to: ErrorMessageFn.self)
}()

private let ext2TableOnce: Void = {
    // Registers the EXT2_ET_* texts with com_err (part of libext2fs).
    initialize_ext2_error_table()
}()

private func ext2InitErrorTable() { _ = ext2TableOnce }

/// The text of an errcode_t: errno values and EXT2_ET_* codes.
func ext2ErrorMessage(_ code: Int) -> String {
    ext2InitErrorTable()
    if let fn = errorMessageFn, let s = fn(code) { return String(cString: s) }
    if code > 0 && code < 4096 { return String(cString: strerror(Int32(code))) }
    return "unknown ext2fs error"
}
