import Foundation
import Testing
import HotSync

/// A counter the test threads share; only touched under the lock under test.
private final class Box: @unchecked Sendable { var value = 0; var flag = false }

private func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

struct LockTests {
    // Several threads increment one counter; a lost update would show as a
    // total below threads × rounds.
    @Test(arguments: [false, true])
    func mutualExclusionUnderContention(recursive: Bool) {
        let lock = Lock(recursive: recursive)
        let box = Box()
        let threads = 8, rounds = 20_000
        DispatchQueue.concurrentPerform(iterations: threads) { _ in
            for _ in 0..<rounds { lock.withLock { box.value += 1 } }
        }
        #expect(box.value == threads * rounds)
    }

    // The same for Monitor, through lock()/unlock() as well as withLock.
    @Test func monitorMutualExclusionUnderContention() {
        let m = Monitor()
        let box = Box()
        let threads = 8, rounds = 20_000
        DispatchQueue.concurrentPerform(iterations: threads) { i in
            for _ in 0..<rounds {
                if i % 2 == 0 {
                    m.withLock { box.value += 1 }
                } else {
                    m.lock(); box.value += 1; m.unlock()
                }
            }
        }
        #expect(box.value == threads * rounds)
    }

    // The recursive option lets the holder take the lock again; another
    // thread still waits until the outermost withLock returns.
    @Test func recursiveLockReenters() {
        let lock = Lock(recursive: true)
        let box = Box()
        let inner = lock.withLock { lock.withLock { lock.withLock { () -> Int in box.value = 1; return 3 } } }
        #expect(inner == 3)
        let done = DispatchSemaphore(value: 0)
        lock.lock()
        lock.lock()
        DispatchQueue.global().async {
            lock.withLock { box.value = 2 }
            done.signal()
        }
        #expect(done.wait(timeout: .now() + .milliseconds(100)) == .timedOut)
        lock.unlock()
        #expect(done.wait(timeout: .now() + .milliseconds(100)) == .timedOut)
        lock.unlock()
        #expect(done.wait(timeout: .now() + .seconds(10)) == .success)
        #expect(lock.withLock { box.value } == 2)
    }

    // Nobody broadcasts: the wait returns false, not before its deadline and
    // not long after it.
    @Test func timedWaitTimesOutNearDeadline() {
        let m = Monitor()
        let timeout: UInt64 = 100_000_000
        let start = monotonicNanos()
        let woken = m.withLock { () -> Bool in
            // A spurious wake-up returns true early; wait out the rest.
            var left = timeout
            while true {
                if !m.wait(timeoutNanos: left) { return false }
                let spent = monotonicNanos() - start
                if spent >= timeout { return true }
                left = timeout - spent
            }
        }
        let elapsed = monotonicNanos() - start
        #expect(!woken)
        #expect(elapsed >= timeout)
        #expect(elapsed < timeout + 2_000_000_000)
    }

    // A waiter with a long timeout returns true soon after a broadcast, and
    // sees the state set before it.
    @Test func broadcastWakesTimedWaiter() {
        let m = Monitor()
        let box = Box()
        let waiting = DispatchSemaphore(value: 0)
        let finished = DispatchSemaphore(value: 0)
        let result = Box()
        DispatchQueue.global().async {
            let start = monotonicNanos()
            m.withLock {
                waiting.signal()
                var woken = true
                while !box.flag && woken { woken = m.wait(timeoutNanos: 30_000_000_000) }
                result.flag = woken && box.flag
                result.value = Int((monotonicNanos() - start) / 1_000_000)
            }
            finished.signal()
        }
        waiting.wait()
        // The waiter holds the lock until it waits, so this runs after it sleeps.
        m.withLock {
            box.flag = true
            m.broadcast()
        }
        #expect(finished.wait(timeout: .now() + .seconds(10)) == .success)
        #expect(result.flag)
        #expect(result.value < 10_000)
    }
}
