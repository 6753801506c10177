// BlockBitmap: the protection map of the copy-on-write snapshot engine.
//
// A set of block numbers in 0..<blockCount, stored as a chunked sparse bitmap.
// Blocks are grouped into chunks of 2^15 blocks. A chunk is in one of three states:
//
//   .empty   no block set        no storage
//   .full    every block set     no storage
//   .mixed   anything else       512 UInt64 words (4 KiB), bit i of word w = block w*64+i
//
// The state is not stored as an enum tag: each chunk keeps its word array (empty unless
// mixed) and its population count, and the state follows from the two (see `Chunk`).
// Every operation normalises: a chunk whose count reaches 0 or its size drops its words.
// So the representation is canonical, and `==` compares chunks directly.
//
// Bits past blockCount (the tail of the last chunk, which may be partial) are never set
// and never counted; a mixed last chunk holds only ceil(bits / 64) words.
//
// Memory, per TiB of 4 KiB blocks (2^28 blocks = 2^13 chunks), on 64-bit:
//   chunk table, always present:   2^13 entries * 16 B (MemoryLayout<Chunk>.stride)
//                                  = 128 KiB (135,152 B allocated, malloc rounds to pages)
//   each mixed chunk:              512 words * 8 B = 4,096 B + 32 B array header
//                                  (4,136 B allocated after malloc rounding)
//   worst case (every chunk mixed): 2^13 * 4,136 + 135,152 = 34,017,264 B ≈ 32.44 MiB per TiB
//                                  (the 32 MiB of raw bits + ~0.44 MiB of headers)
//   typical (large uniform regions, e.g. just filled or mostly copied): ≈ 132 KiB per TiB,
//                                  plus ~4 KiB for each chunk that holds a mixture
//                                  (1,000 scattered single-block edits cost at most ~4 MiB).
// `memoryBytes` reports this (array capacities, i.e. including malloc's rounding).

public struct BlockBitmap: Sendable, Equatable {
    /// log2 of the number of blocks per chunk.
    public static let chunkShift: UInt64 = 15
    /// Blocks per chunk (2^15): one 4 KiB word array when mixed.
    public static let blocksPerChunk: UInt64 = 1 << chunkShift
    /// Words in the array of a complete mixed chunk.
    public static let wordsPerChunk: Int = Int(blocksPerChunk / 64)
    /// Largest accepted blockCount (keeps every index computation far from overflow;
    /// 2^56 blocks is 256 EiB at 4 KiB per block).
    public static let maxBlockCount: UInt64 = 1 << 56

    static let offsetMask: UInt64 = blocksPerChunk - 1
    /// Approximate heap bytes of an array buffer's header (object header + count + capacity).
    static let arrayHeaderBytes = 32

    /// One chunk of 2^15 blocks (fewer for the last chunk).
    /// Invariants: `words.isEmpty` unless 0 < count < bits of the chunk; then
    /// `words.count == ceil(bits / 64)`, `count` is their popcount and bits past the
    /// chunk's end are clear.
    @usableFromInline
    struct Chunk: Sendable, Equatable {
        @usableFromInline var words: [UInt64]
        @usableFromInline var count: UInt32

        static let empty = Chunk(words: [], count: 0)

        @inline(__always) var isUniform: Bool { words.isEmpty }
    }

    /// Number of blocks covered; blocks are 0..<blockCount.
    public let blockCount: UInt64
    @usableFromInline var chunks: [Chunk]

    // MARK: Construction

    public init(blockCount: UInt64, filled: Bool = false) {
        precondition(blockCount <= BlockBitmap.maxBlockCount, "BlockBitmap: blockCount too large")
        self.blockCount = blockCount
        let n = Int((blockCount + BlockBitmap.blocksPerChunk - 1) >> BlockBitmap.chunkShift)
        chunks = [Chunk](repeating: .empty, count: n)
        if filled { fill() }
    }

    // MARK: Chunk geometry

    /// Number of chunks.
    public var chunkCount: Int { chunks.count }

    /// Number of chunks currently holding a word array.
    public var mixedChunkCount: Int {
        var n = 0
        for c in chunks where !c.isUniform { n += 1 }
        return n
    }

    /// Blocks in chunk `ci` (2^15 except possibly for the last).
    @inline(__always)
    func bits(ofChunk ci: Int) -> Int {
        let start = UInt64(ci) << BlockBitmap.chunkShift
        return Int(Swift.min(BlockBitmap.blocksPerChunk, blockCount - start))
    }

    @inline(__always)
    func fullChunk(_ ci: Int) -> Chunk {
        Chunk(words: [], count: UInt32(bits(ofChunk: ci)))
    }

    /// `range` clipped to 0..<blockCount.
    @inline(__always)
    public func clamped(_ range: Range<UInt64>) -> Range<UInt64> {
        let lo = Swift.min(range.lowerBound, blockCount)
        let hi = Swift.min(range.upperBound, blockCount)
        return lo..<hi
    }

    /// Mask of bits lo..<hi of one word, 0 <= lo < hi <= 64.
    @inline(__always)
    static func mask(_ lo: Int, _ hi: Int) -> UInt64 {
        let upper: UInt64 = hi == 64 ? ~0 : (UInt64(1) << UInt64(hi)) &- 1
        return upper & (~0 << UInt64(lo))
    }

    /// Words of a mixed chunk of `bits` blocks, every valid bit set to `value`.
    static func materialisedWords(bits: Int, value: Bool) -> [UInt64] {
        let n = (bits + 63) >> 6
        guard value else { return [UInt64](repeating: 0, count: n) }
        var w = [UInt64](repeating: ~0, count: n)
        if bits & 63 != 0 { w[n - 1] = mask(0, bits & 63) }
        return w
    }

    /// Drop the words of chunk `ci` if it has become uniform.
    @inline(__always)
    mutating func normalise(_ ci: Int) {
        let c = Int(chunks[ci].count)
        if c == 0 || c == bits(ofChunk: ci) { chunks[ci].words = [] }
    }

    // MARK: Whole-set queries

    /// Number of set blocks. O(chunks).
    public var count: UInt64 {
        var total: UInt64 = 0
        for c in chunks { total &+= UInt64(c.count) }
        return total
    }

    public var isEmpty: Bool {
        for c in chunks where c.count != 0 { return false }
        return true
    }

    /// True when every block is set.
    public var isFull: Bool {
        for i in chunks.indices where !(chunks[i].isUniform && chunks[i].count != 0) { return false }
        return true
    }

    /// Approximate heap bytes used: the chunk table plus every mixed chunk's words.
    public var memoryBytes: Int {
        var total = BlockBitmap.arrayHeaderBytes + chunks.capacity * MemoryLayout<Chunk>.stride
        for c in chunks where !c.isUniform {
            total += BlockBitmap.arrayHeaderBytes + c.words.capacity * MemoryLayout<UInt64>.size
        }
        return total
    }

    // MARK: Single blocks

    /// Whether `block` is set; false for any block >= blockCount. O(1).
    @inlinable
    public func contains(_ block: UInt64) -> Bool {
        guard block < blockCount else { return false }
        let ci = Int(block >> BlockBitmap.chunkShift)
        if chunks[ci].words.isEmpty { return chunks[ci].count != 0 }
        let off = Int(block & (BlockBitmap.blocksPerChunk - 1))
        return chunks[ci].words[off >> 6] & (UInt64(1) << UInt64(off & 63)) != 0
    }

    public mutating func insert(_ block: UInt64) {
        precondition(block < blockCount, "BlockBitmap.insert: block \(block) out of range")
        let ci = Int(block >> BlockBitmap.chunkShift)
        if chunks[ci].isUniform {
            if chunks[ci].count != 0 { return }  // full
            chunks[ci].words = BlockBitmap.materialisedWords(bits: bits(ofChunk: ci), value: false)
        }
        let off = Int(block & BlockBitmap.offsetMask)
        let bit = UInt64(1) << UInt64(off & 63)
        let w = chunks[ci].words[off >> 6]
        guard w & bit == 0 else { return }
        chunks[ci].words[off >> 6] = w | bit
        chunks[ci].count += 1
        normalise(ci)
    }

    public mutating func remove(_ block: UInt64) {
        precondition(block < blockCount, "BlockBitmap.remove: block \(block) out of range")
        let ci = Int(block >> BlockBitmap.chunkShift)
        if chunks[ci].isUniform {
            if chunks[ci].count == 0 { return }  // empty
            chunks[ci].words = BlockBitmap.materialisedWords(bits: bits(ofChunk: ci), value: true)
        }
        let off = Int(block & BlockBitmap.offsetMask)
        let bit = UInt64(1) << UInt64(off & 63)
        let w = chunks[ci].words[off >> 6]
        guard w & bit != 0 else { return }
        chunks[ci].words[off >> 6] = w & ~bit
        chunks[ci].count -= 1
        normalise(ci)
    }

    // MARK: Ranges

    /// Set every block of `range` (clamped to blockCount). Whole chunks are O(1) each.
    public mutating func insert(range: Range<UInt64>) { assign(range, true) }

    /// Clear every block of `range` (clamped to blockCount). Whole chunks are O(1) each.
    public mutating func remove(range: Range<UInt64>) { assign(range, false) }

    public mutating func removeAll() {
        for ci in chunks.indices { chunks[ci] = .empty }
    }

    public mutating func fill() {
        for ci in chunks.indices { chunks[ci] = fullChunk(ci) }
    }

    mutating func assign(_ range: Range<UInt64>, _ value: Bool) {
        let r = clamped(range)
        var p = r.lowerBound
        while p < r.upperBound {
            let ci = Int(p >> BlockBitmap.chunkShift)
            let start = UInt64(ci) << BlockBitmap.chunkShift
            let end = Swift.min(start + UInt64(bits(ofChunk: ci)), r.upperBound)
            assign(chunk: ci, Int(p - start), Int(end - start), value)
            p = end
        }
    }

    /// Set offsets lo..<hi (0 <= lo < hi <= bits) of chunk `ci` to `value`.
    mutating func assign(chunk ci: Int, _ lo: Int, _ hi: Int, _ value: Bool) {
        let bits = bits(ofChunk: ci)
        if lo == 0 && hi == bits {
            chunks[ci] = value ? fullChunk(ci) : .empty
            return
        }
        if chunks[ci].isUniform {
            let isSet = chunks[ci].count != 0
            if isSet == value { return }
            chunks[ci].words = BlockBitmap.materialisedWords(bits: bits, value: isSet)
        }
        var delta = 0
        chunks[ci].words.withUnsafeMutableBufferPointer { w in
            let first = lo >> 6, last = (hi - 1) >> 6
            for i in first...last {
                let m = BlockBitmap.mask(i == first ? lo & 63 : 0, i == last ? hi - (last << 6) : 64)
                let old = w[i]
                let new = value ? old | m : old & ~m
                delta += new.nonzeroBitCount - old.nonzeroBitCount
                w[i] = new
            }
        }
        chunks[ci].count = UInt32(Int(chunks[ci].count) + delta)
        normalise(ci)
    }

    /// Number of set blocks in `range` (clamped). O(chunks) plus O(words) of mixed chunks.
    public func countSet(in range: Range<UInt64>) -> UInt64 {
        let r = clamped(range)
        var total: UInt64 = 0
        var p = r.lowerBound
        while p < r.upperBound {
            let ci = Int(p >> BlockBitmap.chunkShift)
            let start = UInt64(ci) << BlockBitmap.chunkShift
            let end = Swift.min(start + UInt64(bits(ofChunk: ci)), r.upperBound)
            let lo = Int(p - start), hi = Int(end - start)
            if chunks[ci].isUniform {
                if chunks[ci].count != 0 { total += end - p }
            } else if lo == 0 && hi == bits(ofChunk: ci) {
                total += UInt64(chunks[ci].count)
            } else {
                chunks[ci].words.withUnsafeBufferPointer { w in
                    let first = lo >> 6, last = (hi - 1) >> 6
                    for i in first...last {
                        let m = BlockBitmap.mask(i == first ? lo & 63 : 0, i == last ? hi - (last << 6) : 64)
                        total += UInt64((w[i] & m).nonzeroBitCount)
                    }
                }
            }
            p = end
        }
        return total
    }

    /// Whether any block of `range` (clamped) is set.
    public func anySet(in range: Range<UInt64>) -> Bool {
        let r = clamped(range)
        return firstPosition(of: true, from: r.lowerBound, before: r.upperBound) != nil
    }

    /// Whether every block of `range` (clamped) is set; true for an empty range.
    public func allSet(in range: Range<UInt64>) -> Bool {
        let r = clamped(range)
        return firstPosition(of: false, from: r.lowerBound, before: r.upperBound) == nil
    }

    /// Next set block at or after `from`, or nil.
    public func nextSet(from: UInt64) -> UInt64? {
        firstPosition(of: true, from: from, before: blockCount)
    }

    /// Next clear block at or after `from` (below blockCount), or nil.
    public func nextClear(from: UInt64) -> UInt64? {
        firstPosition(of: false, from: from, before: blockCount)
    }

    /// First block p with from <= p < limit whose bit equals `value`, or nil.
    /// `limit` must be <= blockCount. Uniform chunks are skipped in O(1); mixed chunks
    /// are scanned a word at a time with trailingZeroBitCount.
    func firstPosition(of value: Bool, from: UInt64, before limit: UInt64) -> UInt64? {
        var p = from
        while p < limit {
            let ci = Int(p >> BlockBitmap.chunkShift)
            let start = UInt64(ci) << BlockBitmap.chunkShift
            if chunks[ci].isUniform {
                if (chunks[ci].count != 0) == value { return p }
                p = start + UInt64(bits(ofChunk: ci))
                continue
            }
            let found: UInt64? = chunks[ci].words.withUnsafeBufferPointer { w in
                var i = Int((p - start) >> 6)
                var x = (value ? w[i] : ~w[i]) & (~0 << (p & 63))
                while true {
                    if x != 0 {
                        // Clear tail bits read as set for value == false; such a hit lies
                        // at or past blockCount >= limit and is rejected by the caller.
                        return start + UInt64(i << 6 + x.trailingZeroBitCount)
                    }
                    i += 1
                    if i == w.count || start + UInt64(i << 6) >= limit { return nil }
                    x = value ? w[i] : ~w[i]
                }
            }
            if let f = found { return f < limit ? f : nil }
            p = start + UInt64(bits(ofChunk: ci))
        }
        return nil
    }

    // MARK: Runs

    /// Maximal runs of set blocks intersecting `range`, clipped to it, in ascending order.
    /// O(chunks in range + words of the mixed chunks visited + runs).
    public func runs(in range: Range<UInt64>) -> [Range<UInt64>] {
        Array(runSequence(in: range, set: true))
    }

    /// Maximal runs of clear blocks (holes) in `range`, clipped to it and to blockCount.
    public func holes(in range: Range<UInt64>) -> [Range<UInt64>] {
        Array(runSequence(in: range, set: false))
    }

    /// Calls `body` for each maximal run of set blocks in `range`, ascending.
    public func forEachRun(in range: Range<UInt64>, _ body: (Range<UInt64>) throws -> Void) rethrows {
        try forEachRun(in: range, set: true, body)
    }

    /// Calls `body` for each maximal run of blocks whose state is `set` (true: set blocks,
    /// false: holes) in `range` clipped to 0..<blockCount, ascending.
    public func forEachRun(in range: Range<UInt64>, set: Bool,
                           _ body: (Range<UInt64>) throws -> Void) rethrows {
        var it = RunIterator(bitmap: self, range: range, value: set)
        while let r = it.next() { try body(r) }
    }

    /// Lazy sequence of the maximal runs of blocks whose state is `set` in `range`.
    public func runSequence(in range: Range<UInt64>, set: Bool = true) -> RunSequence {
        RunSequence(bitmap: self, range: range, value: set)
    }

    public struct RunSequence: Sequence, Sendable {
        let bitmap: BlockBitmap
        let range: Range<UInt64>
        let value: Bool

        public func makeIterator() -> RunIterator {
            RunIterator(bitmap: bitmap, range: range, value: value)
        }
    }

    public struct RunIterator: IteratorProtocol, Sendable {
        let bitmap: BlockBitmap
        var position: UInt64
        let end: UInt64
        let value: Bool

        init(bitmap: BlockBitmap, range: Range<UInt64>, value: Bool) {
            let r = bitmap.clamped(range)
            self.bitmap = bitmap
            self.position = r.lowerBound
            self.end = r.upperBound
            self.value = value
        }

        public mutating func next() -> Range<UInt64>? {
            guard position < end,
                  let start = bitmap.firstPosition(of: value, from: position, before: end)
            else {
                position = end
                return nil
            }
            let stop = bitmap.firstPosition(of: !value, from: start, before: end) ?? end
            position = stop
            return start..<stop
        }
    }

    // MARK: Set algebra (same blockCount)

    /// Keep only the blocks also set in `other`.
    public mutating func formIntersection(_ other: BlockBitmap) {
        precondition(blockCount == other.blockCount, "BlockBitmap.formIntersection: blockCount mismatch")
        for ci in chunks.indices {
            let o = other.chunks[ci]
            if o.isUniform {
                if o.count == 0 { chunks[ci] = .empty }  // else full: no change
                continue
            }
            if chunks[ci].isUniform {
                if chunks[ci].count != 0 { chunks[ci] = o }  // full ∩ x = x (storage shared)
                continue
            }
            combine(ci, o.words) { $0 & $1 }
        }
    }

    /// Remove every block set in `other`.
    public mutating func subtract(_ other: BlockBitmap) {
        precondition(blockCount == other.blockCount, "BlockBitmap.subtract: blockCount mismatch")
        for ci in chunks.indices {
            let o = other.chunks[ci]
            if o.isUniform {
                if o.count != 0 { chunks[ci] = .empty }  // else empty: no change
                continue
            }
            if chunks[ci].isUniform {
                guard chunks[ci].count != 0 else { continue }
                // full − mixed = complement of the other chunk, tail bits kept clear.
                let bits = bits(ofChunk: ci)
                var w = o.words
                w.withUnsafeMutableBufferPointer { b in
                    for i in b.indices { b[i] = ~b[i] }
                    if bits & 63 != 0 { b[b.count - 1] &= BlockBitmap.mask(0, bits & 63) }
                }
                chunks[ci] = Chunk(words: w, count: UInt32(bits) - o.count)
                continue
            }
            combine(ci, o.words) { $0 & ~$1 }
        }
    }

    /// Add every block set in `other`.
    public mutating func formUnion(_ other: BlockBitmap) {
        precondition(blockCount == other.blockCount, "BlockBitmap.formUnion: blockCount mismatch")
        for ci in chunks.indices {
            let o = other.chunks[ci]
            if o.isUniform {
                if o.count != 0 { chunks[ci] = o }  // else empty: no change
                continue
            }
            if chunks[ci].isUniform {
                if chunks[ci].count == 0 { chunks[ci] = o }  // empty ∪ x = x (storage shared)
                continue
            }
            combine(ci, o.words) { $0 | $1 }
        }
    }

    /// words[ci] = op(words[ci], other) for a mixed chunk, then recount and normalise.
    mutating func combine(_ ci: Int, _ other: [UInt64], _ op: (UInt64, UInt64) -> UInt64) {
        var total = 0
        other.withUnsafeBufferPointer { b in
            chunks[ci].words.withUnsafeMutableBufferPointer { a in
                precondition(a.count == b.count)
                for i in a.indices {
                    let v = op(a[i], b[i])
                    a[i] = v
                    total += v.nonzeroBitCount
                }
            }
        }
        chunks[ci].count = UInt32(total)
        normalise(ci)
    }

    // MARK: Diagnostics

    /// nil when every internal invariant holds, else a description of the first violation.
    /// O(bits of the mixed chunks); meant for tests and debug assertions.
    public func validate() -> String? {
        let expected = Int((blockCount + BlockBitmap.blocksPerChunk - 1) >> BlockBitmap.chunkShift)
        if chunks.count != expected { return "chunk count \(chunks.count), expected \(expected)" }
        for ci in chunks.indices {
            let c = chunks[ci], bits = bits(ofChunk: ci)
            if c.isUniform {
                if c.count != 0 && Int(c.count) != bits {
                    return "chunk \(ci): uniform with count \(c.count) of \(bits)"
                }
                continue
            }
            if c.words.count != (bits + 63) >> 6 {
                return "chunk \(ci): \(c.words.count) words for \(bits) bits"
            }
            let pop = c.words.reduce(0) { $0 + $1.nonzeroBitCount }
            if pop != Int(c.count) { return "chunk \(ci): count \(c.count), popcount \(pop)" }
            if pop == 0 || pop == bits { return "chunk \(ci): mixed but uniform (\(pop) of \(bits))" }
            if bits & 63 != 0 && c.words[c.words.count - 1] & ~BlockBitmap.mask(0, bits & 63) != 0 {
                return "chunk \(ci): bits set past blockCount"
            }
        }
        return nil
    }
}

extension BlockBitmap: CustomStringConvertible {
    public var description: String {
        "BlockBitmap(blockCount: \(blockCount), set: \(count), mixedChunks: \(mixedChunkCount))"
    }
}
