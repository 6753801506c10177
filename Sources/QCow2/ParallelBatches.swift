// ParallelBatches.swift — the one work loop of the chain reads that run on
// several threads (verifyChainContent, QCow2Merge.fold).
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import HotSync

/// Runs items 0..<count in batches of `batch` on up to `threads` workers
/// (at least one, never more than there are batches). Each worker makes its
/// state once, runs `body` on every batch it claims, and hands its state
/// to `finish` under the shared lock at the end. The first error stops
/// every worker from claiming more and is rethrown. `afterBatch(n)` runs
/// under the shared lock after each batch of n items (progress).
func parallelBatches<State>(count: Int, batch: Int, threads: Int,
                            makeState: () -> State,
                            body: (inout State, Range<Int>) throws -> Void,
                            finish: (inout State) -> Void = { _ in },
                            afterBatch: ((Int) -> Void)? = nil) throws {
    guard count > 0 else { return }
    let shared = BatchShared()
    let workers = max(1, min(threads, (count + batch - 1) / batch))
    DispatchQueue.concurrentPerform(iterations: workers) { _ in
        var state = makeState()
        while true {
            let start: Int = shared.lock.withLock {
                guard shared.error == nil else { return Int.max }
                let s = shared.next
                shared.next += batch
                return s
            }
            if start >= count { break }
            let r = start..<min(start + batch, count)
            do { try body(&state, r) } catch {
                shared.lock.withLock { if shared.error == nil { shared.error = error } }
                break
            }
            if let afterBatch { shared.lock.withLock { afterBatch(r.count) } }
        }
        shared.lock.withLock { finish(&state) }
    }
    if let e = shared.error { throw e }
}

/// The claim counter and first error of parallelBatches.
private final class BatchShared: @unchecked Sendable {
    let lock = Lock()
    var next = 0
    var error: Error?
}

/// Online CPUs, at most `cap` (the chain workers' default).
func onlineCPUs(cap: Int = 8) -> Int { max(1, min(cap, sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }
