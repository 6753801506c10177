// What the engine needs from the outside world, as protocols, so the
// engine stays free of OS calls and runs in unit tests against memory:
// - `BlockIO`: the real device (HotOS.BlockDevice in the daemon);
// - `SpillStore`: the file tier of the COW buffer (hb_NN.tmp files in the
//   daemon), fixed-size slots addressed by an opaque location.

import HotSync

public protocol BlockIO: AnyObject, Sendable {
    var size: UInt64 { get }
    func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws
    func write(from buf: UnsafeRawPointer, count: Int, offset: UInt64) throws
    /// Makes the range read as zeros (`unmap`: may deallocate).
    func zero(offset: UInt64, length: UInt64, unmap: Bool) throws
    func flush() throws
    /// Reads consecutive bytes from `offset` into several buffers (preadv).
    func read(into buffers: [(UnsafeMutableRawPointer, Int)], offset: UInt64) throws
}

extension BlockIO {
    public func read(into buffers: [(UnsafeMutableRawPointer, Int)], offset: UInt64) throws {
        var off = offset
        for (p, n) in buffers {
            try read(into: p, count: n, offset: off)
            off += UInt64(n)
        }
    }
}

public enum SpillError: Error, Equatable, CustomStringConvertible {
    /// The configured total size of the spill files is reached.
    case full(limit: UInt64)
    case io(String)

    public var description: String {
        switch self {
        case .full(let l): return "the buffer files reached their limit of \(l) bytes"
        case .io(let s): return s
        }
    }
}

public protocol SpillStore: AnyObject, Sendable {
    /// Stores `count` bytes (one block) and returns where.
    func store(_ data: UnsafeRawPointer, count: Int) throws -> UInt64
    /// Stores several blocks at once (one write where the store can);
    /// all or nothing.
    func store(batch: [(UnsafeRawPointer, Int)]) throws -> [UInt64]
    func load(_ location: UInt64, into buf: UnsafeMutableRawPointer, count: Int) throws
    func free(_ location: UInt64)
    /// Bytes held by live slots.
    var bytesInUse: UInt64 { get }
    /// Bytes the store occupies on disk (files' sizes).
    var bytesAllocated: UInt64 { get }
    var fileCount: Int { get }
    /// Frees everything and deletes the files.
    func removeAll()
}

extension SpillStore {
    public func store(batch: [(UnsafeRawPointer, Int)]) throws -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(batch.count)
        do {
            for (p, n) in batch { out.append(try store(p, count: n)) }
        } catch {
            for l in out { free(l) }
            throw error
        }
        return out
    }
}

/// A device in memory, for tests and benchmarks of the engine.
public final class MemoryBlockIO: BlockIO, @unchecked Sendable {
    public let size: UInt64
    public let bytes: UnsafeMutableRawPointer
    public init(size: UInt64) {
        self.size = size
        bytes = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size))
    }
    deinit { bytes.deallocate() }

    public func read(into buf: UnsafeMutableRawPointer, count: Int, offset: UInt64) throws {
        precondition(offset + UInt64(count) <= size)
        buf.copyMemory(from: bytes + Int(offset), byteCount: count)
    }
    public func write(from buf: UnsafeRawPointer, count: Int, offset: UInt64) throws {
        precondition(offset + UInt64(count) <= size)
        (bytes + Int(offset)).copyMemory(from: buf, byteCount: count)
    }
    public func zero(offset: UInt64, length: UInt64, unmap: Bool) throws {
        (bytes + Int(offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(length))
    }
    public func flush() throws {}
}

/// A spill store in memory with an optional limit, for tests.
public final class MemorySpillStore: SpillStore, @unchecked Sendable {
    private let m = Monitor()
    private var slots: [UInt64: [UInt8]] = [:]
    private var next: UInt64 = 0
    public let limit: UInt64
    public var failNextStore: SpillError?

    public init(limit: UInt64 = .max) { self.limit = limit }

    public func store(_ data: UnsafeRawPointer, count: Int) throws -> UInt64 {
        try m.withLock {
            if let e = failNextStore { failNextStore = nil; throw e }
            if UInt64(slots.count + 1) * UInt64(count) > limit { throw SpillError.full(limit: limit) }
            next += 1
            slots[next] = Array(UnsafeRawBufferPointer(start: data, count: count))
            return next
        }
    }
    public func load(_ location: UInt64, into buf: UnsafeMutableRawPointer, count: Int) throws {
        try m.withLock {
            guard let s = slots[location] else { throw SpillError.io("no slot \(location)") }
            s.withUnsafeBytes { buf.copyMemory(from: $0.baseAddress!, byteCount: min(count, s.count)) }
        }
    }
    public func free(_ location: UInt64) { m.withLock { _ = slots.removeValue(forKey: location) } }
    public var bytesInUse: UInt64 { m.withLock { UInt64(slots.values.reduce(0) { $0 + $1.count }) } }
    public var bytesAllocated: UInt64 { bytesInUse }
    public var fileCount: Int { m.withLock { slots.isEmpty ? 0 : 1 } }
    public func removeAll() { m.withLock { slots.removeAll() } }
}
