// When a dm-snapshot copy-on-write store must grow, and by how much.
//
// dm-snapshot has no memory tier and cannot shrink: every chunk written to
// the origin after the cut is copied once into the COW store, which is a
// concatenation of hb_NN.tmp files (each `stepBytes`). The kernel reads the
// store's size at each allocation, so growing is: add a file, extend the
// concatenation. If the store fills, the kernel invalidates the snapshot
// (the live volume keeps running; the backup fails). The policy keeps the
// free space above what the current fill rate consumes in `leadSeconds`
// (and never below half a step), adding whole steps up to `limitBytes`.
//
//   free ≥ want                         keep
//   free < want, total < limit          grow to min(limit, total + k·step),
//                                       the least k with free' ≥ 2·want
//   free < want, total = limit          atLimit (the session may overflow)
//
// with want = max(minFreeFraction · step, rate · leadSeconds).

public struct CowGrowthPolicy: Sendable, Equatable {
    public var stepBytes: UInt64
    public var limitBytes: UInt64
    public var leadSeconds: Double = 3
    public var minFreeFraction: Double = 0.5

    public init(stepBytes: UInt64, limitBytes: UInt64) {
        self.stepBytes = max(1, stepBytes)
        self.limitBytes = limitBytes
    }

    public enum Decision: Equatable, Sendable {
        case keep
        case grow(toBytes: UInt64)
        case atLimit
    }

    /// The size of the first file: one step, or the limit if smaller.
    public var initialBytes: UInt64 { min(stepBytes, limitBytes) }

    public func decide(usedBytes: UInt64, totalBytes: UInt64, bytesPerSecond: Double) -> Decision {
        let free = totalBytes > usedBytes ? totalBytes - usedBytes : 0
        let byRate = bytesPerSecond > 0 ? UInt64(min(Double(UInt64.max / 4), bytesPerSecond * leadSeconds)) : 0
        let want = max(UInt64(Double(stepBytes) * minFreeFraction), byRate)
        if free >= want { return .keep }
        if totalBytes >= limitBytes { return .atLimit }
        var total = totalBytes
        while total < limitBytes && total - min(total, usedBytes) < 2 * want {
            total = min(limitBytes, total + stepBytes)
        }
        return .grow(toBytes: total)
    }
}

/// The COW fill rate over a sliding window of samples.
public struct FillRate: Sendable {
    public var windowNanos: UInt64
    private var samples: [(t: UInt64, bytes: UInt64)] = []

    public init(windowNanos: UInt64 = 2_000_000_000) { self.windowNanos = windowNanos }

    /// Adds a sample and returns the rate in bytes per second (0 until two
    /// samples span some time, or when the fill did not grow).
    /// A sample older than the newest one is ignored (callers on several
    /// threads may read their clocks in one order and report in another).
    public mutating func add(nanos: UInt64, bytes: UInt64) -> Double {
        if let last = samples.last, nanos < last.t { return rate(at: last.t, bytes: last.bytes) }
        samples.append((nanos, bytes))
        samples.removeAll { nanos - $0.t > windowNanos }
        return rate(at: nanos, bytes: bytes)
    }

    private func rate(at nanos: UInt64, bytes: UInt64) -> Double {
        guard let f = samples.first, nanos > f.t, bytes > f.bytes else { return 0 }
        return Double(bytes - f.bytes) / (Double(nanos - f.t) / 1e9)
    }
}
