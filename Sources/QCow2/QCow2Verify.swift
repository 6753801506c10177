// QCow2Verify.swift — a full check of an image: refcounts recomputed the way
// `qemu-img check` does (header, L1, L2 tables, data and compressed ranges,
// refcount table and blocks; COPIED flags), hotimage's structure checksums,
// every written cluster decompressed and compared with its recorded CRC, and
// L2 compared with hotimage's record of written clusters in both directions,
// and every written cluster's digest against the digest table (tail version
// 2; zero clusters must have none). A backing file is not opened: its
// unallocated clusters are fine (verifyChainContent checks a whole chain).
// It reports every problem it finds (up to `VerifyReport.storedProblemLimit`
// stored; all counted), naming the guest region and host file offset.
//
// Cost: one pass over the L2 tables, then every data cluster read once (in
// parallel, one ClusterDecoder per worker) and the tail blob streamed.
// Memory: 4 bytes per host cluster of the file for the two refcount arrays
// (64 MiB per TiB of image at 64 KiB clusters), one L2 table per worker and
// the hotimage group directory.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import HotSync

public struct VerifyProblem: CustomStringConvertible, Equatable, Sendable {
    public enum Kind: String, Sendable {
        /// The image could not be opened at all.
        case open
        /// The qcow2 header, cluster 0, or the hotimage extension.
        case header
        /// hotimage's extension or tail blob.
        case hotimage
        /// The image is marked incomplete.
        case incomplete
        case l1
        case l2
        case refcount
        /// A cluster's data is unreadable, does not decompress, or has the wrong checksum.
        case data
        /// Recorded as written but not present in L2.
        case missing
        /// Present in L2 but not recorded as written.
        case unexpected
        case tail
        /// A cluster's content does not match the image's digest table
        /// (alone: a written cluster; through a chain: any cluster).
        case digest
    }

    public let kind: Kind
    /// Guest byte offset of the affected region, if any.
    public let guestOffset: UInt64?
    /// Length in bytes of the affected guest region.
    public let guestLength: UInt64?
    /// First guest cluster of the region.
    public let cluster: UInt64?
    /// Number of guest clusters in the region.
    public let clusterCount: UInt64?
    /// Host file offset of the structure or data concerned.
    public let hostOffset: UInt64?
    public let message: String

    public init(kind: Kind, guestOffset: UInt64? = nil, guestLength: UInt64? = nil, cluster: UInt64? = nil,
                clusterCount: UInt64? = nil, hostOffset: UInt64? = nil, message: String) {
        self.kind = kind
        self.guestOffset = guestOffset
        self.guestLength = guestLength
        self.cluster = cluster
        self.clusterCount = clusterCount
        self.hostOffset = hostOffset
        self.message = message
    }

    public var description: String {
        var s = ""
        if let g = guestOffset, let len = guestLength {
            let last = len > 0 ? g &+ len &- 1 : g
            s = "guest bytes \(hex(g))–\(hex(last))"
            if let c = cluster {
                let n = clusterCount ?? 1
                s += n == 1 ? " (cluster \(c))" : " (clusters \(c)–\(c &+ n &- 1))"
            }
            s += ": "
        }
        s += message
        if let h = hostOffset, !message.contains(hex(h)) {
            s += " (file offset \(hex(h)))"
        }
        return s
    }
}

public struct VerifyReport: Sendable, CustomStringConvertible {
    /// At most this many problems are stored; `problemCount` counts all.
    public static let storedProblemLimit = 10_000

    public var problems: [VerifyProblem] = []
    public var problemCount: UInt64 = 0
    /// Guest clusters whose L2 entry was checked against their data (data
    /// clusters read and decompressed, zero clusters).
    public var clustersChecked: UInt64 = 0
    public var dataClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0
    public var zeroClusters: UInt64 = 0
    /// Whether hotimage's checksums were available and used.
    public var checkedChecksums = false
    /// Whether the refcounts were recomputed and compared.
    public var checkedRefcounts = false
    public var notes: [String] = []

    public init() {}

    public var isClean: Bool { problemCount == 0 }

    mutating func add(_ p: VerifyProblem) {
        problemCount += 1
        if problems.count < Self.storedProblemLimit { problems.append(p) }
    }

    public var description: String {
        var lines: [String] = []
        lines.append(isClean ? "verify: no problems (\(clustersChecked) clusters checked)"
                             : "verify: \(problemCount) problem(s) (\(clustersChecked) clusters checked)")
        for p in problems { lines.append("  \(p)") }
        if problemCount > UInt64(problems.count) {
            lines.append("  ... and \(problemCount - UInt64(problems.count)) more")
        }
        for n in notes { lines.append("  note: \(n)") }
        return lines.joined(separator: "\n")
    }
}

extension QCow2Reader {
    /// Opens and verifies the image at `path`; a failure to open becomes a
    /// problem of kind `.open` in the report.
    public static func verifyImage(at path: String, progress: ((UInt64, UInt64) -> Void)? = nil) -> VerifyReport {
        do {
            let reader = try QCow2Reader(path: path)
            return reader.verify(progress: progress)
        } catch {
            var r = VerifyReport()
            r.add(VerifyProblem(kind: .open, message: "\(error)"))
            return r
        }
    }

    /// Verifies the whole image. `progress(done, total)` counts guest
    /// clusters; it may be called from several threads (never concurrently).
    public func verify(progress: ((UInt64, UInt64) -> Void)? = nil) -> VerifyReport {
        var v = Verifier(reader: self)
        v.run(progress: progress)
        return v.report
    }
}

/// One hotimage cluster group (see QCow2Writer.swift).
struct GroupRef {
    let number: UInt64
    let l2CRC: UInt32
    let l2Offset: UInt64
}

struct Verifier {
    let r: QCow2Reader
    var report = VerifyReport()
    let cs: UInt64
    let nbClusters: UInt64
    var diskRefs: [UInt16] = []
    var refs: [UInt16] = []
    var refsEnabled = false
    /// hotimage tail usable for checksums.
    let tail: TailLayout?
    var groups: [Int: GroupRef] = [:]
    /// L1 indexes with a readable L2 table, and its offset.
    var tables: [(Int, UInt64)] = []
    var totalEntries: UInt64 = 0
    /// Valid refcount blocks: refcount table index and file offset.
    var refBlocks: [(Int, UInt64)] = []
    /// L2 table offset -> first L1 index using it (a table shared by several
    /// L1 entries is scanned once, which bounds the work on hostile files).
    var seenTables: [UInt64: Int] = [:]
    var notedBeyond = false
    /// The digest table (tail version 2), loaded in run().
    var digestTable: ClusterDigestTable? = nil

    /// Above this many host clusters the refcount comparison is skipped
    /// (it needs 4 bytes per host cluster: 2 GiB here).
    static let maxRefcountClusters: UInt64 = 1 << 29

    init(reader: QCow2Reader) {
        r = reader
        cs = reader.cs
        nbClusters = divRoundUp(reader.fileLength, reader.cs)
        tail = reader.hotimage != nil && reader.hotiExtOffset != nil ? reader.tail : nil
    }

    mutating func problem(_ kind: VerifyProblem.Kind, host: UInt64? = nil, _ message: String) {
        report.add(VerifyProblem(kind: kind, hostOffset: host, message: message))
    }

    mutating func guestProblem(_ kind: VerifyProblem.Kind, cluster: UInt64, count: UInt64 = 1, host: UInt64? = nil, _ message: String) {
        guard cluster < r.guestClusters else {
            problem(kind, host: host, "cluster \(cluster) (beyond the end of the disk): \(message)")
            return
        }
        let (start, len) = r.guestRange(cluster, count: count)
        report.add(VerifyProblem(kind: kind, guestOffset: start, guestLength: len, cluster: cluster,
                                 clusterCount: count, hostOffset: host, message: message))
    }

    mutating func run(progress: ((UInt64, UInt64) -> Void)?) {
        report.notes = r.notes
        report.checkedChecksums = tail != nil && r.hotimage?.checksumsValid == true
        checkHeader()
        loadDiskRefcounts()
        loadGroups()
        scanTables()
        countStructures()
        compareRefcounts()
        if tail != nil {
            do {
                digestTable = try r.digests()
            } catch let e as QCow2Error {
                problem(.digest, e.message)
            } catch {
                problem(.digest, "\(error)")
            }
        }
        checkData(progress: progress)
        checkTail()
    }

    // MARK: Header

    mutating func checkHeader() {
        for p in r.hotimageProblems { problem(.hotimage, p) }
        if r.incompatibleFeatures & Q.incompatDirty != 0 {
            problem(.header, host: 72, "the dirty bit is set (incompatible feature bit 0): the image was not closed cleanly and its refcounts may be stale")
        }
        if r.incompatibleFeatures & Q.incompatCorrupt != 0 {
            problem(.header, host: 72, "the corrupt bit is set (incompatible feature bit 1): qemu found this image corrupt")
        }
        guard let info = r.hotimage, let ext = r.hotiExtOffset else { return }
        if !info.complete {
            problem(.incomplete, "the image is marked incomplete: it is a partial backup kept for diagnosis, not a usable image")
        }
        var hc = r.headerCluster
        let stored = hc.be32(at: ext + 28)
        for k in 24..<32 { hc[ext + k] = 0 }
        let computed = crc32Of(hc)
        if computed != stored {
            problem(.header, host: 0, "header cluster (file offset 0, \(cs) bytes): checksum mismatch (stored \(hex(UInt64(stored))), computed \(hex(UInt64(computed))))")
        }
        if let t = tail, t.headerCRC != computed {
            problem(.hotimage, host: info.tailOffset, "the tail blob's copy of the header checksum (\(hex(UInt64(t.headerCRC)))) does not match the header cluster")
        }
        if let t = tail {
            if t.l1Offset != (r.l1Size > 0 ? r.l1Offset : 0) || t.refTableOffset != r.refcountTableOffset || t.refTableClusters != r.refcountTableClusters {
                problem(.hotimage, host: info.tailOffset, "the tail blob records different L1/refcount table locations than the header")
            }
        }
    }

    // MARK: Refcounts on disk

    func readRefcount(_ block: UnsafeRawBufferPointer, _ e: Int, order: UInt32) -> UInt64 {
        let bits = 1 << Int(order)
        if bits >= 8 {
            let bytes = bits / 8
            var v: UInt64 = 0
            for k in 0..<bytes { v = v << 8 | UInt64(block[e * bytes + k]) }
            return v
        }
        let bit = e * bits
        return UInt64(block[bit / 8] >> UInt8(bit % 8)) & ((1 << UInt64(bits)) - 1)
    }

    mutating func loadDiskRefcounts() {
        guard r.refcountTableClusters > 0 else {
            problem(.refcount, host: 48, "the image has no refcount table (refcount_table_clusters is 0)")
            return
        }
        guard r.refcountsComparable else { return }      // see the reader's notes
        guard nbClusters <= Self.maxRefcountClusters else {
            report.notes.append("the file has \(nbClusters) clusters, too many to recompute refcounts in memory; refcounts not checked")
            return
        }
        refsEnabled = true
        report.checkedRefcounts = true
        diskRefs = [UInt16](repeating: 0, count: Int(nbClusters))
        refs = [UInt16](repeating: 0, count: Int(nbClusters))
        let rtOff = r.refcountTableOffset
        let rtBytes = Int(UInt64(r.refcountTableClusters) * cs)
        let rt: [UInt8]
        do {
            rt = try preadArray(r.fd, count: rtBytes, offset: rtOff, what: "refcount table")
        } catch {
            problem(.refcount, host: rtOff, "\(error)")
            refsEnabled = false
            return
        }
        if let t = tail, crc32Of(rt) != t.refTableCRC {
            problem(.refcount, host: rtOff, "refcount table at file offset \(hex(rtOff)) (\(rtBytes) bytes): checksum mismatch")
        }
        var list: [UInt8] = []
        if let t = tail, let info = r.hotimage {
            do {
                list = try preadArray(r.fd, count: Int(t.refBlockCount) * 16, offset: info.tailOffset + t.refBlockListOffset,
                                      what: "hotimage refcount block list")
            } catch {
                problem(.hotimage, host: info.tailOffset, "\(error)")
            }
        }
        let order = r.refcountOrder
        let epb = Int(cs * 8 / (UInt64(1) << UInt64(order)))
        var block = [UInt8](repeating: 0, count: Int(cs))
        var seenBlocks: [UInt64: Int] = [:]
        var used = 0
        for i in 0..<(rtBytes / 8) {
            let e = rt.be64(at: i * 8)
            let entryAt = rtOff + UInt64(i) * 8
            if i < list.count / 16 {
                let recorded = list.be64(at: i * 16)
                if recorded != e & ~Q.refTableReserved {
                    problem(.refcount, host: entryAt, "refcount table entry \(i) (file offset \(hex(entryAt))) points to \(hex(e)), but hotimage recorded \(hex(recorded))")
                }
            }
            if e == 0 { continue }
            used += 1
            if e & Q.refTableReserved != 0 {
                problem(.refcount, host: entryAt, "refcount table entry \(i) (file offset \(hex(entryAt))) has reserved bits set: \(hex(e))")
            }
            let off = e & ~Q.refTableReserved
            guard off % cs == 0 else {
                problem(.refcount, host: entryAt, "refcount block \(i) at \(hex(off)) is not cluster aligned; refcount table entry corrupted")
                continue
            }
            guard off / cs < nbClusters, off + cs <= r.fileLength else {
                problem(.refcount, host: entryAt, "refcount block \(i) at file offset \(hex(off)) lies outside the image (\(r.fileLength) bytes; truncated?)")
                continue
            }
            if off < cs {
                problem(.refcount, host: entryAt, "refcount block \(i) at file offset \(hex(off)) overlaps the header cluster")
            }
            if let other = seenBlocks[off] {
                problem(.refcount, host: entryAt, "refcount block \(i) at file offset \(hex(off)) is also refcount block \(other)")
                refBlocks.append((i, off))
                continue
            }
            seenBlocks[off] = i
            let got = block.withUnsafeMutableBytes { (try? preadFull(r.fd, $0.baseAddress!, Int(cs), off)) ?? -1 }
            guard got == Int(cs) else {
                problem(.refcount, host: off, "refcount block \(i) at file offset \(hex(off)) cannot be read")
                continue
            }
            if i < list.count / 16 {
                let recordedCRC = list.be32(at: i * 16 + 8)
                if crc32Of(block) != recordedCRC {
                    problem(.refcount, host: off, "refcount block \(i) at file offset \(hex(off)) (covering host clusters \(UInt64(i) * UInt64(epb))–\(UInt64(i + 1) * UInt64(epb) - 1)): checksum mismatch")
                }
            }
            refBlocks.append((i, off))
            block.withUnsafeBytes { b in
                let base = UInt64(i) * UInt64(epb)
                guard base < nbClusters else { return }
                let n = Int(min(UInt64(epb), nbClusters - base))
                for e2 in 0..<n {
                    diskRefs[Int(base) + e2] = UInt16(truncatingIfNeeded: min(readRefcount(b, e2, order: order), 0xFFFF))
                }
            }
        }
        if tail != nil && list.count / 16 > used {
            problem(.hotimage, "hotimage recorded \(list.count / 16) refcount blocks but the refcount table has \(used)")
        }
    }


    /// Adds one reference to every host cluster in [offset, offset+length).
    mutating func addRef(_ offset: UInt64, _ length: UInt64, _ what: @autoclosure () -> String) {
        guard refsEnabled, length > 0 else { return }
        let first = offset / cs
        let last = (checkedAdd(offset, length - 1) ?? UInt64.max) / cs
        var beyond = false
        var k = first
        while k <= last {
            if k >= nbClusters { beyond = true; break }
            if refs[Int(k)] == 0xFFFF {
                problem(.refcount, host: k * cs, "host cluster \(k) (file offset \(hex(k * cs))) has more than 65535 references")
            } else {
                refs[Int(k)] += 1
            }
            k += 1
        }
        if beyond {
            problem(.refcount, host: offset, "\(what()) at file offset \(hex(offset)) (\(length) bytes) lies beyond the end of the file (\(r.fileLength) bytes)")
        }
    }

    func copiedOK(_ entry: UInt64, host: UInt64) -> Bool? {
        guard refsEnabled, host / cs < nbClusters else { return nil }
        return (diskRefs[Int(host / cs)] == 1) == (entry & Q.oflagCopied != 0)
    }

    // MARK: hotimage groups

    mutating func loadGroups() {
        guard let t = tail, let info = r.hotimage else { return }
        var last = -1
        for g in 0..<t.groupCount {
            let at = info.tailOffset + t.groupsOffset + g * UInt64(t.groupSize)
            guard let h = try? preadArray(r.fd, count: 16, offset: at, what: "hotimage cluster group") else {
                problem(.hotimage, host: at, "hotimage cluster group \(g) at file offset \(hex(at)) cannot be read")
                continue
            }
            let l1i = Int(h.be32(at: 0))
            guard l1i < r.l1Size else {
                problem(.hotimage, host: at, "hotimage cluster group \(g) at file offset \(hex(at)) names L1 entry \(l1i), beyond the L1 table's \(r.l1Size) entries")
                continue
            }
            guard l1i > last else {
                problem(.hotimage, host: at, "hotimage cluster groups are not in ascending L1 order at group \(g) (file offset \(hex(at)))")
                continue
            }
            last = l1i
            groups[l1i] = GroupRef(number: g, l2CRC: h.be32(at: 4), l2Offset: h.be64(at: 8))
        }
    }

    func readGroup(_ g: GroupRef) -> [UInt8]? {
        guard let t = tail, let info = r.hotimage else { return nil }
        let at = info.tailOffset + t.groupsOffset + g.number * UInt64(t.groupSize)
        return try? preadArray(r.fd, count: Int(t.groupSize), offset: at, what: "hotimage cluster group")
    }

    // MARK: L1 / L2 scan (references, entry validity, COPIED flags)

    mutating func scanTables() {
        if let t = tail, r.l1Size > 0 {
            let bytes = Int(alignUp(UInt64(r.l1Size) * 8, cs))
            if let l1Bytes = try? preadArray(r.fd, count: bytes, offset: r.l1Offset, what: "L1 table") {
                if crc32Of(l1Bytes) != t.l1CRC {
                    problem(.l1, host: r.l1Offset, "L1 table at file offset \(hex(r.l1Offset)) (\(r.l1Size) entries): checksum mismatch")
                }
            } else {
                problem(.l1, host: r.l1Offset, "L1 table at file offset \(hex(r.l1Offset)) (\(bytes) bytes with padding) cannot be read completely (truncated?)")
            }
        }
        let l2e = UInt64(r.l2Entries)
        for i in 0..<r.l1Size {
            let e = r.l1[i]
            let (first, count) = r.l1Coverage(i)
            let entryAt = r.l1Offset + UInt64(i) * 8
            if e == 0 {
                if let g = groups[i] { reportMissingTable(i, g) }
                continue
            }
            let (checked, why) = r.checkL1Entry(i)
            if let why {
                if count > 0 {
                    guestProblem(.l1, cluster: first, count: count, host: entryAt, why)
                } else {
                    problem(.l1, host: entryAt, why)
                }
                continue
            }
            guard let off = checked else {
                if let g = groups[i] { reportMissingTable(i, g) }
                continue
            }
            if let other = seenTables[off] {
                // Counted again (qemu counts it twice), but its entries once.
                addRef(off, cs, "L2 table of L1 entry \(i)")
                guestProblem(.l1, cluster: first, count: max(count, 1), host: entryAt, "L1 entry \(i) (file offset \(hex(entryAt))) points to the L2 table at file offset \(hex(off)), which L1 entry \(other) uses too")
                continue
            }
            seenTables[off] = i
            addRef(off, cs, "L2 table of L1 entry \(i)")
            if copiedOK(e, host: off) == false {
                problem(.l1, host: entryAt, "L1 entry \(i) (file offset \(hex(entryAt))): the COPIED flag does not match the L2 table's refcount \(diskRefs[Int(off / cs)])")
            }
            let table: [UInt64]
            let raw: [UInt8]
            do {
                raw = try preadArray(r.fd, count: Int(cs), offset: off, what: "L2 table")
                table = decodeBE64Array(raw, count: r.l2Entries)
            } catch {
                guestProblem(.l2, cluster: first, count: max(count, 1), host: off, "\(error)")
                continue
            }
            tables.append((i, off))
            if tail != nil {
                if let g = groups[i] {
                    if g.l2Offset != off {
                        guestProblem(.l2, cluster: first, count: max(count, 1), host: off, "L2 table is at file offset \(hex(off)) but hotimage recorded it at \(hex(g.l2Offset))")
                    }
                    if crc32Of(raw) != g.l2CRC {
                        guestProblem(.l2, cluster: first, count: max(count, 1), host: off, "L2 table at file offset \(hex(off)): checksum mismatch")
                    }
                } else {
                    guestProblem(.l2, cluster: first, count: max(count, 1), host: off, "L2 table at file offset \(hex(off)) is not recorded by hotimage")
                }
            }
            for j in 0..<r.l2Entries {
                let entry = table[j]
                if entry == 0 { continue }
                let index = UInt64(i) * l2e + UInt64(j)
                let entryOff = off + UInt64(j) * 8
                let beyond = index >= r.guestClusters
                if beyond && !notedBeyond {
                    // qemu leaves these after shrinking a disk; they are not
                    // read, but their clusters are still referenced.
                    notedBeyond = true
                    report.notes.append("L2 entries map clusters beyond the end of the disk (first: L2 entry at file offset \(hex(entryOff))); they are not read")
                }
                switch r.decodeEntry(entry, index: index) {
                case .invalid(let why):
                    if beyond {
                        problem(.l2, host: entryOff, "L2 entry at file offset \(hex(entryOff)) for cluster \(index), beyond the end of the disk: \(why)")
                    } else {
                        guestProblem(.l2, cluster: index, host: entryOff, "L2 entry at file offset \(hex(entryOff)): \(why)")
                    }
                case .state(let s, let zeroHost):
                    if !beyond, s != .unallocated { totalEntries += 1 }
                    switch s {
                    case .unallocated:
                        break
                    case .zero:
                        if let h = zeroHost {
                            addRef(h, cs, "preallocated zero cluster \(index)")
                            if copiedOK(entry, host: h) == false {
                                guestProblem(.l2, cluster: index, host: entryOff, "L2 entry at file offset \(hex(entryOff)): the COPIED flag does not match the cluster's refcount")
                            }
                        }
                    case .raw(let h):
                        addRef(h, cs, "data of guest cluster \(index)")
                        if copiedOK(entry, host: h) == false {
                            guestProblem(.l2, cluster: index, host: entryOff, "L2 entry at file offset \(hex(entryOff)): the COPIED flag does not match the data cluster's refcount \(diskRefs[Int(h / cs)])")
                        }
                    case .compressed(let h, let size):
                        // qemu counts the sector-rounded range.
                        addRef(h & ~511, UInt64(size) + (h & 511), "compressed data of guest cluster \(index)")
                    }
                }
            }
        }
    }

    mutating func reportMissingTable(_ i: Int, _ g: GroupRef) {
        guard let bytes = readGroup(g) else { return }
        let (first, count) = r.l1Coverage(i)
        var written: UInt64 = 0
        for j in 0..<Int(count) where bytes[16 + j / 8] & (1 << UInt8(j % 8)) != 0 { written += 1 }
        if written > 0 {
            guestProblem(.missing, cluster: first, count: count, host: r.l1Offset + UInt64(i) * 8,
                         "\(written) cluster(s) recorded as written, but L1 entry \(i) has no L2 table (file offset \(hex(r.l1Offset + UInt64(i) * 8)))")
        }
    }

    /// Header, L1, refcount table, refcount blocks (counted last, as qemu does).
    mutating func countStructures() {
        guard refsEnabled else { return }
        addRef(0, cs, "header cluster")
        if r.l1Size > 0 { addRef(r.l1Offset, UInt64(r.l1Size) * 8, "L1 table") }
        addRef(r.refcountTableOffset, UInt64(r.refcountTableClusters) * cs, "refcount table")
        for (i, off) in refBlocks {
            addRef(off, cs, "refcount block \(i)")
            if refs[Int(off / cs)] != 1 {
                problem(.refcount, host: off, "refcount block \(i) at file offset \(hex(off)) is referenced \(refs[Int(off / cs)]) times (it must be used only as a refcount block)")
            }
        }
    }

    mutating func compareRefcounts() {
        guard refsEnabled else { return }
        // Consecutive clusters with the same kind of mismatch are reported
        // as one range (a lost L2 table leaks every cluster it mapped).
        var k = 0
        let n = Int(nbClusters)
        while k < n {
            if diskRefs[k] == refs[k] { k += 1; continue }
            let leak = diskRefs[k] > refs[k]
            var end = k + 1
            while end < n && diskRefs[end] != refs[end] && (diskRefs[end] > refs[end]) == leak { end += 1 }
            let at = UInt64(k) * cs
            let detail = "refcount \(diskRefs[k]) on disk but \(refs[k]) reference(s)"
            if end - k == 1 {
                problem(.refcount, host: at, "host cluster \(k) (file offset \(hex(at))): \(leak ? "leaked: " : "")\(detail)")
            } else {
                let last = UInt64(end) * cs - 1
                problem(.refcount, host: at, "host clusters \(k)–\(end - 1) (file offsets \(hex(at))–\(hex(last))): \(end - k) clusters \(leak ? "leaked (refcount higher than references)" : "with fewer refcounts than references"); first: \(detail)")
            }
            k = end
        }
        if let info = r.hotimage, tail != nil {
            // The tail blob must not share clusters with refcounted structures.
            let first = info.tailOffset / cs
            if first < nbClusters && refs[Int(first)] != 0 {
                problem(.hotimage, host: info.tailOffset, "the hotimage tail blob at file offset \(hex(info.tailOffset)) shares host cluster \(first) with refcounted data")
            }
        }
    }

    // MARK: Data

    mutating func checkData(progress: ((UInt64, UInt64) -> Void)?) {
        let total = totalEntries
        let work = tables
        guard !work.isEmpty else {
            progress?(0, total)
            return
        }
        let shared = DataShared()
        let workers = max(1, min(work.count, min(8, sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        let me = self
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            var local = LocalResult()
            let decoder = ClusterDecoder()
            let buf = UnsafeMutableRawPointer.allocate(byteCount: Int(me.cs), alignment: 64)
            defer { buf.deallocate() }
            while true {
                let k: Int = shared.lock.withLock {
                    let k = shared.next
                    shared.next += 1
                    return k
                }
                if k >= work.count { break }
                let before = local.checked
                me.checkTable(work[k].0, work[k].1, decoder: decoder, buf: buf, into: &local)
                if let progress {
                    shared.lock.withLock {
                        shared.done += local.checked - before
                        progress(shared.done, total)
                    }
                }
            }
            shared.lock.withLock { shared.results.append(local) }
        }
        var all: [VerifyProblem] = []
        for res in shared.results {
            report.clustersChecked += res.checked
            report.dataClusters += res.data
            report.compressedClusters += res.compressed
            report.zeroClusters += res.zero
            all.append(contentsOf: res.problems)
        }
        all.sort { ($0.guestOffset ?? 0, $0.hostOffset ?? 0) < ($1.guestOffset ?? 0, $1.hostOffset ?? 0) }
        for p in all { report.add(p) }
    }

    struct LocalResult {
        var problems: [VerifyProblem] = []
        var checked: UInt64 = 0
        var data: UInt64 = 0
        var compressed: UInt64 = 0
        var zero: UInt64 = 0
        mutating func add(_ p: VerifyProblem) {
            if problems.count < VerifyReport.storedProblemLimit { problems.append(p) }
        }
    }

    final class DataShared: @unchecked Sendable {
        let lock = Lock()
        var next = 0
        var done: UInt64 = 0
        var results: [LocalResult] = []
    }

    func checkTable(_ i: Int, _ off: UInt64, decoder: ClusterDecoder, buf: UnsafeMutableRawPointer, into local: inout LocalResult) {
        let l2e = r.l2Entries
        let (first, count) = r.l1Coverage(i)
        func gp(_ kind: VerifyProblem.Kind, _ index: UInt64, _ host: UInt64?, _ msg: String) {
            let (start, len) = r.guestRange(index)
            local.add(VerifyProblem(kind: kind, guestOffset: start, guestLength: len, cluster: index, clusterCount: 1, hostOffset: host, message: msg))
        }
        guard let raw = try? preadArray(r.fd, count: Int(cs), offset: off, what: "L2 table") else {
            let (start, len) = r.guestRange(first, count: count)
            local.add(VerifyProblem(kind: .l2, guestOffset: start, guestLength: len, cluster: first, clusterCount: count, hostOffset: off, message: "L2 table at file offset \(hex(off)) cannot be read"))
            return
        }
        let table = decodeBE64Array(raw, count: l2e)
        var group: [UInt8]? = nil
        if tail != nil, let g = groups[i] {
            group = readGroup(g)
            if group == nil {
                gp(.hotimage, first, nil, "hotimage cluster group \(g.number) cannot be read")
            }
        }
        let useCRC = r.hotimage?.checksumsValid == true
        let bitmapBytes = l2e / 8
        let zeroCRC = crc32OfZeros(Int(cs))
        for j in 0..<Int(count) {
            let index = first + UInt64(j)
            var written = false
            var expected: UInt32 = 0
            if let g = group {
                written = g[16 + j / 8] & (1 << UInt8(j % 8)) != 0
                expected = g.be32(at: 16 + bitmapBytes + 4 * j)
            }
            let hasRecord = tail != nil
            guard case .state(let state, _) = r.decodeEntry(table[j], index: index) else {
                continue            // reported by the L2 scan
            }
            switch state {
            case .unallocated:
                if hasRecord && written {
                    gp(.missing, index, off + UInt64(j) * 8, "recorded as written, but unallocated in the L2 table")
                }
            case .zero:
                local.checked += 1
                local.zero += 1
                if hasRecord {
                    if !written {
                        gp(.unexpected, index, off + UInt64(j) * 8, "a zero cluster in L2, but not recorded as written")
                    } else if useCRC && expected != zeroCRC {
                        gp(.data, index, off + UInt64(j) * 8, "checksum mismatch: L2 marks the cluster as zeros, but the recorded checksum is of other data")
                    }
                }
                if useCRC, let d = digestTable?[cluster: index] {
                    gp(.digest, index, off + UInt64(j) * 8, "a zero cluster, but the digest table records digest \(d) (zero clusters have none)")
                }
            case .raw(let h), .compressed(let h, _):
                local.checked += 1
                local.data += 1
                if case .compressed = state { local.compressed += 1 }
                let why: String?
                do {
                    why = try r.readState(state, index: index, into: buf, decoder: decoder, strict: true)
                } catch {
                    why = (error as? QCow2Error)?.message ?? "\(error)"
                }
                if let why {
                    gp(.data, index, h, why)
                    continue
                }
                var crcFailed = false
                if hasRecord {
                    if !written {
                        gp(.unexpected, index, h, "allocated in L2, but not recorded as written")
                    } else if useCRC {
                        var crc = crc32Update(0, buf, Int(cs))
                        if case .compressed = state {
                            let stream = decoder.lastStream
                            crc = crc32Update(crc, stream.baseAddress, stream.count)
                        }
                        if crc != expected {
                            crcFailed = true
                            let kind: String
                            if case .compressed = state { kind = "compressed" } else { kind = "raw" }
                            gp(.data, index, h, "checksum mismatch (\(kind) data at file offset \(hex(h)))")
                        }
                    }
                }
                // Damaged data is reported once, by its CRC; the digest
                // check finds a table that disagrees with intact data.
                if useCRC, !crcFailed, let table = digestTable {
                    let computed = ClusterDigest.of(UnsafeRawBufferPointer(start: buf, count: Int(cs)), clusterSize: Int(cs))
                    if let d = table[cluster: index] {
                        if d != computed {
                            gp(.digest, index, h, "digest mismatch: the digest table records \(d), the data's digest is \(computed)")
                        }
                    } else if computed != ClusterDigest.zeros(clusterSize: Int(cs)) {
                        gp(.digest, index, h, "written with data, but the digest table has no digest for it (it would read as zeros)")
                    }
                }
            }
        }
        if let g = group {
            for j in Int(count)..<l2e where g[16 + j / 8] & (1 << UInt8(j % 8)) != 0 {
                local.add(VerifyProblem(kind: .hotimage, hostOffset: off, message: "hotimage records cluster \(first + UInt64(j)) as written, beyond the end of the disk"))
            }
        }
    }

    // MARK: Tail

    mutating func checkTail() {
        guard let info = r.hotimage, r.hotiExtOffset != nil else { return }
        guard let end = checkedAdd(info.tailOffset, info.tailLength), end <= r.fileLength, info.tailOffset >= cs else {
            return          // already reported when opening
        }
        var crc: UInt32 = 0
        let chunk = 8 << 20
        let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 64)
        defer { buf.deallocate() }
        var done: UInt64 = 0
        while done < info.tailLength {
            let n = Int(min(UInt64(chunk), info.tailLength - done))
            guard let got = try? preadFull(r.fd, buf, n, info.tailOffset + done), got == n else {
                problem(.tail, host: info.tailOffset + done, "hotimage tail blob cannot be read at file offset \(hex(info.tailOffset + done))")
                return
            }
            crc = crc32Update(crc, buf, n)
            done += UInt64(n)
        }
        if crc != r.tailCRC {
            problem(.tail, host: info.tailOffset, "hotimage tail blob at file offset \(hex(info.tailOffset)) (\(info.tailLength) bytes): checksum mismatch")
        }
        if end < r.fileLength {
            report.notes.append("\(r.fileLength - end) bytes follow the hotimage tail blob")
        }
    }
}
