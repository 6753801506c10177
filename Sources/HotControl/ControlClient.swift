// A client of a daemon's control socket (the CLI and the imager): one
// request, one reply, one call at a time.
import HotCore
import HotOS
import HotSync
#if canImport(Glibc)
import Glibc
#endif

public final class ControlClient: @unchecked Sendable {
    let sock: UnixSocket
    private var pending: [UInt8] = []
    private let m = Monitor()

    public init(path: String) throws {
        sock = try UnixSocket.connect(path: path)
    }

    public func close() { sock.close() }

    /// Ends the connection from another thread while a call may be blocked
    /// in it (the call throws; the daemon sees the client gone).
    public func shutdown() { sock.shutdownBoth() }

    /// Sends one request and waits for its reply.
    public func call(_ req: ControlRequest) throws -> ControlReply {
        try m.withLock {
            try sock.writeAll(ControlCodec.encode(req))
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                if let nl = pending.firstIndex(of: 0x0a) {
                    let line = Array(pending[..<nl])
                    pending.removeSubrange(...nl)
                    return try ControlCodec.decode(ControlReply.self, line)
                }
                let n = try buf.withUnsafeMutableBytes { try sock.readSome(into: $0.baseAddress!, count: $0.count) }
                if n == 0 { throw OSError("read", errno: ECONNRESET, object: "control socket (the daemon closed the connection)") }
                pending.append(contentsOf: buf[0..<n])
            }
        }
    }

    public func call(_ op: ControlOp) throws -> ControlReply { try call(ControlRequest(op: op)) }
}
