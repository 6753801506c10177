// Thin helpers over Glibc that the rest of the tool shares: the monotonic clock,
// errno text, stderr output, and the few GNU-only symbols Swift's Glibc module does
// not import (O_DIRECT, fallocate and its mode bits).
import Glibc

enum Sys {
    /// O_DIRECT is a _GNU_SOURCE constant and not visible to Swift; its value is per-arch.
    #if arch(arm64) || arch(arm)
    static let oDirect: Int32 = 0o200000
    #else
    static let oDirect: Int32 = 0o40000
    #endif

    // linux/falloc.h
    static let fallocKeepSize: Int32 = 0x01
    static let fallocPunchHole: Int32 = 0x02
    static let fallocZeroRange: Int32 = 0x10

    /// CLOCK_MONOTONIC in nanoseconds; the time base of every logged op and of --cut-ns.
    @inline(__always)
    static func monotonicNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// Sleeps for `ns` nanoseconds (restarting after EINTR).
    static func sleepNs(_ ns: UInt64) {
        var req = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
        var rem = timespec()
        while nanosleep(&req, &rem) != 0 && errno == EINTR { req = rem }
    }

    static func errnoText(_ code: Int32) -> String {
        String(cString: strerror(code))
    }

    static func fileExists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    /// fallocate(2) is declared only under _GNU_SOURCE, so it is looked up once at run
    /// time. It is not variadic, so calling it through a C function pointer is exact.
    private typealias FallocateFn = @convention(c) (Int32, Int32, Int64, Int64) -> Int32
    private static let fallocateFn: FallocateFn? = {
        guard let handle = dlopen(nil, RTLD_NOW), let sym = dlsym(handle, "fallocate") else { return nil }
        return unsafeBitCast(sym, to: FallocateFn.self)
    }()

    /// Returns 0 on success or the errno value.
    static func fallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Int32 {
        guard let fn = fallocateFn else { return ENOSYS }
        while true {
            if fn(fd, mode, Int64(offset), Int64(length)) == 0 { return 0 }
            let e = errno
            if e != EINTR { return e }
        }
    }
}

/// Writes a line to stderr, unbuffered.
func warn(_ message: String) {
    let line = message + "\n"
    _ = line.withCString { fputs($0, stderr) }
}

/// An I/O or format error the tool reports (exit status 2).
struct StampError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }

    static func errno(_ what: String, _ code: Int32 = Glibc.errno) -> StampError {
        StampError("\(what): \(Sys.errnoText(code))")
    }
}

/// A page-aligned heap buffer (posix_memalign) suitable for O_DIRECT I/O.
final class AlignedBuffer {
    let pointer: UnsafeMutableRawPointer
    let count: Int

    init(bytes: Int, alignment: Int = 4096) {
        var raw: UnsafeMutableRawPointer?
        let rc = posix_memalign(&raw, alignment, max(bytes, alignment))
        guard rc == 0, let raw else { fatalError("posix_memalign(\(bytes)) failed: \(Sys.errnoText(rc))") }
        memset(raw, 0, bytes)
        pointer = raw
        count = bytes
    }

    deinit { free(pointer) }

    func block(_ index: Int) -> UnsafeMutableRawPointer {
        pointer + index * Stamp.blockSize
    }
}
