import Testing
@testable import HotCore

// BlockMap (open addressing, backward-shift deletion) against Swift's
// Dictionary as the model, under random churn that keeps long probe runs
// forming and breaking: the deletions are what an off-by-one in the shift
// condition would corrupt (a later key becomes unreachable).

@Suite("BlockMap")
struct BlockMapTests {
    @Test("Random inserts, updates and removals match a Dictionary", arguments: [1 as UInt64, 2, 3, 4])
    func matchesModel(seed: UInt64) {
        var rng = TestRNG(seed: seed)
        var map = BlockMap()
        var model: [UInt64: UInt64] = [:]
        // Keys from a small range (dense, collisions and long runs) and
        // from the whole space, including 0 and the largest valid block.
        func key() -> UInt64 {
            switch rng.next() % 8 {
            case 0: return 0
            case 1: return UInt64.max - 1
            case 2, 3: return rng.next()
            default: return rng.next() % 3000
            }
        }
        for step in 0..<60_000 {
            let k = key()
            switch rng.next() % 10 {
            case 0..<5:
                let v = rng.next()
                map.insert(k, v)
                model[k] = v
            case 5..<9:
                #expect(map.removeValue(forKey: k) == model.removeValue(forKey: k), "step \(step)")
            default:
                #expect(map[k] == model[k], "step \(step)")
            }
            if step % 5000 == 0 {
                #expect(map.count == model.count)
                for (mk, mv) in model { #expect(map[mk] == mv, "step \(step) key \(mk)") }
            }
        }
        #expect(map.count == model.count)
        var seen = 0
        map.forEach { k, v in
            seen += 1
            #expect(model[k] == v)
        }
        #expect(seen == model.count)
    }

    @Test("Grows past 3/4 load and keeps every entry; removeAll empties it")
    func growth() {
        var map = BlockMap()
        let start = map.capacity
        for b in 0..<UInt64(10_000) { map.insert(b * 4096, b) }
        #expect(map.capacity > start)
        #expect(map.count * 4 <= map.capacity * 3)
        for b in 0..<UInt64(10_000) { #expect(map[b * 4096] == b) }
        #expect(map[1] == nil)
        for b in stride(from: UInt64(0), to: 10_000, by: 2) { map.removeValue(forKey: b * 4096) }
        #expect(map.count == 5000)
        for b in 0..<UInt64(10_000) { #expect(map[b * 4096] == (b % 2 == 1 ? b : nil)) }
        let cap = map.capacity
        map.removeAll(keepingCapacity: true)
        #expect(map.isEmpty && map.capacity == cap && map[4096] == nil)
        map.removeAll()
        #expect(map.isEmpty && map.capacity < cap)
    }

    @Test("BufferIndex packs memory slots and spill locations apart")
    func bufferIndex() {
        var idx = BufferIndex()
        idx[7] = SnapshotEngine.BufferEntry(inMemory: true, location: 5)
        idx[8] = SnapshotEngine.BufferEntry(inMemory: false, location: 5)
        idx[9] = SnapshotEngine.BufferEntry(inMemory: false, location: (3 << 32) | 0xffff_ffff)
        #expect(idx[7]?.inMemory == true && idx[7]?.location == 5)
        #expect(idx[8]?.inMemory == false && idx[8]?.location == 5)
        #expect(idx[9]?.location == (3 << 32) | 0xffff_ffff)
        #expect(idx.removeValue(forKey: 7)?.inMemory == true)
        #expect(idx[7] == nil && idx.count == 2)
    }

    @Test("BusyMarks keep negative (exclusive) and shared counts")
    func busyMarks() {
        var busy = BusyMarks()
        #expect(busy.isEmpty)
        busy[3] = -1
        busy[4] = 2
        #expect(busy[3] == -1 && busy[4] == 2 && busy[5] == nil)
        busy.removeValue(forKey: 3)
        busy[4] = nil
        #expect(busy.isEmpty)
    }
}
