// The kernel NBD client, configured over generic netlink (CHotShim's
// hs_nbd_*): hand it sockets that are already in the transmission phase and
// it presents /dev/nbdN. No nbd-client is needed at run time.
import CHotShim
#if canImport(Glibc)
import Glibc
#endif

public enum KernelNBD {
    public struct Config: Sendable {
        public var sizeBytes: UInt64
        public var blockSize: UInt64 = 4096
        public var serverFlags: UInt16
        /// Per-request timeout; 0 waits for the server forever (a local
        /// daemon is either alive or being restarted, see deadConnTimeout).
        public var timeoutSeconds: UInt64 = 0
        /// How long I/O waits, when every connection is dead, for a restarted
        /// daemon to reconnect before the kernel fails it with EIO.
        public var deadConnTimeoutSeconds: UInt64
        /// Shown in /sys/block/nbdN/backend; a reconnect must present the same.
        public var backend: String

        public init(sizeBytes: UInt64, blockSize: UInt64 = 4096, serverFlags: UInt16,
                    deadConnTimeoutSeconds: UInt64, backend: String) {
            self.sizeBytes = sizeBytes
            self.blockSize = blockSize
            self.serverFlags = serverFlags
            self.deadConnTimeoutSeconds = deadConnTimeoutSeconds
            self.backend = backend
        }
    }

    public static let flagHasFlags = UInt16(HS_NBD_FLAG_HAS_FLAGS)
    public static let flagSendFlush = UInt16(HS_NBD_FLAG_SEND_FLUSH)
    public static let flagSendFUA = UInt16(HS_NBD_FLAG_SEND_FUA)
    public static let flagSendTrim = UInt16(HS_NBD_FLAG_SEND_TRIM)
    public static let flagCanMultiConn = UInt16(HS_NBD_FLAG_CAN_MULTI_CONN)

    /// Whether this kernel has the nbd driver (loaded or loadable as a node).
    public static var available: Bool {
        access("/sys/module/nbd", F_OK) == 0 || access("/dev/nbd0", F_OK) == 0
    }

    public static func devicePath(_ index: Int) -> String { "/dev/nbd\(index)" }

    /// Connects `fds` (the client ends) to /dev/nbd`index` (nil: any free
    /// device); returns the index.
    public static func connect(index: Int?, fds: [Int32], config: Config) throws -> Int {
        var out: Int32 = -1
        let r = config.backend.withCString { be -> Int32 in
            var c = hs_nbd_config(size_bytes: config.sizeBytes, block_size: config.blockSize,
                                  server_flags: UInt64(config.serverFlags), client_flags: 0,
                                  timeout_s: config.timeoutSeconds,
                                  dead_conn_timeout_s: config.deadConnTimeoutSeconds, backend: be)
            return fds.withUnsafeBufferPointer { hs_nbd_connect(Int32(index ?? -1), $0.baseAddress, Int32(fds.count), &c, &out) }
        }
        if r < 0 { throw OSError("nbd netlink connect", errno: -r) }
        return Int(out)
    }

    /// Replaces the dead connections of /dev/nbd`index` with `fds`.
    public static func reconfigure(index: Int, fds: [Int32], deadConnTimeoutSeconds: UInt64, backend: String) throws {
        let r = backend.withCString { be in
            fds.withUnsafeBufferPointer { hs_nbd_reconfigure(Int32(index), $0.baseAddress, Int32(fds.count), deadConnTimeoutSeconds, be) }
        }
        if r < 0 { throw OSError("nbd netlink reconfigure", errno: -r, object: "/dev/nbd\(index)") }
    }

    public static func disconnect(index: Int) throws {
        let r = hs_nbd_disconnect(Int32(index))
        if r < 0 { throw OSError("nbd netlink disconnect", errno: -r, object: "/dev/nbd\(index)") }
    }

    /// Whether /dev/nbd`index` has a live configuration (nil: no such device).
    public static func isConnected(index: Int) -> Bool? {
        var c: Int32 = 0
        return hs_nbd_status(Int32(index), &c) == 0 ? c != 0 : nil
    }

    /// The backend identifier of /dev/nbd`index`, if connected.
    public static func backend(index: Int) -> String? {
        let t = readShortFile("/sys/block/nbd\(index)/backend")
        return (t?.isEmpty ?? true) ? nil : t
    }

    /// The size the kernel shows for /dev/nbd`index` (0 when unconfigured).
    public static func sizeBytes(index: Int) -> UInt64? {
        readShortFile("/sys/block/nbd\(index)/size").flatMap { UInt64($0) }.map { $0 * 512 }
    }


    /// A connected pair of stream sockets: (server end, kernel end).
    public static func socketPair() throws -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        if socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) != 0 {
            throw OSError("socketpair", errno: errno)
        }
        return (fds[0], fds[1])
    }
}
