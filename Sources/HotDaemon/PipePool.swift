// Splice pipes for the live export's READ replies (see HotOS/SplicePipe):
// the device's page-cache pages go to the socket by reference, so a READ
// costs the daemon no copy. A small free list keeps pipes for reuse; a pipe
// that failed half way is closed, never reused. Splicing turns itself off
// for good when the kernel refuses it for this device (EINVAL), or when no
// pipe of the size can be made; READs are then copied as before.
import HotControl
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

final class PipePool: @unchecked Sendable {
    /// Bytes per pipe: the largest READ that is spliced (1 MiB is the
    /// default /proc/sys/fs/pipe-max-size).
    static let pipeBytes = 1 << 20
    private let m = Monitor()
    private var free: [SplicePipe] = []
    private var on: Bool
    private let keep: Int
    private let logger: Logger
    private var spliced: UInt64 = 0
    private var copied: UInt64 = 0

    init(enabled: Bool, keep: Int, logger: Logger) {
        on = enabled
        self.keep = keep
        self.logger = logger
    }

    /// A pipe for a READ of `count` bytes at `offset`, or nil: splicing
    /// off, or the range spans more pages than a pipe holds.
    func get(offset: UInt64, count: Int) -> SplicePipe? {
        guard count > 0, SplicePipe.bytesSpanned(offset: offset, count: count) <= PipePool.pipeBytes else { return nil }
        let (enabled, reused) = m.withLock { (on, on ? free.popLast() : nil) }
        guard enabled else { return nil }
        if let p = reused { return p }
        do {
            let p = try SplicePipe(capacity: PipePool.pipeBytes)
            if p.capacity >= PipePool.pipeBytes { return p }
            disable("pipe capacity \(p.capacity) bytes")
        } catch {
            disable("\(error)")
        }
        return nil
    }

    /// Gives a pipe back; one that still holds bytes or failed is closed.
    func put(_ p: SplicePipe, reusable: Bool) {
        let kept = reusable && p.buffered == 0 && m.withLock { () -> Bool in
            guard on, free.count < keep else { return false }
            free.append(p)
            return true
        }
        if !kept { p.close() }
    }

    func count(spliced s: Bool) {
        m.withLock { if s { spliced += 1 } else { copied += 1 } }
    }

    var counters: ReadCounters {
        m.withLock { ReadCounters(spliced: spliced, copied: copied, spliceEnabled: on) }
    }

    func disable(_ why: String) {
        let was = m.withLock { () -> Bool in
            let was = on
            on = false
            free.removeAll()
            return was
        }
        if was { logger.info("nbd: READ replies are copied, not spliced: \(why)") }
    }
}
