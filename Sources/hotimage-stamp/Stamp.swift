// The stamp written into every 4096-byte block. All integers little-endian.
//
//   bytes    0..7     ASCII "HOTSTAMP"
//   bytes    8..15    block number (u64, absolute block index on the device)
//   bytes   16..23    sequence number (u64, global, unique per op, starts at 1)
//   bytes   24..31    thread id (u64; 0 = init phase, 1...T = writer threads)
//   bytes   32..4087  507 u64 words of SplitMix64 output seeded only from seq
//   bytes 4088..4095  checksum: FNV-1a 64 folded over the 511 u64 words of bytes
//                     0..4087 (h ^= word; h *= 0x100000001b3), so any single
//                     changed word always changes the checksum.
//
// TRIM and ZERO ops leave the block all zeros; a stamp is never all zeros.

enum Stamp {
    static let blockSize = 4096
    static let wordCount = blockSize / 8          // 512
    static let bodyFirstWord = 4                  // byte 32
    static let checksumWord = wordCount - 1       // byte 4088
    /// "HOTSTAMP" read as a little-endian u64.
    static let magic: UInt64 = {
        var v: UInt64 = 0
        for (i, c) in "HOTSTAMP".utf8.enumerated() { v |= UInt64(c) << (8 * UInt64(i)) }
        return v
    }()

    static let fnvOffset: UInt64 = 0xcbf2_9ce4_8422_2325
    static let fnvPrime: UInt64 = 0x0000_0100_0000_01b3

    /// The generator for the body words; depends on seq only.
    struct BodyGenerator {
        var state: UInt64
        init(seq: UInt64) { state = seq &* 0x9E37_79B9_7F4A_7C15 ^ 0x484F_5453_5441_4D50 }
        @inline(__always)
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    @inline(__always)
    static func word(_ p: UnsafeRawPointer, _ i: Int) -> UInt64 {
        UInt64(littleEndian: p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
    }

    @inline(__always)
    static func setWord(_ p: UnsafeMutableRawPointer, _ i: Int, _ v: UInt64) {
        p.storeBytes(of: v.littleEndian, toByteOffset: i * 8, as: UInt64.self)
    }

    /// Writes the complete stamp for (block, seq, thread) into the 4096 bytes at `p`.
    static func fill(_ p: UnsafeMutableRawPointer, block: UInt64, seq: UInt64, thread: UInt64) {
        var h = fnvOffset
        @inline(__always) func put(_ i: Int, _ v: UInt64) {
            setWord(p, i, v)
            h = (h ^ v) &* fnvPrime
        }
        put(0, magic)
        put(1, block)
        put(2, seq)
        put(3, thread)
        var gen = BodyGenerator(seq: seq)
        for i in bodyFirstWord..<checksumWord { put(i, gen.next()) }
        setWord(p, checksumWord, h)
    }

    /// The checksum computed over words 0..<checksumWord of the block at `p`.
    static func checksum(_ p: UnsafeRawPointer) -> UInt64 {
        var h = fnvOffset
        for i in 0..<checksumWord { h = (h ^ word(p, i)) &* fnvPrime }
        return h
    }

    /// True when the block at `p` is byte-for-byte the stamp of (block, seq, thread).
    static func matches(_ p: UnsafeRawPointer, block: UInt64, seq: UInt64, thread: UInt64) -> Bool {
        guard word(p, 0) == magic, word(p, 1) == block, word(p, 2) == seq, word(p, 3) == thread else {
            return false
        }
        var h = fnvOffset
        h = (h ^ magic) &* fnvPrime
        h = (h ^ block) &* fnvPrime
        h = (h ^ seq) &* fnvPrime
        h = (h ^ thread) &* fnvPrime
        var gen = BodyGenerator(seq: seq)
        var diff: UInt64 = 0
        for i in bodyFirstWord..<checksumWord {
            let v = gen.next()
            diff |= word(p, i) ^ v
            h = (h ^ v) &* fnvPrime
        }
        return diff == 0 && word(p, checksumWord) == h
    }

    static func isZero(_ p: UnsafeRawPointer) -> Bool {
        var acc: UInt64 = 0
        for i in 0..<wordCount { acc |= word(p, i) }
        return acc == 0
    }

    /// What a block holds, decoded without reference to the log.
    enum Content: Equatable {
        case zeros
        /// Magic present and checksum valid.
        case stamp(block: UInt64, seq: UInt64, thread: UInt64)
        case garbage(magicOK: Bool, checksumOK: Bool, header: (block: UInt64, seq: UInt64, thread: UInt64)?)

        static func == (a: Content, b: Content) -> Bool {
            switch (a, b) {
            case (.zeros, .zeros): return true
            case let (.stamp(b1, s1, t1), .stamp(b2, s2, t2)): return b1 == b2 && s1 == s2 && t1 == t2
            case let (.garbage(m1, c1, _), .garbage(m2, c2, _)): return m1 == m2 && c1 == c2
            default: return false
            }
        }
    }

    static func decode(_ p: UnsafeRawPointer) -> Content {
        if isZero(p) { return .zeros }
        let magicOK = word(p, 0) == magic
        let checksumOK = checksum(p) == word(p, checksumWord)
        let header = (block: word(p, 1), seq: word(p, 2), thread: word(p, 3))
        if magicOK && checksumOK { return .stamp(block: header.block, seq: header.seq, thread: header.thread) }
        return .garbage(magicOK: magicOK, checksumOK: checksumOK, header: magicOK ? header : nil)
    }

    static func describe(_ content: Content) -> String {
        switch content {
        case .zeros:
            return "zeros"
        case let .stamp(block, seq, thread):
            return "stamp block \(block) seq \(seq) thread \(thread)"
        case let .garbage(magicOK, checksumOK, header):
            var s = "garbage (magic \(magicOK ? "ok" : "missing"), checksum \(checksumOK ? "ok" : "bad")"
            if let header { s += ", header claims block \(header.block) seq \(header.seq) thread \(header.thread)" }
            return s + ")"
        }
    }
}
