// Unix stream sockets for the NBD and control servers: root-only (0600)
// listening sockets, and whole-buffer reads and writes that retry EINTR
// and short transfers.
#if canImport(Glibc)
import CHotShim
import Glibc
#endif

public final class UnixSocket: @unchecked Sendable {
    public let fd: Int32
    public private(set) var closed = false

    public init(fd: Int32) { self.fd = fd }
    deinit { if !closed { Glibc.close(fd) } }

    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(fd)
    }

    /// Stops further reads and writes (wakes a thread blocked in read).
    public func shutdownBoth() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    static func address(_ path: String) throws -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw OSError("socket", errno: ENAMETOOLONG, object: path)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
            p[bytes.count] = 0
        }
        return addr
    }

    /// A listening socket at `path` with mode 0600 (an old socket file is replaced).
    public static func listen(path: String, backlog: Int32 = 64) throws -> UnixSocket {
        let fd = try syscall("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let s = UnixSocket(fd: fd)
        unlink(path)
        var addr = try address(path)
        // Create the socket file already private: umask for the bind.
        let old = umask(0o177)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(old)
        if r != 0 { throw OSError("bind", errno: errno, object: path) }
        try syscall("listen", path) { Glibc.listen(fd, backlog) }
        return s
    }

    public static func connect(path: String) throws -> UnixSocket {
        let fd = try syscall("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let s = UnixSocket(fd: fd)
        var addr = try address(path)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 { throw OSError("connect", errno: errno, object: path) }
        return s
    }

    public func accept() throws -> UnixSocket {
        let c = try syscall("accept") { Glibc.accept(fd, nil, nil) }
        return UnixSocket(fd: c)
    }

    /// Asks for a send buffer of `bytes` (SO_SNDBUFFORCE as root, past
    /// net.core.wmem_max; else SO_SNDBUF, capped by it). Returns the size the
    /// kernel reports afterwards (it doubles the request for bookkeeping).
    @discardableResult
    public func setSendBuffer(_ bytes: Int) -> Int { UnixSocket.setSendBuffer(fd: fd, bytes) }

    @discardableResult
    public static func setSendBuffer(fd: Int32, _ bytes: Int) -> Int {
        var v = Int32(clamping: bytes)
        let size = socklen_t(MemoryLayout<Int32>.size)
        if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &v, size) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, size)
        }
        var got: Int32 = 0
        var len = size
        _ = getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &len)
        return Int(got)
    }

    /// Reads what is available (at least one byte); 0 at end of stream.
    public func readSome(into buf: UnsafeMutableRawPointer, count: Int) throws -> Int {
        try syscall("read") { Glibc.read(fd, buf, count) }
    }

    /// Bytes already received and not yet read (0 if unknown).
    public var pendingBytes: Int { max(0, Int(hs_pending_bytes(fd))) }

    /// Reads exactly `count` bytes; false at a clean end of stream before any byte.
    public func readExactly(into buf: UnsafeMutableRawPointer, count: Int) throws -> Bool {
        var done = 0
        while done < count {
            let n = try readSome(into: buf + done, count: count - done)
            if n == 0 {
                if done == 0 { return false }
                throw OSError("read", errno: ECONNRESET, object: "peer closed mid-message")
            }
            done += n
        }
        return true
    }

    public func writeAll(_ buf: UnsafeRawPointer, count: Int) throws {
        var done = 0
        while done < count {
            let n = try syscall("write") { send(fd, buf + done, count - done, Int32(MSG_NOSIGNAL)) }
            done += n
        }
    }

    public func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try writeAll($0.baseAddress!, count: $0.count) }
    }

    /// Writes `header` then `count` bytes at `data` with one writev where possible.
    public func writeAll(header: [UInt8], data: UnsafeRawPointer?, count: Int) throws {
        guard let data, count > 0 else { return try writeAll(header) }
        try header.withUnsafeBytes { h in
            var iov = [iovec(iov_base: UnsafeMutableRawPointer(mutating: h.baseAddress!), iov_len: h.count),
                       iovec(iov_base: UnsafeMutableRawPointer(mutating: data), iov_len: count)]
            let total = h.count + count
            var done = 0
            var start = 0
            while done < total {
                let n = try iov.withUnsafeMutableBufferPointer { p in
                    try syscall("writev") { writev(fd, p.baseAddress! + start, Int32(p.count - start)) }
                }
                done += n
                advance(&iov, start: &start, by: n)
            }
        }
    }
}
