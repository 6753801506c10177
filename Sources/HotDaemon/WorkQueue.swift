// A fixed pool of worker threads fed from one queue: NBD requests of all
// connections run here, so pipelined requests of one connection proceed in
// parallel and a slow device read does not hold up other connections.
import DequeModule
import HotCore
import HotOS
import HotSync

final class WorkQueue: @unchecked Sendable {
    private let m = Monitor()
    private var jobs: Deque<() -> Void> = []
    private var stopping = false

    init(threads: Int, name: String) {
        for i in 0..<threads {
            Threads.start(name: "\(name)-\(i)") { [self] in run() }
        }
    }

    func submit(_ job: @escaping () -> Void) {
        m.withLock {
            jobs.append(job)
            m.broadcast()
        }
    }

    func stop() { m.withLock { stopping = true; m.broadcast() } }

    private func run() {
        while true {
            m.lock()
            while jobs.isEmpty && !stopping { m.wait() }
            if jobs.isEmpty && stopping { m.unlock(); return }
            let job = jobs.removeFirst()
            m.unlock()
            job()
        }
    }
}
