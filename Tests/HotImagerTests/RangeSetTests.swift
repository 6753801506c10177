import Foundation
import Testing
@testable import HotImager

/// RangeSet against a byte-per-position model over small universes.
@Suite struct RangeSetTests {
    struct LCG { var s: UInt64; mutating func next(_ n: UInt64) -> UInt64 { s = s &* 6364136223846793005 &+ 1442695040888963407; return (s >> 33) % n } }

    func model(_ rs: [Range<UInt64>], _ n: UInt64) -> [Bool] {
        var m = [Bool](repeating: false, count: Int(n))
        for r in rs { for i in r where i < n { m[Int(i)] = true } }
        return m
    }

    func randomRanges(_ g: inout LCG, _ n: UInt64) -> [Range<UInt64>] {
        (0..<g.next(8)).map { _ in let a = g.next(n); let b = min(n, a + g.next(20)); return a..<b }
    }

    @Test func normalizeIsSortedMergedAndSameSet() {
        var g = LCG(s: 1)
        for _ in 0..<500 {
            let rs = randomRanges(&g, 100)
            let n = RangeSet.normalize(rs)
            #expect(model(n, 100) == model(rs, 100))
            for i in n.indices.dropFirst() { #expect(n[i - 1].upperBound < n[i].lowerBound) }
            #expect(n.allSatisfy { !$0.isEmpty })
        }
    }

    @Test func subtractMatchesModel() {
        var g = LCG(s: 2)
        for _ in 0..<500 {
            let a = RangeSet.normalize(randomRanges(&g, 100)), b = RangeSet.normalize(randomRanges(&g, 100))
            let d = RangeSet.subtract(a, b)
            let ma = model(a, 100), mb = model(b, 100)
            #expect(model(d, 100) == zip(ma, mb).map { $0 && !$1 })
            #expect(RangeSet.total(d) == UInt64(zip(ma, mb).filter { $0 && !$1 }.count))
        }
    }

    @Test func alignRoundsOutwardAndClips() {
        #expect(RangeSet.align([5..<6, 17..<18], unit: 8, limit: 20) == [0..<8, 16..<20])
        #expect(RangeSet.align([0..<8, 8..<9], unit: 8, limit: 100) == [0..<16])
    }
}

@Suite struct ConfigTests {
    @Test func parsesKeysAndKeepsHookOrder() throws {
        let c = try HotimageConfig.parse("""
        # comment
        before-snapshot = echo one
        before-snapshot = echo two = three
        after-backup=mail root
        hook-timeout = 5
        compress = zlib:6
        consistency = wip
        exclude = /srv/cache

        """, path: "t.conf")
        #expect(c.hooks.of(.beforeSnapshot) == ["echo one", "echo two = three"])
        #expect(c.hooks.of(.afterBackup) == ["mail root"])
        #expect(c.hooks.timeoutSeconds == 5)
        #expect(c.compress == "zlib:6" && c.consistency == "wip" && c.excludes == ["/srv/cache"])
    }

    @Test func errorsNameTheLine() {
        for (text, needle) in [("x = 1", "t.conf:1: unknown key 'x'"), ("\nbefore-snapshot", "t.conf:2: expected"),
                               ("hook-timeout = -1", "t.conf:1: hook-timeout"), ("consistency = raw", "t.conf:1: consistency"),
                               ("compress =", "t.conf:1: 'compress' has no value")] {
            #expect(throws: (any Error).self) { try HotimageConfig.parse(text, path: "t.conf") }
            do { _ = try HotimageConfig.parse(text, path: "t.conf") } catch {
                #expect("\(error)".contains(needle), "\(error) should contain \(needle)")
            }
        }
    }
}

@Suite struct HookTests {
    let ctx = HookContext(volumes: ["/srv/a", "/srv/b"], freeze: true, image: "/backup/x.qcow2")

    @Test func environmentAndExitCodes() throws {
        let out = "/tmp/hotimage-hooktest-\(getpid())"
        defer { unlink(out) }
        var set = HookSet()
        set.add(.afterBackup, ["echo \"$HOTIMAGE_PHASE|$HOTIMAGE_ERROR|$HOTIMAGE_VOLUMES|$HOTIMAGE_FREEZE|$HOTIMAGE_IMAGE\" > \(out)", "exit 3"])
        let r = HookRunner.run(set, .afterBackup, error: 70000, context: ctx, stopOnFailure: false, log: { _ in })
        #expect(r.count == 2)
        #expect(r[0].ok && !r[1].ok && r[1].exitCode == 3)
        let text = try String(contentsOfFile: out, encoding: .utf8)
        #expect(text == "after-backup|65535|/srv/a /srv/b|yes|/backup/x.qcow2\n")
    }

    @Test func stopOnFailureStopsThePhase() {
        var set = HookSet()
        set.add(.beforeSnapshot, ["true", "exit 9", "true"])
        let r = HookRunner.run(set, .beforeSnapshot, error: 0, context: ctx, stopOnFailure: true, log: { _ in })
        #expect(r.map(\.exitCode) == [0, 9])
        let all = HookRunner.run(set, .beforeSnapshot, error: 0, context: ctx, stopOnFailure: false, log: { _ in })
        #expect(all.count == 3)
    }

    @Test func timeoutKillsTheWholeGroup() {
        var set = HookSet()
        set.timeoutSeconds = 0.3
        set.add(.afterSnapshot, ["sleep 20 & sleep 20"])
        let r = HookRunner.run(set, .afterSnapshot, error: 0, context: ctx, stopOnFailure: false, log: { _ in })
        #expect(r.count == 1 && r[0].timedOut && !r[0].ok)
        #expect(r[0].seconds < 5)
    }
}
