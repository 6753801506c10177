import Foundation
import Testing
import HotCore

// Point in time: after arming, every snapshot read returns the device as it was at
// the cut, whatever the live writes (WRITE, TRIM, WRITE_ZEROES) did since, while
// the live device shows the new contents. The fixture device has 65 blocks of 4 KiB,
// the last one only 1000 bytes long, pre-filled with a pattern (`image`).

struct EngWriteCase: Sendable, CustomTestStringConvertible {
    let name: String
    let offset: UInt64
    let length: UInt64
    var testDescription: String { name }

    init(_ name: String, _ offset: UInt64, _ length: UInt64) {
        self.name = name; self.offset = offset; self.length = length
    }

    /// Blocks the range touches (partial blocks included).
    var blocks: Range<UInt64> { (offset / 4096)..<((offset + length - 1) / 4096 + 1) }
}

@Suite("SnapshotEngine: point in time")
struct SnapshotEnginePointInTimeTests {
    static let size = EngFixture.defaultSize

    static let cases: [EngWriteCase] = [
        EngWriteCase("one full block", blk(3), 4096),                                   // exactly block 3
        EngWriteCase("first byte of the device", 0, 1),                                 // 1 byte of block 0
        EngWriteCase("inside one block", blk(5) + 100, 200),                            // partial, unaligned at both ends
        EngWriteCase("unaligned across two blocks", blk(7) + 4000, 200),                // tail of 7, head of 8
        EngWriteCase("unaligned across six blocks", blk(10) + 17, 5 * 4096 + 33),       // 10...15, partial at both ends
        EngWriteCase("aligned, eight blocks", blk(20), 8 * 4096),                       // 20..<28
        EngWriteCase("last partial block, whole", blk(64), 1000),                       // the 1000-byte block
        EngWriteCase("last partial block, last byte", size - 1, 1),                     // final byte of the device
        EngWriteCase("last full block into the partial one", blk(63) + 10, size - blk(63) - 10), // 63 and 64
        EngWriteCase("whole device", 0, size),                                          // every block
    ]

    static let copyPhases: [EngPhase] = [.armed, .protecting]

    /// Checks the snapshot against the pre-arm image: all at once and block by block.
    static func expectSnapshotIsImage(_ f: EngFixture, _ loc: SourceLocation = #_sourceLocation) throws {
        #expect(try f.snap(0, Int(f.size)) == f.image, sourceLocation: loc)
        for b in 0..<f.blockCount {
            #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)", sourceLocation: loc)
        }
    }

    @Test("Overwrites after arming: the snapshot keeps the pre-arm contents",
          arguments: cases, copyPhases)
    func overwrite(_ c: EngWriteCase, _ phase: EngPhase) throws {
        let f = EngFixture()
        try f.enter(phase)
        try f.write(c.offset, Int(c.length), seed: 2)
        let touched = UInt64(c.blocks.count)
        #expect(f.deviceBytes() == f.live)
        #expect(try f.liveRead(0, Int(f.size)) == f.live)
        #expect(f.live != f.image)
        try Self.expectSnapshotIsImage(f)
        let s = f.status
        #expect(s.counters.copies == touched)
        #expect(s.bufferedBlocks == touched)
        #expect(s.protectedBlocks == 65 - touched)
        #expect(s.memoryBlocks == Int(touched))
        #expect(s.memoryBytes == touched * 4096)
        #expect(s.counters.writesDuringSession == 1)
        // A second write to the same range copies nothing more.
        try f.write(c.offset, Int(c.length), seed: 3)
        #expect(f.status.counters.copies == touched)
        #expect(f.deviceBytes() == f.live)
        try Self.expectSnapshotIsImage(f)
    }

    @Test("TRIM and WRITE_ZEROES after arming: the snapshot keeps the pre-arm contents",
          arguments: cases, [true, false])
    func zeroes(_ c: EngWriteCase, _ unmap: Bool) throws {
        let f = EngFixture()
        try f.protect()
        try f.zero(c.offset, c.length, unmap: unmap)
        #expect(f.deviceBytes() == f.live)
        #expect(try f.liveRead(c.offset, Int(c.length)) == [UInt8](repeating: 0, count: Int(c.length)))
        #expect(f.status.counters.copies == UInt64(c.blocks.count))
        try Self.expectSnapshotIsImage(f)
    }

    @Test("Overlapping writes copy each block once, only the still-protected ones")
    func overlappingWrites() throws {
        let f = EngFixture()
        try f.protect()
        try f.writeBlocks(5, 1, seed: 2)
        #expect(f.status.counters.copies == 1)
        try f.write(blk(4) + 2000, 3 * 4096, seed: 3)        // 4, 5, 6, 7: 5 is copied already
        #expect(f.status.counters.copies == 4)
        try f.zero(blk(3), 6 * 4096, unmap: true)             // 3...8: only 3 and 8 are new
        #expect(f.status.counters.copies == 6)
        #expect(f.status.bufferedBlocks == 6)
        #expect(f.status.counters.writesDuringSession == 3)
        #expect(f.deviceBytes() == f.live)
        try Self.expectSnapshotIsImage(f)
    }

    @Test("Unaligned snapshot reads across zeros, memory, spill and device sources")
    func unalignedReadsAcrossSources() throws {
        let f = EngFixture(memoryBlocks: 16) {
            $0.spillAfterNanos = engSecond
            $0.highWater = 0.9
        }
        // Holes at 8..<12, 30..<31 and 50..<64 (ranges given in bytes, not block aligned).
        let used: [Range<UInt64>] = [0..<blk(8) - 5, blk(12) + 1..<blk(30), blk(31)..<blk(50) - 4000, blk(64) + 999..<f.size]
        try f.protect(.freeze, used: used)
        var expected = f.image
        for b in [8, 9, 10, 11, 30] + Array(50..<64) {
            expected.replaceSubrange(blk(UInt64(b)).asInt..<blk(UInt64(b) + 1).asInt, with: repeatElement(0, count: 4096))
        }
        try f.writeBlocks(2, 4, seed: 5)            // 2...5, soon in the spill store
        try f.write(blk(20) + 7, 4096 * 2, seed: 6) // 20...22
        f.manual.advance(seconds: 2)
        #expect(f.engine.spillStep() == 7)
        try f.writeBlocks(6, 3, seed: 7)            // 6, 7 in memory; 8 is a hole: not copied
        try f.write(blk(64), 1000, seed: 8)         // the partial last block, in memory
        #expect(f.status.counters.copies == 10)
        #expect(f.status.counters.spilledBlocks == 7)
        #expect(f.status.memoryBlocks == 3)
        #expect(try f.snap(0, Int(f.size)) == expected)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<400 {
            let off = UInt64.random(in: 0..<f.size, using: &rng)
            let len = Int.random(in: 1...min(6 * 4096, Int(f.size - off)), using: &rng)
            let got = try f.snap(off, len)
            if got != Array(expected[Int(off)..<Int(off) + len]) {
                Issue.record("snapshot read \(off)+\(len) differs from the pre-arm image")
                break
            }
        }
        #expect(f.deviceBytes() == f.live)
    }
}

extension UInt64 {
    var asInt: Int { Int(self) }
}
