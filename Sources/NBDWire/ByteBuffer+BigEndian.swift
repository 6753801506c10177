// ByteBuffer+BigEndian.swift — the module's only byte-level plumbing.
//
// Design note: NBD is big-endian throughout. Writers append to a caller-owned
// `[UInt8]` (so a server can build one outgoing buffer per reply and reuse
// its capacity); readers never trap: every read is bounds-checked and
// returns nil when the bytes are not there, which is what lets the decoders
// treat hostile input as "not yet complete" or "malformed" instead of
// crashing. `NBDInputBuffer` is a consumed-prefix FIFO shared by the request
// decoder and the handshake: bytes are appended at the end, consumed from a
// moving head index, and the dead prefix is dropped only when that is cheap
// relative to what remains (amortised O(1) per byte). Everything here is
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

/// A FIFO of received bytes: append at the tail, consume from the head.
struct NBDInputBuffer {
    private(set) var storage: [UInt8] = []
    private(set) var head = 0

    var count: Int { storage.count - head }

    mutating func append(_ bytes: UnsafeRawBufferPointer) {
        storage.append(contentsOf: bytes)
    }

    mutating func append(_ bytes: [UInt8]) {
        storage.append(contentsOf: bytes)
    }

    /// Big-endian integer at `offset` bytes past the head.
    func peek<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T? {
        loadBE(storage, at: head + offset, as: T.self)
    }

    /// Copies `length` bytes starting `offset` past the head (caller has
    /// checked `count`).
    func copy(from offset: Int, length: Int) -> [UInt8] {
        let start = head + offset
        return Array(storage[start..<(start + length)])
    }

    /// Drops `n` bytes from the head (n <= count).
    mutating func consume(_ n: Int) {
        head += n
        compactIfWorthwhile()
    }

    /// Removes and returns everything still buffered.
    mutating func takeAll() -> [UInt8] {
        let out = Array(storage[head...])
        storage.removeAll(keepingCapacity: false)
        head = 0
        return out
    }

    mutating func removeAll() {
        storage.removeAll(keepingCapacity: false)
        head = 0
    }

    private mutating func compactIfWorthwhile() {
        if head == storage.count {
            // Keep a modest buffer for the next message; release the memory
            // of a large WRITE payload.
            storage.removeAll(keepingCapacity: storage.capacity <= 1 << 20)
            head = 0
        } else if head >= 4096 && head >= storage.count - head {
            // Moving the live tail costs no more than the bytes already consumed.
            storage.removeSubrange(0..<head)
            head = 0
        }
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
