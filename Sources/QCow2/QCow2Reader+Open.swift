// QCow2Reader+Open.swift — the steps of opening an image, in file order:
//
//   fixed header        magic, version, cluster_bits, cluster 0, the backing
//                       file name (bounded); refuses encryption
//   version 3 fields    feature bits, header_length, compression type,
//                       refcount_order
//   L1 table            size against the virtual size and qemu's limit, read
//   refcount table      bounds only (verify reads it)
//   snapshots           bounds; a note (only the active state is read)
//   header extensions   HOTI, backing format (bounded), bitmaps (a note),
//                       crypto (refused)
//   hotimage part       the HOTI extension and the tail blob it points at;
//                       damage is recorded as a problem, never thrown
//
// Each step is a static function over the bytes read so far: the reader's
// stored properties are set from their results in init.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The qcow2 header fields, validated.
struct ParsedHeader {
    var version: UInt32
    var clusterBits: Int
    var cs: UInt64
    /// Cluster 0, zero-padded when the file is shorter than a cluster.
    var cluster0: [UInt8]
    var size: UInt64
    var l1Size: UInt32
    var l1Offset: UInt64
    var rtOffset: UInt64
    var rtClusters: UInt32
    var nbSnapshots: UInt32
    var snapshotsOffset: UInt64
    var incompat: UInt64 = 0
    var autoclear: UInt64 = 0
    var refcountOrder: UInt32 = 4
    var headerLength = Q.v2HeaderLength
    var compression = QCow2CompressionType.zlib
    var backingFileName: String? = nil
}

/// What the header extensions hold.
struct HeaderExtensions {
    /// File offset of the HOTI extension's data, and its length.
    var hotiExt: Int? = nil
    var hotiLen = 0
    var hasBitmaps = false
    var backingFormat: String? = nil
    var notes: [String] = []
    var problems: [String] = []
}

/// hotimage's extension and tail blob, as far as they could be read.
struct HotimagePart {
    var info: HotimageInfo? = nil
    var tail: TailLayout? = nil
    var tailCRC: UInt32 = 0
    /// The HOTI extension's data offset; nil when missing or too short.
    var hotiExt: Int?
    var problems: [String]
}

extension QCow2Reader {
    static func fileLengthOf(_ fd: Int32) throws -> UInt64 {
        let end = lseek(fd, 0, SEEK_END)
        if end < 0 { throw QCow2Error("cannot determine the file length: \(errnoText(errno))") }
        return UInt64(end)
    }

    /// Magic, version, cluster size, cluster 0 and the fields every version
    /// has, and the backing file name; refuses encryption.
    static func readFixedHeader(fd: Int32, fileLength: UInt64) throws -> ParsedHeader {
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
        let clusterBits = first.be32(at: 20)
        guard clusterBits >= UInt32(Q.minClusterBits) && clusterBits <= UInt32(Q.maxClusterBits) else {
            throw QCow2Error("cluster_bits \(clusterBits) (header offset 20) is out of range 9...21")
        }
        let cb = Int(clusterBits)
        let cs = UInt64(1) << UInt64(cb)

        var hc = [UInt8](repeating: 0, count: Int(cs))
        _ = try hc.withUnsafeMutableBytes { try preadFull(fd, $0.baseAddress!, Int(cs), 0) }

        let backingName = try readBackingName(hc, cs: cs, fileLength: fileLength)
        let size = hc.be64(at: 24)
        guard size <= UInt64(Int64.max) else {
            throw QCow2Error("virtual size \(size) (header offset 24) is larger than 2^63 - 1")
        }
        let cryptMethod = hc.be32(at: 32)
        if cryptMethod != 0 {
            throw QCow2Error("the image is encrypted (crypt_method \(cryptMethod), header offset 32); encrypted images are not supported")
        }
        return ParsedHeader(version: version, clusterBits: cb, cs: cs, cluster0: hc, size: size,
                            l1Size: hc.be32(at: 36), l1Offset: hc.be64(at: 40), rtOffset: hc.be64(at: 48),
                            rtClusters: hc.be32(at: 56), nbSnapshots: hc.be32(at: 60), snapshotsOffset: hc.be64(at: 64),
                            backingFileName: backingName)
    }

    /// The backing file name (backing_file_offset / backing_file_size,
    /// header offsets 8 and 16): inside cluster 0, after the fixed header,
    /// 1...1023 bytes (qemu's limit), UTF-8 without NUL. nil: none.
    static func readBackingName(_ hc: [UInt8], cs: UInt64, fileLength: UInt64) throws -> String? {
        let off = hc.be64(at: 8)
        let size = UInt64(hc.be32(at: 16))
        if off == 0 { return nil }
        let at = "backing file name (backing_file_offset \(hex(off)), backing_file_size \(size); header offsets 8 and 16)"
        guard size >= 1, size <= UInt64(QCow2Backing.maxNameBytes) else {
            throw QCow2Error("\(at): the size must be 1...\(QCow2Backing.maxNameBytes) bytes")
        }
        guard off >= UInt64(Q.v2HeaderLength), let end = checkedAdd(off, size), end <= cs else {
            throw QCow2Error("\(at): the name must lie inside the \(cs)-byte header cluster, after the header")
        }
        guard end <= fileLength else {
            throw QCow2Error("\(at): the name is cut short by the end of the file")
        }
        let bytes = Array(hc[Int(off)..<Int(end)])
        guard !bytes.contains(0) else { throw QCow2Error("\(at): the name contains a NUL byte") }
        guard let name = String(validatingUTF8: bytes.map { CChar(bitPattern: $0) } + [0]) else {
            throw QCow2Error("\(at): the name is not valid UTF-8")
        }
        return name
    }

    /// Version 3: feature bits, header_length, compression type and
    /// refcount_order (version 2 keeps the defaults).
    static func readVersion3Fields(_ h: inout ParsedHeader, fileLength: UInt64) throws {
        guard h.version == 3 else { return }
        let hc = h.cluster0
        let cs = h.cs
        let incompat = hc.be64(at: 72)
        h.incompat = incompat
        h.autoclear = hc.be64(at: 88)
        h.refcountOrder = hc.be32(at: 96)
        let hl = hc.be32(at: 100)
        guard hl >= 104, hl % 8 == 0, UInt64(hl) <= cs, UInt64(hl) <= fileLength else {
            throw QCow2Error("header_length \(hl) (header offset 100) is invalid: it must be at least 104, a multiple of 8, within the \(cs)-byte header cluster and within the \(fileLength)-byte file")
        }
        let headerLength = Int(hl)
        h.headerLength = headerLength
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
            h.compression = t
        } else if ctype != 0 {
            throw QCow2Error("compression_type \(ctype) (header offset 104) is non-zero but incompatible feature bit 3 is not set")
        }
        guard h.refcountOrder <= 6 else {
            throw QCow2Error("refcount_order \(h.refcountOrder) (header offset 96) exceeds 6")
        }
    }

    /// The L1 table, large enough for the virtual size and within qemu's limit.
    static func readL1Table(fd: Int32, _ h: ParsedHeader, fileLength: UInt64) throws -> [UInt64] {
        let cs = h.cs, l1Size = h.l1Size
        let gc = divRoundUp(h.size, cs)
        let l1Needed = divRoundUp(gc, cs / 8)
        guard UInt64(l1Size) * 8 <= Q.maxL1Bytes else {
            throw QCow2Error("l1_size \(l1Size) (header offset 36) makes an L1 table of \(UInt64(l1Size) * 8) bytes, more than qemu's \(Q.maxL1Bytes)-byte limit")
        }
        guard UInt64(l1Size) >= l1Needed else {
            throw QCow2Error("L1 table too small: l1_size \(l1Size) (header offset 36) but a virtual size of \(h.size) bytes with \(cs)-byte clusters needs \(l1Needed) entries")
        }
        guard l1Size > 0 else { return [] }
        try checkTable("L1 table", offset: h.l1Offset, bytes: UInt64(l1Size) * 8, cs: cs, fileLength: fileLength)
        let raw = try preadArray(fd, count: Int(l1Size) * 8, offset: h.l1Offset, what: "L1 table")
        return decodeBE64Array(raw, count: Int(l1Size))
    }

    /// The refcount table's bounds (needed only by verify, but validated here).
    static func checkRefcountTable(_ h: ParsedHeader, fileLength: UInt64) throws {
        guard UInt64(h.rtClusters) * h.cs <= Q.maxRefTableBytes else {
            throw QCow2Error("refcount_table_clusters \(h.rtClusters) (header offset 56) makes a refcount table of \(UInt64(h.rtClusters) * h.cs) bytes, more than qemu's \(Q.maxRefTableBytes)-byte limit")
        }
        if h.rtClusters > 0 {
            try checkTable("refcount table", offset: h.rtOffset, bytes: UInt64(h.rtClusters) * h.cs, cs: h.cs, fileLength: fileLength)
        }
    }

    /// Snapshots: the active image is readable; verify reports them. The
    /// notes to show.
    static func checkSnapshots(_ h: ParsedHeader, fileLength: UInt64) throws -> [String] {
        guard h.nbSnapshots <= Q.maxSnapshots else {
            throw QCow2Error("nb_snapshots \(h.nbSnapshots) (header offset 60) exceeds qemu's limit of \(Q.maxSnapshots)")
        }
        guard h.nbSnapshots > 0 else { return [] }
        guard h.snapshotsOffset % h.cs == 0, h.snapshotsOffset >= h.cs, h.snapshotsOffset < fileLength else {
            throw QCow2Error("snapshot table offset \(hex(h.snapshotsOffset)) (header offset 64) is not a cluster-aligned offset inside the file")
        }
        return ["the image has \(h.nbSnapshots) internal snapshot(s); only the active state is read, and refcounts are not verified"]
    }

    /// Walks the header extensions in cluster 0.
    static func scanExtensions(_ h: ParsedHeader, fileLength: UInt64) throws -> HeaderExtensions {
        let hc = h.cluster0
        var x = HeaderExtensions()
        var off = h.headerLength
        let extEnd = Int(h.cs)
        var seenHoti = false
        while off < extEnd {
            if extEnd - off < 8 {
                break
            }
            let type = hc.be32(at: off)
            let len = UInt64(hc.be32(at: off + 4))
            if type == Q.extEnd { break }
            let dataStart = off + 8
            guard len <= UInt64(extEnd - dataStart) else {
                throw QCow2Error("header extension \(hex(UInt64(type))) at file offset \(hex(UInt64(off))) claims \(len) bytes, which run past the end of the \(h.cs)-byte header cluster")
            }
            if UInt64(dataStart) + len > fileLength {
                throw QCow2Error("header extension \(hex(UInt64(type))) at file offset \(hex(UInt64(off))) (\(len) bytes) is cut short by the end of the file")
            }
            switch type {
            case Q.extHotimage:
                if seenHoti {
                    x.problems.append("a second hotimage (HOTI) header extension at file offset \(hex(UInt64(off))) was ignored")
                } else {
                    seenHoti = true
                    x.hotiExt = dataStart
                    x.hotiLen = Int(len)
                }
            case Q.extBackingFormat:
                guard len >= 1, len <= UInt64(QCow2Backing.maxFormatBytes) else {
                    throw QCow2Error("backing file format header extension at file offset \(hex(UInt64(off))) is \(len) bytes long; qemu accepts 1...\(QCow2Backing.maxFormatBytes)")
                }
                guard x.backingFormat == nil else {
                    throw QCow2Error("a second backing file format header extension at file offset \(hex(UInt64(off)))")
                }
                var bytes = Array(hc[dataStart..<(dataStart + Int(len))])
                // qemu NUL-terminates a format shorter than its 16-byte
                // buffer; trailing NULs are padding, an inner NUL is not.
                while bytes.last == 0 { bytes.removeLast() }
                guard !bytes.isEmpty, !bytes.contains(0),
                      let f = String(validatingUTF8: bytes.map { CChar(bitPattern: $0) } + [0]) else {
                    throw QCow2Error("backing file format header extension at file offset \(hex(UInt64(off))) is empty, holds a NUL byte or is not UTF-8")
                }
                x.backingFormat = f
            case Q.extBitmaps:
                x.notes.append("the image has persistent dirty bitmaps; refcounts are not verified")
                x.hasBitmaps = true
            case Q.extCrypto:
                throw QCow2Error("the image has a full-disk-encryption header extension at file offset \(hex(UInt64(off))); encrypted images are not supported")
            case Q.extDataFile:
                x.notes.append("the image names an external data file (header extension at file offset \(hex(UInt64(off)))) that is not used")
            default:
                break
            }
            off = dataStart + Int(alignUp(len, 8))
        }
        return x
    }

    /// The HOTI extension and the tail blob it points at. Damage becomes a
    /// problem (after those of the extension scan), never a QCow2Error.
    static func readHotimagePart(fd: Int32, _ h: ParsedHeader, _ x: HeaderExtensions, fileLength: UInt64) throws -> HotimagePart {
        let hc = h.cluster0
        var p = HotimagePart(hotiExt: x.hotiExt, problems: x.problems)
        let marker = h.autoclear & Q.autoclearHotimage != 0
        guard let ext = x.hotiExt else {
            if marker {
                p.problems.append("autoclear feature bit 63 (hotimage) is set but the hotimage header extension is missing or damaged")
            }
            return p
        }
        if x.hotiLen < Q.hotiExtLength {
            p.problems.append("the hotimage header extension at file offset \(hex(UInt64(ext - 8))) is \(x.hotiLen) bytes long, expected \(Q.hotiExtLength)")
            p.hotiExt = nil
            return p
        }
        let fv = hc.be32(at: ext)
        let flags = hc.be32(at: ext + 4)
        let tOff = hc.be64(at: ext + 8)
        let tLen = hc.be64(at: ext + 16)
        p.tailCRC = hc.be32(at: ext + 24)
        if fv != Q.hotiFormatVersion {
            p.problems.append("unsupported hotimage format version \(fv) in the header extension at file offset \(hex(UInt64(ext)))")
        }
        if !marker {
            p.problems.append("autoclear feature bit 63 is clear: another program opened the image for writing, so hotimage's checksums no longer apply")
        }
        var metadata: [UInt8] = []
        do {
            let (layout, meta) = try readTail(fd: fd, offset: tOff, length: tLen, fileLength: fileLength,
                                              cs: h.cs, clusterBits: h.clusterBits, virtualSize: h.size, l1Size: h.l1Size)
            p.tail = layout
            metadata = meta
            if crc32Of(meta) != layout.metadataCRC {
                p.problems.append("hotimage metadata (file offset \(hex(tOff &+ layout.metadataOffset)), \(meta.count) bytes): checksum mismatch")
            }
        } catch let e as QCow2Error {
            p.problems.append(e.message)
        }
        p.info = HotimageInfo(formatVersion: fv, complete: flags & Q.hotiFlagComplete != 0, metadata: metadata,
                              tailOffset: tOff, tailLength: tLen, checksumsValid: marker)
        return p
    }

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
        guard length >= UInt64(Q.tailHeaderLengthV1) else { throw QCow2Error("\(at) is too short for its header") }
        let h1 = try preadArray(fd, count: Q.tailHeaderLengthV1, offset: offset, what: "hotimage tail header")
        guard Array(h1[0..<8]) == Q.tailMagic else { throw QCow2Error("\(at): bad magic (expected \"HOTITAIL\")") }
        var t = TailLayout()
        let version = h1.be32(at: 8)
        guard version == 1 || version == Q.tailVersion else { throw QCow2Error("\(at): unsupported tail version \(version)") }
        t.version = version
        let headerLength = version == 1 ? Q.tailHeaderLengthV1 : Q.tailHeaderLength
        guard length >= UInt64(headerLength) else { throw QCow2Error("\(at) is too short for its version \(version) header") }
        let h = version == 1 ? h1 : try preadArray(fd, count: headerLength, offset: offset, what: "hotimage tail header")
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
            guard let bytes, rel >= UInt64(headerLength), let e = checkedAdd(rel, bytes), e <= length else {
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
        if version >= 2 {
            t.digestsOffset = h.be64(at: 128)
            t.digestsLength = h.be64(at: 136)
            t.digestCount = h.be64(at: 144)
            t.digestsCRC = h.be32(at: 152)
            t.digestRegions = h.be32(at: 156)
            try section("digest table", t.digestsOffset, t.digestsLength)
            guard t.digestRegions <= l1Size else {
                throw QCow2Error("\(at): \(t.digestRegions) digest table regions but the L1 table has only \(l1Size) entries")
            }
        }
        let meta = try preadArray(fd, count: Int(t.metadataLength), offset: offset + t.metadataOffset, what: "hotimage metadata")
        return (t, meta)
    }
}
