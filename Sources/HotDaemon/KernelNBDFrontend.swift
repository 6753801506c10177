// `--via nbd`: the kernel's own NBD client presents HotCore as /dev/nbdN.
//
//   /dev/nbdN   (kernel NBD client; no page cache of its own below the
//     │          filesystem: a completed write was answered by HotCore)
//     └─ N socketpairs, configured over generic netlink (KernelNBD):
//          the kernel end goes to the driver, the daemon end is served by
//          NBDServer in the transmission phase (no handshake: the kernel
//          does none) as the "live" export with simple replies.
//
// Reconnect. The device is set up with a dead-connection timeout: when the
// daemon dies (kill -9, crash) its socket ends close, the kernel marks every
// connection dead and holds new and in-flight I/O for up to that long. A new
// daemon started with `attach --reconnect` finds the device in
// RUN/NAME/nbd-index, checks that its backend identifier is ours, and hands
// fresh sockets to the kernel (NBD_CMD_RECONFIGURE); the held requests are
// resent to it and the mounted filesystem sees no error. A session that was
// running is lost (the new daemon starts idle), which the imager sees as a
// failed session.
//
// Request timeout. A request the old daemon had read but not answered is
// stuck on its dead socket: the kernel resends it only when the request
// timeout fires. So the device gets a timeout (--nbd-timeout, default 30 s),
// which bounds how long such a request waits after a restart. The price: a
// request that a *live* daemon does not answer within it makes the kernel
// drop that socket and resend the request on another one; the daemon then
// hands the kernel a replacement socket at once (replaceClosed), so the
// device never runs out of connections. HotCore answers every write within
// the buffer deadline, far below the timeout, except on a hung disk.
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

final class KernelNBDFrontend: Frontend, @unchecked Sendable {
    let stateFile: String
    let logger: Logger
    let options: AttachOptions
    private(set) var index: Int?
    private let m = Monitor()
    private var stopping = false
    private var server: NBDServer?
    private var backend = ""
    private var deadConnTimeout: UInt64 = 0

    init(runDir: String, logger: Logger, options: AttachOptions) {
        stateFile = runDir + "/nbd-index"
        self.logger = logger
        self.options = options
    }

    /// Connects a new device, or with --reconnect re-attaches the one a
    /// dead daemon of this attachment left waiting.
    func start(server: NBDServer, size: UInt64, sectorSize: Int) throws -> String {
        let backend = KernelNBDFrontend.backendID(name: options.name, device: options.device)
        var orphan: (index: Int, connections: Int)?
        if options.reconnect {
            orphan = KernelNBDFrontend.orphan(runDir: options.dir, backend: backend)
            if orphan == nil { logger.info("--reconnect: no device of '\(options.name)' is waiting; connecting a new one") }
        }
        return try start(server: server, size: size, sectorSize: sectorSize, connections: options.nbdConnections,
                         requestTimeout: options.nbdRequestTimeoutSeconds, deadConnTimeout: options.deadConnTimeoutSeconds,
                         backend: backend, reconnectTo: orphan)
    }

    /// The identifier the kernel keeps for the device; a reconnect must match it.
    static func backendID(name: String, device: String) -> String {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let canon = realpath(device, &buf) != nil ? String(cString: buf) : device
        return "hotimage:\(name):\(canon)"
    }

    /// The device a previous daemon of this attachment left waiting for a
    /// reconnect, if there is one and it is ours.
    static func orphan(runDir: String, backend: String) -> (index: Int, connections: Int)? {
        guard let (idx, conns) = readState(runDir + "/nbd-index") else { return nil }
        guard KernelNBD.isConnected(index: idx) == true, KernelNBD.backend(index: idx) == backend else { return nil }
        return (idx, conns)
    }

    static func readState(_ path: String) -> (Int, Int)? {
        guard let s = readShortFile(path) else { return nil }
        let parts = s.split(separator: " ").compactMap { Int($0) }
        guard parts.count == 2 else { return nil }
        return (parts[0], parts[1])
    }


    /// Connects (or, with `reconnectTo`, re-attaches) the kernel device and
    /// returns its path once the kernel shows the full size.
    func start(server: NBDServer, size: UInt64, sectorSize: Int, connections: Int, requestTimeout: UInt64,
               deadConnTimeout: UInt64, backend: String, reconnectTo: (index: Int, connections: Int)?) throws -> String {
        let count = reconnectTo?.connections ?? connections
        m.withLock {
            self.server = server
            self.backend = backend
            self.deadConnTimeout = deadConnTimeout
        }
        var kernelEnds: [Int32] = []
        defer { for fd in kernelEnds { close(fd) } }
        for _ in 0..<count { kernelEnds.append(try newConnection(server)) }
        let idx: Int
        if let r = reconnectTo {
            // The kernel notices the old sockets died as soon as their
            // process is gone; give it a moment if it has not yet.
            var attempt = 0
            while true {
                do {
                    try KernelNBD.reconfigure(index: r.index, fds: kernelEnds, deadConnTimeoutSeconds: deadConnTimeout, backend: backend)
                    break
                } catch let e as OSError where (e.errno == ENOSPC || e.errno == EBUSY) && attempt < 50 {
                    attempt += 1
                    usleep(100_000)
                }
            }
            idx = r.index
            logger.info("reconnected /dev/nbd\(idx) (\(count) connections)")
        } else {
            var cfg = KernelNBD.Config(sizeBytes: size, blockSize: UInt64(max(512, sectorSize)),
                                       serverFlags: KernelNBD.flagHasFlags | KernelNBD.flagSendFlush | KernelNBD.flagSendFUA
                                           | KernelNBD.flagSendTrim | KernelNBD.flagCanMultiConn,
                                       deadConnTimeoutSeconds: deadConnTimeout, backend: backend)
            cfg.timeoutSeconds = requestTimeout
            idx = try KernelNBD.connect(index: nil, fds: kernelEnds, config: cfg)
            logger.info("connected /dev/nbd\(idx) (\(count) connections, dead-connection timeout \(deadConnTimeout) s)")
        }
        index = idx
        writeFileAtomically(stateFile, "\(idx) \(count)\n")
        let deadline = monotonicNanos() + 10_000_000_000
        while KernelNBD.sizeBytes(index: idx) != size {
            if monotonicNanos() > deadline {
                throw DaemonError.failed("/dev/nbd\(idx) did not show \(size) bytes within 10 s")
            }
            usleep(20_000)
        }
        return KernelNBD.devicePath(idx)
    }

    /// A socketpair whose daemon end NBDServer serves; returns the kernel end.
    private func newConnection(_ server: NBDServer) throws -> Int32 {
        let (mine, theirs) = try KernelNBD.socketPair()
        UnixSocket.setSendBuffer(fd: theirs, NBDServer.sendBufferBytes)  // the kernel's WRITE payloads
        server.adoptTransmission(socket: UnixSocket(fd: mine), export: "live") { [weak self] in self?.replaceClosed() }
        return theirs
    }

    /// A kernel connection ended while the device stays: the kernel dropped
    /// it (request timeout) or it failed. Give the kernel a new one.
    private func replaceClosed() {
        let snap: (Int?, NBDServer?, String, UInt64) = m.withLock {
            (stopping ? nil : self.index, self.server, self.backend, self.deadConnTimeout)
        }
        guard let idx = snap.0, let server = snap.1 else { return }
        let backend = snap.2, dct = snap.3
        Threads.start(name: "nbd-replace") { [self] in
            for attempt in 0..<100 {
                if m.withLock({ stopping }) { return }
                do {
                    let fd = try newConnection(server)
                    defer { close(fd) }
                    try KernelNBD.reconfigure(index: idx, fds: [fd], deadConnTimeoutSeconds: dct, backend: backend)
                    logger.warning("a kernel connection of /dev/nbd\(idx) ended; replaced it")
                    return
                } catch {
                    // ENOSPC: the kernel has not marked the old one dead yet.
                    if attempt == 99 { logger.error("cannot replace a kernel connection of /dev/nbd\(idx): \(error)") }
                    usleep(100_000)
                }
            }
        }
    }

    /// Disconnects the device (the kernel sends NBD_CMD_DISC on every socket).
    func stop() {
        m.withLock { stopping = true }
        guard let idx = index else { return }
        index = nil
        do { try KernelNBD.disconnect(index: idx) } catch { logger.error("\(error)") }
        let deadline = monotonicNanos() + 10_000_000_000
        while KernelNBD.isConnected(index: idx) == true && monotonicNanos() < deadline { usleep(20_000) }
        unlink(stateFile)
    }
}
