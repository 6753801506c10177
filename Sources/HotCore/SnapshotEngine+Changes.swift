// Changed-block tracking for incremental backups.
//
//   changes   clusters (changeClusterBytes, 64 KiB by default) touched by a
//             WRITE, TRIM or WRITE_ZEROES since the last cut; marked in
//             `mutate` under the lock the write path already takes, before
//             the device write, in the same hold that counts the write in
//             flight.
//   pending   at arming (no write in flight, so every write is wholly before
//             or after the cut): pending ∪= changes, changes = ∅. pending is
//             what the backup of this cut must take beyond the image it
//             continues from (`cutChanges`). A wip retry arms again and
//             pending keeps accumulating: a retry never loses a mark.
//   end       with a commit (the session reached protecting): pending is
//             dropped, the backup holds it. Without (a plain end, a failure,
//             a lost heartbeat, a closed connection): changes ∪= pending.
//
// Memory: one bit per cluster, 2 MiB per TiB at 64 KiB clusters (BlockBitmap:
// less while the map is sparse, plus its ~4 KiB per mixed 2^15-cluster chunk
// and a small chunk table), and a second map (pending) of the same bound
// during a session. Cost per write: a bit set (or a run set) under the lock
// `mutate` takes anyway.

/// A change map at cluster granularity: bit i = cluster i (bytes
/// i*clusterBytes ..< (i+1)*clusterBytes) was written.
public struct ChangeBits: Sendable, Equatable {
    public var clusterBytes: Int
    public var bits: BlockBitmap
    public var clusterCount: UInt64 { bits.blockCount }
    public var count: UInt64 { bits.count }

    public init(clusterBytes: Int, clusterCount: UInt64) {
        self.clusterBytes = clusterBytes
        bits = BlockBitmap(blockCount: clusterCount)
    }

    public init(clusterBytes: Int, bits: BlockBitmap) {
        self.clusterBytes = clusterBytes
        self.bits = bits
    }

    /// Words the flat form has: ceil(clusters / 64).
    public static func wordCount(clusters: UInt64) -> Int { Int((clusters + 63) / 64) }

    /// The flat form: bit i of word i/64 = cluster i changed;
    /// exactly ceil(clusterCount / 64) words.
    public func words() -> [UInt64] {
        var w: [UInt64] = []
        w.reserveCapacity(ChangeBits.wordCount(clusters: clusterCount))
        forEachLittleEndianChunk { raw in
            for i in 0..<raw.count / 8 { w.append(UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))) }
        }
        return w
    }

    /// The flat form in pieces of at most `maxWords` little-endian words, in
    /// order (what the files hold), so that a 4 TiB map (8 MiB flat) is
    /// never held flat at once: memory stays the sparse bitmap's plus one
    /// piece.
    public func forEachLittleEndianChunk(maxWords: Int = 32768, _ body: (UnsafeRawBufferPointer) throws -> Void) rethrows {
        let total = ChangeBits.wordCount(clusters: clusterCount)
        let buf = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(1, min(maxWords, total)))
        defer { buf.deallocate() }
        var first = 0
        while first < total {
            let n = min(buf.count, total - first)
            for i in 0..<n { buf[i] = 0 }
            let lo = UInt64(first) * 64
            let hi = min(clusterCount, UInt64(first + n) * 64)
            bits.forEachRun(in: lo..<hi) { r in
                var c = r.lowerBound
                while c < r.upperBound {
                    let wi = Int((c - lo) >> 6)
                    let b = Int(c & 63)
                    let e = Int(min(r.upperBound - (c & ~63), 64))
                    let mask: UInt64 = (e == 64 ? ~0 : (UInt64(1) << UInt64(e)) &- 1) & ~((UInt64(1) << UInt64(b)) &- 1)
                    buf[wi] |= mask
                    c = (c & ~63) + UInt64(e)
                }
            }
            for i in 0..<n { buf[i] = buf[i].littleEndian }
            try body(UnsafeRawBufferPointer(start: buf.baseAddress, count: n * 8))
            first += n
        }
    }

    /// From the flat form; nil unless `words` has exactly the right count
    /// and no bit past `clusterCount`.
    public init?(clusterBytes: Int, clusterCount: UInt64, words: [UInt64]) {
        guard words.count == ChangeBits.wordCount(clusters: clusterCount) else { return nil }
        if clusterCount % 64 != 0, let last = words.last, last >> (clusterCount % 64) != 0 { return nil }
        var b = BlockBitmap(blockCount: clusterCount)
        var i = 0
        while i < words.count {
            var x = words[i]
            while x != 0 {
                let lo = x.trailingZeroBitCount
                let run = (~(x >> UInt64(lo))).trailingZeroBitCount
                let start = UInt64(i) * 64 + UInt64(lo)
                b.insert(range: start..<start + UInt64(run))
                x = run + lo >= 64 ? 0 : x & ~(((UInt64(1) << UInt64(run)) &- 1) << UInt64(lo))
            }
            i += 1
        }
        self.clusterBytes = clusterBytes
        bits = b
    }
}

/// The change map's counts, for status.
public struct ChangeCounts: Sendable, Equatable {
    /// Clusters written since the last committed cut (changes ∪ pending).
    public var changedClusters: UInt64
    /// Of those, clusters written before the current session's cut.
    public var pendingClusters: UInt64
    public var clusterBytes: Int
    public var clusterCount: UInt64
}

extension SnapshotEngine {
    public var tracksChanges: Bool { config.trackChanges }

    /// Clusters touched by the byte range (partial clusters included).
    @inline(__always) func clusters(offset: UInt64, length: UInt64) -> Range<UInt64> {
        guard length > 0 else { return 0..<0 }
        let first = offset >> clusterShift
        let last = (offset + length - 1) >> clusterShift
        return min(first, clusterCount)..<min(last + 1, clusterCount)
    }

    /// Lock held.
    @inline(__always) func markChangedLocked(offset: UInt64, length: UInt64) {
        let r = clusters(offset: offset, length: length)
        if r.count == 1 { changes!.insert(r.lowerBound) } else if !r.isEmpty { changes!.insert(range: r) }
    }

    /// The cut: pending ∪= changes; changes = ∅ (lock held, no write in flight).
    func cutChangesLocked() {
        guard var c = changes else { return }
        if !c.isEmpty {
            if pendingChanges!.isEmpty { pendingChanges = c } else { pendingChanges!.formUnion(c) }
            c.removeAll()
            changes = c
        }
    }

    /// No commit: changes ∪= pending (lock held). Idempotent.
    func mergePendingChangesLocked() {
        guard changes != nil, !pendingChanges!.isEmpty else { return }
        changes!.formUnion(pendingChanges!)
        pendingChanges!.removeAll()
    }

    /// Commit: the backup holds pending (lock held).
    func dropPendingChangesLocked() {
        guard pendingChanges != nil else { return }
        pendingChanges!.removeAll()
    }

    /// The clusters written since the last committed cut up to this
    /// session's cut (a copy of pending). nil when tracking is off.
    public func cutChanges() -> ChangeBits? {
        m.withLock { pendingChanges.map { ChangeBits(clusterBytes: config.changeClusterBytes, bits: $0) } }
    }

    /// Everything written since the last committed cut (changes ∪ pending),
    /// consistent under the lock: what a state file saves.
    public func exportChanges() -> ChangeBits? {
        m.withLock {
            guard var c = changes else { return nil }
            if !pendingChanges!.isEmpty { c.formUnion(pendingChanges!) }
            return ChangeBits(clusterBytes: config.changeClusterBytes, bits: c)
        }
    }

    /// Replaces the change map (a saved one, or empty to start over); pending
    /// is emptied. Call it outside a session (at attach, before any write).
    /// Throws if the geometry differs.
    public func loadChanges(_ bits: ChangeBits) throws {
        guard bits.clusterBytes == config.changeClusterBytes, bits.clusterCount == clusterCount else {
            throw EngineError.changeMapMismatch("a change map of \(bits.clusterCount) clusters of \(bits.clusterBytes) bytes does not fit this device's \(clusterCount) clusters of \(config.changeClusterBytes) bytes")
        }
        m.withLock {
            guard changes != nil else { return }
            changes = bits.bits
            pendingChanges!.removeAll()
        }
    }

    /// Counts for status; nil when tracking is off.
    public func changeCounts() -> ChangeCounts? {
        m.withLock {
            guard let c = changes, let p = pendingChanges else { return nil }
            var changed = c.count
            if !p.isEmpty {
                var u = c
                u.formUnion(p)
                changed = u.count
            }
            return ChangeCounts(changedClusters: changed, pendingClusters: p.count,
                                clusterBytes: config.changeClusterBytes, clusterCount: clusterCount)
        }
    }
}
