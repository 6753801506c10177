// QCow2Reader.swift — reads qcow2 images (ours and qemu-img's) defensively.
//
// Every offset, size and count taken from the file is bounds-checked with
// checked arithmetic before use; memory allocated while opening is bounded
// by qemu's own limits (32 MiB of L1 table, 8 MiB of refcount table, one
// header cluster) and by the file length. Failures are QCow2Errors naming the
// structure and its file offset.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import HotSync

/// Where a guest cluster's data lives.
public enum ClusterState: Equatable, Sendable {
    /// Never written: reads as zeros.
    case unallocated
    /// Written as zeros (the L2 zero flag): reads as zeros.
    case zero
    /// A standard cluster at this host offset.
    case raw(hostOffset: UInt64)
    /// A compressed stream starting at `hostOffset`; `size` is the
    /// descriptor's sector-rounded byte count from `hostOffset` (the stream
    /// itself may be shorter).
    case compressed(hostOffset: UInt64, size: Int)
}

/// What hotimage stored in an image it wrote.
public struct HotimageInfo: Sendable {
    /// Format version of the HOTI extension.
    public let formatVersion: UInt32
    /// false: a partial image kept for diagnosis.
    public let complete: Bool
    /// The opaque bytes given to `QCow2Writer.finish` (empty if the tail blob
    /// could not be read; see `QCow2Reader.hotimageProblems`).
    public let metadata: [UInt8]
    public let tailOffset: UInt64
    public let tailLength: UInt64
    /// false when autoclear bit 63 was cleared: another program (qemu)
    /// opened the image for writing, so hotimage's checksums are void.
    public let checksumsValid: Bool
}

/// The guest clusters that hold data, ascending. Stored as runs, so memory
/// is proportional to the number of runs, not clusters; indexing by
/// position (`clusters[i]`, for work distribution) is a binary search.
public struct AllocatedClusters: RandomAccessCollection, Sendable {
    public let ranges: [Range<UInt64>]
    /// starts[k] = position of ranges[k].lowerBound in the sequence.
    private let starts: [Int]
    public let startIndex = 0
    public let endIndex: Int

    public init(ranges: [Range<UInt64>]) {
        self.ranges = ranges
        var starts: [Int] = []
        starts.reserveCapacity(ranges.count)
        var n = 0
        for r in ranges {
            starts.append(n)
            n += r.count
        }
        self.starts = starts
        self.endIndex = n
    }

    public subscript(position: Int) -> UInt64 {
        precondition(position >= 0 && position < endIndex, "index \(position) out of range 0..<\(endIndex)")
        var lo = 0, hi = starts.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if starts[mid] <= position { lo = mid } else { hi = mid - 1 }
        }
        return ranges[lo].lowerBound + UInt64(position - starts[lo])
    }

    public func makeIterator() -> Iterator { Iterator(ranges: ranges) }

    public struct Iterator: IteratorProtocol {
        let ranges: [Range<UInt64>]
        var r = 0
        var cursor: UInt64 = 0
        init(ranges: [Range<UInt64>]) {
            self.ranges = ranges
            if let first = ranges.first { cursor = first.lowerBound }
        }
        public mutating func next() -> UInt64? {
            while r < ranges.count {
                if cursor < ranges[r].upperBound {
                    defer { cursor += 1 }
                    return cursor
                }
                r += 1
                if r < ranges.count { cursor = ranges[r].lowerBound }
            }
            return nil
        }
    }
}

/// The parsed tail blob header (see QCow2Writer.swift for the layout).
struct TailLayout {
    var headerCRC: UInt32 = 0
    var l1CRC: UInt32 = 0
    var l1Offset: UInt64 = 0
    var l1Size: UInt32 = 0
    var refTableCRC: UInt32 = 0
    var refTableOffset: UInt64 = 0
    var refTableClusters: UInt32 = 0
    var refBlockCount: UInt32 = 0
    var metadataOffset: UInt64 = 0
    var metadataLength: UInt64 = 0
    var metadataCRC: UInt32 = 0
    var groupSize: UInt32 = 0
    var refBlockListOffset: UInt64 = 0
    var groupsOffset: UInt64 = 0
    var groupCount: UInt64 = 0
    var clustersWritten: UInt64 = 0
    var zeroClusters: UInt64 = 0
}

/// Decoded L2 entry, or why it is invalid.
enum EntryDecode {
    case state(ClusterState, zeroAllocHost: UInt64?)
    case invalid(String)
}

/// Reads a qcow2 image. `readCluster` is thread-safe (pread plus a locked
/// L2 cache); make one `ClusterDecoder` per thread.
public final class QCow2Reader: @unchecked Sendable {
    public let path: String
    public let fileLength: UInt64
    public let version: UInt32
    public let clusterBits: Int
    public let clusterSize: Int
    public let virtualSize: UInt64
    /// Guest clusters (the last one may be partial).
    public let guestClusters: UInt64
    /// "zlib" or "zstd".
    public let compressionType: String
    public let l1Size: Int
    public let l1Offset: UInt64
    public let refcountTableOffset: UInt64
    public let refcountTableClusters: UInt32
    public let refcountOrder: UInt32
    public let incompatibleFeatures: UInt64
    public let autoclearFeatures: UInt64
    public let snapshotCount: UInt32
    /// hotimage's extension, or nil for images hotimage did not write.
    public let hotimage: HotimageInfo?
    /// Damage found in hotimage's extension or tail blob while opening.
    public let hotimageProblems: [String]
    /// Informational notes from opening (bitmaps, snapshots, ...).
    public let notes: [String]

    let fd: Int32
    let cs: UInt64
    let l2Entries: Int
    let l1: [UInt64]
    let compression: QCow2CompressionType
    let csizeShift: UInt64
    let csizeMask: UInt64
    /// Cluster 0 as read (zero-padded to a full cluster).
    let headerCluster: [UInt8]
    /// File offset of the HOTI extension's data, when present.
    let hotiExtOffset: Int?
    let tailCRC: UInt32
    let tail: TailLayout?
    /// false when structures this reader does not parse (internal
    /// snapshots, bitmaps) hold references, so refcounts cannot be recomputed.
    let refcountsComparable: Bool

    private let cacheLock = Lock()
    private var l2Cache: [Int: [UInt64]] = [:]
    private let l2CacheLimit: Int

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            throw QCow2Error("cannot open the image: \(errnoText(errno))", path: path)
        }
        do {
            let end = lseek(fd, 0, SEEK_END)
            if end < 0 { throw QCow2Error("cannot determine the file length: \(errnoText(errno))") }
            let fileLength = UInt64(end)
            self.fd = fd
            self.fileLength = fileLength

            // Fixed header.
            guard fileLength >= UInt64(Q.v2HeaderLength) else {
                throw QCow2Error("file is \(fileLength) bytes long, too short for a qcow2 header (at least 72 bytes)")
            }
            let first = try preadArray(fd, count: Int(min(fileLength, 104)), offset: 0, what: "qcow2 header")
            let magic = first.be32(at: 0)
            guard magic == Q.magic else {
                throw QCow2Error("not a qcow2 image: magic at file offset 0 is \(hex(UInt64(magic))), expected 0x514649fb (\"QFI\\xfb\")")
            }
            let version = first.be32(at: 4)
            guard version == 2 || version == 3 else {
                throw QCow2Error("unsupported qcow2 version \(version) (header offset 4): only versions 2 and 3 are readable")
            }
            if version == 3 && fileLength < 104 {
                throw QCow2Error("file is \(fileLength) bytes long, too short for a qcow2 version 3 header (104 bytes)")
            }
            self.version = version
            let clusterBits = first.be32(at: 20)
            guard clusterBits >= UInt32(Q.minClusterBits) && clusterBits <= UInt32(Q.maxClusterBits) else {
                throw QCow2Error("cluster_bits \(clusterBits) (header offset 20) is out of range 9...21")
            }
            let cb = Int(clusterBits)
            let cs = UInt64(1) << UInt64(cb)
            self.clusterBits = cb
            self.clusterSize = Int(cs)
            self.cs = cs
            self.l2Entries = Int(cs / 8)
            self.csizeShift = UInt64(62 - (cb - 8))
            self.csizeMask = (UInt64(1) << UInt64(cb - 8)) - 1

            // Cluster 0, zero-padded when the file is shorter than a cluster.
            var hc = [UInt8](repeating: 0, count: Int(cs))
            _ = try hc.withUnsafeMutableBytes { try preadFull(fd, $0.baseAddress!, Int(cs), 0) }
            self.headerCluster = hc

            let backingOffset = hc.be64(at: 8)
            let backingSize = hc.be32(at: 16)
            if backingOffset != 0 {
                throw QCow2Error("the image has a backing file (backing_file_offset \(hex(backingOffset)), \(backingSize) bytes); images with backing files are not supported")
            }
            let size = hc.be64(at: 24)
            guard size <= UInt64(Int64.max) else {
                throw QCow2Error("virtual size \(size) (header offset 24) is larger than 2^63 - 1")
            }
            let cryptMethod = hc.be32(at: 32)
            if cryptMethod != 0 {
                throw QCow2Error("the image is encrypted (crypt_method \(cryptMethod), header offset 32); encrypted images are not supported")
            }
            let l1Size = hc.be32(at: 36)
            let l1Offset = hc.be64(at: 40)
            let rtOffset = hc.be64(at: 48)
            let rtClusters = hc.be32(at: 56)
            let nbSnapshots = hc.be32(at: 60)
            let snapshotsOffset = hc.be64(at: 64)

            var incompat: UInt64 = 0, autoclear: UInt64 = 0
            var refcountOrder: UInt32 = 4
            var headerLength = Q.v2HeaderLength
            var compression = QCow2CompressionType.zlib
            if version == 3 {
                incompat = hc.be64(at: 72)
                autoclear = hc.be64(at: 88)
                refcountOrder = hc.be32(at: 96)
                let hl = hc.be32(at: 100)
                guard hl >= 104, hl % 8 == 0, UInt64(hl) <= cs, UInt64(hl) <= fileLength else {
                    throw QCow2Error("header_length \(hl) (header offset 100) is invalid: it must be at least 104, a multiple of 8, within the \(cs)-byte header cluster and within the \(fileLength)-byte file")
                }
                headerLength = Int(hl)
                if incompat & ~Q.incompatKnown != 0 {
                    throw QCow2Error("unknown incompatible feature bits \(hex(incompat & ~Q.incompatKnown)) (header offset 72); refusing to read an image that needs features this reader does not know")
                }
                if incompat & Q.incompatDataFile != 0 {
                    throw QCow2Error("the image keeps its data in an external data file (incompatible feature bit 2); not supported")
                }
                if incompat & Q.incompatExtendedL2 != 0 {
                    throw QCow2Error("the image uses extended L2 entries (incompatible feature bit 4); not supported")
                }
                let ctype: UInt8 = headerLength > 104 ? hc[104] : 0
                if incompat & Q.incompatCompression != 0 {
                    guard headerLength > 104, ctype != 0 else {
                        throw QCow2Error("incompatible feature bit 3 (compression type) is set but compression_type (header offset 104) is \(headerLength > 104 ? "0" : "absent")")
                    }
                    guard let t = QCow2CompressionType(rawValue: ctype) else {
                        throw QCow2Error("unknown compression_type \(ctype) (header offset 104); known: 0 zlib, 1 zstd")
                    }
                    compression = t
                } else if ctype != 0 {
                    throw QCow2Error("compression_type \(ctype) (header offset 104) is non-zero but incompatible feature bit 3 is not set")
                }
                guard refcountOrder <= 6 else {
                    throw QCow2Error("refcount_order \(refcountOrder) (header offset 96) exceeds 6")
                }
            }
            self.incompatibleFeatures = incompat
            self.autoclearFeatures = autoclear
            self.refcountOrder = refcountOrder
            self.compression = compression
            self.compressionType = compression.name
            self.virtualSize = size

            // L1 table.
            let gc = divRoundUp(size, cs)
            let l1Needed = divRoundUp(gc, cs / 8)
            guard UInt64(l1Size) * 8 <= Q.maxL1Bytes else {
                throw QCow2Error("l1_size \(l1Size) (header offset 36) makes an L1 table of \(UInt64(l1Size) * 8) bytes, more than qemu's \(Q.maxL1Bytes)-byte limit")
            }
            guard UInt64(l1Size) >= l1Needed else {
                throw QCow2Error("L1 table too small: l1_size \(l1Size) (header offset 36) but a virtual size of \(size) bytes with \(cs)-byte clusters needs \(l1Needed) entries")
            }
            self.guestClusters = gc
            self.l1Size = Int(l1Size)
            self.l1Offset = l1Offset
            if l1Size > 0 {
                try Self.checkTable("L1 table", offset: l1Offset, bytes: UInt64(l1Size) * 8, cs: cs, fileLength: fileLength)
                let raw = try preadArray(fd, count: Int(l1Size) * 8, offset: l1Offset, what: "L1 table")
                self.l1 = decodeBE64Array(raw, count: Int(l1Size))
            } else {
                self.l1 = []
            }

            // Refcount table (needed only by verify, but validated here).
            guard UInt64(rtClusters) * cs <= Q.maxRefTableBytes else {
                throw QCow2Error("refcount_table_clusters \(rtClusters) (header offset 56) makes a refcount table of \(UInt64(rtClusters) * cs) bytes, more than qemu's \(Q.maxRefTableBytes)-byte limit")
            }
            if rtClusters > 0 {
                try Self.checkTable("refcount table", offset: rtOffset, bytes: UInt64(rtClusters) * cs, cs: cs, fileLength: fileLength)
            }
            self.refcountTableOffset = rtOffset
            self.refcountTableClusters = rtClusters

            // Snapshots: the active image is readable; verify reports them.
            guard nbSnapshots <= Q.maxSnapshots else {
                throw QCow2Error("nb_snapshots \(nbSnapshots) (header offset 60) exceeds qemu's limit of \(Q.maxSnapshots)")
            }
            var notes: [String] = []
            if nbSnapshots > 0 {
                guard snapshotsOffset % cs == 0, snapshotsOffset >= cs, snapshotsOffset < fileLength else {
                    throw QCow2Error("snapshot table offset \(hex(snapshotsOffset)) (header offset 64) is not a cluster-aligned offset inside the file")
                }
                notes.append("the image has \(nbSnapshots) internal snapshot(s); only the active state is read, and refcounts are not verified")
            }
            self.snapshotCount = nbSnapshots

            // Header extensions.
            var hotiExt: Int? = nil
            var hotiLen = 0
            var problems: [String] = []
            var off = headerLength
            let extEnd = Int(cs)
            var seenHoti = false
            var hasBitmaps = false
            while off < extEnd {
                if extEnd - off < 8 {
                    break
                }
                let type = hc.be32(at: off)
                let len = UInt64(hc.be32(at: off + 4))
                if type == Q.extEnd { break }
                let dataStart = off + 8
                guard len <= UInt64(extEnd - dataStart) else {
                    throw QCow2Error("header extension \(hex(UInt64(type))) at file offset \(hex(UInt64(off))) claims \(len) bytes, which run past the end of the \(cs)-byte header cluster")
                }
                if UInt64(dataStart) + len > fileLength {
                    throw QCow2Error("header extension \(hex(UInt64(type))) at file offset \(hex(UInt64(off))) (\(len) bytes) is cut short by the end of the file")
                }
                switch type {
                case Q.extHotimage:
                    if seenHoti {
                        problems.append("a second hotimage (HOTI) header extension at file offset \(hex(UInt64(off))) was ignored")
                    } else {
                        seenHoti = true
                        hotiExt = dataStart
                        hotiLen = Int(len)
                    }
                case Q.extBitmaps:
                    notes.append("the image has persistent dirty bitmaps; refcounts are not verified")
                    hasBitmaps = true
                case Q.extCrypto:
                    throw QCow2Error("the image has a full-disk-encryption header extension at file offset \(hex(UInt64(off))); encrypted images are not supported")
                case Q.extDataFile:
                    notes.append("the image names an external data file (header extension at file offset \(hex(UInt64(off)))) that is not used")
                default:
                    break
                }
                off = dataStart + Int(alignUp(len, 8))
            }
            self.notes = notes
            self.refcountsComparable = nbSnapshots == 0 && !hasBitmaps

            // hotimage extension and tail blob.
            var info: HotimageInfo? = nil
            var tail: TailLayout? = nil
            var tailCRC: UInt32 = 0
            let marker = autoclear & Q.autoclearHotimage != 0
            if let ext = hotiExt {
                if hotiLen < Q.hotiExtLength {
                    problems.append("the hotimage header extension at file offset \(hex(UInt64(ext - 8))) is \(hotiLen) bytes long, expected \(Q.hotiExtLength)")
                    hotiExt = nil
                } else {
                    let fv = hc.be32(at: ext)
                    let flags = hc.be32(at: ext + 4)
                    let tOff = hc.be64(at: ext + 8)
                    let tLen = hc.be64(at: ext + 16)
                    tailCRC = hc.be32(at: ext + 24)
                    if fv != Q.hotiFormatVersion {
                        problems.append("unsupported hotimage format version \(fv) in the header extension at file offset \(hex(UInt64(ext)))")
                    }
                    if !marker {
                        problems.append("autoclear feature bit 63 is clear: another program opened the image for writing, so hotimage's checksums no longer apply")
                    }
                    var metadata: [UInt8] = []
                    do {
                        let (layout, meta) = try Self.readTail(fd: fd, offset: tOff, length: tLen, fileLength: fileLength,
                                                               cs: cs, clusterBits: cb, virtualSize: size, l1Size: l1Size)
                        tail = layout
                        metadata = meta
                        if crc32Of(meta) != layout.metadataCRC {
                            problems.append("hotimage metadata (file offset \(hex(tOff &+ layout.metadataOffset)), \(meta.count) bytes): checksum mismatch")
                        }
                    } catch let e as QCow2Error {
                        problems.append(e.message)
                    }
                    info = HotimageInfo(formatVersion: fv, complete: flags & Q.hotiFlagComplete != 0, metadata: metadata,
                                        tailOffset: tOff, tailLength: tLen, checksumsValid: marker)
                }
            } else if marker {
                problems.append("autoclear feature bit 63 (hotimage) is set but the hotimage header extension is missing or damaged")
            }
            self.hotiExtOffset = hotiExt
            self.hotimage = info
            self.tail = tail
            self.tailCRC = tailCRC
            self.hotimageProblems = problems
            self.l2CacheLimit = max(16, (64 << 20) / Int(cs))
        } catch let e as QCow2Error {
            close(fd)
            throw e.with(path: path)
        }
    }

    deinit { close(fd) }

    static func checkTable(_ what: String, offset: UInt64, bytes: UInt64, cs: UInt64, fileLength: UInt64) throws {
        guard offset % cs == 0 else {
            throw QCow2Error("\(what) offset \(hex(offset)) is not aligned to the \(cs)-byte cluster size")
        }
        guard offset >= cs else {
            throw QCow2Error("\(what) at file offset \(hex(offset)) overlaps the header cluster")
        }
        guard let end = checkedAdd(offset, bytes), end <= fileLength else {
            throw QCow2Error("\(what) at file offset \(hex(offset)) (\(bytes) bytes) extends past the end of the file (\(fileLength) bytes; truncated?)")
        }
    }

    static func readTail(fd: Int32, offset: UInt64, length: UInt64, fileLength: UInt64, cs: UInt64,
                         clusterBits: Int, virtualSize: UInt64, l1Size: UInt32) throws -> (TailLayout, [UInt8]) {
        let at = "hotimage tail blob at file offset \(hex(offset)) (\(length) bytes)"
        guard offset >= cs else { throw QCow2Error("\(at) overlaps the header cluster") }
        guard let end = checkedAdd(offset, length), end <= fileLength else {
            throw QCow2Error("\(at) extends past the end of the file (\(fileLength) bytes; truncated?)")
        }
        guard length >= UInt64(Q.tailHeaderLength) else { throw QCow2Error("\(at) is too short for its header") }
        let h = try preadArray(fd, count: Q.tailHeaderLength, offset: offset, what: "hotimage tail header")
        guard Array(h[0..<8]) == Q.tailMagic else { throw QCow2Error("\(at): bad magic (expected \"HOTITAIL\")") }
        var t = TailLayout()
        let version = h.be32(at: 8)
        guard version == Q.tailVersion else { throw QCow2Error("\(at): unsupported tail version \(version)") }
        guard h.be32(at: 12) == UInt32(clusterBits) else { throw QCow2Error("\(at): cluster_bits \(h.be32(at: 12)) differs from the header's \(clusterBits)") }
        guard h.be64(at: 16) == virtualSize else { throw QCow2Error("\(at): virtual size \(h.be64(at: 16)) differs from the header's \(virtualSize)") }
        t.headerCRC = h.be32(at: 24)
        t.l1CRC = h.be32(at: 28)
        t.l1Offset = h.be64(at: 32)
        t.l1Size = h.be32(at: 40)
        t.refTableCRC = h.be32(at: 44)
        t.refTableOffset = h.be64(at: 48)
        t.refTableClusters = h.be32(at: 56)
        t.refBlockCount = h.be32(at: 60)
        t.metadataOffset = h.be64(at: 64)
        t.metadataLength = h.be64(at: 72)
        t.metadataCRC = h.be32(at: 80)
        t.groupSize = h.be32(at: 84)
        t.refBlockListOffset = h.be64(at: 88)
        t.groupsOffset = h.be64(at: 96)
        t.groupCount = h.be64(at: 104)
        t.clustersWritten = h.be64(at: 112)
        t.zeroClusters = h.be64(at: 120)
        guard t.l1Size == l1Size else { throw QCow2Error("\(at): l1_size \(t.l1Size) differs from the header's \(l1Size)") }
        func section(_ name: String, _ rel: UInt64, _ bytes: UInt64?) throws {
            guard let bytes, rel >= UInt64(Q.tailHeaderLength), let e = checkedAdd(rel, bytes), e <= length else {
                throw QCow2Error("\(at): the \(name) section (offset \(rel) in the tail) lies outside the tail blob")
            }
        }
        guard t.metadataLength <= Q.maxMetadataBytes else {
            throw QCow2Error("\(at): metadata length \(t.metadataLength) exceeds the \(Q.maxMetadataBytes)-byte limit")
        }
        try section("metadata", t.metadataOffset, t.metadataLength)
        try section("refcount block list", t.refBlockListOffset, checkedMul(UInt64(t.refBlockCount), 16))
        let l2e = cs / 8
        let expectedGroup = 16 + l2e / 8 + 4 * l2e
        guard UInt64(t.groupSize) == expectedGroup else {
            throw QCow2Error("\(at): group size \(t.groupSize) does not match \(expectedGroup) for \(cs)-byte clusters")
        }
        guard t.groupCount <= UInt64(l1Size) else {
            throw QCow2Error("\(at): \(t.groupCount) cluster groups but the L1 table has only \(l1Size) entries")
        }
        try section("cluster group", t.groupsOffset, checkedMul(t.groupCount, UInt64(t.groupSize)))
        let meta = try preadArray(fd, count: Int(t.metadataLength), offset: offset + t.metadataOffset, what: "hotimage metadata")
        return (t, meta)
    }

    // MARK: - L2 access

    func guestRange(_ first: UInt64, count: UInt64 = 1) -> (UInt64, UInt64) {
        let start = first &* cs
        let end = min(first &+ count, guestClusters) &* cs
        return (start, min(end, virtualSize) &- start)
    }

    func describeGuest(_ first: UInt64, count: UInt64 = 1) -> String {
        let (start, len) = guestRange(first, count: count)
        let last = len > 0 ? start &+ len &- 1 : start
        let which = count == 1 ? "cluster \(first)" : "clusters \(first)–\(first &+ count &- 1)"
        return "guest bytes \(hex(start))–\(hex(last)) (\(which))"
    }

    /// Guest clusters covered by L1 entry `i` (clipped to the disk).
    func l1Coverage(_ i: Int) -> (first: UInt64, count: UInt64) {
        let first = UInt64(i) * UInt64(l2Entries)
        if first >= guestClusters { return (first, 0) }
        return (first, min(UInt64(l2Entries), guestClusters - first))
    }

    /// Validates L1 entry `i`: the L2 table offset (nil: no table), or why
    /// the entry is invalid.
    func checkL1Entry(_ i: Int) -> (offset: UInt64?, problem: String?) {
        let e = l1[i]
        if e == 0 { return (nil, nil) }
        let at = "L1 entry \(i) (file offset \(hex(l1Offset + UInt64(i) * 8)))"
        if e & Q.l1Reserved != 0 {
            return (nil, "\(at) has reserved bits set: \(hex(e))")
        }
        let off = e & Q.offsetMask
        if off == 0 { return (nil, nil) }
        guard off % cs == 0 else { return (nil, "\(at): L2 table offset \(hex(off)) is not cluster-aligned") }
        guard off >= cs else { return (nil, "\(at): L2 table offset \(hex(off)) overlaps the header cluster") }
        guard off + cs <= fileLength else {
            return (nil, "\(at): L2 table at file offset \(hex(off)) lies past the end of the file (\(fileLength) bytes; truncated?)")
        }
        return (off, nil)
    }

    /// Validates L1 entry `i`; returns the L2 table offset (nil: no table).
    func l2Offset(_ i: Int) throws -> UInt64? {
        let (off, problem) = checkL1Entry(i)
        if let problem {
            let (first, count) = l1Coverage(i)
            throw QCow2Error("\(count > 0 ? describeGuest(first, count: count) : "clusters beyond the disk"): \(problem)")
        }
        return off
    }

    func readL2(_ off: UInt64) throws -> [UInt64] {
        let raw = try preadArray(fd, count: clusterSize, offset: off, what: "L2 table")
        return decodeBE64Array(raw, count: l2Entries)
    }

    /// The L2 table for L1 index `i` via the cache (nil: none allocated).
    func l2Table(_ i: Int) throws -> [UInt64]? {
        if let t = cacheLock.withLock({ l2Cache[i] }) { return t }
        guard let off = try l2Offset(i) else { return nil }
        let t = try readL2(off)
        cacheLock.withLock {
            if l2Cache.count >= l2CacheLimit { l2Cache.removeAll(keepingCapacity: true) }
            l2Cache[i] = t
        }
        return t
    }

    /// Decodes and validates an L2 entry of guest cluster `index`.
    func decodeEntry(_ e: UInt64, index: UInt64) -> EntryDecode {
        if e == 0 { return .state(.unallocated, zeroAllocHost: nil) }
        if e & Q.oflagCompressed != 0 {
            if e & Q.oflagCopied != 0 {
                return .invalid("compressed cluster descriptor \(hex(e)) has the COPIED flag (bit 63) set")
            }
            let off = e & ((UInt64(1) << csizeShift) - 1)
            let sectors = ((e >> csizeShift) & csizeMask) + 1
            guard off <= Q.offsetMask | 0x1FF else {
                return .invalid("compressed cluster descriptor \(hex(e)) has host offset \(hex(off)) beyond 2^56")
            }
            guard off >= cs else {
                return .invalid("compressed data at file offset \(hex(off)) overlaps the header cluster")
            }
            guard off < fileLength else {
                return .invalid("compressed data at file offset \(hex(off)) lies past the end of the file (\(fileLength) bytes; truncated?)")
            }
            let size = sectors * 512 - (off & 511)
            return .state(.compressed(hostOffset: off, size: Int(size)), zeroAllocHost: nil)
        }
        if e & Q.l2StdReserved != 0 {
            return .invalid("L2 entry \(hex(e)) has reserved bits set")
        }
        let off = e & Q.offsetMask
        if e & Q.oflagZero != 0 {
            if version < 3 {
                return .invalid("L2 entry \(hex(e)) uses the zero flag, which version 2 images do not have")
            }
            if off == 0 { return .state(.zero, zeroAllocHost: nil) }
            guard off % cs == 0, off >= cs else {
                return .invalid("preallocated zero cluster at file offset \(hex(off)) is not a cluster-aligned offset after the header")
            }
            return .state(.zero, zeroAllocHost: off)
        }
        if off == 0 { return .state(.unallocated, zeroAllocHost: nil) }
        guard off % cs == 0 else {
            return .invalid("data cluster offset \(hex(off)) is not cluster-aligned")
        }
        guard off >= cs else {
            return .invalid("data cluster at file offset \(hex(off)) overlaps the header cluster")
        }
        guard off + cs <= fileLength else {
            return .invalid("data cluster at file offset \(hex(off)) lies past the end of the file (\(fileLength) bytes; truncated?)")
        }
        return .state(.raw(hostOffset: off), zeroAllocHost: nil)
    }

    // MARK: - Public reading API

    /// Where guest cluster `index` is stored.
    public func clusterState(_ index: UInt64) throws -> ClusterState {
        guard index < guestClusters else {
            throw QCow2Error("cluster \(index) is beyond the virtual size \(virtualSize) (\(guestClusters) clusters)", path: path)
        }
        let i = Int(index / UInt64(l2Entries))
        let j = Int(index % UInt64(l2Entries))
        do {
            guard let table = try l2Table(i) else { return .unallocated }
            switch decodeEntry(table[j], index: index) {
            case .state(let s, _): return s
            case .invalid(let why):
                throw QCow2Error("\(describeGuest(index)): L2 entry \(j) of L1 entry \(i): \(why)")
            }
        } catch let e as QCow2Error {
            throw e.with(path: path)
        }
    }

    /// The guest clusters holding data (standard or compressed; not
    /// unallocated, not zero), ascending, as runs. Reads each L2 table once
    /// without caching; memory is proportional to the number of runs.
    public func allocatedClusters() throws -> AllocatedClusters {
        var ranges: [Range<UInt64>] = []
        var seen: [UInt64: Int] = [:]
        do {
            for i in 0..<l1Size {
                let (first, count) = l1Coverage(i)
                guard count > 0, let off = try l2Offset(i) else { continue }
                if let other = seen[off] {
                    throw QCow2Error("\(describeGuest(first, count: count)): L1 entries \(other) and \(i) both point to the L2 table at file offset \(hex(off))")
                }
                seen[off] = i
                let table = try readL2(off)
                for j in 0..<Int(count) {
                    let index = first + UInt64(j)
                    switch decodeEntry(table[j], index: index) {
                    case .state(.raw, _), .state(.compressed, _):
                        if let last = ranges.last, last.upperBound == index {
                            ranges[ranges.count - 1] = last.lowerBound..<(index + 1)
                        } else {
                            ranges.append(index..<(index + 1))
                        }
                    case .state:
                        break
                    case .invalid(let why):
                        throw QCow2Error("\(describeGuest(index)): L2 entry \(j) of the table at file offset \(hex(off)): \(why)")
                    }
                }
            }
        } catch let e as QCow2Error {
            throw e.with(path: path)
        }
        return AllocatedClusters(ranges: ranges)
    }

    /// Reads guest cluster `index` (a full cluster, zero-padded past the end
    /// of the disk) into the first `clusterSize` bytes of `into`. Returns
    /// false, having zero-filled, when the cluster is unallocated or a zero
    /// cluster; true when data was read. One pread per cluster; thread-safe.
    public func readCluster(_ index: UInt64, into: UnsafeMutableRawBufferPointer, decoder: ClusterDecoder) throws -> Bool {
        guard into.count >= clusterSize, let base = into.baseAddress else {
            throw QCow2Error("read buffer of \(into.count) bytes is smaller than the \(clusterSize)-byte cluster", path: path)
        }
        let state = try clusterState(index)
        if let why = try readState(state, index: index, into: base, decoder: decoder, strict: false) {
            throw QCow2Error("\(describeGuest(index)): \(why)", path: path)
        }
        switch state {
        case .unallocated, .zero: return false
        default: return true
        }
    }

    /// Reads a decoded state into `into` (clusterSize bytes). Returns nil on
    /// success or a description of a data problem; throws on I/O errors.
    func readState(_ state: ClusterState, index: UInt64, into: UnsafeMutableRawPointer,
                   decoder: ClusterDecoder, strict: Bool) throws -> String? {
        switch state {
        case .unallocated, .zero:
            into.initializeMemory(as: UInt8.self, repeating: 0, count: clusterSize)
            return nil
        case .raw(let off):
            let got = try preadFull(fd, into, clusterSize, off)
            if got != clusterSize {
                return "data cluster at file offset \(hex(off)) is cut short by the end of the file"
            }
            return nil
        case .compressed(let off, let size):
            let n = Int(min(UInt64(size), fileLength - off))
            let buf = decoder.inputBuffer(n)
            let got = try preadFull(fd, buf, n, off)
            if got == 0 {
                return "compressed data at file offset \(hex(off)) lies past the end of the file"
            }
            if let why = decoder.decompress(compression, src: UnsafeRawBufferPointer(start: buf, count: got),
                                            dst: UnsafeMutableRawBufferPointer(start: into, count: clusterSize), strict: strict) {
                return "compressed data at file offset \(hex(off)) (\(size) bytes) does not decompress: \(why)"
            }
            return nil
        }
    }
}
