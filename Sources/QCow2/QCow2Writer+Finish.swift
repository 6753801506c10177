// QCow2Writer+Finish.swift — what finish() writes after the data area, in
// file order (the FILE LAYOUT in QCow2Writer.swift):
//
//   flush the staged buffers        the data area is complete
//   lay out the metadata            L2 tables, L1, refcount table and blocks
//   L2 tables                       in L1 order, one cluster each
//   L1 table                        padded to whole clusters
//   refcount blocks, table          covering every cluster above
//   tail blob                       header, metadata, block list, groups,
//                                   digest table
//   header cluster                  last, after an fsync; then fsync, close
//
// Called under the writer's lock with no job in flight.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where finish() puts the refcounted metadata, after the data area.
struct FinishLayout {
    /// End of the data area (cluster-aligned) and its clusters.
    let dataEnd: UInt64
    let dataClusters: UInt64
    /// L1 indices that have an L2 table, ascending.
    let tables: [Int]
    let nL2: UInt64
    let l1Clusters: UInt64
    /// Refcount entries per block (16-bit refcounts).
    let epb: UInt64
    /// Refcount table clusters and refcount blocks.
    let rtc: UInt64
    let nrb: UInt64
    let l2Start: UInt64
    let l1Off: UInt64
    let rtOff: UInt64
    let rbOff: UInt64
    /// End of the refcounted structures: where the tail blob starts.
    let metaEnd: UInt64
    let metaClusters: UInt64
}

/// The tail blob's sections (offsets relative to its start, except tailOff).
struct TailGeometry {
    let groupSize: Int
    let metaOffRel: UInt64
    let metaLen: UInt64
    let rbListRel: UInt64
    let groupsRel: UInt64
    /// The digest section (8-byte aligned; its length is a multiple of 8).
    let digestsRel: UInt64
    let digestsLen: UInt64
    let tailLen: UInt64
    let tailOff: UInt64

    init(_ g: FinishLayout, l2Entries: Int, metadataBytes: Int, digestBytes: Int) {
        groupSize = 16 + l2Entries / 8 + 4 * l2Entries
        metaOffRel = UInt64(Q.tailHeaderLength)
        metaLen = UInt64(metadataBytes)
        rbListRel = metaOffRel + alignUp(metaLen, 8)
        groupsRel = rbListRel + g.nrb * 16
        digestsRel = alignUp(groupsRel + g.nL2 * UInt64(groupSize), 8)
        digestsLen = UInt64(digestBytes)
        tailLen = digestsRel + digestsLen
        tailOff = g.metaEnd
    }
}

/// The CRCs of the refcounted structures, which the tail header records.
struct StructureCRCs {
    var l2: [UInt32] = []
    var l1: UInt32 = 0
    var refBlocks: [UInt32] = []
    var refTable: UInt32 = 0
}

extension QCow2Writer {
    func finishLocked(metadata: [UInt8], complete: Bool) throws -> QCow2WriteSummary {
        try flushStaged()
        let g = try finishLayout()
        var crcs = StructureCRCs()
        let (l1, l2CRCs) = try writeL2Tables(g)
        crcs.l2 = l2CRCs
        crcs.l1 = try writeL1Table(l1, g)
        crcs.refBlocks = try writeRefcountBlocks(g)
        crcs.refTable = try writeRefcountTable(g)
        let table = digests.snapshot()
        let digestSection = table.encoded()
        let t = TailGeometry(g, l2Entries: l2Entries, metadataBytes: metadata.count, digestBytes: digestSection.count)
        let hdr = headerCluster(g, t, complete: complete)
        let headerCRC = crc32Of(hdr)
        var th = tailHeader(g, t, crcs: crcs, headerCRC: headerCRC, metadataCRC: crc32Of(metadata))
        th.putBE64(t.digestsRel, at: 128)
        th.putBE64(t.digestsLen, at: 136)
        th.putBE64(UInt64(table.count), at: 144)
        th.putBE32(crc32Of(digestSection), at: 152)
        th.putBE32(UInt32(table.order.count), at: 156)
        var tailCRC = try writeTail(th, metadata: metadata, g, t, crcs: crcs)
        // Padding up to the digest section, then the section.
        let gap = Int(t.digestsRel - (t.groupsRel + g.nL2 * UInt64(t.groupSize)))
        let rest = [UInt8](repeating: 0, count: gap) + digestSection
        if !rest.isEmpty {
            try rest.withUnsafeBytes { try pwriteFull(fd, $0.baseAddress!, $0.count, t.tailOff + t.digestsRel - UInt64(gap)) }
            bytesWritten += UInt64(rest.count)
            tailCRC = rest.withUnsafeBytes { crc32Update(tailCRC, $0.baseAddress, $0.count) }
        }
        try writeHeaderAndClose(hdr, tailCRC: tailCRC, headerCRC: headerCRC)
        regions = []
        dataRefcounts = []
        return QCow2WriteSummary(
            path: path, virtualSize: virtualSize, clusterSize: clusterSize, compression: compression,
            complete: complete, clustersWritten: nZero + nRaw + nCompressed, zeroClusters: nZero,
            rawClusters: nRaw, compressedClusters: nCompressed, compressedBytes: compressedBytes,
            dataAreaBytes: g.dataEnd, l2Tables: g.nL2, refcountBlocks: g.nrb, tailOffset: t.tailOff,
            tailLength: t.tailLen, digestCount: table.count, fileSize: t.tailOff + t.tailLen, hostBytesWritten: bytesWritten)
    }

    /// Writes the staged standard clusters and compressed run.
    private func flushStaged() throws {
        var jobs = try detachRaw()
        if let job = detachRun() { jobs.append(job) }
        try runLocked(jobs)
    }

    /// Sizes the refcount structures (they count themselves, so iterate to
    /// a fixed point) and places everything after the data area.
    private func finishLayout() throws -> FinishLayout {
        let dataEnd = alignUp(fileEnd, cs)
        let dataClusters = dataEnd / cs
        let tables = regions.indices.filter { regions[$0] != nil }
        let nL2 = UInt64(tables.count)
        let l1Bytes = UInt64(l1Size) * 8
        let l1Clusters = divRoundUp(l1Bytes, cs)
        let epb = cs / 2                                   // 16-bit refcounts
        var rtc: UInt64 = 1, nrb: UInt64 = 1
        while true {
            let total = dataClusters + nL2 + l1Clusters + rtc + nrb
            let nrb2 = divRoundUp(total, epb)
            let rtc2 = divRoundUp(nrb2 * 8, cs)
            if nrb2 == nrb && rtc2 == rtc { break }
            nrb = nrb2
            rtc = rtc2
        }
        guard rtc * cs <= Q.maxRefTableBytes else {
            throw err("the refcount table would need \(rtc * cs) bytes; qemu allows at most \(Q.maxRefTableBytes) (use a larger cluster size)")
        }
        let l2Start = dataEnd
        let l1Off = l2Start + nL2 * cs
        let rtOff = l1Off + l1Clusters * cs
        let rbOff = rtOff + rtc * cs
        let metaEnd = rbOff + nrb * cs
        guard metaEnd <= Q.offsetMask else {
            throw err("the image grew beyond the 64 PiB qcow2 metadata can address")
        }
        return FinishLayout(dataEnd: dataEnd, dataClusters: dataClusters, tables: tables, nL2: nL2, l1Clusters: l1Clusters,
                            epb: epb, rtc: rtc, nrb: nrb, l2Start: l2Start, l1Off: l1Off, rtOff: rtOff, rbOff: rbOff,
                            metaEnd: metaEnd, metaClusters: metaEnd / cs)
    }

    /// L2 tables, in L1 order; the L1 entries pointing at them and each
    /// table's CRC.
    private func writeL2Tables(_ g: FinishLayout) throws -> ([UInt64], [UInt32]) {
        var l1 = [UInt64](repeating: 0, count: l1Size)
        var l2CRCs = [UInt32](repeating: 0, count: g.tables.count)
        let tablesPerChunk = max(1, (8 << 20) / clusterSize)
        try writeChunked(g.nL2 * cs, at: g.l2Start, chunk: tablesPerChunk * clusterSize) { buf, done in
            let first = Int(done / cs)
            for t in 0..<(buf.count / clusterSize) {
                let k = first + t
                let region = regions[g.tables[k]]!
                let base = t * clusterSize
                for j in 0..<l2Entries {
                    let e = region.entries[j]
                    precondition(e != Self.pendingRaw, "standard cluster left pending at finish")
                    buf.putBE64(e, at: base + j * 8)
                }
                l2CRCs[k] = crc32Update(0, buf.baseAddress! + base, clusterSize)
                l1[g.tables[k]] = (g.l2Start + UInt64(k) * cs) | Q.oflagCopied
            }
        }
        return (l1, l2CRCs)
    }

    /// L1 table, padded to whole clusters; its CRC.
    private func writeL1Table(_ l1: [UInt64], _ g: FinishLayout) throws -> UInt32 {
        var l1Buf = [UInt8](repeating: 0, count: Int(g.l1Clusters * cs))
        for i in 0..<l1Size { l1Buf.putBE64(l1[i], at: i * 8) }
        let l1CRC = crc32Of(l1Buf)
        if g.l1Clusters > 0 {
            try l1Buf.withUnsafeBytes { try pwriteFull(fd, $0.baseAddress!, $0.count, g.l1Off) }
            bytesWritten += UInt64(l1Buf.count)
        }
        return l1CRC
    }

    /// Refcount blocks: the data area's counted refcounts, 1 for each
    /// metadata cluster; each block's CRC.
    private func writeRefcountBlocks(_ g: FinishLayout) throws -> [UInt32] {
        var rbCRCs = [UInt32](repeating: 0, count: Int(g.nrb))
        let blocksPerChunk = max(1, (8 << 20) / clusterSize)
        let dataRefs = dataRefcounts
        try writeChunked(g.nrb * cs, at: g.rbOff, chunk: blocksPerChunk * clusterSize) { buf, done in
            let firstBlock = done / cs
            for t in 0..<(buf.count / clusterSize) {
                let b = firstBlock + UInt64(t)
                let base = t * clusterSize
                buf.baseAddress!.advanced(by: base).initializeMemory(as: UInt8.self, repeating: 0, count: clusterSize)
                let p = buf.baseAddress!.advanced(by: base).assumingMemoryBound(to: UInt16.self)
                for e in 0..<Int(g.epb) {
                    let k = b * g.epb + UInt64(e)
                    let v: UInt16
                    if k < g.dataClusters {
                        v = k < UInt64(dataRefs.count) ? dataRefs[Int(k)] : 0
                    } else {
                        v = k < g.metaClusters ? 1 : 0
                    }
                    p[e] = v.bigEndian
                }
                rbCRCs[Int(b)] = crc32Update(0, buf.baseAddress! + base, clusterSize)
            }
        }
        return rbCRCs
    }

    /// Refcount table; its CRC.
    private func writeRefcountTable(_ g: FinishLayout) throws -> UInt32 {
        var rt = [UInt8](repeating: 0, count: Int(g.rtc * cs))
        for b in 0..<Int(g.nrb) { rt.putBE64(g.rbOff + UInt64(b) * cs, at: b * 8) }
        let rtCRC = crc32Of(rt)
        try rt.withUnsafeBytes { try pwriteFull(fd, $0.baseAddress!, $0.count, g.rtOff) }
        bytesWritten += UInt64(rt.count)
        return rtCRC
    }

    /// Header cluster: the qcow2 header and the HOTI extension, its two CRC
    /// fields zero for now.
    private func headerCluster(_ g: FinishLayout, _ t: TailGeometry, complete: Bool) -> [UInt8] {
        var hdr = [UInt8](repeating: 0, count: clusterSize)
        hdr.putBE32(Q.magic, at: 0)
        hdr.putBE32(3, at: 4)
        hdr.putBE32(UInt32(clusterBits), at: 20)
        hdr.putBE64(virtualSize, at: 24)
        hdr.putBE32(UInt32(l1Size), at: 36)
        hdr.putBE64(l1Size > 0 ? g.l1Off : 0, at: 40)
        hdr.putBE64(g.rtOff, at: 48)
        hdr.putBE32(UInt32(g.rtc), at: 56)
        hdr.putBE64(compression.headerType == .zstd ? Q.incompatCompression : 0, at: 72)
        hdr.putBE64(Q.autoclearHotimage, at: 88)
        hdr.putBE32(4, at: 96)                               // refcount_order
        hdr.putBE32(UInt32(Q.headerLength), at: 100)
        hdr[104] = compression.headerType.rawValue
        let ext = Q.headerLength + 8
        hdr.putBE32(Q.extHotimage, at: Q.headerLength)
        hdr.putBE32(UInt32(Q.hotiExtLength), at: Q.headerLength + 4)
        hdr.putBE32(Q.hotiFormatVersion, at: ext)
        hdr.putBE32(complete ? Q.hotiFlagComplete : 0, at: ext + 4)
        hdr.putBE64(t.tailOff, at: ext + 8)
        hdr.putBE64(t.tailLen, at: ext + 16)
        if let b = backing {
            // Backing file format extension, end marker, then the name
            // (checked to fit in init).
            let (x, _, nameAt) = Self.backingLayout(b)
            let fmt = Array(b.format.utf8), name = Array(b.fileName.utf8)
            hdr.putBE32(Q.extBackingFormat, at: x)
            hdr.putBE32(UInt32(fmt.count), at: x + 4)
            hdr.replaceSubrange((x + 8)..<(x + 8 + fmt.count), with: fmt)
            hdr.replaceSubrange(nameAt..<(nameAt + name.count), with: name)
            hdr.putBE64(UInt64(nameAt), at: 8)
            hdr.putBE32(UInt32(name.count), at: 16)
        }
        // End-of-extensions marker: 8 zero bytes after the last extension
        // (already zero).
        return hdr
    }

    /// Tail header (160 bytes; the digest fields at 128... are filled in
    /// by finishLocked).
    private func tailHeader(_ g: FinishLayout, _ t: TailGeometry, crcs: StructureCRCs,
                            headerCRC: UInt32, metadataCRC: UInt32) -> [UInt8] {
        var th = [UInt8](repeating: 0, count: Q.tailHeaderLength)
        for (i, b) in Q.tailMagic.enumerated() { th[i] = b }
        th.putBE32(Q.tailVersion, at: 8)
        th.putBE32(UInt32(clusterBits), at: 12)
        th.putBE64(virtualSize, at: 16)
        th.putBE32(headerCRC, at: 24)
        th.putBE32(crcs.l1, at: 28)
        th.putBE64(l1Size > 0 ? g.l1Off : 0, at: 32)
        th.putBE32(UInt32(l1Size), at: 40)
        th.putBE32(crcs.refTable, at: 44)
        th.putBE64(g.rtOff, at: 48)
        th.putBE32(UInt32(g.rtc), at: 56)
        th.putBE32(UInt32(g.nrb), at: 60)
        th.putBE64(t.metaOffRel, at: 64)
        th.putBE64(t.metaLen, at: 72)
        th.putBE32(metadataCRC, at: 80)
        th.putBE32(UInt32(t.groupSize), at: 84)
        th.putBE64(t.rbListRel, at: 88)
        th.putBE64(t.groupsRel, at: 96)
        th.putBE64(g.nL2, at: 104)
        th.putBE64(nZero + nRaw + nCompressed, at: 112)
        th.putBE64(nZero, at: 120)
        return th
    }

    /// Streams the tail: header + metadata + refcount block list + groups;
    /// the CRC of the whole blob.
    private func writeTail(_ th: [UInt8], metadata: [UInt8], _ g: FinishLayout, _ t: TailGeometry,
                           crcs: StructureCRCs) throws -> UInt32 {
        var tailCRC: UInt32 = 0
        let fixedPart: [UInt8] = {
            var b = th
            b.append(contentsOf: metadata)
            b.append(contentsOf: repeatElement(0, count: Int(t.rbListRel - t.metaOffRel - t.metaLen)))
            var list = [UInt8](repeating: 0, count: Int(g.nrb) * 16)
            for i in 0..<Int(g.nrb) {
                list.putBE64(g.rbOff + UInt64(i) * cs, at: i * 16)
                list.putBE32(crcs.refBlocks[i], at: i * 16 + 8)
            }
            b.append(contentsOf: list)
            return b
        }()
        tailCRC = crc32Of(fixedPart)
        try fixedPart.withUnsafeBytes { try pwriteFull(fd, $0.baseAddress!, $0.count, t.tailOff) }
        bytesWritten += UInt64(fixedPart.count)
        let groupSize = t.groupSize
        let groupsPerChunk = max(1, (8 << 20) / groupSize)
        let bitmapBytes = l2Entries / 8
        try writeChunked(g.nL2 * UInt64(groupSize), at: t.tailOff + t.groupsRel, chunk: groupsPerChunk * groupSize) { buf, done in
            let first = Int(done / UInt64(groupSize))
            buf.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: buf.count)
            for k0 in 0..<(buf.count / groupSize) {
                let k = first + k0
                let region = regions[g.tables[k]]!
                let o = k0 * groupSize
                buf.storeBytes(of: UInt32(g.tables[k]).bigEndian, toByteOffset: o, as: UInt32.self)
                buf.storeBytes(of: crcs.l2[k].bigEndian, toByteOffset: o + 4, as: UInt32.self)
                buf.putBE64(g.l2Start + UInt64(k) * cs, at: o + 8)
                for j in 0..<l2Entries where region.entries[j] != 0 {
                    buf[o + 16 + j / 8] |= UInt8(1) << UInt8(j % 8)
                    buf.storeBytes(of: region.crcs[j].bigEndian, toByteOffset: o + 16 + bitmapBytes + 4 * j, as: UInt32.self)
                }
            }
            tailCRC = crc32Update(tailCRC, buf.baseAddress, buf.count)
        }
        return tailCRC
    }

    /// Makes everything durable, then writes the header cluster with its
    /// CRC fields filled in (the image becomes valid only now), fsyncs and
    /// closes the file and syncs its directory.
    private func writeHeaderAndClose(_ header: [UInt8], tailCRC: UInt32, headerCRC: UInt32) throws {
        guard fsync(fd) == 0 else { throw err("fsync failed: \(errnoText(errno))") }
        var hdr = header
        let ext = Q.headerLength + 8
        hdr.putBE32(tailCRC, at: ext + 24)
        hdr.putBE32(headerCRC, at: ext + 28)
        try hdr.withUnsafeBytes { try pwriteFull(fd, $0.baseAddress!, $0.count, 0) }
        bytesWritten += UInt64(hdr.count)
        guard fsync(fd) == 0 else { throw err("fsync failed: \(errnoText(errno))") }
        let closed = close(fd)
        fd = -1
        guard closed == 0 else { throw err("close failed: \(errnoText(errno))") }
        syncParentDirectory()
    }

    private func writeChunked(_ totalBytes: UInt64, at offset: UInt64, chunk: Int,
                              fill: (UnsafeMutableRawBufferPointer, UInt64) -> Void) throws {
        guard totalBytes > 0 else { return }
        let cap = Int(min(UInt64(chunk), totalBytes))
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: cap, alignment: 4096)
        defer { buf.deallocate() }
        var done: UInt64 = 0
        while done < totalBytes {
            let n = Int(min(UInt64(cap), totalBytes - done))
            let slice = UnsafeMutableRawBufferPointer(rebasing: buf[0..<n])
            fill(slice, done)
            try pwriteFull(fd, slice.baseAddress!, n, offset + done)
            bytesWritten += UInt64(n)
            done += UInt64(n)
        }
    }

    private func syncParentDirectory() {
        var dir = path
        if let slash = dir.lastIndex(of: "/") {
            dir = slash == dir.startIndex ? "/" : String(dir[..<slash])
        } else {
            dir = "."
        }
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            _ = fsync(dfd)
            close(dfd)
        }
    }
}
