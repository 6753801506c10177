// Where the imager reads the volume from: HotCore's snapshot export through
// libnbd (online), or the device itself under exclusive access (offline).
// Each imager worker gets its own reader, so an NBD source runs one
// connection per worker (the daemon serves several) and keeps that many
// requests in flight.
import CNBD
import Foundation
import HotErrors
import HotOS

public protocol BlockReader: AnyObject {
    /// Reads exactly `count` bytes at `offset` into `buf`.
    func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws
    func close()
}

public protocol BlockSource: Sendable {
    var size: UInt64 { get }
    var description: String { get }
    /// Buffers passed to readers must be aligned to this (O_DIRECT).
    var alignment: Int { get }
    func makeReader() throws -> BlockReader
}

public struct ReadError: CodedError {
    public var description: String
    public var kind: FailureKind { .failed }
}

/// The snapshot export of a HotCore daemon, over libnbd.
public struct NBDSource: BlockSource {
    public let uri: String
    public let size: UInt64
    public var description: String { uri }
    public var alignment: Int { 4096 }

    public init(uri: String) throws {
        self.uri = uri
        let r = try NBDReader(uri: uri)
        size = r.size
        r.close()
    }

    public func makeReader() throws -> BlockReader { try NBDReader(uri: uri) }
}

final class NBDReader: BlockReader {
    private var h: OpaquePointer?
    let size: UInt64

    init(uri: String) throws {
        guard let h = nbd_create() else { throw ReadError(description: "libnbd: \(String(cString: nbd_get_error()))") }
        if nbd_connect_uri(h, uri) != 0 {
            let e = String(cString: nbd_get_error())
            nbd_close(h)
            throw ReadError(description: "connecting to \(uri): \(e)")
        }
        let s = nbd_get_size(h)
        if s < 0 {
            let e = String(cString: nbd_get_error())
            nbd_close(h)
            throw ReadError(description: "size of \(uri): \(e)")
        }
        self.h = h
        size = UInt64(s)
    }

    func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
        guard let h else { throw ReadError(description: "reader closed") }
        if nbd_pread(h, buf, count, offset, 0) != 0 {
            throw ReadError(description: "reading \(count) bytes at \(offset) from the snapshot: \(String(cString: nbd_get_error()))")
        }
    }

    func close() {
        if let h { _ = nbd_shutdown(h, 0); nbd_close(h) }
        h = nil
    }

    deinit { close() }
}

/// A device or image file read directly with O_DIRECT (offline backups,
/// and read-only mounted volumes). Readers share one descriptor (pread).
public final class DeviceSource: BlockSource, @unchecked Sendable {
    public let device: BlockDevice
    public var size: UInt64 { device.size }
    public var description: String { device.path }
    public var alignment: Int { 4096 }

    /// `exclusive` holds the device with O_EXCL for the whole backup so
    /// nobody mounts it meanwhile.
    public init(path: String, exclusive: Bool) throws {
        device = try BlockDevice(path: path, readOnly: true, exclusive: exclusive, direct: true)
    }

    public func makeReader() throws -> BlockReader { DeviceReader(device: device) }
}

final class DeviceReader: BlockReader {
    let device: BlockDevice
    init(device: BlockDevice) { self.device = device }
    func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
        try device.read(into: buf, count: count, offset: offset)
    }
    func close() {}
}
