// What is on a device or image file: the filesystem type, UUID, label,
// block size and size, decoded from the first 68 KiB (the btrfs superblock
// at 64 KiB is the furthest structure read). Type names follow blkid:
// ext2, ext3, ext4, jbd (an external ext3/4 journal), xfs, btrfs, swap,
// swsuspend (a swap area holding a hibernation image), vfat, exfat, ntfs,
// crypto_LUKS.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public struct FSProbe: Equatable, Sendable {
    /// blkid's name for the type: "ext4", "xfs", "swap", "crypto_LUKS", ...
    public var type: String
    /// Lowercase 8-4-4-4-12 for 16-byte UUIDs; FAT and exFAT volume serials
    /// are "ABCD-1234" and NTFS serials 16 hex digits, uppercase, as blkid
    /// and /dev/disk/by-uuid show them.
    public var uuid: String?
    public var label: String?
    /// The filesystem's allocation unit in bytes (block, cluster, page).
    public var blockSize: Int?
    /// Bytes the filesystem (or swap area) says it spans on this device,
    /// which can be less than the device. Nil when the header does not say
    /// (LUKS).
    public var sizeBytes: UInt64?

    public init(type: String, uuid: String? = nil, label: String? = nil,
                blockSize: Int? = nil, sizeBytes: UInt64? = nil) {
        self.type = type
        self.uuid = uuid
        self.label = label
        self.blockSize = blockSize
        self.sizeBytes = sizeBytes
    }

    /// How many bytes from the start of a device `probeFilesystem(bytes:)`
    /// looks at.
    public static let probeBytes = 0x11000
}

public enum FSProbeError: Error, CustomStringConvertible, Equatable, Sendable {
    case notADeviceOrFile(String)

    public var description: String {
        switch self {
        case .notADeviceOrFile(let p): return "\(p) is neither a block device nor a regular file"
        }
    }
}

/// Probes the block device or image file at `path`. A block device is read
/// with O_DIRECT, so a stale page cache of a mounted device (whose
/// filesystem writes its superblock through its own buffers) is bypassed.
/// Nil: nothing recognised.
public func probeFilesystem(path: String) throws -> FSProbe? {
    var st = stat()
    try syscall("stat", path) { stat(path, &st) }
    let kind = st.st_mode & S_IFMT
    guard kind == S_IFBLK || kind == S_IFREG else { throw FSProbeError.notADeviceOrFile(path) }
    let want = FSProbe.probeBytes   // a multiple of 4096: O_DIRECT-friendly
    var fd: Int32 = -1
    if kind == S_IFBLK { fd = open(path, O_RDONLY | O_CLOEXEC | HS_O_DIRECT) }
    if fd < 0 { fd = try syscall("open", path) { open(path, O_RDONLY | O_CLOEXEC) } }
    defer { close(fd) }
    let buf = UnsafeMutableRawPointer.allocate(byteCount: want, alignment: 4096)
    defer { buf.deallocate() }
    var got = 0
    while got < want {
        let n = try syscall("pread", path) { pread(fd, buf + got, want - got, off_t(got)) }
        if n == 0 { break }   // a device or image smaller than the probe area
        got += n
    }
    let bytes = [UInt8](UnsafeRawBufferPointer(start: buf, count: got))
    return probeFilesystem(bytes: bytes)
}

/// Decodes the first bytes of a device (ideally `FSProbe.probeBytes` of
/// them; fewer only recognise what lies inside them). Never traps on short
/// or hostile input: nil means nothing recognised.
public func probeFilesystem(bytes: [UInt8]) -> FSProbe? {
    let b = ProbeBytes(bytes)
    // Signatures at fixed places, most specific first; FAT (a boot sector
    // plus a few plausible numbers) comes last, being the weakest.
    return probeLUKS(b) ?? probeXFS(b) ?? probeBtrfs(b) ?? probeExt(b)
        ?? probeSwap(b) ?? probeNTFS(b) ?? probeExFAT(b) ?? probeFAT(b)
}

// MARK: - Byte access that never goes out of bounds

struct ProbeBytes {
    let a: [UInt8]
    init(_ a: [UInt8]) { self.a = a }

    func has(_ off: Int, _ n: Int) -> Bool { off >= 0 && n >= 0 && off <= a.count - n }
    func bytes(_ off: Int, _ n: Int) -> ArraySlice<UInt8>? { has(off, n) ? a[off ..< off + n] : nil }
    func matches(_ off: Int, _ sig: [UInt8]) -> Bool { bytes(off, sig.count).map { Array($0) == sig } ?? false }
    func matches(_ off: Int, _ sig: String) -> Bool { matches(off, Array(sig.utf8)) }

    func le(_ off: Int, _ n: Int) -> UInt64? {
        guard let s = bytes(off, n) else { return nil }
        return s.reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }
    func be(_ off: Int, _ n: Int) -> UInt64? {
        guard let s = bytes(off, n) else { return nil }
        return s.reduce(0) { $0 << 8 | UInt64($1) }
    }
    func u8(_ off: Int) -> UInt64? { le(off, 1) }
    func le16(_ off: Int) -> UInt64? { le(off, 2) }
    func le32(_ off: Int) -> UInt64? { le(off, 4) }
    func le64(_ off: Int) -> UInt64? { le(off, 8) }
    func be16(_ off: Int) -> UInt64? { be(off, 2) }
    func be32(_ off: Int) -> UInt64? { be(off, 4) }
    func be64(_ off: Int) -> UInt64? { be(off, 8) }

    /// A 16-byte UUID as lowercase 8-4-4-4-12; nil if all zero.
    func uuid(_ off: Int) -> String? {
        guard let s = bytes(off, 16), s.contains(where: { $0 != 0 }) else { return nil }
        let hex = s.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }
        let groups = [0 ..< 4, 4 ..< 6, 6 ..< 8, 8 ..< 10, 10 ..< 16]
        return groups.map { hex[$0].joined() }.joined(separator: "-")
    }

    /// A NUL-padded (and, with `trimSpaces`, space-padded) name; nil if empty.
    func label(_ off: Int, _ n: Int, trimSpaces: Bool = false) -> String? {
        guard let s = bytes(off, n) else { return nil }
        var v = Array(s.prefix { $0 != 0 })
        if trimSpaces { while let l = v.last, l == 0x20 { v.removeLast() } }
        if v.isEmpty { return nil }
        return String(decoding: v, as: UTF8.self)
    }
}

private func isPowerOfTwo(_ v: UInt64) -> Bool { v != 0 && v & (v - 1) == 0 }

private func mul(_ a: UInt64, _ b: UInt64) -> UInt64? {
    let (r, o) = a.multipliedReportingOverflow(by: b)
    return o ? nil : r
}

// MARK: - Decoders

/// ext2/3/4: superblock at 1024, magic 0xEF53 at +56, little-endian.
func probeExt(_ b: ProbeBytes) -> FSProbe? {
    let sb = 1024
    guard b.le16(sb + 56) == 0xEF53,
          let logBlock = b.le32(sb + 24), logBlock <= 6,   // 1 KiB ... 64 KiB
          let compat = b.le32(sb + 92), let incompat = b.le32(sb + 96),
          let roCompat = b.le32(sb + 100),
          let blocksLo = b.le32(sb + 4) else { return nil }
    let blockSize = UInt64(1024) << logBlock
    let hasJournal: UInt64 = 0x4            // COMPAT_HAS_JOURNAL
    let journalDev: UInt64 = 0x8            // INCOMPAT_JOURNAL_DEV
    let is64bit: UInt64 = 0x80              // INCOMPAT_64BIT
    // What ext3 knows: INCOMPAT FILETYPE|RECOVER|META_BG, RO_COMPAT
    // SPARSE_SUPER|LARGE_FILE|BTREE_DIR. Anything else needs ext4.
    let ext3Incompat: UInt64 = 0x2 | 0x4 | 0x10
    let ext3RoCompat: UInt64 = 0x1 | 0x2 | 0x4
    var blocks = blocksLo
    if incompat & is64bit != 0, let hi = b.le32(sb + 0x150) { blocks |= hi << 32 }
    let type: String
    if incompat & journalDev != 0 {
        type = "jbd"
    } else if incompat & ~ext3Incompat != 0 || roCompat & ~ext3RoCompat != 0 {
        type = "ext4"
    } else if compat & hasJournal != 0 {
        type = "ext3"
    } else {
        type = "ext2"
    }
    return FSProbe(type: type, uuid: b.uuid(sb + 104), label: b.label(sb + 120, 16),
                   blockSize: Int(blockSize), sizeBytes: mul(blocks, blockSize))
}

/// XFS: "XFSB" at 0, big-endian superblock.
func probeXFS(_ b: ProbeBytes) -> FSProbe? {
    guard b.matches(0, "XFSB"), let bs = b.be32(4), isPowerOfTwo(bs), bs >= 512, bs <= 65536,
          let dblocks = b.be64(8) else { return nil }
    return FSProbe(type: "xfs", uuid: b.uuid(32), label: b.label(108, 12),
                   blockSize: Int(bs), sizeBytes: mul(dblocks, bs))
}

/// btrfs: superblock at 64 KiB, magic "_BHRfS_M" at +0x40, little-endian.
func probeBtrfs(_ b: ProbeBytes) -> FSProbe? {
    let sb = 0x10000
    guard b.matches(sb + 0x40, "_BHRfS_M") else { return nil }
    let sector = b.le32(sb + 0x90).flatMap { isPowerOfTwo($0) && $0 <= 65536 ? Int($0) : nil }
    let devItem = sb + 0xc9
    return FSProbe(type: "btrfs", uuid: b.uuid(sb + 0x20), label: b.label(sb + 0x12b, 256),
                   blockSize: sector, sizeBytes: b.le64(devItem + 8))
}

/// LUKS1 and LUKS2: "LUKS\xba\xbe" at 0, version (big-endian) at 6, the
/// UUID as text at 168; LUKS2 has a label at 24.
func probeLUKS(_ b: ProbeBytes) -> FSProbe? {
    guard b.matches(0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]), let version = b.be16(6) else { return nil }
    let uuid = b.label(168, 40).map { $0.lowercased() }
    let label = version == 2 ? b.label(24, 48) : nil
    return FSProbe(type: "crypto_LUKS", uuid: uuid, label: label)
}

/// Linux swap: the signature ends the first page, whose size is not known
/// here, so each page size Linux uses is tried. The v1 header (at 1024)
/// is in the byte order of the machine that wrote it.
func probeSwap(_ b: ProbeBytes) -> FSProbe? {
    for page in [4096, 8192, 16384, 32768, 65536] {
        let sig = page - 10
        if b.matches(sig, "SWAPSPACE2") {
            var size: UInt64?
            if b.le32(1024) == 1, let last = b.le32(1028) {
                size = mul(last + 1, UInt64(page))
            } else if b.be32(1024) == 1, let last = b.be32(1028) {
                size = mul(last + 1, UInt64(page))
            }
            return FSProbe(type: "swap", uuid: b.uuid(1036), label: b.label(1052, 16),
                           blockSize: page, sizeBytes: size)
        }
        if b.matches(sig, "SWAP-SPACE") {   // the old v0 format: no UUID, no label
            return FSProbe(type: "swap", blockSize: page)
        }
        for s in ["S1SUSPEND", "S2SUSPEND", "ULSUSPEND", "LINHIB0001"] where b.matches(sig, s) {
            return FSProbe(type: "swsuspend", blockSize: page)
        }
        if b.matches(sig, [0xed, 0xc3, 0x02, 0xe9, 0x98, 0x56, 0xe5, 0x0c]) {
            return FSProbe(type: "swsuspend", blockSize: page)
        }
    }
    return nil
}

/// NTFS: "NTFS    " at 3, a boot sector ending in 0x55AA.
func probeNTFS(_ b: ProbeBytes) -> FSProbe? {
    guard b.matches(3, "NTFS    "), b.matches(510, [0x55, 0xaa]),
          let sector = b.le16(11), isPowerOfTwo(sector), sector >= 256, sector <= 4096,
          let spc = b.u8(13), spc != 0 else { return nil }
    // Sectors per cluster above 0x80 is a negative power of two: 2^-(int8).
    let cluster: UInt64 = spc <= 0x80 ? sector * spc : (1 << (256 - spc))
    let serial = b.le64(0x48).map { v -> String in
        let h = String(v, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 16 - h.count)) + h
    }
    return FSProbe(type: "ntfs", uuid: serial, blockSize: Int(cluster),
                   sizeBytes: b.le64(0x28).flatMap { mul($0, sector) })
}

/// exFAT: "EXFAT   " at 3.
func probeExFAT(_ b: ProbeBytes) -> FSProbe? {
    guard b.matches(3, "EXFAT   "), b.matches(510, [0x55, 0xaa]),
          let sectorShift = b.u8(108), sectorShift >= 9, sectorShift <= 12,
          let clusterShift = b.u8(109), sectorShift + clusterShift <= 25 else { return nil }
    let sector = UInt64(1) << sectorShift
    return FSProbe(type: "exfat", uuid: b.le32(100).map(fatSerial),
                   blockSize: Int(sector << clusterShift),
                   sizeBytes: b.le64(72).flatMap { mul($0, sector) })
}

/// "ABCD-1234", as blkid shows FAT and exFAT volume serials.
private func fatSerial(_ v: UInt64) -> String {
    func hex4(_ x: UInt64) -> String {
        let h = String(x & 0xffff, radix: 16, uppercase: true)
        return String(repeating: "0", count: 4 - h.count) + h
    }
    return hex4(v >> 16) + "-" + hex4(v)
}

/// FAT12/16/32: a BIOS parameter block that makes sense, 0x55AA at 510
/// and "FAT" in the type string of the FAT12/16 or FAT32 extended BPB (or
/// a FAT32 layout). The label is the boot sector's; "NO NAME" is no label.
func probeFAT(_ b: ProbeBytes) -> FSProbe? {
    guard b.matches(510, [0x55, 0xaa]),
          let sector = b.le16(11), isPowerOfTwo(sector), sector >= 512, sector <= 4096,
          let spc = b.u8(13), isPowerOfTwo(spc),
          let reserved = b.le16(14), reserved >= 1,
          let fats = b.u8(16), fats >= 1, fats <= 4,
          let rootEntries = b.le16(17),
          let total16 = b.le16(19), let total32 = b.le32(32),
          let fatSize16 = b.le16(22) else { return nil }
    let media = b.u8(21) ?? 0
    guard media == 0xf0 || media >= 0xf8 else { return nil }
    let fat32Type = b.matches(82, "FAT32   ")
    let fat1xType = b.matches(54, "FAT12   ") || b.matches(54, "FAT16   ") || b.matches(54, "FAT     ")
    // FAT32 has no 16-bit FAT size and no fixed root directory.
    let isFAT32 = fatSize16 == 0 && rootEntries == 0
    guard isFAT32 ? (fat32Type || b.matches(82, "FAT")) : fat1xType else { return nil }
    let ext = isFAT32 ? 64 : 36   // start of the extended BPB
    var serial: String?
    var label: String?
    if b.u8(ext + 2) == 0x29 {    // extended boot signature: serial and label valid
        serial = b.le32(ext + 3).map(fatSerial)
        label = b.label(ext + 7, 11, trimSpaces: true)
        if label == "NO NAME" { label = nil }
    }
    let totalSectors = total16 != 0 ? total16 : total32
    return FSProbe(type: "vfat", uuid: serial, label: label,
                   blockSize: Int(sector * spc), sizeBytes: mul(totalSectors, sector))
}
