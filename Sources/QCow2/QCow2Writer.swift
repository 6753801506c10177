// QCow2Writer.swift — writes a qcow2 version 3 image in one pass.
//
// ============================================================================
// FILE LAYOUT (what finish() leaves on disk)
// ============================================================================
//
//   cluster 0        header (112 bytes) + the "HOTI" header extension
//                    [+ the backing file format extension] + end marker
//                    [+ the backing file name]
//   data area        guest data, in the order it arrived:
//                      - compressed streams packed back to back, byte-tight,
//                        across cluster boundaries (staged in a multi-MiB run
//                        and written with one pwrite per run)
//                      - standard clusters, cluster-aligned, in batches
//                    Consecutive compressed runs continue at the exact byte
//                    where the previous one ended; only where a batch of
//                    standard clusters follows compressed data is the rest of
//                    one cluster left unused.
//   L2 tables        one cluster each, for every 512 MiB-ish region (l2 entries
//                    x cluster size) that holds at least one written cluster
//   L1 table         l1_size entries, padded to whole clusters
//   refcount table   followed by the refcount blocks, which cover every
//                    cluster above (including themselves)
//   tail blob        hotimage's own data, NOT refcounted (see below)
//
// The header cluster is written last, after everything else is fsynced, so a
// writer that dies before finish() leaves a file without the qcow2 magic
// rather than one that looks valid (abandon() deletes the file).
//
// qcow2 header: version 3, refcount_order 4 (16-bit refcounts), no
// encryption, no extended L2, no snapshots, header_length 112.
// Backing file (incremental images; QCow2Backing): none, or a name stored
// as given (a relative name is relative to this image's directory) right
// after the end-of-extensions marker, backing_file_offset (header offset 8)
// and backing_file_size (offset 16) pointing at it, 1...1023 bytes, no NUL;
// and the backing file format extension (0xE2792ACA, the format name, at
// most 16 bytes, zero-padded to 8) after the HOTI extension. A name that
// does not fit in cluster 0 is refused when the writer is created. The
// header CRC (below) covers all of cluster 0, name included.
// With a backing file the L2 entry 0 of a never-written cluster means
// "read the backing file" and the zero flag "zeros, hiding the backing
// file"; the writer's entries are the same with or without one.
// compression_type (byte 104) is 1 for zstd, with incompatible feature bit 3
// ("compression type") set; 0 for zlib and for uncompressed images.
// Autoclear feature bit 63 is set: "hotimage checksums valid". qemu clears
// unknown autoclear bits when it opens an image for writing, so the reader
// can tell when another program has written to the image.
//
// L2 entries: standard cluster = host offset | bit 63 (COPIED, refcount 1);
// compressed cluster = bit 62 | (additional 512-byte sectors << (62 -
// (cluster_bits - 8))) | byte offset, where the sector count runs from
// (offset & ~511) to the end of the stream; written all-zero cluster = 1
// (the zero flag, no host cluster); never-written cluster = 0. L1 entries =
// L2 table offset | bit 63.
//
// Refcounts (what qemu-img check recomputes): header cluster 1, each L2
// table 1, each L1/refcount table/refcount block cluster 1, each standard
// data cluster 1, and each host cluster touched by the sector-rounded range
// of a compressed cluster +1 per compressed cluster touching it (a host
// cluster shared by 30 compressed clusters has refcount 30; the writer never
// lets one exceed 65535). The tail blob's clusters have refcount 0 and no
// references, which qemu-img check accepts (neither leak nor error).
//
// ============================================================================
// HOTI HEADER EXTENSION (type 0x484F5449 "HOTI", 32 data bytes, big-endian)
// ============================================================================
//
//   0  u32  hotimage format version (1)
//   4  u32  flags: bit 0 = complete (0: partial image kept for diagnosis)
//   8  u64  tail blob file offset
//  16  u64  tail blob length in bytes
//  24  u32  CRC of the whole tail blob
//  28  u32  header CRC: CRC of the whole of cluster 0 with bytes 24..<32 of
//           this extension (the two CRC fields) read as zeros
//
// The extension is small on purpose: qemu keeps unknown header extensions
// only within cluster 0 (it must fit a 512-byte cluster with the header).
//
// ============================================================================
// TAIL BLOB (at the extension's offset, after all refcounted structures)
// ============================================================================
//
// Tail header, 160 bytes (version 2; version 1, still read, has only the
// first 128 and no digest table), big-endian:
//   0  "HOTITAIL"             8 bytes
//   8  u32 tail version (2)   12 u32 cluster_bits       16 u64 virtual size
//  24  u32 header CRC (as in the extension)              28 u32 L1 CRC
//  32  u64 L1 offset          40 u32 l1_size            44 u32 refcount table CRC
//  48  u64 refcount table offset                         56 u32 refcount table clusters
//  60  u32 refcount block count
//  64  u64 metadata offset (from tail start)             72 u64 metadata length
//  80  u32 metadata CRC       84 u32 group size (bytes)
//  88  u64 refcount block list offset (from tail start)
//  96  u64 group list offset (from tail start)          104 u64 group count
// 112  u64 clusters written (including zero clusters)   120 u64 zero clusters
// 128  u64 digest table offset (from tail start)        136 u64 digest table length
// 144  u64 clusters with a digest                        152 u32 digest table CRC
// 156  u32 digest table regions
// Then, each section 8-byte aligned:
//   metadata          the opaque bytes given to finish() (hotimage's JSON)
//   refcount blocks   per block: u64 file offset, u32 CRC of the block, u32 0
//   groups            one per L2 table, ascending L1 index, fixed size
//                     16 + l2_entries/8 + 4 * l2_entries bytes:
//                       0 u32 L1 index   4 u32 CRC of the L2 table (one cluster)
//                       8 u64 L2 table file offset
//                      16 written bitmap: bit j (byte j/8, LSB first) = guest
//                         cluster (L1 index * l2_entries + j) was written
//                         (data or zero)
//                      16 + l2_entries/8: l2_entries x u32 checksum of the
//                         cluster (0 where not written): the CRC of the guest
//                         cluster's bytes; for compressed clusters the CRC of
//                         the guest bytes followed by the compressed stream
//                         (so damage to stream bits that do not change the
//                         output, such as deflate padding, is caught too)
//   digest table      (version 2) per L2-sized region (l2_entries guest
//                     clusters, L1 index i) that has any digest, ascending:
//                       0 u32 L1 index   4 u32 n = digests in the region
//                       8 presence bitmap, l2_entries/8 bytes: bit j (byte
//                         j/8, LSB first) = cluster i * l2_entries + j has
//                         a digest
//                       8 + l2_entries/8: n x 16 bytes, the digests of the
//                         present clusters in cluster order (XXH3-128, seed
//                         0, of the full cluster zero-padded: u64 high,
//                         u64 low)
//                     Meaning: for every guest cluster, "digest D" = the
//                     cluster's content at this image's point in time, read
//                     through the whole backing chain, has digest D;
//                     absent = it reads as zeros then. It covers clusters
//                     this image did not write too (an incremental copies
//                     its base's digests for unchanged clusters):
//                     setDigest(); write() records a data cluster's digest
//                     and clears it for a zero cluster.
//                     Size: 16 bytes per cluster with a digest + 8 +
//                     l2_entries/8 per region: at 64 KiB clusters 256 MiB
//                     + 2 MiB per TiB of used data (the same in the
//                     writer's memory, plus 16 bytes per cluster of each
//                     touched region until finish).
// Structure CRCs cover whole clusters: the L1 table (all its clusters,
// padding included), the refcount table (all its clusters), each refcount
// block and each L2 table.
// All CRCs are zlib's CRC-32 (IEEE).
//
// Writing into the image with qemu (or anything else) voids these
// checksums: qemu keeps the extension and the tail bytes but not their
// meaning, may reuse the unrefcounted tail clusters, and clears autoclear
// bit 63 when it opens the image for writing, which the reader reports.
//
// ============================================================================
// MEMORY
// ============================================================================
// Per guest cluster in each touched L2 region: 8 bytes (L2 entry) + 4 bytes
// (CRC). At 64 KiB clusters that is 192 MiB per TiB of guest space the
// image touches (128 MiB of L2 entries + 64 MiB of CRCs); at 4 KiB clusters
// 3 GiB per TiB. Plus 2 bytes of refcount per host data cluster (32 MiB per
// TiB of data at 64 KiB clusters), and staging buffers: one compressed run
// (max(8 MiB, 2 clusters)) and one standard-cluster batch (max(4 MiB, 1
// cluster)) being filled, plus one of each per thread whose full buffer is
// being written outside the lock.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import HotSync

/// The backing file an incremental image names (qcow2 backing_file_offset /
/// backing_file_size, and the backing file format header extension).
/// `fileName` is stored exactly as given: a relative name is resolved by
/// readers (qemu, `QCow2Chain`) against the directory of this image.
public struct QCow2Backing: Sendable, Equatable {
    public var fileName: String
    public var format: String = "qcow2"

    public init(fileName: String, format: String = "qcow2") {
        self.fileName = fileName
        self.format = format
    }

    /// qemu's limits: a name of at most 1023 bytes, a format of at most 16.
    static let maxNameBytes = 1023
    static let maxFormatBytes = 16
}

/// What finish() wrote.
public struct QCow2WriteSummary: Sendable, CustomStringConvertible {
    public let path: String
    public let virtualSize: UInt64
    public let clusterSize: Int
    public let compression: QCow2Compression
    public let complete: Bool
    /// Guest clusters written (data and zero).
    public let clustersWritten: UInt64
    public let zeroClusters: UInt64
    public let rawClusters: UInt64
    public let compressedClusters: UInt64
    /// Sum of the compressed streams' lengths.
    public let compressedBytes: UInt64
    /// End of the data area (cluster-aligned).
    public let dataAreaBytes: UInt64
    public let l2Tables: UInt64
    public let refcountBlocks: UInt64
    public let tailOffset: UInt64
    public let tailLength: UInt64
    /// Guest clusters with a digest in the image's digest table.
    public let digestCount: Int
    /// Final file length.
    public let fileSize: UInt64
    public let hostBytesWritten: UInt64

    public var description: String {
        "\(path): \(virtualSize) bytes virtual, \(clustersWritten) clusters written (\(compressedClusters) compressed, \(rawClusters) raw, \(zeroClusters) zero), file \(fileSize) bytes\(complete ? "" : ", INCOMPLETE")"
    }
}

final class L2Region {
    var entries: [UInt64]
    var crcs: [UInt32]
    init(_ n: Int) {
        entries = [UInt64](repeating: 0, count: n)
        crcs = [UInt32](repeating: 0, count: n)
    }
}

/// Writes a qcow2 v3 image. Thread-safe: staging happens under an internal
/// lock; full buffers (a compressed run, a batch of standard clusters) get
/// their final file position under the lock and are then written by the
/// calling thread outside it, so other threads keep staging meanwhile.
public final class QCow2Writer: @unchecked Sendable {
    public let path: String
    public let virtualSize: UInt64
    public let clusterBits: Int
    public let clusterSize: Int
    public let compression: QCow2Compression
    /// The backing file named in the header, if any.
    public let backing: QCow2Backing?

    let cs: UInt64
    private let guestClusters: UInt64
    let l2Entries: Int
    let l1Size: Int
    private let csizeShift: UInt64
    private let lock = Monitor()

    private enum State { case open, failed(QCow2Error), finished, abandoned }
    private var state = State.open
    var fd: Int32
    private var created = true

    var regions: [L2Region?]
    /// Refcount of each host cluster below the end of the data area.
    var dataRefcounts: [UInt16] = [1]      // cluster 0: the header
    var fileEnd: UInt64                     // end of the last byte written
    private var lastWasCompressed = false

    private let runCapacity: Int
    private var runBuf: UnsafeMutableRawPointer?
    private var runStart: UInt64 = 0
    private var runLen = 0

    private let rawCapacity: Int                    // clusters per batch
    private var rawBuf: UnsafeMutableRawPointer?
    private var rawIndices: [UInt64] = []

    /// A full buffer on its way to the file. Positions are fixed when the
    /// buffer is detached, so jobs may run concurrently, outside the lock.
    struct Job {
        let buf: UnsafeMutableRawPointer
        let count: Int
        let offset: UInt64
        let isRun: Bool
    }
    private var spareRuns: [UnsafeMutableRawPointer] = []
    private var spareRaws: [UnsafeMutableRawPointer] = []
    private var inFlight = 0

    /// The digest table (its own lock: setDigest never waits for staging).
    let digests: DigestAccumulator

    var bytesWritten: UInt64 = 0
    var nZero: UInt64 = 0, nRaw: UInt64 = 0, nCompressed: UInt64 = 0, compressedBytes: UInt64 = 0

    /// Placeholder L2 entry of a standard cluster waiting in the batch (a
    /// reserved bit, never left in a finished image).
    static let pendingRaw: UInt64 = 1 << 61
    /// qemu's refcount_max for 16-bit refcounts.
    static let refcountMax: UInt16 = 0xFFFF

    /// Creates the image file (O_EXCL unless `overwrite`), mode 0600 (0640
    /// with a group in `access`) whatever the umask: an image is as secret
    /// as the volume (DataFileAccess.swift). `clusterBits` is 9...21;
    /// `virtualSize` must be a multiple of 512 (qemu counts sectors) and
    /// within qemu's limits for the cluster size (32 MiB of L1 table).
    public convenience init(path: String, virtualSize: UInt64, clusterBits: Int = 16,
                            compression: QCow2Compression, overwrite: Bool = false,
                            access: DataFileAccess = .ownerOnly, backing: QCow2Backing? = nil) throws {
        try self.init(path: path, virtualSize: virtualSize, clusterBits: clusterBits, compression: compression,
                      overwrite: overwrite, access: access, runBytes: nil, rawBatchClusters: nil, backing: backing)
    }

    /// `runBytes` / `rawBatchClusters` override the staging sizes (tests use
    /// tiny ones to exercise many concurrent flushes).
    init(path: String, virtualSize: UInt64, clusterBits: Int, compression: QCow2Compression,
         overwrite: Bool, access: DataFileAccess = .ownerOnly, runBytes: Int?, rawBatchClusters: Int?,
         backing: QCow2Backing? = nil) throws {
        guard (Q.minClusterBits...Q.maxClusterBits).contains(clusterBits) else {
            throw QCow2Error("cluster_bits \(clusterBits) is out of range: qcow2 images need 9...21 (512 bytes to 2 MiB clusters)", path: path)
        }
        guard virtualSize % Q.sectorSize == 0 else {
            throw QCow2Error("virtual size \(virtualSize) is not a multiple of 512 bytes (qemu counts qcow2 disks in 512-byte sectors)", path: path)
        }
        guard virtualSize <= UInt64(Int64.max) else {
            throw QCow2Error("virtual size \(virtualSize) is too large", path: path)
        }
        switch compression {
        case .zstd(let level) where !QCow2Compression.zstdLevels.contains(level) || level == 0:
            throw QCow2Error("zstd level \(level) is out of range \(QCow2Compression.zstdLevels)", path: path)
        case .zlib(let level) where !QCow2Compression.zlibLevels.contains(level):
            throw QCow2Error("zlib level \(level) is out of range \(QCow2Compression.zlibLevels)", path: path)
        default: break
        }
        let cs = UInt64(1) << UInt64(clusterBits)
        let l2e = Int(cs / 8)
        let gc = divRoundUp(virtualSize, cs)
        let l1 = divRoundUp(gc, UInt64(l2e))
        guard l1 * 8 <= Q.maxL1Bytes else {
            throw QCow2Error("virtual size \(virtualSize) needs an L1 table of \(l1 * 8) bytes with \(cs)-byte clusters; qemu allows at most \(Q.maxL1Bytes) (use a larger cluster size)", path: path)
        }
        if let backing {
            try Self.checkBacking(backing, clusterSize: Int(cs), path: path)
        }
        self.path = path
        self.backing = backing
        self.digests = DigestAccumulator(l2Entries: l2e)
        self.virtualSize = virtualSize
        self.clusterBits = clusterBits
        self.clusterSize = Int(cs)
        self.compression = compression
        self.cs = cs
        self.guestClusters = gc
        self.l2Entries = l2e
        self.l1Size = Int(l1)
        self.csizeShift = UInt64(62 - (clusterBits - 8))
        self.regions = [L2Region?](repeating: nil, count: Int(l1))
        self.fileEnd = cs
        self.runCapacity = max(runBytes ?? (8 << 20), 2 * Int(cs))
        self.rawCapacity = max(1, rawBatchClusters ?? ((4 << 20) / Int(cs)))

        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL)
        let fd = access.open(path, flags: flags)
        if fd < 0 {
            let e = errno
            if e == EEXIST {
                throw QCow2Error("cannot create the image: the file already exists (not overwriting it)", path: path)
            }
            throw QCow2Error("cannot create the image: \(errnoText(e))", path: path)
        }
        self.fd = fd
    }

    /// Where cluster 0 puts the backing format extension and the backing
    /// file name: (extension offset, extension total bytes, name offset).
    static func backingLayout(_ b: QCow2Backing) -> (extOffset: Int, extBytes: Int, nameOffset: Int) {
        let extOffset = Q.headerLength + 8 + Q.hotiExtLength
        let fmt = b.format.utf8.count
        let extBytes = 8 + Int(alignUp(UInt64(fmt), 8))
        // End-of-extensions marker (8 zero bytes), then the name.
        return (extOffset, extBytes, extOffset + extBytes + 8)
    }

    /// Refuses a backing file name or format the header cannot hold.
    static func checkBacking(_ b: QCow2Backing, clusterSize: Int, path: String) throws {
        let name = Array(b.fileName.utf8), fmt = Array(b.format.utf8)
        guard !name.isEmpty, !name.contains(0) else {
            throw QCow2Error("backing file name \"\(b.fileName)\" is empty or contains a NUL byte", path: path)
        }
        guard name.count <= QCow2Backing.maxNameBytes else {
            throw QCow2Error("backing file name is \(name.count) bytes long; qcow2 readers (qemu) accept at most \(QCow2Backing.maxNameBytes)", path: path)
        }
        guard !fmt.isEmpty, !fmt.contains(0), fmt.count <= QCow2Backing.maxFormatBytes else {
            throw QCow2Error("backing file format \"\(b.format)\" must be 1...\(QCow2Backing.maxFormatBytes) bytes without NUL", path: path)
        }
        let at = backingLayout(b).nameOffset
        guard at + name.count <= clusterSize else {
            throw QCow2Error("backing file name of \(name.count) bytes does not fit in the \(clusterSize)-byte header cluster (\(clusterSize - at) bytes left after the header and its extensions); use a shorter (relative) name or a larger cluster size", path: path)
        }
    }

    /// Records the digest of guest cluster `cluster` in the image's digest
    /// table: its content at this image's point in time, read through the
    /// whole chain (for clusters this image does not write, such as ones
    /// unchanged since the base, the caller copies the base's digest).
    /// Thread-safe; one lock and a store. `write` records it automatically
    /// for data clusters and clears it for zero clusters.
    public func setDigest(cluster: UInt64, _ d: ClusterDigest) {
        precondition(cluster < guestClusters, "cluster \(cluster) lies beyond the virtual size \(virtualSize)")
        digests.set(cluster, d)
    }

    deinit {
        if fd >= 0 { close(fd) }
        runBuf?.deallocate()
        rawBuf?.deallocate()
        for b in spareRuns + spareRaws { b.deallocate() }
    }

    /// Bytes written to the file so far.
    public var hostBytesWritten: UInt64 { lock.withLock { bytesWritten } }

    func err(_ message: String) -> QCow2Error { QCow2Error(message, path: path) }

    private func checkOpen() throws {
        switch state {
        case .open: return
        case .failed(let e): throw err("the writer failed earlier and cannot continue (\(e.message))")
        case .finished: throw err("the image is already finished")
        case .abandoned: throw err("the image was abandoned")
        }
    }

    private func guestRange(_ index: UInt64) -> String {
        let start = index &* cs
        let end = min(start &+ cs, virtualSize)
        return "guest bytes \(hex(start))–\(hex(end &- 1)) (cluster \(index))"
    }

    /// Stores one encoded cluster. Clusters may arrive in any order; each
    /// index at most once.
    public func write(_ c: EncodedCluster) throws {
        // The recorded checksum; for compressed clusters CRC(guest bytes ||
        // stream), which also covers stream bits that do not change the
        // output. (Not an XOR of two CRCs: CRC is affine, so equal flips at
        // equal distances from the ends of a stored deflate block would
        // cancel.) Computed before taking the lock.
        let recorded: UInt32
        if case .compressed(let bytes) = c.payload {
            recorded = bytes.withUnsafeBytes { crc32Update(c.crc, $0.baseAddress, $0.count) }
        } else {
            recorded = c.crc
        }
        var jobs: [Job] = []
        var thrown: Error? = nil
        lock.withLock {
            do { try stage(c, recorded: recorded, jobs: &jobs) } catch { thrown = error }
        }
        // Detached buffers are always written (and released), even when
        // staging failed after detaching them.
        if !jobs.isEmpty {
            do { try run(jobs) } catch { if thrown == nil { thrown = error } }
        }
        if let thrown { throw thrown }
        // A zero cluster reads as zeros: "absent" in the digest table.
        digests.set(c.index, c.isZero ? nil : c.digest)
    }

    /// Validates and stages one cluster (lock held). Full buffers are
    /// detached into `jobs` for the caller to write after unlocking.
    private func stage(_ c: EncodedCluster, recorded: UInt32, jobs: inout [Job]) throws {
        try checkOpen()
        guard c.index < guestClusters else {
            throw err("cluster \(c.index) (guest offset \(hex(c.index &* cs))) lies beyond the virtual size \(virtualSize)")
        }
        switch c.payload {
        case .zero:
            break
        case .raw(let bytes):
            guard bytes.count == clusterSize else {
                throw err("\(guestRange(c.index)): raw payload has \(bytes.count) bytes, expected exactly \(clusterSize)")
            }
        case .compressed(let bytes):
            guard bytes.count > 0, bytes.count < clusterSize else {
                throw err("\(guestRange(c.index)): compressed payload has \(bytes.count) bytes, expected 1...\(clusterSize - 1)")
            }
        }
        let l1i = Int(c.index / UInt64(l2Entries))
        let j = Int(c.index % UInt64(l2Entries))
        if let r = regions[l1i], r.entries[j] != 0 {
            throw err("\(guestRange(c.index)) was written twice")
        }
        let region: L2Region
        if let r = regions[l1i] {
            region = r
        } else {
            region = L2Region(l2Entries)
            regions[l1i] = region
        }
        switch c.payload {
        case .zero:
            region.entries[j] = Q.oflagZero
            nZero += 1
        case .raw(let bytes):
            try stageRaw(bytes, index: c.index, region: region, slot: j, jobs: &jobs)
            nRaw += 1
        case .compressed(let bytes):
            region.entries[j] = try stageCompressed(bytes, index: c.index, jobs: &jobs)
            nCompressed += 1
            compressedBytes += UInt64(bytes.count)
        }
        region.crcs[j] = recorded
    }

    /// Writes detached buffers outside the lock, then returns them.
    private func run(_ jobs: [Job]) throws {
        var failure: QCow2Error? = nil
        var done: UInt64 = 0
        for job in jobs where failure == nil {
            do {
                try pwriteFull(fd, job.buf, job.count, job.offset)
                done += UInt64(job.count)
            } catch let e as QCow2Error {
                failure = e.with(path: path)
            } catch {
                failure = err("\(error)")
            }
        }
        lock.withLock {
            for job in jobs {
                if job.isRun { spareRuns.append(job.buf) } else { spareRaws.append(job.buf) }
            }
            bytesWritten += done
            inFlight -= jobs.count
            if let failure, case .open = state { state = .failed(failure) }
            lock.broadcast()
        }
        if let failure { throw failure }
    }

    /// Runs jobs while holding the lock (finish only); releases them all
    /// even when one fails.
    func runLocked(_ jobs: [Job]) throws {
        var failure: Error? = nil
        for job in jobs {
            if failure == nil {
                do {
                    try pwriteFull(fd, job.buf, job.count, job.offset)
                    bytesWritten += UInt64(job.count)
                } catch {
                    failure = error
                }
            }
            if job.isRun { spareRuns.append(job.buf) } else { spareRaws.append(job.buf) }
            inFlight -= 1
        }
        if let failure { throw failure }
    }

    // MARK: Staging

    private func bumpRefcount(_ k: UInt64) {
        let i = Int(k)
        if i >= dataRefcounts.count {
            dataRefcounts.append(contentsOf: repeatElement(0, count: i + 1 - dataRefcounts.count))
        }
        if dataRefcounts[i] < Self.refcountMax { dataRefcounts[i] += 1 }
    }

    private func refcount(_ k: UInt64) -> UInt16 {
        let i = Int(k)
        return i < dataRefcounts.count ? dataRefcounts[i] : 0
    }

    private func stageCompressed(_ bytes: [UInt8], index: UInt64, jobs: inout [Job]) throws -> UInt64 {
        let n = bytes.count
        if runBuf == nil { runBuf = spareRuns.popLast() ?? .allocate(byteCount: runCapacity, alignment: 4096) }
        if runLen == 0 { runStart = lastWasCompressed ? fileEnd : alignUp(fileEnd, cs) }
        var p = runStart + UInt64(runLen)
        // Keep every host cluster's refcount within 16 bits.
        var padding = refcount(p / cs) >= Self.refcountMax ? Int(alignUp(p, cs) - p) : 0
        if runLen + padding + n > runCapacity {
            if let job = detachRun() { jobs.append(job) }
            runBuf = spareRuns.popLast() ?? .allocate(byteCount: runCapacity, alignment: 4096)
            runStart = fileEnd
            p = runStart
            padding = refcount(p / cs) >= Self.refcountMax ? Int(alignUp(p, cs) - p) : 0
        }
        guard p + UInt64(padding) < (UInt64(1) << csizeShift) else {
            let e = err("\(guestRange(index)): host offset \(hex(p)) exceeds what a compressed cluster descriptor can address with \(clusterSize)-byte clusters")
            state = .failed(e)
            throw e
        }
        let buf = runBuf!
        if padding > 0 {
            (buf + runLen).initializeMemory(as: UInt8.self, repeating: 0, count: padding)
            runLen += padding
            p += UInt64(padding)
        }
        bytes.withUnsafeBytes { (buf + runLen).copyMemory(from: $0.baseAddress!, byteCount: n) }
        runLen += n
        let last = p + UInt64(n) - 1
        let extraSectors = (last >> 9) - (p >> 9)
        for k in (p / cs)...(last / cs) { bumpRefcount(k) }
        return Q.oflagCompressed | (extraSectors << csizeShift) | p
    }

    private func stageRaw(_ bytes: [UInt8], index: UInt64, region: L2Region, slot: Int, jobs: inout [Job]) throws {
        if rawBuf == nil { rawBuf = spareRaws.popLast() ?? .allocate(byteCount: rawCapacity * clusterSize, alignment: 4096) }
        let buf = rawBuf! + rawIndices.count * clusterSize
        bytes.withUnsafeBytes { buf.copyMemory(from: $0.baseAddress!, byteCount: clusterSize) }
        rawIndices.append(index)
        region.entries[slot] = Self.pendingRaw
        if rawIndices.count == rawCapacity { jobs += try detachRaw() }
    }

    /// Hands the compressed run over for writing; its position is final.
    func detachRun() -> Job? {
        guard runLen > 0, let buf = runBuf else { return nil }
        let job = Job(buf: buf, count: runLen, offset: runStart, isRun: true)
        fileEnd = runStart + UInt64(runLen)
        lastWasCompressed = true
        runLen = 0
        runBuf = nil
        inFlight += 1
        return job
    }

    /// Places the batch of standard clusters (after the compressed run, which
    /// is detached first) and hands both over for writing.
    func detachRaw() throws -> [Job] {
        guard !rawIndices.isEmpty, let buf = rawBuf else { return [] }
        var jobs: [Job] = []
        if let job = detachRun() { jobs.append(job) }
        let start = alignUp(fileEnd, cs)
        let count = rawIndices.count
        guard start + UInt64(count) * cs <= Q.offsetMask else {
            let e = err("the image grew beyond the 64 PiB a standard cluster descriptor can address")
            state = .failed(e)
            throw e
        }
        for (k, index) in rawIndices.enumerated() {
            let host = start + UInt64(k) * cs
            let r = regions[Int(index / UInt64(l2Entries))]!
            r.entries[Int(index % UInt64(l2Entries))] = host | Q.oflagCopied
            bumpRefcount(host / cs)
        }
        jobs.append(Job(buf: buf, count: count * clusterSize, offset: start, isRun: false))
        inFlight += 1
        fileEnd = start + UInt64(count) * cs
        lastWasCompressed = false
        rawIndices.removeAll(keepingCapacity: true)
        rawBuf = nil
        return jobs
    }

    // MARK: Finish

    /// Writes the L2 tables, L1 table, refcount structures, the tail blob
    /// and finally the header; fsyncs and closes (QCow2Writer+Finish.swift).
    /// `complete: false` marks a partial image kept for diagnosis.
    public func finish(metadata: [UInt8], complete: Bool) throws -> QCow2WriteSummary {
        try lock.withLock {
            while inFlight > 0 { lock.wait() }
            try checkOpen()
            guard UInt64(metadata.count) <= Q.maxMetadataBytes else {
                throw err("metadata of \(metadata.count) bytes exceeds the \(Q.maxMetadataBytes)-byte limit")
            }
            do {
                let s = try finishLocked(metadata: metadata, complete: complete)
                state = .finished
                return s
            } catch let e as QCow2Error {
                state = .failed(e)
                throw e.with(path: path)
            }
        }
    }

    /// Closes and deletes the file (the failure path). Safe to call more
    /// than once.
    public func abandon() {
        lock.withLock {
            while inFlight > 0 { lock.wait() }
            if fd >= 0 {
                close(fd)
                fd = -1
            }
            if created {
                unlink(path)
                created = false
            }
            state = .abandoned
            runLen = 0
            rawIndices.removeAll()
        }
    }
}
