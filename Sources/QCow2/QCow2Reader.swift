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
    var version: UInt32 = 1
    /// Version 2: the digest section (offset from the tail start; 0 length
    /// when the table is empty), its CRC and counts.
    var digestsOffset: UInt64 = 0
    var digestsLength: UInt64 = 0
    var digestCount: UInt64 = 0
    var digestsCRC: UInt32 = 0
    var digestRegions: UInt32 = 0
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
    /// The backing file name as stored (relative names are relative to the
    /// directory of this image), or nil; at most 1023 bytes, no NUL.
    public let backingFileName: String?
    /// The backing file format extension ("qcow2", "raw", ...), or nil.
    public let backingFormat: String?

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
            // The steps are in QCow2Reader+Open.swift.
            let fileLength = try Self.fileLengthOf(fd)
            self.fd = fd
            self.fileLength = fileLength
            var h = try Self.readFixedHeader(fd: fd, fileLength: fileLength)
            try Self.readVersion3Fields(&h, fileLength: fileLength)
            let l1 = try Self.readL1Table(fd: fd, h, fileLength: fileLength)
            try Self.checkRefcountTable(h, fileLength: fileLength)
            let snapshotNotes = try Self.checkSnapshots(h, fileLength: fileLength)
            let x = try Self.scanExtensions(h, fileLength: fileLength)
            let hoti = try Self.readHotimagePart(fd: fd, h, x, fileLength: fileLength)

            let cs = h.cs
            self.version = h.version
            self.clusterBits = h.clusterBits
            self.clusterSize = Int(cs)
            self.cs = cs
            self.l2Entries = Int(cs / 8)
            self.csizeShift = UInt64(62 - (h.clusterBits - 8))
            self.csizeMask = (UInt64(1) << UInt64(h.clusterBits - 8)) - 1
            self.headerCluster = h.cluster0
            self.incompatibleFeatures = h.incompat
            self.autoclearFeatures = h.autoclear
            self.refcountOrder = h.refcountOrder
            self.compression = h.compression
            self.compressionType = h.compression.name
            self.virtualSize = h.size
            self.guestClusters = divRoundUp(h.size, cs)
            self.l1Size = Int(h.l1Size)
            self.l1Offset = h.l1Offset
            self.l1 = l1
            self.refcountTableOffset = h.rtOffset
            self.refcountTableClusters = h.rtClusters
            self.snapshotCount = h.nbSnapshots
            self.notes = snapshotNotes + x.notes
            self.backingFileName = h.backingFileName
            self.backingFormat = h.backingFileName == nil ? nil : x.backingFormat
            self.refcountsComparable = h.nbSnapshots == 0 && !x.hasBitmaps
            self.hotiExtOffset = hoti.hotiExt
            self.hotimage = hoti.info
            self.tail = hoti.tail
            self.tailCRC = hoti.tailCRC
            self.hotimageProblems = hoti.problems
            self.l2CacheLimit = max(16, (64 << 20) / Int(cs))
        } catch let e as QCow2Error {
            close(fd)
            throw e.with(path: path)
        }
    }

    deinit { close(fd) }

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

    /// The image's per-cluster digest table (see `ClusterDigestTable`), or
    /// nil when the image has none (images from before tail version 2, or
    /// not written by hotimage). Throws when the table is damaged (its CRC
    /// or structure), naming the tail's file offset. Reads the section once.
    public func digests() throws -> ClusterDigestTable? {
        guard let t = tail, t.version >= 2, let info = hotimage else { return nil }
        let at = info.tailOffset &+ t.digestsOffset
        do {
            // readTail checked that the section lies inside the tail, and
            // the tail inside the file.
            let b = try preadArray(fd, count: Int(t.digestsLength), offset: at, what: "hotimage digest table")
            guard crc32Of(b) == t.digestsCRC else {
                throw QCow2Error("hotimage digest table at file offset \(hex(at)) (\(b.count) bytes): checksum mismatch")
            }
            return try ClusterDigestTable.decode(b, regionClusters: l2Entries, regionCount: t.digestRegions,
                                                 digestCount: t.digestCount, l1Size: l1Size, guestClusters: guestClusters)
        } catch let e as QCow2Error {
            throw QCow2Error(e.message.hasPrefix("hotimage digest table") ? e.message : "hotimage digest table at file offset \(hex(at)): \(e.message)", path: path)
        }
    }

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
        AllocatedClusters(ranges: try allocatedRanges(includeZero: false))
    }

    /// The guest clusters this image allocates: data, and with
    /// `includeZero` also zero-flag clusters (which hide a backing file's
    /// data), ascending, as runs.
    func allocatedRanges(includeZero: Bool) throws -> [Range<UInt64>] {
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
                    let take: Bool
                    switch decodeEntry(table[j], index: index) {
                    case .state(.raw, _), .state(.compressed, _):
                        take = true
                    case .state(.zero, _):
                        take = includeZero
                    case .state:
                        take = false
                    case .invalid(let why):
                        throw QCow2Error("\(describeGuest(index)): L2 entry \(j) of the table at file offset \(hex(off)): \(why)")
                    }
                    if take {
                        if let last = ranges.last, last.upperBound == index {
                            ranges[ranges.count - 1] = last.lowerBound..<(index + 1)
                        } else {
                            ranges.append(index..<(index + 1))
                        }
                    }
                }
            }
        } catch let e as QCow2Error {
            throw e.with(path: path)
        }
        return ranges
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
