// The control socket: one thread per connection reading JSON lines and
// answering each with one line (HotControl's codec). The daemon decides
// what each op does.
import HotControl
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

final class ControlServer: @unchecked Sendable {
    let path: String
    let logger: Logger
    private var listener: UnixSocket?
    private let m = Monitor()
    private var nextID = 0
    private var open: [Int: UnixSocket] = [:]
    /// (connection id, request) → reply
    var handler: ((Int, ControlRequest) -> ControlReply)?
    /// Called when a connection closes.
    var onClose: ((Int) -> Void)?
    static let maxLine = 64 << 20

    init(path: String, logger: Logger) {
        self.path = path
        self.logger = logger
    }

    func start() throws {
        let l = try UnixSocket.listen(path: path)
        listener = l
        Threads.start(name: "ctl-accept") { [self] in
            while true {
                let c: UnixSocket
                do { c = try l.accept() } catch {
                    if l.closed { return }
                    usleep(10_000)
                    continue
                }
                let id = m.withLock { nextID += 1; open[nextID] = c; return nextID }
                Threads.start(name: "ctl-conn") { [self] in
                    serve(c, id: id)
                    _ = m.withLock { open.removeValue(forKey: id) }
                    onClose?(id)
                    c.close()
                }
            }
        }
    }

    func stop() {
        listener?.close()
        unlink(path)
        for c in m.withLock({ Array(open.values) }) { c.shutdownBoth() }
    }

    /// Has the peer of connection `id` hung up? (Its handler may be blocked
    /// in a request, so nothing reads the socket to see the end of file.)
    func peerClosed(_ id: Int) -> Bool {
        guard let c = m.withLock({ open[id] }) else { return true }
        var byte: UInt8 = 0
        let n = recv(c.fd, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
    }

    private func serve(_ sock: UnixSocket, id: Int) {
        var pending: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            // Answer every complete line already buffered.
            while let nl = pending.firstIndex(of: 0x0a) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                if line.isEmpty { continue }
                let reply: ControlReply
                do {
                    let req = try ControlCodec.decode(ControlRequest.self, line)
                    reply = handler?(id, req) ?? .failure("daemon not ready")
                } catch {
                    logger.warning("control: malformed request: \(error)")
                    reply = ControlCodec.replyToUndecodable(error)
                }
                do { try sock.writeAll(ControlCodec.encode(reply)) } catch { return }
            }
            if pending.count > ControlServer.maxLine {
                logger.warning("control: request line over \(ControlServer.maxLine) bytes; closing")
                _ = try? sock.writeAll(ControlCodec.encode(ControlReply.failure("request too large")))
                return
            }
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try sock.readSome(into: $0.baseAddress!, count: $0.count) } }
            catch { return }
            if n == 0 { return }
            pending.append(contentsOf: buf[0..<n])
        }
    }
}
