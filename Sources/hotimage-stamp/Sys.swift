// Thin helpers over Glibc that the rest of the tool shares: the monotonic clock,
// errno text, stderr output, and fallocate(2). The GNU-only symbols Swift's Glibc
// module does not import (O_DIRECT, fallocate and its mode bits) come from the
// project's C shim (CHotShim's hs_file.h), as in HotOS.
import CHotShim
import Glibc

enum Sys {
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

    /// fallocate(2) with a mode from the shim (HS_FALLOC_*, KEEP_SIZE included),
    /// retried after EINTR. Returns 0 on success or the errno value.
    static func fallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Int32 {
        while true {
            if hs_fallocate(fd, mode, offset, length) == 0 { return 0 }
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
