import Testing
import HotCore

// Tests of BlockBitmap, the chunked sparse protection map.
//
// Worst-case memory, fully mixed (every 2^15-block chunk holds a mixture), per TiB of 4 KiB
// blocks = 2^28 blocks = 2^13 chunks:
//   bits:        2^28 / 8                          = 33,554,432 B (32 MiB)
//   chunk table: 2^13 * 16 B, page-rounded         =    135,152 B
//   word arrays: 2^13 * (32 B header + 8 B malloc) =    327,680 B
//   total                                          = 34,017,264 B ≈ 32.44 MiB per TiB
// (checked by "Worst case" below: < 32.5 MiB). Typical, uniform regions: ≈ 132 KiB per TiB.
//
// The model-based test runs every operation on the bitmap and on an independent model:
// a sorted list of disjoint, non-adjacent intervals (cheap for blockCounts of 100k+ blocks).
// For small blockCounts a naive [Bool] model runs alongside as well, checking the interval
// model and the bitmap block by block.

// MARK: - Helpers (file-private so they cannot clash with other test files)

private let chunk = BlockBitmap.blocksPerChunk

/// An interesting block position for a bitmap of `bc` blocks: often on or next to a chunk
/// or word boundary, sometimes at or past the end, otherwise uniform.
private func randomPoint(_ rng: inout TestRNG, _ bc: UInt64) -> UInt64 {
    func near(_ x: UInt64) -> UInt64 {
        switch rng.next() % 3 {
        case 0: return x == 0 ? 0 : x - 1
        case 1: return x
        default: return x + 1
        }
    }
    switch rng.next() % 10 {
    case 0, 1, 2, 3: return rng.upTo(bc)
    case 4, 5: return near(rng.upTo((bc + chunk - 1) / chunk) * chunk)  // chunk boundary ±1
    case 6: return near(rng.upTo(bc / 64 + 1) * 64)                     // word boundary ±1
    case 7: return near(bc)                                              // the end ±1
    case 8: return rng.upTo(3)                                           // the start
    default: return rng.upTo(bc + 100)                                   // possibly past the end
    }
}

private func randomRange(_ rng: inout TestRNG, _ bc: UInt64) -> Range<UInt64> {
    let a = randomPoint(&rng, bc), b = randomPoint(&rng, bc)
    switch rng.next() % 8 {
    case 0: return 0..<UInt64.max                   // everything (clamping)
    case 1: return a..<a                            // empty range
    case 2: return a..<(a + rng.upTo(70))           // short, around a word
    default: return min(a, b)..<max(a, b)           // may span many chunks
    }
}

/// Reference model: sorted, disjoint, non-adjacent, non-empty intervals inside 0..<blockCount.
private struct IntervalModel {
    let blockCount: UInt64
    var intervals: [Range<UInt64>] = []

    init(blockCount: UInt64, filled: Bool = false) {
        self.blockCount = blockCount
        if filled && blockCount > 0 { intervals = [0..<blockCount] }
    }

    func clamp(_ r: Range<UInt64>) -> Range<UInt64> {
        min(r.lowerBound, blockCount)..<min(r.upperBound, blockCount)
    }

    mutating func insert(_ range: Range<UInt64>) {
        let r = clamp(range)
        guard !r.isEmpty else { return }
        var lo = r.lowerBound, hi = r.upperBound
        var out: [Range<UInt64>] = []
        var placed = false
        for x in intervals {
            if x.upperBound < lo {
                out.append(x)
            } else if x.lowerBound > hi {
                if !placed { out.append(lo..<hi); placed = true }
                out.append(x)
            } else {  // overlapping or touching: merge
                lo = min(lo, x.lowerBound)
                hi = max(hi, x.upperBound)
            }
        }
        if !placed { out.append(lo..<hi) }
        intervals = out
    }

    mutating func remove(_ range: Range<UInt64>) {
        let r = clamp(range)
        guard !r.isEmpty else { return }
        var out: [Range<UInt64>] = []
        for x in intervals {
            if x.upperBound <= r.lowerBound || x.lowerBound >= r.upperBound {
                out.append(x)
                continue
            }
            if x.lowerBound < r.lowerBound { out.append(x.lowerBound..<r.lowerBound) }
            if x.upperBound > r.upperBound { out.append(r.upperBound..<x.upperBound) }
        }
        intervals = out
    }

    var count: UInt64 { intervals.reduce(0) { $0 + UInt64($1.count) } }
    func contains(_ b: UInt64) -> Bool { intervals.contains { $0.contains(b) } }

    func runs(in range: Range<UInt64>) -> [Range<UInt64>] {
        let r = clamp(range)
        return intervals.compactMap { x in
            let c = x.clamped(to: r)
            return c.isEmpty ? nil : c
        }
    }

    func holes(in range: Range<UInt64>) -> [Range<UInt64>] {
        let r = clamp(range)
        var out: [Range<UInt64>] = []
        var p = r.lowerBound
        for x in intervals {
            if x.upperBound <= p { continue }
            if x.lowerBound >= r.upperBound { break }
            if x.lowerBound > p { out.append(p..<x.lowerBound) }
            p = max(p, x.upperBound)
        }
        if p < r.upperBound { out.append(p..<r.upperBound) }
        return out
    }

    func countSet(in range: Range<UInt64>) -> UInt64 {
        runs(in: range).reduce(0) { $0 + UInt64($1.count) }
    }

    func nextSet(from: UInt64) -> UInt64? {
        for x in intervals where x.upperBound > from { return max(x.lowerBound, from) }
        return nil
    }

    mutating func intersect(_ o: IntervalModel) { for h in o.holes(in: 0..<blockCount) { remove(h) } }
    mutating func subtract(_ o: IntervalModel) { for x in o.intervals { remove(x) } }
    mutating func union(_ o: IntervalModel) { for x in o.intervals { insert(x) } }

    /// A bitmap built from scratch with the same content.
    func bitmap() -> BlockBitmap {
        var b = BlockBitmap(blockCount: blockCount)
        for x in intervals { b.insert(range: x) }
        return b
    }
}

/// Runs of `value` in a [Bool], computed the obvious way.
private func naiveRuns(_ bits: [Bool], _ value: Bool) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    var start: Int? = nil
    for i in 0...bits.count {
        let v = i < bits.count && bits[i] == value
        if v, start == nil { start = i }
        if !v, let s = start { out.append(UInt64(s)..<UInt64(i)); start = nil }
    }
    return out
}

private func holesViaForEach(_ b: BlockBitmap, _ r: Range<UInt64>) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    b.forEachRun(in: r, set: false) { out.append($0) }
    return out
}

private func setRunsViaForEach(_ b: BlockBitmap, _ r: Range<UInt64>) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    b.forEachRun(in: r) { out.append($0) }
    return out
}

/// A random second operand for intersection / subtraction / union, with its model.
private func randomOther(_ rng: inout TestRNG, _ bc: UInt64) -> (BlockBitmap, IntervalModel) {
    let filled = rng.next() % 2 == 0
    var b = BlockBitmap(blockCount: bc, filled: filled)
    var m = IntervalModel(blockCount: bc, filled: filled)
    for _ in 0..<(1 + rng.next() % 6) {
        let r = randomRange(&rng, bc)
        switch rng.next() % 4 {
        case 0: b.insert(range: r); m.insert(r)
        case 1: b.remove(range: r); m.remove(r)
        case 2 where bc > 0: let p = rng.upTo(bc - 1); b.insert(p); m.insert(p..<p + 1)
        default: if bc > 0 { let p = rng.upTo(bc - 1); b.remove(p); m.remove(p..<p + 1) }
        }
    }
    return (b, m)
}

// MARK: - Model-based property test

@Suite("BlockBitmap")
struct BlockBitmapTests {

    @Test("5000 random operations agree with the model", arguments: [
        UInt64(1),          // a single block: one partial chunk of one bit
        63,                 // one partial word
        64,                 // exactly one word
        65,                 // one word and one bit
        32767,              // one chunk minus one block
        32768,              // exactly one chunk
        32769,              // one chunk and one block
        100_000,            // several chunks, last one partial, not a multiple of 64
        3 * 32768 + 5,      // three whole chunks and a 5-block tail
    ])
    func modelBased(blockCount bc: UInt64) {
        var rng = TestRNG(seed: 0x5EED_0000 ^ bc)
        var bitmap = BlockBitmap(blockCount: bc)
        var model = IntervalModel(blockCount: bc)
        let naive = bc <= 1024
        var bools = [Bool](repeating: false, count: naive ? Int(bc) : 0)
        func boolsAssign(_ r: Range<UInt64>, _ v: Bool) {
            guard naive else { return }
            let c = model.clamp(r)
            for i in c { bools[Int(i)] = v }
        }

        for step in 0..<5000 {
            let op = rng.next() % 100
            var what = ""
            switch op {
            case 0..<20 where bc > 0:
                let p = rng.upTo(bc - 1)
                what = "insert(\(p))"
                bitmap.insert(p); model.insert(p..<p + 1); boolsAssign(p..<p + 1, true)
            case 20..<40 where bc > 0:
                let p = rng.upTo(bc - 1)
                what = "remove(\(p))"
                bitmap.remove(p); model.remove(p..<p + 1); boolsAssign(p..<p + 1, false)
            case 40..<60:
                let r = randomRange(&rng, bc)
                what = "insert(range: \(r))"
                bitmap.insert(range: r); model.insert(r); boolsAssign(r, true)
            case 60..<80:
                let r = randomRange(&rng, bc)
                what = "remove(range: \(r))"
                bitmap.remove(range: r); model.remove(r); boolsAssign(r, false)
            case 80..<84:
                what = "fill()"
                bitmap.fill(); model = IntervalModel(blockCount: bc, filled: true)
                boolsAssign(0..<bc, true)
            case 84..<88:
                what = "removeAll()"
                bitmap.removeAll(); model = IntervalModel(blockCount: bc)
                boolsAssign(0..<bc, false)
            case 88..<92:
                let (ob, om) = randomOther(&rng, bc)
                what = "formIntersection(\(om.intervals))"
                bitmap.formIntersection(ob); model.intersect(om)
                if naive { for i in bools.indices where !om.contains(UInt64(i)) { bools[i] = false } }
            case 92..<96:
                let (ob, om) = randomOther(&rng, bc)
                what = "subtract(\(om.intervals))"
                bitmap.subtract(ob); model.subtract(om)
                if naive { for i in bools.indices where om.contains(UInt64(i)) { bools[i] = false } }
            default:
                let (ob, om) = randomOther(&rng, bc)
                what = "formUnion(\(om.intervals))"
                bitmap.formUnion(ob); model.union(om)
                if naive { for i in bools.indices where om.contains(UInt64(i)) { bools[i] = true } }
            }

            let ctx = Comment(rawValue: "blockCount \(bc), step \(step), after \(what)")
            let invariant = bitmap.validate()
            #expect(invariant == nil, ctx)
            #expect(bitmap.count == model.count, ctx)
            #expect(bitmap.isEmpty == (model.count == 0), ctx)
            for _ in 0..<6 {
                let p = randomPoint(&rng, bc)
                #expect(bitmap.contains(p) == model.contains(p), "contains(\(p)); \(ctx)")
            }
            let r1 = randomRange(&rng, bc)
            #expect(bitmap.runs(in: r1) == model.runs(in: r1), "runs(in: \(r1)); \(ctx)")
            let r2 = randomRange(&rng, bc)
            #expect(holesViaForEach(bitmap, r2) == model.holes(in: r2), "holes(in: \(r2)); \(ctx)")
            let r3 = randomRange(&rng, bc)
            #expect(bitmap.countSet(in: r3) == model.countSet(in: r3), "countSet(in: \(r3)); \(ctx)")
            #expect(bitmap.anySet(in: r3) == (model.countSet(in: r3) > 0), "anySet(in: \(r3)); \(ctx)")
            for _ in 0..<2 {
                let p = randomPoint(&rng, bc)
                #expect(bitmap.nextSet(from: p) == model.nextSet(from: p), "nextSet(from: \(p)); \(ctx)")
            }

            if naive {
                // Block by block against the [Bool] model (also validates the interval model).
                var same = true
                for i in 0..<Int(bc) where bitmap.contains(UInt64(i)) != bools[i] { same = false; break }
                #expect(same, "contains differs from [Bool] model; \(ctx)")
                #expect(model.intervals == naiveRuns(bools, true), "interval model broken; \(ctx)")
                #expect(bitmap.holes(in: 0..<bc) == naiveRuns(bools, false), ctx)
            }

            if step % 250 == 249 || step == 4999 {
                // Whole-range comparison, and canonical form: equal to a bitmap rebuilt from the model.
                #expect(bitmap.runs(in: 0..<UInt64.max) == model.intervals, ctx)
                #expect(setRunsViaForEach(bitmap, 0..<bc) == model.intervals, ctx)
                #expect(bitmap.holes(in: 0..<bc) == model.holes(in: 0..<bc), ctx)
                #expect(bitmap == model.bitmap(), ctx)
            }
        }
    }

    // MARK: - Memory

    /// Bounds of `memoryBytes` for 1 TiB (2^28 blocks of 4 KiB = 2^13 chunks), which reports
    /// allocated capacities (so it includes malloc's rounding of each allocation):
    /// the chunk table is 32 + 2^13 * 16 = 131,104 B, rounded up to whole pages by malloc
    /// (135,152 B measured): bound 136 KiB. Each mixed chunk adds 4,096 B of bits plus a
    /// 32 B array header and up to 16 B of rounding (4,136 B measured): bound 4,144 B.
    private static let tib: UInt64 = 1 << 28
    private static let tableBytes = 136 * 1024
    private static let mixedChunkBytes = 4096 + 32 + 16

    @Test("1 TiB filled, then 4000 scattered removals: memory stays under 17 MiB")
    func memoryScattered() {
        let tib = Self.tib
        var b = BlockBitmap(blockCount: tib, filled: true)
        // Uniform: only the chunk table, about 128 KiB per TiB.
        #expect(b.memoryBytes <= Self.tableBytes)
        var rng = TestRNG(seed: 42)
        var removed = Set<UInt64>()
        for _ in 0..<4000 {
            let x = rng.upTo(tib - 1)
            b.remove(x)
            removed.insert(x)
        }
        let touched = Set(removed.map { $0 / chunk }).count
        #expect(b.count == tib - UInt64(removed.count))
        #expect(b.mixedChunkCount == touched)
        // Bound: table + one 4 KiB word array per touched chunk (at most 4000 chunks),
        // i.e. <= 139,264 + 4000 * 4,144 = 16,715,264 B < 17 MiB.
        #expect(b.memoryBytes <= Self.tableBytes + touched * Self.mixedChunkBytes)
        #expect(b.memoryBytes < 17 * 1024 * 1024)
        // Putting the blocks back returns to the canonical, storage-free form.
        for x in removed { b.insert(x) }
        #expect(b == BlockBitmap(blockCount: tib, filled: true))
        #expect(b.memoryBytes <= Self.tableBytes)
    }

    @Test("1 TiB filled, then 4000 clustered removals: memory stays under 200 KiB")
    func memoryClustered() {
        var b = BlockBitmap(blockCount: Self.tib, filled: true)
        var rng = TestRNG(seed: 7)
        // Writes land in 10 hot chunks of the device.
        let hot = (0..<10).map { _ in rng.upTo(Self.tib / chunk - 1) * chunk }
        for _ in 0..<4000 {
            b.remove(hot[Int(rng.next() % 10)] + rng.upTo(chunk - 1))
        }
        #expect(b.mixedChunkCount <= 10)
        #expect(b.memoryBytes <= Self.tableBytes + 10 * Self.mixedChunkBytes)  // 180,704 B
        #expect(b.memoryBytes < 200 * 1024)
    }

    @Test("Worst case: every chunk of 1 TiB mixed costs under 32.5 MiB")
    func memoryWorstCase() {
        var b = BlockBitmap(blockCount: Self.tib, filled: true)
        // One removal per chunk makes every chunk mixed: 1 bit per block plus headers.
        for ci in 0..<(Self.tib / chunk) { b.remove(ci * chunk + ci % chunk) }
        #expect(b.mixedChunkCount == 8192)
        // 32 MiB of bits + 8192 * (16 B entry + ~40 B array header and rounding) ≈ 32.44 MiB.
        #expect(b.memoryBytes >= 32 * 1024 * 1024 + 8192 * (16 + 32))
        #expect(b.memoryBytes < 32 * 1024 * 1024 + 512 * 1024)  // < 32.5 MiB per TiB
        #expect(b.count == Self.tib - 8192)
    }

    // MARK: - Edge cases

    @Test("Edge cases at the start and end", arguments: [
        UInt64(0),          // no blocks at all: no chunks
        1,                  // one block
        2,                  // two blocks
        63,                 // tail inside the first word
        64,                 // exactly one word
        65,                 // one bit into the second word
        127,                // one bit short of two words
        4095,               // partial chunk, partial last word
        32767,              // one chunk minus one
        32768,              // exactly one chunk (no partial chunk)
        32769,              // a one-bit last chunk
        65537,              // two chunks and a one-bit chunk
        3 * 32768 + 5,      // three chunks and a 5-bit chunk
    ])
    func edges(blockCount bc: UInt64) {
        let everything: Range<UInt64> = 0..<UInt64.max

        // Empty bitmap.
        var e = BlockBitmap(blockCount: bc)
        #expect(e.count == 0 && e.isEmpty)
        #expect(e.runs(in: everything) == [])
        #expect(e.holes(in: everything) == (bc == 0 ? [] : [0..<bc]))
        #expect(e.nextSet(from: 0) == nil)
        #expect(!e.anySet(in: everything) && e.countSet(in: everything) == 0)
        #expect(!e.contains(bc) && !e.contains(.max))
        e.insert(range: bc..<bc + 1000)              // entirely past the end: no-op
        e.insert(range: UInt64.max - 1..<UInt64.max) // far past the end: no-op
        #expect(e == BlockBitmap(blockCount: bc))

        // Full bitmap: tail bits past blockCount are never counted or reported.
        let f = BlockBitmap(blockCount: bc, filled: true)
        #expect(f.validate() == nil)
        #expect(f.count == bc)
        #expect(f.isEmpty == (bc == 0))
        #expect(f.runs(in: everything) == (bc == 0 ? [] : [0..<bc]))
        #expect(f.holes(in: everything) == [])
        #expect(f.countSet(in: everything) == bc)
        #expect(!f.contains(bc))
        #expect(f.nextSet(from: bc) == nil)
        var g = BlockBitmap(blockCount: bc)
        g.insert(range: everything)
        #expect(g == f)
        g.remove(range: bc..<UInt64.max)             // past the end: no-op
        #expect(g == f)

        guard bc > 0 else {
            // No blocks: fill and removeAll are no-ops, memory is just the empty table.
            var z = BlockBitmap(blockCount: 0)
            z.fill()
            #expect(z.count == 0 && z.isEmpty && z.chunkCount == 0)
            return
        }
        #expect(f.contains(bc - 1))

        // A run that ends exactly at blockCount, inserted with an over-long range.
        let k = min(bc, 5)
        var t = BlockBitmap(blockCount: bc)
        t.insert(range: bc - k..<bc + 1000)
        #expect(t.validate() == nil)
        #expect(t.count == k)
        #expect(t.runs(in: everything) == [bc - k..<bc])
        #expect(holesViaForEach(t, everything) == (bc == k ? [] : [0..<bc - k]))
        #expect(t.nextSet(from: 0) == bc - k)
        #expect(t.nextSet(from: bc - 1) == bc - 1)
        #expect(t.nextSet(from: bc) == nil)
        #expect(t.countSet(in: bc - 1..<bc + 50) == 1)

        // full − {last block}: the complement must not set the tail bits.
        var lastOnly = BlockBitmap(blockCount: bc)
        lastOnly.insert(bc - 1)
        var s = f
        s.subtract(lastOnly)
        #expect(s.validate() == nil)
        #expect(s.count == bc - 1)
        #expect(s.holes(in: everything) == [bc - 1..<bc])
        #expect(s.runs(in: everything) == (bc == 1 ? [] : [0..<bc - 1]))
        // full ∩ x == x; x ∪ complement == full; x − x == empty.
        var i = f
        i.formIntersection(lastOnly)
        #expect(i == lastOnly)
        s.formUnion(lastOnly)
        #expect(s == f)
        var x = lastOnly
        x.subtract(lastOnly)
        #expect(x == BlockBitmap(blockCount: bc))

        // Block-by-block insertion of the last chunk normalises to the same value as a range.
        let lastStart = (bc - 1) / chunk * chunk
        var bb = BlockBitmap(blockCount: bc)
        for b in lastStart..<bc { bb.insert(b) }
        var rr = BlockBitmap(blockCount: bc)
        rr.insert(range: lastStart..<bc)
        #expect(bb == rr)
        #expect(bb.mixedChunkCount == 0)
        #expect(bb.runs(in: everything) == [lastStart..<bc])

        // Insert then remove one block: back to the empty, storage-free form.
        var u = BlockBitmap(blockCount: bc)
        u.insert(bc / 2)
        u.remove(bc / 2)
        #expect(u == BlockBitmap(blockCount: bc))
        // No word array is left behind. (memoryBytes itself also counts the
        // chunk array's capacity, which malloc's rounding makes vary between
        // two equal arrays, so it is not compared exactly.)
        #expect(u.mixedChunkCount == 0)
        #expect(u.memoryBytes <= BlockBitmap(blockCount: bc).memoryBytes + 64)

        // Empty query ranges report nothing.
        #expect(f.runs(in: bc / 2..<bc / 2) == [])
        #expect(f.holes(in: bc / 2..<bc / 2) == [])
        #expect(!f.anySet(in: bc / 2..<bc / 2))
    }

    @Test("forEachRun rethrows and stops at the first error")
    func forEachRunRethrows() {
        struct Stop: Error {}
        var b = BlockBitmap(blockCount: 1000)
        b.insert(range: 10..<20)
        b.insert(range: 30..<40)
        var seen: [Range<UInt64>] = []
        #expect(throws: Stop.self) {
            try b.forEachRun(in: 0..<1000) { r in
                seen.append(r)
                throw Stop()
            }
        }
        #expect(seen == [10..<20])
    }

    // MARK: - Performance sanity (structure, not timing)

    @Test("Runs over uniform chunks are per chunk, not per bit", arguments: [
        UInt64(1) << 28,    // 1 TiB of 4 KiB blocks: 8,192 chunks, 2^28 bits
        UInt64(1) << 34,    // 64 TiB: 524,288 chunks, 2^34 bits (a per-bit walk would never finish)
    ])
    func uniformRuns(blockCount bc: UInt64) {
        var b = BlockBitmap(blockCount: bc)
        b.insert(range: 0..<bc)
        #expect(b.runs(in: 0..<bc) == [0..<bc])
        #expect(b.holes(in: 0..<bc) == [])
        #expect(b.count == bc && b.countSet(in: 0..<bc) == bc)
        #expect(b.nextSet(from: 12345) == 12345)
        #expect(b.memoryBytes <= 32 + Int(bc / chunk) * 16 + 8192)  // table only (+ malloc rounding)

        // One hole in the middle of the device: two runs, one mixed chunk scanned by words.
        let mid = bc / 2 + 777
        b.remove(mid)
        #expect(b.runs(in: 0..<bc) == [0..<mid, mid + 1..<bc])
        #expect(b.holes(in: 0..<UInt64.max) == [mid..<mid + 1])
        #expect(b.countSet(in: 0..<bc) == bc - 1)

        // Sparse the other way: empty device with one set block near the end.
        var s = BlockBitmap(blockCount: bc)
        s.insert(bc - 3)
        #expect(s.nextSet(from: 0) == bc - 3)
        #expect(s.runs(in: 0..<bc) == [bc - 3..<bc - 2])
        #expect(s.anySet(in: 0..<bc - 3) == false)
    }
}
