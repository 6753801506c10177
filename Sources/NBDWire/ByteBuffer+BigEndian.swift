// ByteBuffer+BigEndian.swift — the module's only byte-level plumbing.
//
// Design note: NBD is big-endian throughout. Writers append to a caller-owned
// `[UInt8]` (so a server can build one outgoing buffer per reply and reuse
// its capacity); readers never trap: every read is bounds-checked and
// returns nil when the bytes are not there, which is what lets the decoders
// treat hostile input as "not yet complete" or "malformed" instead of
// crashing. `NBDInputBuffer` is a consumed-prefix FIFO shared by the request
// decoder and the handshake: bytes are appended (or read straight from the
// socket) at a tail index, consumed from a head index, and the live bytes
// move to the front only when the free space at the tail runs out (they
// are then at most one partial message). Everything here is
// internal; the public surface is the codecs built on top.

extension Array where Element == UInt8 {
    /// Appends `value` in network byte order.
    @inline(__always)
    mutating func appendBE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.bigEndian) { append(contentsOf: $0) }
    }

    /// Appends `count` zero bytes.
    @inline(__always)
    mutating func appendZeroes(_ count: Int) {
        append(contentsOf: repeatElement(0, count: count))
    }
}

/// Reads a big-endian integer of type `T` at `index`; nil if out of range.
@inline(__always)
func loadBE<T: FixedWidthInteger>(_ bytes: [UInt8], at index: Int, as: T.Type = T.self) -> T? {
    let width = MemoryLayout<T>.size
    guard index >= 0, index <= bytes.count - width else { return nil }
    var value: T = 0
    for i in 0..<width {
        value = (value << 8) | T(truncatingIfNeeded: bytes[index + i])
    }
    return value
}

/// Sequential bounds-checked reader over a byte array slice.
struct NBDByteReader {
    private let bytes: [UInt8]
    private(set) var position: Int
    private let end: Int

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
        self.position = 0
        self.end = bytes.count
    }

    var remaining: Int { end - position }
    var isAtEnd: Bool { position == end }

    mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) -> T? {
        guard remaining >= MemoryLayout<T>.size,
              let v = loadBE(bytes, at: position, as: T.self) else { return nil }
        position += MemoryLayout<T>.size
        return v
    }

    /// Reads `count` raw bytes; nil if fewer remain. `count` may come
    /// straight off the wire, so it is compared before any arithmetic.
    mutating func readBytes<T: FixedWidthInteger>(count: T) -> [UInt8]? {
        guard count >= 0, UInt64(count) <= UInt64(remaining) else { return nil }
        let n = Int(count)
        let out = Array(bytes[position..<(position + n)])
        position += n
        return out
    }
}

/// A FIFO of received bytes: append (or read straight) into free space at
/// the tail, consume from the head. `storage` is allocated space, not
/// content: the bytes are `storage[head..<tail]`.
struct NBDInputBuffer {
    private(set) var storage: [UInt8] = []
    private(set) var head = 0
    private(set) var tail = 0

    /// Capacity kept between messages; a larger buffer (a big WRITE payload
    /// decoded whole) is released once it is drained.
    static let keepBytes = 1 << 20

    var count: Int { tail - head }

    mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        makeRoom(bytes.count)
        storage.withUnsafeMutableBytes { ($0.baseAddress! + tail).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
        tail += bytes.count
    }

    mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// Lets `read` put up to `max` bytes straight into free space at the
    /// tail (no intermediate copy); it returns how many it wrote.
    mutating func fill(max: Int, _ read: (UnsafeMutableRawPointer, Int) throws -> Int) rethrows -> Int {
        makeRoom(max)
        let n = try storage.withUnsafeMutableBytes { try read($0.baseAddress! + tail, max) }
        precondition(n >= 0 && n <= max)
        tail += n
        return n
    }

    /// Ensures `n` free bytes after the tail: moves the live bytes to the
    /// front when that suffices (they are few: at most one partial message
    /// is left after decoding), grows otherwise.
    private mutating func makeRoom(_ n: Int) {
        if storage.count - tail >= n { return }
        if head > 0 {
            let live = count
            if live > 0 {
                storage.withUnsafeMutableBytes { p in
                    (p.baseAddress!).copyMemory(from: p.baseAddress! + head, byteCount: live)
                }
            }
            head = 0
            tail = live
            if storage.count - tail >= n { return }
        }
        var newSize = Swift.max(storage.count, 4096)
        while newSize - tail < n { newSize *= 2 }
        storage.append(contentsOf: repeatElement(0, count: newSize - storage.count))
    }

    /// Big-endian integer at `offset` bytes past the head.
    func peek<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T? {
        guard offset >= 0, offset <= count - MemoryLayout<T>.size else { return nil }
        return loadBE(storage, at: head + offset, as: T.self)
    }

    /// Copies `length` bytes starting `offset` past the head (caller has
    /// checked `count`).
    func copy(from offset: Int, length: Int) -> [UInt8] {
        let start = head + offset
        return Array(storage[start..<(start + length)])
    }

    /// Copies up to `max` bytes from the head into `dst` and consumes them.
    mutating func take(into dst: UnsafeMutableRawPointer, max: Int) -> Int {
        let n = Swift.min(max, count)
        guard n > 0 else { return 0 }
        storage.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress! + head, byteCount: n) }
        consume(n)
        return n
    }

    /// Drops `n` bytes from the head (n <= count).
    mutating func consume(_ n: Int) {
        head += n
        if head == tail {
            head = 0
            tail = 0
            if storage.count > NBDInputBuffer.keepBytes { storage = [] }
        }
    }

    /// Removes and returns everything still buffered.
    mutating func takeAll() -> [UInt8] {
        let out = Array(storage[head..<tail])
        removeAll()
        return out
    }

    mutating func removeAll() {
        storage = []
        head = 0
        tail = 0
    }
}

/// Valid UTF-8 without NUL, as the spec requires of every string; nil otherwise.
func decodeNBDString(_ bytes: [UInt8]) -> String? {
    if bytes.contains(0) { return nil }
    let s = String(decoding: bytes, as: UTF8.self)
    // Decoding repairs invalid sequences; a byte-exact round trip proves validity.
    guard s.utf8.elementsEqual(bytes) else { return nil }
    return s
}

/// UTF-8 bytes of `s`, cut to at most `max` bytes without splitting a scalar.
func truncatedUTF8(_ s: String, max: Int) -> [UInt8] {
    var bytes = Array(s.utf8)
    guard bytes.count > max else { return bytes }
    var cut = max
    // Back off over continuation bytes (10xxxxxx) to a scalar boundary.
    while cut > 0 && (bytes[cut] & 0xC0) == 0x80 { cut -= 1 }
    bytes.removeSubrange(cut...)
    return bytes
}
