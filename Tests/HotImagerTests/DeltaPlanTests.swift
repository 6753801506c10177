import Foundation
import Testing
@testable import HotImager

/// DeltaPlan (Incremental.swift) against a per-cluster model: what an
/// incremental reads, zeroes and leaves to its base.
@Suite struct DeltaPlanTests {
    struct LCG { var s: UInt64; mutating func next(_ n: UInt64) -> UInt64 { s = s &* 6364136223846793005 &+ 1442695040888963407; return (s >> 33) % n } }

    let cs = 16                      // bytes per cluster in the model
    let size: UInt64 = 16 * 200 + 5  // a short last cluster

    func plan(used: [Range<UInt64>], base: Set<UInt64>, changed: Set<UInt64>?, reread: [Range<UInt64>] = []) -> DeltaPlan {
        let clusters = (size + UInt64(cs) - 1) / UInt64(cs)
        var bits: [UInt64]?
        if let ch = changed {
            var b = [UInt64](repeating: 0, count: Int((clusters + 63) / 64))
            for c in ch { b[Int(c / 64)] |= 1 << (c % 64) }
            bits = b
        }
        return DeltaPlan.make(used: RangeSet.normalize(used), size: size, clusterSize: cs, baseHas: base.sorted(),
                              hasDigest: { base.contains($0) }, changed: bits, reread: RangeSet.normalize(reread))
    }

    @Test func modelOverRandomMaps() {
        var g = LCG(s: 7)
        let clusters = (size + UInt64(cs) - 1) / UInt64(cs)
        for round in 0..<300 {
            let used: [Range<UInt64>] = (0..<g.next(30)).map { _ in let a = g.next(size); return a..<min(size, a + 1 + g.next(80)) }
            let base = Set((0..<g.next(120)).map { _ in g.next(clusters) })
            let changed: Set<UInt64>? = round % 3 == 0 ? nil : Set((0..<g.next(60)).map { _ in g.next(clusters) })
            let reread: [Range<UInt64>] = (0..<g.next(3)).map { _ in let a = g.next(size); return a..<min(size, a + 1 + g.next(40)) }
            let p = plan(used: used, base: base, changed: changed, reread: reread)
            // The model, cluster by cluster.
            var usedC = Set<UInt64>()
            for r in used { for b in r { usedC.insert(b / UInt64(cs)) } }
            var rereadC = Set<UInt64>()
            for r in reread { for b in r { rereadC.insert(b / UInt64(cs)) } }
            let wantRead = usedC.filter { changed == nil || changed!.contains($0) || rereadC.contains($0) }
            let wantKept = usedC.subtracting(wantRead)
            let wantZero = base.subtracting(usedC)
            #expect(Set(p.kept) == wantKept)
            #expect(p.kept == p.kept.sorted())
            #expect(Set(p.zero) == wantZero)
            #expect(p.readClusters == UInt64(wantRead.count))
            // What is read: exactly the used bytes of the clusters to read.
            var readBytes = Set<UInt64>()
            for r in p.read { for b in r { readBytes.insert(b) } }
            var wantBytes = Set<UInt64>()
            for r in used { for b in r where wantRead.contains(b / UInt64(cs)) { wantBytes.insert(b) } }
            #expect(readBytes == wantBytes)
        }
    }

    @Test func comparedReadsEveryUsedClusterTrackedOnlyChanges() {
        // Clusters 0..9 used; the base holds 0..4 and 20; 2 changed since.
        let used: [Range<UInt64>] = [0..<160]
        let base: Set<UInt64> = [0, 1, 2, 3, 4, 20]
        let compared = plan(used: used, base: base, changed: nil)
        #expect(compared.readClusters == 10)
        #expect(compared.kept.isEmpty)
        #expect(compared.zero == [20])
        let tracked = plan(used: used, base: base, changed: [2, 7])
        // Only what was written since is read; 5..9 without a write keep
        // the base's zeros.
        #expect(tracked.readClusters == 2)
        #expect(tracked.kept == [0, 1, 3, 4, 5, 6, 8, 9])
        #expect(tracked.zero == [20])
        #expect(tracked.read == [32..<48, 112..<128])
        // What the base or this backup left out is read again even unchanged
        // (the base holds zeros there, or data this backup leaves out).
        let excl = plan(used: used, base: base, changed: [2, 7], reread: [50..<52, 140..<141])
        #expect(excl.readClusters == 4)
        #expect(excl.kept == [0, 1, 4, 5, 6, 9])
    }

    @Test func shortLastClusterAndChangeMapShorterThanTheVolume() {
        let last = (size - 1) / UInt64(cs)
        let p = plan(used: [(size - 3)..<size], base: [last], changed: [])
        #expect(p.kept == [last])
        #expect(p.readClusters == 0)
        // A change map with fewer words than clusters: the rest counts as changed.
        let q = DeltaPlan.make(used: [(size - 3)..<size], size: size, clusterSize: cs, baseHas: [last],
                               hasDigest: { $0 == last }, changed: [0])
        #expect(q.readClusters == 1)
        #expect(q.read == [(size - 3)..<size])
    }
}
