// One client connection: handshake, then a reader loop that decodes
// requests and hands them to the worker pool; replies are written whole
// under the connection's write lock, so pipelined replies never interleave.
import HotCore
import HotOS
import HotSync
import Logging
import NBDWire
#if canImport(Glibc)
import Glibc
#endif

final class NBDConnection: @unchecked Sendable {
    let socket: UnixSocket
    unowned let server: NBDServer
    let id: Int
    private let writeLock = Monitor()
    private let flight = Monitor()
    private var inFlight = 0
    private var broken = false
    var logger: Logger
    /// Set for a connection that starts in the transmission phase.
    var preNegotiated: NBDNegotiated?

    init(socket: UnixSocket, server: NBDServer, id: Int) {
        self.socket = socket
        self.server = server
        self.id = id
        logger = server.logger
        logger[metadataKey: "conn"] = "\(id)"
    }

    var engine: SnapshotEngine { server.engine }

    func run() {
        socket.setSendBuffer(NBDServer.sendBufferBytes)
        defer {
            // Let running requests finish before the socket goes.
            flight.withLock { while inFlight > 0 { flight.wait() } }
            socket.close()
        }
        if let neg = preNegotiated {
            transmission(neg, leftover: [])
            return
        }
        guard let (neg, leftover) = handshake() else { return }
        logger.debug("nbd: export '\(neg.exportName)' structured=\(neg.structuredReplies) blockstatus=\(neg.baseAllocationContextID != nil)")
        transmission(neg, leftover: leftover)
    }

    private func handshake() -> (NBDNegotiated, [UInt8])? {
        var hs = NBDHandshake(lookup: { [server] in server.exportInfo($0) },
                              listNames: { [server] in server.exportNames() },
                              defaultExport: "")
        do { try socket.writeAll(hs.greeting()) } catch { return nil }
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n: Int
            do { n = try buf.withUnsafeMutableBytes { try socket.readSome(into: $0.baseAddress!, count: $0.count) } }
            catch { logger.info("nbd: handshake read failed: \(error)"); return nil }
            if n == 0 { return nil }
            let actions: [NBDHandshakeAction]
            do { actions = try buf.withUnsafeBytes { try hs.feed(UnsafeRawBufferPointer(rebasing: $0[0..<n])) } }
            catch { logger.warning("nbd: handshake refused: \(error)"); return nil }
            for a in actions {
                switch a {
                case .send(let bytes):
                    do { try socket.writeAll(bytes) } catch { return nil }
                case .close(let reason):
                    logger.info("nbd: handshake closed: \(reason)")
                    return nil
                case .enterTransmission(let neg):
                    return (neg, hs.takeLeftover())
                }
            }
        }
    }

    /// Bytes asked of the socket when the decoder needs more: enough for
    /// many small requests per read, while after a large WRITE only the next
    /// header is read, so the following payload goes straight to its buffer.
    static let readAhead = 64 << 10
    static let largeWrite = 64 << 10
    /// WRITEs up to this size run on the reader thread.
    static let inlineWrite = 16 << 10

    private func transmission(_ neg: NBDNegotiated, leftover: [UInt8]) {
        var decoder = NBDRequestDecoder(maxPayload: Int(NBDServer.maxRequest))
        decoder.feed(leftover)
        let snapshot = neg.exportName == "snapshot"
        let context = neg.validationContext
        let pool = server.buffers
        var afterLargeWrite = false
        let batch = ReplyBatch()
        defer { flush(batch) }
        while true {
            // Decode everything buffered before reading more.
            while true {
                let header: NBDRequest?
                do { header = try decoder.nextHeader() } catch {
                    logger.warning("nbd: closing connection: \(error)")
                    return
                }
                guard let req = header else { break }
                var payload: UnsafeMutableRawPointer?
                let length = Int(req.length)
                if req.hasPayload {
                    // The payload goes from the socket straight into a request
                    // buffer; only the bytes already read ahead are copied.
                    let p = pool.get(length)
                    let got = decoder.takeBuffered(into: p, max: length)
                    do {
                        if got < length, try !socket.readExactly(into: p + got, count: length - got) {
                            throw OSError("read", errno: ECONNRESET, object: "peer closed mid-message")
                        }
                    } catch {
                        pool.put(p, length)
                        logger.warning("nbd: client vanished mid-request (\(describe(req)): \(error))")
                        return
                    }
                    payload = p
                    afterLargeWrite = length >= NBDConnection.largeWrite
                } else {
                    afterLargeWrite = false
                }
                if req.command == NBDCommand.disc.rawValue {
                    if let payload { pool.put(payload, length) }
                    return
                }
                if let err = nbdValidate(req, context: context) {
                    if let payload { pool.put(payload, length) }
                    logger.info("nbd: refused \(describe(req)): \(err)")
                    reply(neg, req, error: err, message: "invalid request")
                    continue
                }
                // Where the request runs. Here, on the reader thread, saving
                // two thread hand-offs, when it is alone (nothing else in
                // flight or waiting: a client at queue depth 1, such as each
                // nbdfuse connection), or when it is a small plain WRITE (it
                // lands in the page cache in microseconds, less than a
                // hand-off costs). Otherwise on the pool, so the next request
                // is read while this one runs and a read that waits for the
                // disk holds up nothing else. After a large WRITE only its
                // header was read ahead, so the socket itself is asked
                // whether more is waiting.
                let smallWrite = req.command == NBDCommand.write.rawValue && length <= NBDConnection.inlineWrite
                    && req.flags & NBDConst.fua == 0
                let alone = flight.withLock { () -> Bool in
                    while inFlight >= NBDServer.maxInFlightPerConnection { flight.wait() }
                    inFlight += 1
                    return inFlight == 1 && decoder.bufferedBytes == 0
                }
                let here = smallWrite || alone && (!afterLargeWrite || socket.pendingBytes == 0)
                if here {
                    if smallWrite, let payload {
                        writeBatched(neg, req, payload: payload, batch: batch)
                    } else {
                        flush(batch)
                        execute(neg, req, payload: payload, snapshot: snapshot)
                    }
                    if let payload { pool.put(payload, length) }
                    flight.withLock { inFlight -= 1; flight.broadcast() }
                    continue
                }
                server.queue.submit { [self] in
                    execute(neg, req, payload: payload, snapshot: snapshot)
                    if let payload { pool.put(payload, length) }
                    flight.withLock { inFlight -= 1; flight.broadcast() }
                }
            }
            flush(batch)  // before waiting for the client
            let want = afterLargeWrite ? max(1, NBDConst.requestHeaderSize - decoder.bufferedBytes) : NBDConnection.readAhead
            let n: Int
            do { n = try decoder.fill(max: want) { try socket.readSome(into: $0, count: $1) } } catch {
                logger.info("nbd: read failed: \(error)")
                return
            }
            if n == 0 {
                if decoder.bufferedBytes > 0 {
                    logger.warning("nbd: client vanished mid-request (\(decoder.bufferedBytes) bytes of an incomplete message)")
                }
                return
            }
        }
    }

    private func describe(_ r: NBDRequest) -> String {
        let name = r.knownCommand.map { "\($0)" } ?? "command \(r.command)"
        return "\(name) offset \(r.offset) length \(r.length)"
    }

    private func errno(for error: Error) -> NBDErrno {
        switch error {
        case let e as OSError:
            switch e.errno {
            case ENOSPC: return .nospc
            case EPERM, EACCES, EROFS: return .perm
            case ENOMEM: return .nomem
            case EINVAL: return .inval
            default: return .io
            }
        case let e as EngineError:
            if case .outOfRange = e { return .inval }
            return .io
        default:
            return .io
        }
    }

    private func execute(_ neg: NBDNegotiated, _ req: NBDRequest, payload: UnsafeMutableRawPointer?, snapshot: Bool) {
        guard let cmd = req.knownCommand else {
            return reply(neg, req, error: .inval, message: "unknown command")
        }
        do {
            switch cmd {
            case .read:
                let count = Int(req.length)
                if !snapshot, try spliceRead(neg, req) { return }
                let data = server.buffers.get(count)
                defer { server.buffers.put(data, count) }
                if snapshot {
                    try engine.snapshotRead(offset: req.offset, count: count, into: data)
                } else {
                    try engine.read(offset: req.offset, count: count, into: data)
                }
                send(readHeader(neg, req), data, count)
                server.pipes.count(spliced: false)
            case .write:
                if req.length > 0, let payload {
                    try engine.write(offset: req.offset, count: Int(req.length), from: payload)
                }
                if req.flags & NBDConst.fua != 0 { try engine.flush() }
                ok(neg, req)
            case .flush:
                try engine.flush()
                ok(neg, req)
            case .trim, .writeZeroes:
                let unmap = cmd == .trim || req.flags & NBDConst.noHole == 0
                try engine.zero(offset: req.offset, length: UInt64(req.length), unmap: unmap)
                if req.flags & NBDConst.fua != 0 { try engine.flush() }
                ok(neg, req)
            case .blockStatus:
                guard let ctx = neg.baseAllocationContextID, neg.structuredReplies else {
                    return reply(neg, req, error: .inval, message: "no metadata context negotiated")
                }
                var extents: [(length: UInt32, flags: UInt32)]
                if snapshot {
                    let ex = try engine.snapshotExtents(offset: req.offset, length: UInt64(req.length))
                    extents = ex.map { (UInt32($0.length), $0.hole ? NBDConst.stateHole | NBDConst.stateZero : 0) }
                } else {
                    extents = [(req.length, 0)]
                }
                if req.flags & NBDConst.reqOne != 0 { extents = Array(extents.prefix(1)) }
                var out: [UInt8] = []
                NBDReply.blockStatus(cookie: req.cookie, contextID: ctx, extents: extents, done: true, into: &out)
                send(out, nil, 0)
            case .cache:
                ok(neg, req)
            case .disc, .resize:
                reply(neg, req, error: .inval, message: "unsupported command")
            }
        } catch {
            let e = errno(for: error)
            if snapshot || e != .io { logger.info("nbd: \(describe(req)) failed: \(error)") }
            else { logger.error("nbd: live \(describe(req)) failed: \(error)") }
            reply(neg, req, error: e, message: "\(error)")
        }
    }

    private func readHeader(_ neg: NBDNegotiated, _ req: NBDRequest) -> [UInt8] {
        var header: [UInt8] = []
        if neg.structuredReplies {
            NBDReply.offsetData(cookie: req.cookie, offset: req.offset, dataLength: Int(req.length), done: true, into: &header)
        } else {
            NBDReply.simple(cookie: req.cookie, error: 0, into: &header)
        }
        return header
    }

    /// A live READ answered by splicing the device's pages to the socket
    /// (no copy in the daemon). False: not spliced (splicing off, the READ
    /// too large for a pipe, or the kernel refused it); copy instead. A read
    /// error throws, before anything is sent.
    private func spliceRead(_ neg: NBDNegotiated, _ req: NBDRequest) throws -> Bool {
        guard let fd = server.spliceFD, let pipe = server.pipes.get(offset: req.offset, count: Int(req.length)) else {
            return false
        }
        var reusable = false
        defer { server.pipes.put(pipe, reusable: reusable) }
        try engine.checkRange(req.offset, UInt64(req.length))
        do {
            try pipe.fill(from: fd, offset: req.offset, count: Int(req.length))
        } catch let e as OSError where e.errno == EINVAL && pipe.buffered == 0 {
            server.pipes.disable("\(e)")
            return false
        } catch let e as OSError where e.errno == EAGAIN {
            return false  // more slots than pages expected: copy (the pipe is closed)
        }
        let header = readHeader(neg, req)
        writeLock.withLock {
            guard !broken else { return }
            do {
                try socket.writeAll(header)
                try pipe.drain(to: socket.fd)
                reusable = true
                server.pipes.count(spliced: true)
            } catch { dropAfterFailedReply(error) }
        }
        return true
    }

    /// A small plain WRITE on the reader thread. Its success reply joins the
    /// batch, sent with one write when the reader has decoded everything it
    /// read (or the batch is full): a burst of small WRITEs costs one send
    /// instead of one each. A failure flushes the batch and answers at once.
    private func writeBatched(_ neg: NBDNegotiated, _ req: NBDRequest, payload: UnsafeMutableRawPointer, batch: ReplyBatch) {
        do {
            if req.length > 0 { try engine.write(offset: req.offset, count: Int(req.length), from: payload) }
        } catch {
            flush(batch)
            let e = errno(for: error)
            if e != .io { logger.info("nbd: \(describe(req)) failed: \(error)") }
            else { logger.error("nbd: live \(describe(req)) failed: \(error)") }
            reply(neg, req, error: e, message: "\(error)")
            return
        }
        NBDReply.simple(cookie: req.cookie, error: 0, at: batch.next())
        if batch.full { flush(batch) }
    }

    private func flush(_ batch: ReplyBatch) {
        guard batch.count > 0 else { return }
        writeLock.withLock {
            guard !broken else { return }
            do { try socket.writeAll(batch.bytes, count: batch.byteCount) } catch { dropAfterFailedReply(error) }
        }
        batch.count = 0
    }

    private func ok(_ neg: NBDNegotiated, _ req: NBDRequest) {
        // Non-read commands answer with a simple reply even when structured
        // replies are on (allowed by the spec, and what nbdkit does).
        withUnsafeTemporaryAllocation(byteCount: NBDConst.simpleReplyHeaderSize, alignment: 8) { b in
            NBDReply.simple(cookie: req.cookie, error: 0, at: b.baseAddress!)
            writeLock.withLock {
                guard !broken else { return }
                do { try socket.writeAll(b.baseAddress!, count: b.count) } catch { dropAfterFailedReply(error) }
            }
        }
    }

    private func reply(_ neg: NBDNegotiated, _ req: NBDRequest, error: NBDErrno, message: String) {
        var out: [UInt8] = []
        if neg.structuredReplies {
            NBDReply.error(cookie: req.cookie, errno: error, message: String(message.prefix(4000)), done: true, into: &out)
        } else {
            NBDReply.simple(cookie: req.cookie, error: error.rawValue, into: &out)
        }
        send(out, nil, 0)
    }

    private func send(_ header: [UInt8], _ data: UnsafeRawPointer?, _ count: Int) {
        writeLock.withLock {
            guard !broken else { return }
            do { try socket.writeAll(header: header, data: data, count: count) } catch { dropAfterFailedReply(error) }
        }
    }

    /// Write lock held.
    private func dropAfterFailedReply(_ error: Error) {
        broken = true
        logger.info("nbd: reply failed, dropping connection: \(error)")
        socket.shutdownBoth()
    }
}

/// Success replies of small WRITEs run on the reader thread, waiting to go
/// out with one write (simple replies: 16 bytes each).
final class ReplyBatch {
    static let capacity = 64
    let bytes = UnsafeMutableRawPointer.allocate(byteCount: capacity * NBDConst.simpleReplyHeaderSize, alignment: 8)
    var count = 0
    var full: Bool { count == ReplyBatch.capacity }
    var byteCount: Int { count * NBDConst.simpleReplyHeaderSize }
    deinit { bytes.deallocate() }

    /// Room for the next reply.
    func next() -> UnsafeMutableRawPointer {
        precondition(count < ReplyBatch.capacity)
        count += 1
        return bytes + (count - 1) * NBDConst.simpleReplyHeaderSize
    }
}
