// Incremental.swift — `backup --base PREV`: the base opened and checked,
// and which clusters the new link reads, writes as zero clusters, and
// leaves to its base.
//
// The invariant every image keeps (its digest table, QCow2): a guest
// cluster has a digest exactly when it holds something at the image's
// point in time, read through the whole chain; a cluster without one reads
// as zeros. So an incremental needs only its base's table, never the chain
// below it:
//   used now, digest equal to the base's     nothing written (the base has it)
//   used now, different or new               written
//   used now, all zeros, base has nothing    nothing written
//   unused now, base has a digest            a zero cluster (no stale data)
// What is *read* depends on how the changes are known:
//   tracked   HotCore's change map continues from the base's cut: only the
//             used clusters written since are read; the rest keep the
//             base's digest (or its zeros) unread. A cluster whose blocks
//             became used without a write keeps the base's bytes: content
//             never written is part of no file (ext4 and XFS read unwritten
//             extents as zeros).
//   compared  every used cluster is read and its digest compared.
// A cluster read and found equal is not written either way (a rewrite of
// the same bytes costs a read, never image space).
import Foundation
import HotControl
import HotErrors
import HotOS
import QCow2

/// The base of an incremental, opened and checked against the volume.
struct IncrementalBase {
    /// The base image (as resolved: absolute).
    let path: String
    let meta: ImageMetadata
    let id: String
    let digests: ClusterDigestTable
    /// The backing file name the new image stores: the base's file name
    /// when both are in one directory, else its absolute path.
    let backingName: String
    /// Links in the base's chain (1: a full image).
    let depth: Int

    /// Opens PREV for a backup to `output` of a volume of `size` bytes with
    /// `clusterSize` clusters; refuses (exit 2) a base that cannot be one.
    static func open(_ given: String, output: String, size: UInt64, clusterSize: Int,
                     filesystemUUID: String?) throws -> IncrementalBase {
        func refuse(_ s: String) -> BackupFailure { BackupFailure(kind: .refused, description: "--base \(given): \(s)") }
        guard let abs = realPath(given) else { throw refuse("no such image") }
        let chain: ImageChain
        do { chain = try ImageChain.open(abs) } catch { throw refuse("\(error)") }
        let top = chain.links[0]
        if let d = chain.damage.first {
            throw refuse("\(d); a damaged or changed chain cannot be a base ('hotimage verify \(given)' says more; make a full backup)")
        }
        guard let meta = top.meta else { throw refuse("not an image made by hotimage (no metadata, no digests to compare against); make a full backup") }
        guard top.complete else { throw refuse("an incomplete image (a failed backup kept with --keep-partial) cannot be a base") }
        if chain.links.count >= ImageChain.maxLinks {
            throw refuse("its chain has \(chain.links.count) links, the most a chain may have: shorten it first ('hotimage merge \(given)'), or make a full backup")
        }
        // The new image must not replace a link of the chain it builds on.
        let out = fileIdentity(output)
        for (i, l) in chain.links.enumerated() where fileIdentity(l.path) == out {
            throw refuse("the image \(output) is \(i == 0 ? "the base itself" : "a link of the base's chain") (\(l.path)): write the incremental to a new file")
        }
        guard let id = meta.id else {
            throw refuse("made by a hotimage without image ids; make a full backup (leave out --base) and take incrementals from it")
        }
        guard let digests = top.digests else {
            throw refuse("holds no cluster digests (made by an older hotimage); make a full backup (leave out --base)")
        }
        if chain.virtualSize != size {
            throw refuse("its volume is \(chain.virtualSize) bytes, this one \(size): not a backup of this volume")
        }
        if chain.clusterSize != clusterSize {
            throw refuse("its clusters are \(chain.clusterSize) bytes, this backup's \(clusterSize): use --cluster-size \(chain.clusterSize)")
        }
        if let a = meta.filesystem.uuid, let b = filesystemUUID, a != b {
            throw refuse("it holds filesystem \(a), the volume holds \(b): not a backup of this filesystem (make a full backup)")
        }
        let name = backingFileName(of: abs, for: output)
        return IncrementalBase(path: abs, meta: meta, id: id, digests: digests, backingName: name, depth: chain.links.count)
    }
}

/// What an incremental reads, zeroes and keeps (see the file's header).
struct DeltaPlan: Equatable {
    /// Byte ranges to read: the used blocks of the clusters to read.
    var read: [Range<UInt64>]
    var readClusters: UInt64
    /// Clusters used in the base and unused now: written as zero clusters.
    var zero: [UInt64]
    /// Used clusters left unread: their digests (if any) are copied from the base.
    var kept: [UInt64]

    /// `used`: the snapshot's protected byte ranges (normalized); `baseHas`:
    /// the clusters with a digest in the base (ascending); `changed`: the
    /// tracked change map (bit c of word c/64), nil to compare; `reread`:
    /// byte ranges whose clusters are read even when unchanged — what the
    /// base left out though in use (it holds zeros there) and what this
    /// backup leaves out (the base may hold it).
    static func make(used: [Range<UInt64>], size: UInt64, clusterSize: Int, baseHas: [UInt64],
                     hasDigest: (UInt64) -> Bool, changed: [UInt64]?, reread: [Range<UInt64>] = []) -> DeltaPlan {
        let cs = UInt64(clusterSize)
        let clusters = (size + cs - 1) / cs
        /// Bit c set for every cluster c the byte ranges touch.
        func clusterBits(_ ranges: [Range<UInt64>]) -> [UInt64] {
            var bits = [UInt64](repeating: 0, count: Int((clusters + 63) / 64))
            for r in ranges where !r.isEmpty {
                var c = r.lowerBound / cs
                let end = min(clusters, (r.upperBound + cs - 1) / cs)
                while c < end { bits[Int(c >> 6)] |= 1 << (c & 63); c += 1 }
            }
            return bits
        }
        let usedBits = clusterBits(used)
        func isUsed(_ c: UInt64) -> Bool { usedBits[Int(c >> 6)] & (1 << (c & 63)) != 0 }
        let rereadBits = changed == nil ? [] : clusterBits(reread)
        func isChanged(_ c: UInt64) -> Bool {
            guard let ch = changed else { return true }
            let w = Int(c >> 6)
            return w >= ch.count || ch[w] & (1 << (c & 63)) != 0 || rereadBits[w] & (1 << (c & 63)) != 0
        }
        var readRuns: [Range<UInt64>] = []
        var readCount: UInt64 = 0
        var kept: [UInt64] = []
        for w in 0..<usedBits.count where usedBits[w] != 0 {
            var bits = usedBits[w]
            while bits != 0 {
                let c = UInt64(w) * 64 + UInt64(bits.trailingZeroBitCount)
                bits &= bits - 1
                if isChanged(c) {
                    readCount += 1
                    let lo = c * cs, hi = min(size, lo + cs)
                    if let l = readRuns.last, l.upperBound == lo { readRuns[readRuns.count - 1] = l.lowerBound..<hi } else { readRuns.append(lo..<hi) }
                } else {
                    kept.append(c)
                }
            }
        }
        let zero = baseHas.filter { $0 < clusters && !isUsed($0) }
        // The used blocks of the clusters to read.
        let read = RangeSet.subtract(used, RangeSet.subtract(used, readRuns))
        return DeltaPlan(read: read, readClusters: readCount, zero: zero, kept: kept)
    }
}

/// How an incremental found its changes, decided after the cut.
struct DeltaMethod {
    var tracked: Bool
    /// Why compared (nil when tracked).
    var reason: String?
    var changed: [UInt64]?
}

/// How an image at `image` names its backing file `base` (absolute): the
/// file name when both are in one directory; else a relative path (qemu
/// resolves it against the image's directory), so a tree of backups can be
/// moved or copied whole; absolute only when they share nothing but `/`.
func backingFileName(of base: String, for image: String) -> String {
    let imageDir = realPath((image as NSString).deletingLastPathComponent.ifEmpty(".")) ?? ""
    let b = base.split(separator: "/").map(String.init)
    let d = imageDir.split(separator: "/").map(String.init)
    var common = 0
    while common < min(b.count - 1, d.count) && b[common] == d[common] { common += 1 }
    if common == 0 { return base }
    return (Array(repeating: "..", count: d.count - common) + b[common...]).joined(separator: "/")
}

func realPath(_ p: String) -> String? {
    guard let r = realpath(p, nil) else { return nil }
    defer { free(r) }
    return String(cString: r)
}
