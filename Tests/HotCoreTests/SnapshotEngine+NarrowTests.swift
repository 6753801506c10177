import Foundation
import Testing
import HotCore

// narrow(used:excluded:): the filesystem's map turns `armed` (everything protected)
// into `protecting` (only used blocks). Blocks outside the map read as zeros and are
// reported as holes; originals copied while armed for them are freed; with .wip a
// write between arm and narrow means retry.

@Suite("SnapshotEngine: narrow")
struct SnapshotEngineNarrowTests {
    static let size = EngFixture.defaultSize   // 65 blocks, the last 1000 bytes

    struct MapCase: Sendable, CustomTestStringConvertible {
        let name: String
        let used: [Range<UInt64>]
        let excluded: [Range<UInt64>]
        let usedBlocks: Set<UInt64>
        var testDescription: String { name }
    }

    static let maps: [MapCase] = [
        // Ranges are widened to whole blocks: 100..<5000 touches blocks 0 and 1.
        MapCase(name: "unaligned ranges widen to blocks",
                used: [100..<5000, blk(3) + 1..<blk(3) + 2, blk(10)..<blk(12), blk(64) + 500..<size],
                excluded: [], usedBlocks: [0, 1, 3, 10, 11, 64]),
        // Excluded ranges remove only the blocks they cover wholly (2 stays, 3 and 4 go).
        MapCase(name: "exclusions remove only whole blocks",
                used: [0..<size], excluded: [blk(2) + 1..<blk(5)],
                usedBlocks: Set(0..<65).subtracting([3, 4])),
        // The partial last block counts as whole when an exclusion reaches the end.
        MapCase(name: "exclusion of the partial last block",
                used: [0..<size], excluded: [blk(64)..<size], usedBlocks: Set(0..<64)),
        // Overlapping and unsorted map ranges, plus empty ranges, which are ignored.
        MapCase(name: "overlapping, unsorted, empty ranges",
                used: [blk(20)..<blk(25), 0..<0, blk(22)..<blk(30), blk(5)..<blk(5), blk(1)..<blk(2)],
                excluded: [blk(40)..<blk(40)], usedBlocks: Set(20..<30).union([1])),
        // An empty map: every block is a hole.
        MapCase(name: "empty map", used: [], excluded: [], usedBlocks: []),
        // Exclusion covering everything wins over the map.
        MapCase(name: "everything excluded", used: [0..<size], excluded: [0..<size], usedBlocks: []),
    ]

    @Test("Blocks outside the map read as zeros; blocks inside keep the pre-arm contents",
          arguments: maps)
    func holesReadAsZeros(_ c: MapCase) throws {
        let f = EngFixture()
        try f.arm()
        let r = try f.engine.narrow(used: c.used, excluded: c.excluded)
        #expect(r == .protecting(usedBlocks: UInt64(c.usedBlocks.count)))
        #expect(f.phase == .protecting)
        #expect(f.status.usedBlocks == UInt64(c.usedBlocks.count))
        #expect(f.status.protectedBlocks == UInt64(c.usedBlocks.count))
        // Overwrite everything: holes are not copied.
        try f.write(0, Int(f.size), seed: 9)
        #expect(f.status.counters.copies == UInt64(c.usedBlocks.count))
        for b in 0..<f.blockCount {
            let expected = c.usedBlocks.contains(b) ? f.imageBlock(b) : [UInt8](repeating: 0, count: f.blockLen(b))
            #expect(try f.snapBlock(b) == expected, "block \(b)")
        }
        // The extents alternate and reproduce the map exactly.
        let ext = try f.engine.snapshotExtents(offset: 0, length: f.size)
        #expect(ext.reduce(0) { $0 + $1.length } == f.size)
        for i in ext.indices.dropFirst() { #expect(ext[i].hole != ext[i - 1].hole) }
        var pos: UInt64 = 0
        for e in ext {
            #expect(e.length > 0)
            for b in (pos / 4096)..<((pos + e.length - 1) / 4096 + 1) {
                #expect(c.usedBlocks.contains(b) != e.hole, "block \(b) in extent at \(pos)")
            }
            pos += e.length
        }
    }

    struct ExtentCase: Sendable, CustomTestStringConvertible {
        let name: String
        let offset: UInt64
        let length: UInt64
        let expected: [UInt64]      // extent lengths, alternating
        let firstIsHole: Bool
        var testDescription: String { name }
    }

    // Map: blocks 0,1 | hole 2 | 3 | holes 4...9 | 10,11 | holes 12...63 | 64 (1000 bytes).
    static let extentMap: [Range<UInt64>] = [0..<blk(2), blk(3)..<blk(4), blk(10)..<blk(12), blk(64)..<size]
    static let extentCases: [ExtentCase] = [
        // The whole device: exact lengths including the 1000-byte last block.
        ExtentCase(name: "whole device", offset: 0, length: size,
                   expected: [2 * 4096, 4096, 4096, 6 * 4096, 2 * 4096, 52 * 4096, 1000], firstIsHole: false),
        // Starts 100 bytes into block 1, ends 100 bytes into block 4 (hole).
        ExtentCase(name: "unaligned both ends", offset: blk(1) + 100, length: 3 * 4096,
                   expected: [3996, 4096, 4096, 100], firstIsHole: false),
        // Inside one hole block.
        ExtentCase(name: "inside a hole", offset: blk(5) + 1, length: 10,
                   expected: [10], firstIsHole: true),
        // Inside one used block.
        ExtentCase(name: "inside data", offset: blk(10) + 4000, length: 100,
                   expected: [100], firstIsHole: false),
        // From a hole into the partial last block, to the end.
        ExtentCase(name: "hole into the last block", offset: blk(63) + 7, length: size - blk(63) - 7,
                   expected: [4089, 1000], firstIsHole: true),
        // A hole spanning, then data, then the start of the next hole.
        ExtentCase(name: "hole, data, hole", offset: blk(9) + 4095, length: 1 + 8192 + 1,
                   expected: [1, 8192, 1], firstIsHole: true),
        // Zero length: no extents.
        ExtentCase(name: "empty", offset: blk(3), length: 0, expected: [], firstIsHole: false),
    ]

    @Test("snapshotExtents reports holes and data with exact, unaligned lengths", arguments: extentCases)
    func extents(_ c: ExtentCase) throws {
        let f = EngFixture()
        try f.protect(.freeze, used: Self.extentMap)
        let ext = try f.engine.snapshotExtents(offset: c.offset, length: c.length)
        #expect(ext.map(\.length) == c.expected)
        #expect(ext.enumerated().allSatisfy { $0.element.hole == (c.firstIsHole != ($0.offset % 2 == 1)) })
    }

    @Test("snapshotExtents while armed: everything is data")
    func extentsWhileArmed() throws {
        let f = EngFixture()
        try f.arm()
        let ext = try f.engine.snapshotExtents(offset: 5, length: f.size - 5)
        #expect(ext.count == 1)
        #expect(ext.first?.length == f.size - 5)
        #expect(ext.first?.hole == false)
    }

    @Test("Copies taken while armed for blocks outside the map are freed by narrow")
    func narrowFreesUnneededCopies() throws {
        let f = EngFixture(memoryBlocks: 32) { $0.spillAfterNanos = engSecond }
        try f.arm()
        try f.writeBlocks(0, 6, seed: 2)             // 0...5
        f.manual.advance(seconds: 2)
        #expect(f.engine.spillStep() == 6)           // now in the spill store
        try f.writeBlocks(6, 4, seed: 3)             // 6...9 in memory
        #expect(f.status.bufferedBlocks == 10)
        #expect(f.status.memoryBytes == 4 * 4096)
        #expect(f.spill.bytesInUse == 6 * 4096)
        // The map keeps 0...2 (spilled), 6, 7 (memory) and 20...29 (untouched).
        let r = try f.engine.narrow(used: [0..<blk(3), blk(6)..<blk(8), blk(20)..<blk(30)])
        #expect(r == .protecting(usedBlocks: 15))
        let s = f.status
        #expect(s.bufferedBlocks == 5)
        #expect(s.memoryBlocks == 2)
        #expect(s.memoryBytes == 2 * 4096)
        #expect(f.spill.bytesInUse == 3 * 4096)
        #expect(s.protectedBlocks == 10)
        #expect(f.engine.bufferedRanges() == [0..<blk(3), blk(6)..<blk(8)])
        for b: UInt64 in [0, 1, 2, 6, 7, 20, 29] { #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)") }
        for b: UInt64 in [3, 4, 5, 8, 9, 30] { #expect(try f.snapBlock(b) == [UInt8](repeating: 0, count: 4096), "block \(b)") }
    }

    @Test("wip: a write between arm and narrow means retry, back to waiting")
    func wipRetry() throws {
        let f = EngFixture()
        try f.arm(.wip)
        try f.writeBlocks(4, 2, seed: 2)
        try f.zero(blk(9), 10, unmap: true)
        #expect(f.status.bufferedBlocks == 3)
        #expect(try f.engine.narrow(used: [0..<f.size]) == .retry(writes: 2))
        #expect(f.phase == .waiting)
        let s = f.status
        #expect(s.bufferedBlocks == 0 && s.protectedBlocks == 0 && s.usedBlocks == 0 && s.memoryBytes == 0)
        #expect(throws: EngineError.noSession) { try f.snap(0, 4096) }
        // Writes now pass through without copies.
        try f.writeBlocks(4, 1, seed: 3)
        #expect(f.status.counters.copies == 3)
        // The next cycle: pause, arm, map with no writes in between.
        f.armAgain()
        #expect(f.phase == .armed)
        #expect(try f.engine.narrow(used: [0..<f.size]) == .protecting(usedBlocks: 65))
        // The new cut includes the writes made before it.
        try f.writeBlocks(4, 2, seed: 4)
        #expect(try f.snapBlock(4) == engBytes(offset: blk(4), count: 4096, seed: 3))
        #expect(try f.snapBlock(5) == engBytes(offset: blk(5), count: 4096, seed: 2))
        #expect(try f.snapBlock(6) == f.imageBlock(6))
    }

    @Test("wip retry: the client's next begin is accepted from waiting (as the daemon sends it) and the next cut protects")
    func wipRetryBeginsAgain() throws {
        let f = EngFixture()
        try f.arm(.wip)
        try f.writeBlocks(4, 1, seed: 2)
        #expect(try f.engine.narrow(used: [0..<f.size]) == .retry(writes: 1))
        #expect(f.phase == .waiting)
        // SessionClient.take begins again on the same connection after a retry.
        try f.engine.begin(consistency: .wip)
        #expect(f.phase == .waiting)
        f.armAgain()
        #expect(f.phase == .armed)
        #expect(try f.engine.narrow(used: [0..<f.size]) == .protecting(usedBlocks: 65))
        #expect(try f.snapBlock(4) == engBytes(offset: blk(4), count: 4096, seed: 2))
    }

    @Test("wip retry: a snapshot read in flight across the retry and the next arm never returns another block's data")
    func readAcrossRetry() throws {
        let g = GatedBlockIO(size: EngFixture.defaultSize)
        let f = EngFixture(gated: g)
        try f.arm(.wip)
        try f.writeBlocks(5, 1, seed: 2)             // block 5's original goes to a memory slot
        g.holdNextRead()
        let result = EngBox<Result<[UInt8], Error>?>(nil)
        // Block 4 comes from the device (held), block 5 from its memory slot.
        let reader = engSpawn { result.value = Result { try f.snap(blk(4), 2 * 4096) } }
        #expect(engWait(g.entered))
        #expect(try f.engine.narrow(used: [0..<f.size]) == .retry(writes: 1))
        f.armAgain()
        try f.writeBlocks(9, 1, seed: 3)             // a new copy, into whatever slot is free
        g.open()
        #expect(engWait(reader))
        switch result.value {
        case .success(let bytes)?:
            #expect(Array(bytes[0..<4096]) == f.imageBlock(4))
            let five = Array(bytes[4096...])
            #expect(five == f.imageBlock(5) || five == engBytes(offset: blk(5), count: 4096, seed: 2),
                    "block 5 came back with foreign data")
        case .failure(let e)?:
            #expect(e is EngineError)
        case nil:
            Issue.record("no result")
        }
        #expect(try f.snapBlock(9) == f.imageBlock(9))
    }

    @Test("wip without writes between arm and narrow: no retry")
    func wipNoWrites() throws {
        let f = EngFixture()
        try f.arm(.wip)
        #expect(try f.engine.narrow(used: [0..<blk(10)]) == .protecting(usedBlocks: 10))
    }

    @Test("freeze and raw: writes between arm and narrow do not cause a retry",
          arguments: [Consistency.freeze, .raw])
    func noRetryWithoutWip(_ c: Consistency) throws {
        let f = EngFixture()
        try f.arm(c)
        try f.writeBlocks(4, 2, seed: 2)
        #expect(try f.engine.narrow(used: [0..<f.size]) == .protecting(usedBlocks: 65))
        #expect(f.status.bufferedBlocks == 2)
        #expect(try f.snapBlock(4) == f.imageBlock(4))
        #expect(try f.snapBlock(5) == f.imageBlock(5))
    }

    @Test("A copy in progress while narrow removes its block does not leave a stray copy")
    func copyInFlightDuringNarrow() throws {
        let g = GatedBlockIO(size: EngFixture.defaultSize)
        let f = EngFixture(gated: g)
        try f.arm(.raw)
        g.holdNextRead()                              // the copy's read of the original
        let data = engBytes(offset: blk(7), count: 4096, seed: 2)
        let writer = engSpawn {
            do { try data.withUnsafeBytes { try f.engine.write(offset: blk(7), count: 4096, from: $0.baseAddress!) } }
            catch { Issue.record("write failed: \(error)") }
        }
        #expect(engWait(g.entered))
        // Block 7 is outside the map.
        #expect(try f.engine.narrow(used: [0..<blk(4)]) == .protecting(usedBlocks: 4))
        g.open()
        #expect(engWait(writer))
        #expect(f.mem.bytes.load(fromByteOffset: Int(blk(7)), as: UInt8.self) == data[0])
        #expect(try f.snapBlock(7) == [UInt8](repeating: 0, count: 4096))   // a hole reads as zeros
        let s = f.status
        #expect(s.bufferedBlocks == 0)
        #expect(s.memoryBytes == 0)
        #expect(s.protectedBlocks == 4)
        #expect(f.engine.bufferedRanges().isEmpty)
    }
}
