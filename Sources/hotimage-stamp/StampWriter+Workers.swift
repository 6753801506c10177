// Main-phase worker threads and the burst/pause coordination between them.
//
// Bursts: every thread works until the shared burst deadline, finishes its in-flight op,
// then waits at the gate. When the last thread arrives nothing is in flight anywhere;
// from that moment the pause lasts pauseNs, after which the next burst starts for all.
// So each pause is a window of at least pauseNs with no op in flight on any thread.
import Glibc
import HotSync

struct WorkerContext {
    let config: WriterConfig
    let target: BlockTarget
    let state: WriterRunState
    let gate: BurstGate?
    let deadlineNs: UInt64?
}

final class Worker {
    let thread: Int
    let context: WorkerContext
    private(set) var ops: [OpRecord] = []
    private var rng: Xoshiro256
    private let buffer = AlignedBuffer(bytes: Stamp.blockSize)
    private var nextStopFileCheckNs: UInt64 = 0

    init(thread: Int, context: WorkerContext) {
        self.thread = thread
        self.context = context
        // Deterministic per (seed, thread).
        rng = Xoshiro256(seed: context.config.seed ^ (UInt64(thread) &* 0xD1B5_4A32_D192_ED03))
        ops.reserveCapacity(1 << 16)
    }

    func run() {
        let config = context.config
        let state = context.state
        let blockSize = UInt64(Stamp.blockSize)
        let trimLimit = UInt64(config.trimPercent)
        let zeroLimit = UInt64(config.trimPercent + config.zeroPercent)
        var burstEnd = context.gate?.burstEndNs ?? UInt64.max
        while true {
            var now = Sys.monotonicNs()
            if shouldStop(now) { break }
            if now >= burstEnd, let gate = context.gate {
                let (resume, nextEnd) = gate.arrive(stopRequested: state.stopRequested)
                burstEnd = nextEnd
                while !shouldStop(now) && now < resume {
                    Sys.sleepNs(min(resume - now, 10_000_000))
                    now = Sys.monotonicNs()
                }
                continue
            }
            let block = config.firstBlock + rng.next() % config.blockCount
            let roll = rng.next() % 100
            let kind: OpKind = roll < trimLimit ? .trim : (roll < zeroLimit ? .zero : .write)
            let seq = state.nextSeq()
            let offset = block * blockSize
            if kind == .write {
                Stamp.fill(buffer.pointer, block: block, seq: seq, thread: UInt64(thread))
            }
            let start = Sys.monotonicNs()
            let err: Int32
            switch kind {
            case .write: err = context.target.write(buffer.pointer, count: Stamp.blockSize, at: offset)
            case .trim: err = context.target.discard(at: offset, length: blockSize)
            case .zero: err = context.target.zeroOut(at: offset, length: blockSize)
            }
            let end = Sys.monotonicNs()
            ops.append(OpRecord(seq: seq, block: block, startNs: start, endNs: end, thread: UInt16(thread),
                                kind: kind, flags: err != 0 ? OpRecord.failedFlag : 0, errorCode: err))
            // A failing device is logged and counted, but not hammered.
            if err != 0 { Sys.sleepNs(1_000_000) }
        }
        context.gate?.leave()
    }

    /// Checks the stop conditions: signal (flag), duration, stop file (every 50 ms).
    private func shouldStop(_ now: UInt64) -> Bool {
        let state = context.state
        if state.stopRequested { return true }
        if let deadline = context.deadlineNs, now >= deadline {
            state.requestStop("duration")
            return true
        }
        if let stopFile = context.config.stopFile, now >= nextStopFileCheckNs {
            nextStopFileCheckNs = now + 50_000_000
            if Sys.fileExists(stopFile) {
                state.requestStop("stop file \(stopFile)")
                return true
            }
        }
        return false
    }
}

/// The barrier that turns the end of every burst into a common pause.
final class BurstGate {
    let burstNs: UInt64
    let pauseNs: UInt64
    var onQuiescent: ((Int) -> Void)?

    private let m = Monitor()
    private var participants: Int
    private var arrived = 0
    private var generation = 0
    private var resumeNs: UInt64 = 0
    private var burstEnd: UInt64

    init(participants: Int, burstNs: UInt64, pauseNs: UInt64, startNs: UInt64) {
        self.participants = participants
        self.burstNs = burstNs
        self.pauseNs = pauseNs
        burstEnd = startNs + burstNs
    }

    var burstEndNs: UInt64 { m.withLock { burstEnd } }

    /// Waits until every participating thread has finished its burst. Returns when the
    /// pause ends (resume time) and when the following burst ends.
    func arrive(stopRequested: Bool) -> (resumeNs: UInt64, burstEndNs: UInt64) {
        m.lock()
        defer { m.unlock() }
        arrived += 1
        let myGeneration = generation
        if arrived == participants {
            release(runHook: !stopRequested)
        } else {
            while generation == myGeneration { m.wait() }
        }
        return (resumeNs, burstEnd)
    }

    /// A thread that stops for good leaves the gate so nobody waits for it.
    func leave() {
        m.lock()
        defer { m.unlock() }
        participants -= 1
        if arrived > 0 && arrived >= participants { release(runHook: false) }
    }

    /// Called with the mutex held, when no thread has an op in flight.
    private func release(runHook: Bool) {
        if runHook, let hook = onQuiescent { hook(generation + 1) }
        resumeNs = Sys.monotonicNs() + pauseNs
        burstEnd = resumeNs + burstNs
        arrived = 0
        generation += 1
        m.broadcast()
    }
}

/// xoshiro256** seeded through SplitMix64: one independent stream per writer thread.
struct Xoshiro256 {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    init(seed: UInt64) {
        var x = seed
        func splitmix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    @inline(__always)
    mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }
}
