import Testing
import HotCore

// When the dm-snapshot COW store grows (CowGrowthPolicy) and the fill-rate
// window it uses.

@Suite("COW growth policy")
struct CowGrowthPolicyTests {
    let mib: UInt64 = 1 << 20
    var policy: CowGrowthPolicy { CowGrowthPolicy(stepBytes: 16 << 20, limitBytes: 128 << 20) }

    @Test("The first file is one step, or the limit if that is smaller")
    func initial() {
        #expect(policy.initialBytes == 16 * mib)
        #expect(CowGrowthPolicy(stepBytes: 16 * mib, limitBytes: 4 * mib).initialBytes == 4 * mib)
    }

    @Test("More than half a step free and a slow fill: keep")
    func keep() {
        #expect(policy.decide(usedBytes: 0, totalBytes: 16 * mib, bytesPerSecond: 0) == .keep)
        #expect(policy.decide(usedBytes: 8 * mib, totalBytes: 16 * mib, bytesPerSecond: 1e6) == .keep)
    }

    @Test("Less than half a step free: one more step")
    func growOneStep() {
        #expect(policy.decide(usedBytes: 9 * mib, totalBytes: 16 * mib, bytesPerSecond: 0) == .grow(toBytes: 32 * mib))
    }

    @Test("A fast fill grows by as many steps as three seconds of it need, twice over")
    func growByRate() {
        // 10 MB/s for 3 s = 30 MB wanted free; at least 60 MB free after
        // growing: 2 MiB used, so 64 MiB (62 MiB free), three steps added.
        #expect(policy.decide(usedBytes: 2 * mib, totalBytes: 16 * mib, bytesPerSecond: 10e6) == .grow(toBytes: 64 * mib))
    }

    @Test("Growth stops at the limit, and at the limit the answer is atLimit")
    func limit() {
        #expect(policy.decide(usedBytes: 100 * mib, totalBytes: 112 * mib, bytesPerSecond: 50e6) == .grow(toBytes: 128 * mib))
        #expect(policy.decide(usedBytes: 121 * mib, totalBytes: 128 * mib, bytesPerSecond: 0) == .atLimit)
        // A limit that is not a multiple of the step: the last piece is smaller.
        let odd = CowGrowthPolicy(stepBytes: 16 * mib, limitBytes: 20 * mib)
        #expect(odd.decide(usedBytes: 12 * mib, totalBytes: 16 * mib, bytesPerSecond: 0) == .grow(toBytes: 20 * mib))
    }

    @Test("A full store (used = total) below the limit still grows")
    func full() {
        #expect(policy.decide(usedBytes: 16 * mib, totalBytes: 16 * mib, bytesPerSecond: 0) == .grow(toBytes: 32 * mib))
    }
}

@Suite("Fill rate")
struct FillRateTests {
    @Test("Bytes per second over the window; 0 until two samples span time")
    func rate() {
        var r = FillRate(windowNanos: 2_000_000_000)
        #expect(r.add(nanos: 1_000_000_000, bytes: 0) == 0)
        #expect(r.add(nanos: 2_000_000_000, bytes: 10_000_000) == 10e6)
        // The first sample leaves the 2 s window: rate from t=2 s on.
        #expect(r.add(nanos: 4_000_000_000, bytes: 30_000_000) == 10e6)
    }

    @Test("An older sample (another thread's clock read) is ignored, never traps")
    func outOfOrder() {
        var r = FillRate()
        _ = r.add(nanos: 5_000_000_000, bytes: 0)
        _ = r.add(nanos: 6_000_000_000, bytes: 1_000_000)
        #expect(r.add(nanos: 5_500_000_000, bytes: 999) == 1e6)
    }

    @Test("A shrinking fill (a new session) is no growth")
    func shrinking() {
        var r = FillRate()
        _ = r.add(nanos: 1_000_000_000, bytes: 50)
        #expect(r.add(nanos: 1_500_000_000, bytes: 10) == 0)
    }
}
