// The NBD server of HotCore: fixed newstyle handshake (NBDWire's state
// machine), then the transmission phase with pipelined requests executed on
// a shared worker pool. Exports:
//   "" and "live"  the real device, read-write, through the engine's write
//                  path (copy-on-write while a session protects blocks);
//   "snapshot"     read-only point-in-time view, listed only while a session
//                  is armed or protecting; BLOCK_STATUS marks blocks outside
//                  the used map as holes (zero), so nbdcopy and qemu-img skip them.
// A peer's mistakes (bad magic, oversized or out-of-range requests, unknown
// commands, vanishing mid-request) cost that peer an error reply or its
// connection, a log line, and nothing else.
import HotCore
import HotOS
import HotSync
import Logging
import NBDWire
#if canImport(Glibc)
import Glibc
#endif

public final class NBDServer: @unchecked Sendable {
    public let socketPath: String
    let engine: SnapshotEngine
    let logger: Logger
    let queue: WorkQueue
    let buffers = BufferPool(keep: 32)
    /// The live device's descriptor, for READ replies spliced from its page
    /// cache; nil: every READ is copied through a buffer.
    let spliceFD: Int32?
    let pipes: PipePool
    private var listener: UnixSocket?
    private let m = Monitor()
    private var connections: [ObjectIdentifier: NBDConnection] = [:]
    private var nextID = 0
    public static let maxRequest: UInt32 = 32 << 20
    public static let maxInFlightPerConnection = 64
    /// Send buffer of every NBD socket (both ends of the kernel's pairs).
    /// The default (~208 KiB) makes a 1 MiB READ reply wait for the reader
    /// several times; 2 MiB lets whole replies through: nbd 1 MiB reads
    /// went from 2.4–3.1 to 7.5–8.4 GB/s (paired runs, spliced replies).
    public static let sendBufferBytes = 2 << 20

    public init(socketPath: String, engine: SnapshotEngine, logger: Logger, workers: Int = 8, spliceFD: Int32? = nil) {
        self.socketPath = socketPath
        self.engine = engine
        self.logger = logger
        self.spliceFD = spliceFD
        pipes = PipePool(enabled: spliceFD != nil, keep: 32, logger: logger)
        queue = WorkQueue(threads: workers, name: "nbd-worker")
    }

    public func start() throws {
        // A reply to a peer that has gone must fail with EPIPE, not kill the
        // process (splice to a socket raises SIGPIPE; send uses MSG_NOSIGNAL).
        signal(SIGPIPE, SIG_IGN)
        let l = try UnixSocket.listen(path: socketPath)
        listener = l
        Threads.start(name: "nbd-accept") { [self] in
            while true {
                let c: UnixSocket
                do { c = try l.accept() } catch {
                    if l.closed { return }
                    logger.warning("nbd: accept failed: \(error)")
                    usleep(10_000)
                    continue
                }
                let conn = m.withLock { () -> NBDConnection in
                    nextID += 1
                    let conn = NBDConnection(socket: c, server: self, id: nextID)
                    connections[ObjectIdentifier(conn)] = conn
                    return conn
                }
                Threads.start(name: "nbd-conn") { [self] in
                    conn.run()
                    _ = m.withLock { connections.removeValue(forKey: ObjectIdentifier(conn)) }
                }
            }
        }
    }

    /// Serves `socket` as a connection that is already in the transmission
    /// phase for `export` with simple replies: the kernel NBD client's
    /// sockets (it does no handshake; KernelNBDFrontend configures it).
    func adoptTransmission(socket: UnixSocket, export: String, onClose: (@Sendable () -> Void)? = nil) {
        guard let info = exportInfo(export) else { socket.close(); return }
        let neg = NBDNegotiated(exportName: info.name, structuredReplies: false, baseAllocationContextID: nil,
                                noZeroes: true, export: info, blockSizeAcknowledged: false)
        let conn = m.withLock { () -> NBDConnection in
            nextID += 1
            let conn = NBDConnection(socket: socket, server: self, id: nextID)
            conn.preNegotiated = neg
            connections[ObjectIdentifier(conn)] = conn
            return conn
        }
        Threads.start(name: "nbd-kconn") { [self] in
            conn.run()
            _ = m.withLock { connections.removeValue(forKey: ObjectIdentifier(conn)) }
            onClose?()
        }
    }

    public func stop() {
        listener?.close()
        unlink(socketPath)
        let conns = m.withLock { Array(connections.values) }
        for c in conns { c.socket.shutdownBoth() }
        queue.stop()
    }

    public var connectionCount: Int { m.withLock { connections.count } }

    func exportInfo(_ name: String) -> NBDExportInfo? {
        let base = NBDConst.hasFlags | NBDConst.canMultiConn
        switch name {
        case "", "live":
            let flags = base | NBDConst.sendFlush | NBDConst.sendFUA | NBDConst.sendTrim | NBDConst.sendWriteZeroes
            return NBDExportInfo(name: name, size: engine.device.size, transmissionFlags: flags,
                                 description: "live device (HotCore passthrough)",
                                 minBlock: 1, preferredBlock: UInt32(engine.config.blockSize),
                                 maxBlock: NBDServer.maxRequest)
        case "snapshot":
            guard engine.currentPhase.copiesOnWrite else { return nil }
            return NBDExportInfo(name: name, size: engine.device.size,
                                 transmissionFlags: base | NBDConst.readOnly | NBDConst.sendFlush,
                                 description: "point-in-time snapshot of the backup session",
                                 minBlock: 1, preferredBlock: UInt32(engine.config.blockSize),
                                 maxBlock: NBDServer.maxRequest)
        default:
            return nil
        }
    }

    func exportNames() -> [String] {
        engine.currentPhase.copiesOnWrite ? ["live", "snapshot"] : ["live"]
    }
}
