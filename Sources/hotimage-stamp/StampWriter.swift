// The writer: an init phase that stamps every block of the range once, then a bursty
// multi-threaded main phase of random WRITE/TRIM/ZERO ops, every op logged with its
// sequence number and CLOCK_MONOTONIC start/end.
import Glibc
import HotSync
import Synchronization

struct WriterConfig {
    var devicePath: String
    /// Where run() saves the log (before it stops watching for signals); nil = do not save.
    var logPath: String?
    var firstBlock: UInt64 = 0
    var blockCount: UInt64
    var threads: Int = 2
    /// Main-phase duration; nil = until the stop file appears or a signal arrives.
    var durationNs: UInt64?
    var stopFile: String?
    var burstNs: UInt64 = 300_000_000
    /// 0 disables the coordinated pauses.
    var pauseNs: UInt64 = 400_000_000
    var trimPercent: Int = 0
    var zeroPercent: Int = 0
    var seed: UInt64
    var doInit: Bool = true
    var readyFile: String?
    /// Take SIGINT/SIGTERM as a stop request (the command line does; the selftest does not).
    var handleSignals: Bool = true

    var endBlock: UInt64 { firstBlock + blockCount }
}

struct WriterSummary {
    var writes = 0
    var trims = 0
    var zeroes = 0
    var failed = 0
    var seqMax: UInt64 = 0
    var firstStartNs: UInt64 = 0
    var lastEndNs: UInt64 = 0
    var firstFailure: OpRecord?

    init(ops: [OpRecord]) {
        firstStartNs = ops.isEmpty ? 0 : UInt64.max
        for op in ops {
            switch op.kind {
            case .write: writes += 1
            case .trim: trims += 1
            case .zero: zeroes += 1
            }
            if op.failed {
                failed += 1
                if firstFailure == nil { firstFailure = op }
            }
            seqMax = max(seqMax, op.seq)
            firstStartNs = min(firstStartNs, op.startNs)
            lastEndNs = max(lastEndNs, op.endNs)
        }
    }

    var line: String {
        "stamp: \(writes) writes, \(trims) trims, \(zeroes) zeroes, \(failed) failed, seq max \(seqMax), "
            + "first start \(firstStartNs) ns, last end \(lastEndNs) ns"
    }

    var failureLine: String? {
        guard let op = firstFailure else { return nil }
        return "stamp: live write failed: \(failed) ops failed; first: \(op.kind.name) block \(op.block) "
            + "seq \(op.seq) thread \(op.thread): \(Sys.errnoText(op.errorCode)) (errno \(op.errorCode))"
    }
}

/// State shared by all threads of one run.
final class WriterRunState {
    private let seq = Atomic<UInt64>(0)
    private let stop = Atomic<Bool>(false)
    private let reasonLock = Lock()
    private(set) var stopReason = ""

    func nextSeq() -> UInt64 {
        seq.wrappingAdd(1, ordering: .relaxed).newValue
    }

    var stopRequested: Bool { stop.load(ordering: .acquiring) }

    func requestStop(_ reason: String) {
        reasonLock.withLock {
            if stopReason.isEmpty { stopReason = reason }
        }
        stop.store(true, ordering: .releasing)
    }
}

final class StampWriter {
    let config: WriterConfig
    /// Called by the last thread to go quiet in each pause (argument: pause number, from 1),
    /// while every other writer thread waits: no op is in flight during the call.
    var onQuiescent: ((Int) -> Void)?
    /// Set once the init phase is over (CLOCK_MONOTONIC ns).
    private(set) var mainPhaseStartNs: UInt64 = 0

    init(config: WriterConfig) {
        self.config = config
    }

    func run() throws -> OpLog {
        let target = try BlockTarget.openForWriting(config.devicePath)
        try target.ensureSize(config.endBlock * UInt64(Stamp.blockSize))
        let state = WriterRunState()
        let watcher = config.handleSignals
            ? SignalWatcher { sig in state.requestStop(sig == SIGINT ? "SIGINT" : "SIGTERM") }
            : nil
        defer { watcher?.finish() }

        var ops: [OpRecord] = []
        var initDone = false
        if config.doInit {
            initDone = initPhase(target: target, state: state, into: &ops)
        }
        if let ready = config.readyFile, !state.stopRequested {
            try createReadyFile(ready)
        }
        mainPhaseStartNs = Sys.monotonicNs()
        if !state.stopRequested {
            ops += mainPhase(target: target, state: state)
        }
        if state.stopReason.hasPrefix("SIG") {
            warn("stamp: stopped by \(state.stopReason)")
        }
        ops.sort { $0.seq < $1.seq }
        let log = OpLog(firstBlock: config.firstBlock, blockCount: config.blockCount, seed: config.seed,
                        threads: UInt32(config.threads), initDone: initDone, ops: ops)
        if let path = config.logPath { try log.save(to: path) }
        return log
    }

    /// Writes every block once, in order, 256 blocks per pwrite. Each block is its own
    /// logged op; the blocks of one pwrite share its start and end times.
    private func initPhase(target: BlockTarget, state: WriterRunState, into ops: inout [OpRecord]) -> Bool {
        let chunk: UInt64 = 256
        let buffer = AlignedBuffer(bytes: Int(chunk) * Stamp.blockSize)
        ops.reserveCapacity(Int(config.blockCount) + 1024)
        var block = config.firstBlock
        var seqs = [UInt64](repeating: 0, count: Int(chunk))
        while block < config.endBlock {
            if state.stopRequested { return false }
            let n = Int(min(chunk, config.endBlock - block))
            for i in 0..<n {
                seqs[i] = state.nextSeq()
                Stamp.fill(buffer.block(i), block: block + UInt64(i), seq: seqs[i], thread: 0)
            }
            let start = Sys.monotonicNs()
            let err = target.write(buffer.pointer, count: n * Stamp.blockSize, at: block * UInt64(Stamp.blockSize))
            let end = Sys.monotonicNs()
            let flags = OpRecord.initFlag | (err != 0 ? OpRecord.failedFlag : 0)
            for i in 0..<n {
                ops.append(OpRecord(seq: seqs[i], block: block + UInt64(i), startNs: start, endNs: end,
                                    thread: 0, kind: .write, flags: flags, errorCode: err))
            }
            block += UInt64(n)
        }
        return true
    }

    private func mainPhase(target: BlockTarget, state: WriterRunState) -> [OpRecord] {
        let start = mainPhaseStartNs
        let gate = config.pauseNs > 0
            ? BurstGate(participants: config.threads, burstNs: config.burstNs, pauseNs: config.pauseNs, startNs: start)
            : nil
        gate?.onQuiescent = onQuiescent
        let context = WorkerContext(config: config, target: target, state: state, gate: gate,
                                    deadlineNs: config.durationNs.map { start + $0 })
        let workers = (1...config.threads).map { Worker(thread: $0, context: context) }
        let threads = workers.map { worker in spawnThread { worker.run() } }
        for t in threads { pthread_join(t, nil) }
        var ops: [OpRecord] = []
        ops.reserveCapacity(workers.reduce(0) { $0 + $1.ops.count })
        for w in workers { ops += w.ops }
        return ops
    }

    private func createReadyFile(_ path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StampError.errno("cannot create ready file \(path)") }
        defer { close(fd) }
        let text = "\(Sys.monotonicNs())\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
    }
}

// MARK: - Threads and signals

private final class ThreadBody {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Starts a pthread running `body`.
func spawnThread(_ body: @escaping () -> Void) -> pthread_t {
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var tid = pthread_t()
    let rc = pthread_create(&tid, nil, { arg in
        Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue().body()
        return nil
    }, box)
    precondition(rc == 0, "pthread_create failed: \(Sys.errnoText(rc))")
    return tid
}

/// Blocks SIGINT/SIGTERM in the calling thread (and so in every thread it starts later)
/// and receives them with sigwait on a thread of its own, so no async-signal-safety
/// rules apply to what `onSignal` does.
final class SignalWatcher {
    private final class Flag {
        let value = Atomic<Bool>(false)
    }

    private var oldMask = sigset_t()
    private var thread = pthread_t()
    private let finished = Flag()

    init(onSignal: @escaping (Int32) -> Void) {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, &oldMask)
        let finished = self.finished
        thread = spawnThread {
            var waitSet = set
            while true {
                var sig: Int32 = 0
                guard sigwait(&waitSet, &sig) == 0 else { continue }
                if finished.value.load(ordering: .acquiring) { return }
                onSignal(sig)
            }
        }
    }

    /// Stops the watcher thread and restores the signal mask.
    func finish() {
        finished.value.store(true, ordering: .releasing)
        pthread_kill(thread, SIGTERM)
        pthread_join(thread, nil)
        pthread_sigmask(SIG_SETMASK, &oldMask, nil)
    }
}
