import Foundation
import Testing
import HotCore

// release(offset:length:): the imager reports archived byte ranges. Only blocks
// wholly inside a range are released (a partial last block of the device counts as
// whole); they stop being protected, their buffered originals are freed, snapshot
// reads of them fail with `archived`, and later writes to them copy nothing.

@Suite("SnapshotEngine: release")
struct SnapshotEngineReleaseTests {
    static let size = EngFixture.defaultSize   // 65 blocks, the last 1000 bytes

    struct ReleaseCase: Sendable, CustomTestStringConvertible {
        let name: String
        let offset: UInt64
        let length: UInt64
        let released: Range<UInt64>
        var testDescription: String { name }
    }

    static let cases: [ReleaseCase] = [
        ReleaseCase(name: "one whole block", offset: 0, length: 4096, released: 0..<1),                 // exactly block 0
        ReleaseCase(name: "a block's length, shifted a byte", offset: 1, length: 4096, released: 1..<1), // no whole block
        ReleaseCase(name: "unaligned over four blocks", offset: 100, length: 3 * 4096, released: 1..<3), // 0 and 3 partial
        ReleaseCase(name: "one byte short of a block", offset: blk(4), length: 4095, released: 4..<4),   // nothing
        ReleaseCase(name: "aligned run", offset: blk(6), length: 5 * 4096, released: 6..<11),           // 6...10, mixed buffered/protected
        ReleaseCase(name: "partial last block", offset: blk(64), length: 1000, released: 64..<65),     // counts as whole
        ReleaseCase(name: "last byte of 63 to the end", offset: blk(64) - 1, length: 1001, released: 64..<65),
        ReleaseCase(name: "last full block and the partial one", offset: blk(63), length: 5096, released: 63..<65),
        ReleaseCase(name: "whole device", offset: 0, length: size, released: 0..<65),                 // everything
        ReleaseCase(name: "empty range at the end", offset: size, length: 0, released: 0..<0),        // nothing
    ]

    @Test("Only whole blocks inside the range are released", arguments: cases)
    func releaseRanges(_ c: ReleaseCase) throws {
        let f = EngFixture()
        try f.protect()
        try f.writeBlocks(0, 8, seed: 2)                         // 0...7 buffered, the rest protected
        let n = try f.engine.release(offset: c.offset, length: c.length)
        #expect(n == UInt64(c.released.count))
        let s = f.status
        #expect(s.counters.archivedBlocks == UInt64(c.released.count))
        let bufferedReleased = c.released.clamped(to: 0..<8).count
        #expect(s.bufferedBlocks == UInt64(8 - bufferedReleased))
        #expect(s.memoryBytes == UInt64(8 - bufferedReleased) * 4096)
        #expect(s.protectedBlocks == UInt64(57 - (c.released.count - bufferedReleased)))
        #expect(s.usedBlocks == 65)
        for b in 0..<f.blockCount {
            if c.released.contains(b) {
                #expect(throws: EngineError.archived(block: b)) { try f.snapBlock(b) }
            } else {
                #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)")
            }
        }
        // Writes to released blocks copy nothing and land.
        let copies = s.counters.copies
        for b in c.released { try f.writeBlocks(b, 1, seed: 3) }
        #expect(f.status.counters.copies == copies)
        #expect(f.deviceBytes() == f.live)
    }

    @Test("A read spanning a released block throws archived for the first such block")
    func readSpanningReleased() throws {
        let f = EngFixture()
        try f.protect()
        try f.engine.release(offset: blk(5), length: 2 * 4096)
        #expect(throws: EngineError.archived(block: 5)) { try f.snap(blk(3), 4 * 4096) }
        #expect(throws: EngineError.archived(block: 6)) { try f.snap(blk(6) + 4000, 10) }
        #expect(try f.snap(blk(4) + 1, 4095) == Array(f.image[Int(blk(4)) + 1..<Int(blk(5))]))
        #expect(try f.snap(blk(7), 1) == [f.image[Int(blk(7))]])
    }

    @Test("A snapshot read that fails with archived leaves no block marked busy")
    func archivedReadLeavesNoMarks() throws {
        let f = EngFixture(memoryBlocks: 16) { $0.spillAfterNanos = engSecond }
        try f.protect()
        try f.writeBlocks(0, 1, seed: 2)                          // 0: buffered in memory
        try f.engine.release(offset: blk(2), length: 4096)        // 1: protected, 2: released
        #expect(throws: EngineError.archived(block: 2)) { try f.snap(0, 3 * 4096) }
        // The mover can still move block 0 ...
        f.manual.advance(seconds: 2)
        #expect(f.engine.spillStep() == 1)
        // ... a write to block 1 does not wait for a read that ended ...
        let writer = engSpawn { _ = try? f.writeBlocks(1, 1, seed: 3) }
        #expect(engWait(writer, seconds: 3), "a live write hung on a stale busy mark")
        // ... and releasing them does not hang either.
        let releaser = engSpawn { _ = try? f.engine.release(offset: 0, length: 2 * 4096) }
        #expect(engWait(releaser, seconds: 3), "release hung on a stale busy mark")
    }

    @Test("A release waiting for a read does not touch a session begun meanwhile")
    func releaseWaitingAcrossSessions() throws {
        let g = GatedBlockIO(size: EngFixture.defaultSize)
        let f = EngFixture(gated: g)
        try f.protect()
        g.holdNextRead()
        let reader = engSpawn { _ = try? f.snapBlock(5) }    // holds block 5 (device read)
        #expect(engWait(g.entered))
        let released = EngBox<Result<UInt64, Error>?>(nil)
        let releaser = engSpawn { released.value = Result { try f.engine.release(offset: blk(5), length: 4096) } }
        Thread.sleep(forTimeInterval: 0.05)
        #expect(released.value == nil)                       // waits for the read
        f.engine.end()
        // begin waits up to 5 s (engine clock) for the old session's marks: let that pass.
        let beginner = engSpawn { _ = try? f.engine.begin(consistency: .freeze) }
        Thread.sleep(forTimeInterval: 0.1)
        f.manual.advance(seconds: 6)
        #expect(engWait(beginner))
        f.armAgain()
        #expect(f.phase == .armed)
        g.open()
        #expect(engWait(reader))
        #expect(engWait(releaser))
        guard case .failure? = released.value else {
            Issue.record("the old session's release applied to the new session: \(String(describing: released.value))")
            return
        }
        #expect(f.status.protectedBlocks == 65)
        #expect(f.status.counters.archivedBlocks == 0)
        try f.writeBlocks(5, 1, seed: 3)
        #expect(try f.snapBlock(5) == f.imageBlock(5))
    }

    @Test("Releasing frees buffered copies in memory and in the spill store")
    func releaseFreesBuffers() throws {
        let f = EngFixture(memoryBlocks: 32) { $0.spillAfterNanos = engSecond }
        try f.protect()
        try f.writeBlocks(0, 10, seed: 2)
        f.manual.advance(seconds: 2)
        #expect(f.engine.spillStep() == 10)
        try f.writeBlocks(10, 6, seed: 3)
        #expect(f.spill.bytesInUse == 10 * 4096)
        #expect(f.status.memoryBytes == 6 * 4096)
        #expect(try f.engine.release(offset: blk(4), length: 10 * 4096) == 10)   // 4...13
        #expect(f.spill.bytesInUse == 4 * 4096)
        #expect(f.status.memoryBytes == 2 * 4096)
        #expect(f.status.bufferedBlocks == 6)
        #expect(f.engine.bufferedRanges() == [0..<blk(4), blk(14)..<blk(16)])
        for b: UInt64 in [0, 3, 14, 15, 16] { #expect(try f.snapBlock(b) == f.imageBlock(b), "block \(b)") }
        // Everything left goes too.
        #expect(try f.engine.release(offset: 0, length: f.size) == 55)
        #expect(f.spill.bytesInUse == 0)
        #expect(f.status.memoryBytes == 0)
        #expect(f.status.bufferedBlocks == 0)
        #expect(f.status.protectedBlocks == 0)
        #expect(f.status.counters.archivedBlocks == 65)
    }

    @Test("Releasing twice counts once; holes are never released")
    func releaseTwiceAndHoles() throws {
        let f = EngFixture()
        try f.protect(.freeze, used: [0..<blk(10)])
        #expect(try f.engine.release(offset: 0, length: blk(4)) == 4)
        #expect(try f.engine.release(offset: 0, length: blk(4)) == 0)
        #expect(try f.engine.release(offset: blk(20), length: blk(10)) == 0)   // holes
        #expect(f.status.counters.archivedBlocks == 4)
        #expect(try f.snapBlock(20) == [UInt8](repeating: 0, count: 4096))     // still a hole, not archived
        #expect(f.status.protectedBlocks == 6)
    }
}
