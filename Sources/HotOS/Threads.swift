// Threads with a small, fixed stack: under mlockall every stack page is
// locked, so the default 8 MiB per thread would be wasted locked memory.
#if canImport(Glibc)
import Glibc
#endif

private final class ThreadBody {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

public enum Threads {
    /// Starts a detached thread running `body`.
    public static func start(name: String, stackBytes: Int = 1 << 20, _ body: @escaping () -> Void) {
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, stackBytes)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        var tid = pthread_t()
        let r = pthread_create(&tid, &attr, { arg in
            let b = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
            b.body()
            return nil
        }, box)
        pthread_attr_destroy(&attr)
        if r != 0 {
            Unmanaged<ThreadBody>.fromOpaque(box).release()
            // Fall back to running it on a default thread would hide the
            // problem; a server without its thread is useless.
            fatalError("pthread_create \(name): \(String(cString: strerror(r)))")
        }
        _ = tid
    }
}
