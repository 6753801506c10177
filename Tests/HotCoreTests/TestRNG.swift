/// SplitMix64: the small deterministic PRNG of the HotCore tests, so every
/// failure is reproducible from its seed.
struct TestRNG {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in 0..<n (bias irrelevant here).
    mutating func below(_ n: UInt64) -> UInt64 { next() % n }
    /// Uniform in 0...bound (bias irrelevant here).
    mutating func upTo(_ bound: UInt64) -> UInt64 {
        bound == .max ? next() : next() % (bound + 1)
    }
}
