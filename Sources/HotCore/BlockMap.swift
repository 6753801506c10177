// BlockMap: a hash map from block number to a 64-bit value, for the
// engine's per-block tables that the write path touches for every copied
// block (where a buffered original lives; which blocks are busy).
//
// Open addressing with linear probing over one array of (key, value)
// pairs, so a lookup usually reads one cache line; keys are stored as
// block + 1, so 0 marks an empty slot. The hash is Fibonacci hashing (one
// multiply, the top bits): neighbouring blocks, the common case, spread
// over the table. Deletion shifts later members of the probe run back
// (no tombstones), so lookups never slow down as the map churns. The table
// doubles when it is 3/4 full and never shrinks except by `removeAll`.
//
// Memory: 16 bytes per slot, 21-43 bytes per entry depending on where the
// load sits between growths; Swift's Dictionary<UInt64, 16-byte value>
// costs ~40-80 and hashes each key with SipHash.

struct BlockMap {
    /// keys[2i] = block + 1 (0: empty), keys[2i + 1] = value.
    private var slots: [UInt64]
    private var shift: UInt64
    private(set) var count = 0

    init(minimumCapacity: Int = 0) {
        var bits: UInt64 = 4
        while (1 << bits) * 3 / 4 < minimumCapacity { bits += 1 }
        slots = Array(repeating: 0, count: 2 << bits)
        shift = 64 - bits
    }

    var isEmpty: Bool { count == 0 }
    var capacity: Int { slots.count / 2 }
    /// Bytes of the table (not counting the array header).
    var memoryBytes: Int { slots.count * 8 }

    @inline(__always) private var mask: Int { capacity - 1 }

    @inline(__always) private func home(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> shift)
    }

    /// The slot holding `block`, or nil.
    @inline(__always) private func find(_ block: UInt64) -> Int? {
        let key = block &+ 1
        var i = home(key)
        return slots.withUnsafeBufferPointer { s in
            while true {
                let k = s[2 &* i]
                if k == key { return i }
                if k == 0 { return nil }
                i = (i &+ 1) & mask
            }
        }
    }

    subscript(block: UInt64) -> UInt64? {
        get {
            guard let i = find(block) else { return nil }
            return slots[2 &* i &+ 1]
        }
        set {
            if let v = newValue { insert(block, v) } else { removeValue(forKey: block) }
        }
    }

    func contains(_ block: UInt64) -> Bool { find(block) != nil }

    /// Sets the value of `block`, adding it if absent.
    mutating func insert(_ block: UInt64, _ value: UInt64) {
        precondition(block != UInt64.max, "block number out of range")
        if (count + 1) * 4 > capacity * 3 { grow() }
        let key = block &+ 1
        let m = mask
        var i = home(key)
        let added = slots.withUnsafeMutableBufferPointer { s -> Bool in
            while true {
                let k = s[2 &* i]
                if k == key { s[2 &* i &+ 1] = value; return false }
                if k == 0 {
                    s[2 &* i] = key
                    s[2 &* i &+ 1] = value
                    return true
                }
                i = (i &+ 1) & m
            }
        }
        if added { count += 1 }
    }

    @discardableResult
    mutating func removeValue(forKey block: UInt64) -> UInt64? {
        guard var hole = find(block) else { return nil }
        let m = mask
        let sh = shift
        let old = slots.withUnsafeMutableBufferPointer { s -> UInt64 in
            let old = s[2 &* hole &+ 1]
            // Backward-shift: move each later member of the run whose home
            // is not strictly between the hole and itself into the hole.
            var j = hole
            while true {
                j = (j &+ 1) & m
                let k = s[2 &* j]
                if k == 0 { break }
                let h = Int(truncatingIfNeeded: (k &* 0x9E37_79B9_7F4A_7C15) >> sh)
                // Distance from home to j and from home to the hole, cyclically.
                if (j &- h) & m >= (j &- hole) & m {
                    s[2 &* hole] = k
                    s[2 &* hole &+ 1] = s[2 &* j &+ 1]
                    hole = j
                }
            }
            s[2 &* hole] = 0
            s[2 &* hole &+ 1] = 0
            return old
        }
        count -= 1
        return old
    }

    mutating func removeAll(keepingCapacity keep: Bool = false) {
        if keep {
            slots.withUnsafeMutableBufferPointer { s in
                for i in s.indices { s[i] = 0 }
            }
        } else {
            self = BlockMap()
        }
        count = 0
    }

    /// Calls `body` for every (block, value), in no particular order.
    func forEach(_ body: (UInt64, UInt64) throws -> Void) rethrows {
        for i in 0..<capacity where slots[2 * i] != 0 {
            try body(slots[2 * i] &- 1, slots[2 * i + 1])
        }
    }

    private mutating func grow() {
        var bigger = BlockMap()
        let bits = UInt64(capacity.trailingZeroBitCount) + 1
        bigger.slots = Array(repeating: 0, count: 2 << bits)
        bigger.shift = 64 - bits
        forEach { b, v in bigger.insert(b, v) }
        self = bigger
    }
}

/// Where each buffered original is (memory slot or spill location), keyed
/// by block: a BlockMap with the entry packed into its value (bit 63: in
/// memory; the rest: the location).
struct BufferIndex {
    private var map: BlockMap
    init(minimumCapacity: Int = 0) { map = BlockMap(minimumCapacity: minimumCapacity) }
    private static let memoryBit: UInt64 = 1 << 63

    subscript(block: UInt64) -> SnapshotEngine.BufferEntry? {
        get {
            guard let v = map[block] else { return nil }
            return SnapshotEngine.BufferEntry(inMemory: v & BufferIndex.memoryBit != 0, location: v & ~BufferIndex.memoryBit)
        }
        set {
            guard let e = newValue else { map.removeValue(forKey: block); return }
            precondition(e.location & BufferIndex.memoryBit == 0, "buffer location out of range")
            map.insert(block, e.location | (e.inMemory ? BufferIndex.memoryBit : 0))
        }
    }

    @discardableResult
    mutating func removeValue(forKey block: UInt64) -> SnapshotEngine.BufferEntry? {
        guard let v = map.removeValue(forKey: block) else { return nil }
        return SnapshotEngine.BufferEntry(inMemory: v & BufferIndex.memoryBit != 0, location: v & ~BufferIndex.memoryBit)
    }

    var count: Int { map.count }
    var memoryBytes: Int { map.memoryBytes }
}

/// Busy marks by block: -1 exclusive, n > 0 shared by n readers.
struct BusyMarks {
    private var map = BlockMap(minimumCapacity: 1024)
    var isEmpty: Bool { map.isEmpty }

    subscript(block: UInt64) -> Int32? {
        get { map[block].map { Int32(truncatingIfNeeded: Int64(bitPattern: $0)) } }
        set {
            guard let v = newValue else { map.removeValue(forKey: block); return }
            map.insert(block, UInt64(bitPattern: Int64(v)))
        }
    }

    mutating func removeValue(forKey block: UInt64) { map.removeValue(forKey: block) }
}
