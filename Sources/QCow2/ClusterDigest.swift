// ClusterDigest.swift — XXH3-128 digests of guest clusters, and the
// per-cluster digest table an image's tail blob carries (the format is in
// QCow2Writer.swift, "DIGEST TABLE").
//
// A digest is defined over the full guest cluster, zero-padded to the
// cluster size (like the CRC: the short last cluster of a disk is padded),
// XXH3_128bits with seed 0. The table says, for every guest cluster, either
// "digest D" (the cluster's content at this image's point in time, read
// through the whole backing chain, has digest D) or "absent" (it reads as
// zeros at this point in time).

import CXXHash
import HotSync

/// XXH3-128 of one full guest cluster (16 bytes).
public struct ClusterDigest: Equatable, Hashable, Sendable, CustomStringConvertible {
    public let high: UInt64
    public let low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// The digest of `data` zero-padded to `clusterSize` bytes
    /// (`data.count <= clusterSize`). Pads by streaming zeros, without a copy.
    public static func of(_ data: UnsafeRawBufferPointer, clusterSize: Int) -> ClusterDigest {
        precondition(data.count <= clusterSize, "\(data.count) bytes exceed the cluster size \(clusterSize)")
        if data.count == clusterSize {
            return ClusterDigest(XXH3_128bits_withSeed(data.baseAddress, data.count, 0))
        }
        if data.count == 0, validClusterSize(clusterSize) { return zeros(clusterSize: clusterSize) }
        guard let st = XXH3_createState() else {
            // Allocation failure: fall back to a padded copy.
            let p = UnsafeMutableRawPointer.allocate(byteCount: clusterSize, alignment: 64)
            defer { p.deallocate() }
            if data.count > 0 { p.copyMemory(from: data.baseAddress!, byteCount: data.count) }
            (p + data.count).initializeMemory(as: UInt8.self, repeating: 0, count: clusterSize - data.count)
            return ClusterDigest(XXH3_128bits_withSeed(p, clusterSize, 0))
        }
        defer { XXH3_freeState(st) }
        _ = XXH3_128bits_reset_withSeed(st, 0)
        if data.count > 0 { _ = XXH3_128bits_update(st, data.baseAddress, data.count) }
        var left = clusterSize - data.count
        while left > 0 {
            let n = Swift.min(left, 1 << Q.maxClusterBits)
            _ = XXH3_128bits_update(st, sharedZeros, n)
            left -= n
        }
        return ClusterDigest(XXH3_128bits_digest(st))
    }

    /// The digest of `clusterSize` zero bytes (cached per cluster size).
    public static func zeros(clusterSize: Int) -> ClusterDigest {
        precondition(validClusterSize(clusterSize), "cluster size \(clusterSize) is not a power of two from 512 to 2 MiB")
        return zeroDigests[clusterSize.trailingZeroBitCount - Q.minClusterBits]
    }

    private static let zeroDigests: [ClusterDigest] = (Q.minClusterBits...Q.maxClusterBits).map {
        ClusterDigest(XXH3_128bits_withSeed(sharedZeros, 1 << $0, 0))
    }

    init(_ h: XXH128_hash_t) {
        high = h.high64
        low = h.low64
    }

    public var description: String {
        let a = String(high, radix: 16), b = String(low, radix: 16)
        return String(repeating: "0", count: 16 - a.count) + a + String(repeating: "0", count: 16 - b.count) + b
    }
}

/// One L2-sized region of a digest table: a presence bitmap and the packed
/// digests of the clusters whose bit is set, in cluster order.
struct DigestRegion: Sendable {
    /// Presence bits, 64 clusters per word (bit j % 64 of word j / 64).
    var bits: [UInt64]
    /// ranks[w] = number of set bits in words 0..<w.
    var ranks: [UInt32]
    var digests: [ClusterDigest]

    func lookup(_ j: Int) -> ClusterDigest? {
        let w = j >> 6, b = UInt64(1) << UInt64(j & 63)
        guard bits[w] & b != 0 else { return nil }
        let rank = Int(ranks[w]) + (bits[w] & (b - 1)).nonzeroBitCount
        return digests[rank]
    }
}

/// The per-cluster digest table of an image (`QCow2Reader.digests()`):
/// for every guest cluster a digest of its content at the image's point in
/// time, or nil where that content is all zeros. Memory: 16 bytes per
/// cluster with a digest plus one bit per cluster of each region that has any.
public struct ClusterDigestTable: Sendable, Sequence {
    /// Clusters per region (the L2 table's entry count).
    public let regionClusters: Int
    /// Clusters with a digest.
    public let count: Int
    /// Region index (L1 index) -> region, and the indices ascending.
    let regions: [Int: DigestRegion]
    let order: [Int]

    init(regionClusters: Int, regions: [Int: DigestRegion]) {
        self.regionClusters = regionClusters
        self.regions = regions
        self.order = regions.keys.sorted()
        self.count = regions.values.reduce(0) { $0 + $1.digests.count }
    }

    /// The digest of guest cluster `cluster`, or nil ("reads as zeros").
    public subscript(cluster cluster: UInt64) -> ClusterDigest? {
        let l1 = cluster / UInt64(regionClusters)
        guard l1 < UInt64(Int.max), let r = regions[Int(l1)] else { return nil }
        return r.lookup(Int(cluster % UInt64(regionClusters)))
    }

    /// Iterates (cluster, digest) pairs in ascending cluster order.
    public struct Iterator: IteratorProtocol {
        let table: ClusterDigestTable
        var k = 0          // position in table.order
        var j = 0          // next slot in the region
        var rank = 0
        public mutating func next() -> (cluster: UInt64, digest: ClusterDigest)? {
            while k < table.order.count {
                let l1 = table.order[k]
                let r = table.regions[l1]!
                while j < table.regionClusters {
                    let w = j >> 6
                    let word = r.bits[w] >> UInt64(j & 63)
                    if word == 0 {
                        j = (w + 1) << 6
                        continue
                    }
                    j += word.trailingZeroBitCount
                    let d = r.digests[rank]
                    rank += 1
                    defer { j += 1 }
                    return (UInt64(l1) * UInt64(table.regionClusters) + UInt64(j), d)
                }
                k += 1
                j = 0
                rank = 0
            }
            return nil
        }
    }

    public func makeIterator() -> Iterator { Iterator(table: self) }
}

/// The writer's digests while the image is being written: per touched
/// region a presence bitmap and one slot per cluster (16 bytes per cluster
/// of each region that has any digest). Thread-safe.
final class DigestAccumulator: @unchecked Sendable {
    let l2Entries: Int
    private let lock = Lock()
    private var regions: [Int: (bits: [UInt64], slots: [ClusterDigest])] = [:]

    init(l2Entries: Int) { self.l2Entries = l2Entries }

    func set(_ cluster: UInt64, _ d: ClusterDigest?) {
        let l1 = Int(cluster / UInt64(l2Entries)), j = Int(cluster % UInt64(l2Entries))
        let w = j >> 6, b = UInt64(1) << UInt64(j & 63)
        lock.withLock {
            if let d {
                if regions[l1] == nil {
                    regions[l1] = ([UInt64](repeating: 0, count: max(1, l2Entries / 64)),
                                   [ClusterDigest](repeating: ClusterDigest(high: 0, low: 0), count: l2Entries))
                }
                regions[l1]!.bits[w] |= b
                regions[l1]!.slots[j] = d
            } else if regions[l1] != nil {
                regions[l1]!.bits[w] &= ~b
            }
        }
    }

    /// The table as it stands (regions without any digest dropped).
    func snapshot() -> ClusterDigestTable {
        lock.withLock {
            var out: [Int: DigestRegion] = [:]
            for (l1, r) in regions {
                var ranks = [UInt32](repeating: 0, count: r.bits.count)
                var digests: [ClusterDigest] = []
                var n: UInt32 = 0
                for w in 0..<r.bits.count {
                    ranks[w] = n
                    var word = r.bits[w]
                    while word != 0 {
                        let t = word.trailingZeroBitCount
                        digests.append(r.slots[w * 64 + t])
                        word &= word - 1
                        n += 1
                    }
                }
                if n > 0 { out[l1] = DigestRegion(bits: r.bits, ranks: ranks, digests: digests) }
            }
            return ClusterDigestTable(regionClusters: l2Entries, regions: out)
        }
    }
}

extension ClusterDigestTable {
    /// The on-disk digest section (see QCow2Writer.swift, "DIGEST TABLE"):
    /// per region with any digest, ascending: u32 L1 index, u32 digest
    /// count, the presence bitmap (regionClusters / 8 bytes, LSB first),
    /// then count x 16 bytes (high, low; big-endian).
    func encoded() -> [UInt8] {
        let bitmapBytes = regionClusters / 8
        var size = 0
        for l1 in order { size += 8 + bitmapBytes + 16 * regions[l1]!.digests.count }
        var out = [UInt8](repeating: 0, count: size)
        var o = 0
        for l1 in order {
            let r = regions[l1]!
            out.putBE32(UInt32(l1), at: o)
            out.putBE32(UInt32(r.digests.count), at: o + 4)
            o += 8
            for b in 0..<bitmapBytes {
                out[o + b] = UInt8(truncatingIfNeeded: r.bits[b >> 3] >> UInt64((b & 7) * 8))
            }
            o += bitmapBytes
            for d in r.digests {
                out.putBE64(d.high, at: o)
                out.putBE64(d.low, at: o + 8)
                o += 16
            }
        }
        return out
    }

    /// Parses a digest section; throws on any inconsistency (the reader is
    /// fuzzed: counts are checked against the bitmap and the section length).
    static func decode(_ b: [UInt8], regionClusters: Int, regionCount: UInt32, digestCount: UInt64,
                       l1Size: Int, guestClusters: UInt64) throws -> ClusterDigestTable {
        let bitmapBytes = regionClusters / 8
        let words = Swift.max(1, regionClusters / 64)
        var regions: [Int: DigestRegion] = [:]
        var o = 0
        var last = -1
        var total: UInt64 = 0
        for k in 0..<Int(regionCount) {
            guard b.count - o >= 8 + bitmapBytes else {
                throw QCow2Error("digest table region \(k) at offset \(o) of the section is cut short")
            }
            let l1 = Int(b.be32(at: o))
            let n = Int(b.be32(at: o + 4))
            guard l1 > last, l1 < l1Size else {
                throw QCow2Error("digest table region \(k): L1 index \(l1) is out of order or beyond the L1 table (\(l1Size) entries)")
            }
            last = l1
            o += 8
            var bits = [UInt64](repeating: 0, count: words)
            for i in 0..<bitmapBytes { bits[i >> 3] |= UInt64(b[o + i]) << UInt64((i & 7) * 8) }
            o += bitmapBytes
            var ranks = [UInt32](repeating: 0, count: words)
            var pop: UInt32 = 0
            for w in 0..<words {
                ranks[w] = pop
                pop += UInt32(bits[w].nonzeroBitCount)
            }
            guard pop == UInt32(n), n > 0 else {
                throw QCow2Error("digest table region \(k) (L1 index \(l1)): \(n) digests recorded but the bitmap has \(pop)")
            }
            // No digest beyond the end of the disk.
            let first = UInt64(l1) * UInt64(regionClusters)
            if first + UInt64(regionClusters) > guestClusters {
                let valid = Int(guestClusters > first ? guestClusters - first : 0)
                for j in valid..<regionClusters where bits[j >> 6] & (UInt64(1) << UInt64(j & 63)) != 0 {
                    throw QCow2Error("digest table records a digest for cluster \(first + UInt64(j)), beyond the end of the disk")
                }
            }
            guard (b.count - o) / 16 >= n else {
                throw QCow2Error("digest table region \(k) (L1 index \(l1)): \(n) digests run past the end of the section")
            }
            var digests: [ClusterDigest] = []
            digests.reserveCapacity(n)
            for _ in 0..<n {
                digests.append(ClusterDigest(high: b.be64(at: o), low: b.be64(at: o + 8)))
                o += 16
            }
            total += UInt64(n)
            regions[l1] = DigestRegion(bits: bits, ranks: ranks, digests: digests)
        }
        guard o == b.count else {
            throw QCow2Error("digest table section has \(b.count - o) bytes after its last region")
        }
        guard total == digestCount else {
            throw QCow2Error("digest table holds \(total) digests but its header says \(digestCount)")
        }
        return ClusterDigestTable(regionClusters: regionClusters, regions: regions)
    }
}
