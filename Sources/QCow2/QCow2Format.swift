// QCow2Format.swift — constants, errors, the compression choice, and the
// small helpers (big-endian fields, checked arithmetic, file I/O, a lock)
// shared by the writer, the reader and the verifier.
//
// Reference: qemu's docs/interop/qcow2.txt. All on-disk numbers are big-endian.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CZlib

// MARK: - Errors

/// Every failure of this module. `message` says what went wrong and where
/// (file offset and/or guest offset); `path` names the image when known.
public struct QCow2Error: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public let path: String?
    /// Set when a backing chain cannot be opened (`QCow2Chain`): which link
    /// and which file, typed.
    public let chain: QCow2ChainFailure?

    public init(_ message: String, path: String? = nil, chain: QCow2ChainFailure? = nil) {
        self.message = message
        self.path = path
        self.chain = chain
    }

    public var description: String {
        if let path { return "\(path): \(message)" }
        return message
    }

    func with(path: String) -> QCow2Error { QCow2Error(message, path: self.path ?? path, chain: chain) }
}

// MARK: - Compression choice

/// The compression an image is written with. `.none` writes only standard
/// (uncompressed) clusters; the header then says zlib, like qemu's default.
public enum QCow2Compression: Equatable, Sendable, CustomStringConvertible {
    case none
    case zstd(level: Int32)
    case zlib(level: Int32)

    public static let defaultZstdLevel: Int32 = 1
    public static let defaultZlibLevel: Int32 = 6
    /// Accepted zstd levels: the "fast" negative levels down to -7, and 1...22.
    public static let zstdLevels: ClosedRange<Int32> = -7...22
    public static let zlibLevels: ClosedRange<Int32> = 1...9

    /// Parses "none", "zstd", "zstd:LEVEL", "zlib", "zlib:LEVEL" (case-insensitive).
    public init(parsing text: String) throws {
        let trimmed = text.trimmingSpaces().lowercased()
        let parts = trimmed.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        let name = parts[0]
        let levelText = parts.count > 1 ? parts[1] : nil
        func level(_ range: ClosedRange<Int32>, _ fallback: Int32) throws -> Int32 {
            guard let levelText else { return fallback }
            guard let value = Int32(levelText.trimmingSpaces()), range.contains(value), value != 0 else {
                throw QCow2Error("invalid \(name) compression level \"\(levelText)\" in \"\(text)\": expected an integer from \(range.lowerBound) to \(range.upperBound)\(range.lowerBound < 0 ? " other than 0" : "")")
            }
            return value
        }
        switch name {
        case "none", "off", "raw":
            if levelText != nil {
                throw QCow2Error("compression \"\(text)\": \"none\" takes no level")
            }
            self = .none
        case "zstd":
            self = .zstd(level: try level(Self.zstdLevels, Self.defaultZstdLevel))
        case "zlib", "deflate":
            self = .zlib(level: try level(Self.zlibLevels, Self.defaultZlibLevel))
        default:
            throw QCow2Error("unknown compression \"\(text)\": expected none, zstd, zstd:LEVEL (\(Self.zstdLevels.lowerBound)...\(Self.zstdLevels.upperBound)), zlib or zlib:LEVEL (\(Self.zlibLevels.lowerBound)...\(Self.zlibLevels.upperBound))")
        }
    }

    public var description: String {
        switch self {
        case .none: return "none"
        case .zstd(let level): return "zstd:\(level)"
        case .zlib(let level): return "zlib:\(level)"
        }
    }

    /// The qcow2 header compression_type this choice is stored with.
    var headerType: QCow2CompressionType {
        if case .zstd = self { return .zstd }
        return .zlib
    }
}

/// The compression_type header field (qcow2 offset 104).
enum QCow2CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1
    var name: String { self == .zstd ? "zstd" : "zlib" }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" || c == "\n" || c == "\r" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\n" || c == "\r" { s = s.dropLast() }
        return String(s)
    }
}

// MARK: - Constants

enum Q {
    static let magic: UInt32 = 0x5146_49FB                 // "QFI\xfb"
    static let headerLength: Int = 112                      // v3 header incl. compression_type + padding
    static let v2HeaderLength: Int = 72
    static let minClusterBits = 9
    static let maxClusterBits = 21                          // qemu's implementation limit (2 MiB)
    static let sectorSize: UInt64 = 512

    static let oflagCopied: UInt64 = 1 << 63
    static let oflagCompressed: UInt64 = 1 << 62
    static let oflagZero: UInt64 = 1
    /// Bits 9...55: host offsets in L1 entries and standard L2 descriptors.
    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Reserved bits of an L1 entry: 0...8 and 56...62.
    static let l1Reserved: UInt64 = 0x7F00_0000_0000_01FF
    /// Reserved bits of a standard L2 entry: 1...8 and 56...61 (bit 0 is the zero flag).
    static let l2StdReserved: UInt64 = 0x3F00_0000_0000_01FE
    /// Refcount table entries: bits 0...8 reserved.
    static let refTableReserved: UInt64 = 0x1FF

    static let maxL1Bytes: UInt64 = 32 << 20                // qemu's QCOW_MAX_L1_SIZE
    static let maxRefTableBytes: UInt64 = 8 << 20           // qemu's QCOW_MAX_REFTABLE_SIZE
    static let maxSnapshots: UInt32 = 65536

    static let incompatDirty: UInt64 = 1 << 0
    static let incompatCorrupt: UInt64 = 1 << 1
    static let incompatDataFile: UInt64 = 1 << 2
    static let incompatCompression: UInt64 = 1 << 3
    static let incompatExtendedL2: UInt64 = 1 << 4
    static let incompatKnown: UInt64 = 0x1F

    // Header extension types.
    static let extEnd: UInt32 = 0
    static let extBackingFormat: UInt32 = 0xE279_2ACA
    static let extFeatureTable: UInt32 = 0x6803_F857
    static let extBitmaps: UInt32 = 0x2385_2875
    static let extCrypto: UInt32 = 0x0537_BE77
    static let extDataFile: UInt32 = 0x4441_5441
    /// hotimage's private header extension, "HOTI".
    static let extHotimage: UInt32 = 0x484F_5449

    /// Autoclear feature bit 63 marks "hotimage checksums are valid". qemu
    /// clears unknown autoclear bits whenever it opens the image for writing,
    /// so a cleared bit next to a present extension means another program
    /// wrote to the image and our checksums are void.
    static let autoclearHotimage: UInt64 = 1 << 63

    static let hotiExtLength = 32
    static let hotiFormatVersion: UInt32 = 1
    static let hotiFlagComplete: UInt32 = 1
    static let tailMagic: [UInt8] = Array("HOTITAIL".utf8)
    /// Tail version 1: 128-byte header, no digest table. Version 2 (written
    /// now): 160-byte header with the digest table fields.
    static let tailHeaderLengthV1 = 128
    static let tailHeaderLength = 160
    static let tailVersion: UInt32 = 2
    static let maxMetadataBytes: UInt64 = 256 << 20
}

// MARK: - Checked arithmetic

@inline(__always)
func checkedAdd(_ a: UInt64, _ b: UInt64) -> UInt64? {
    let (r, o) = a.addingReportingOverflow(b)
    return o ? nil : r
}

@inline(__always)
func checkedMul(_ a: UInt64, _ b: UInt64) -> UInt64? {
    let (r, o) = a.multipliedReportingOverflow(by: b)
    return o ? nil : r
}

@inline(__always)
func divRoundUp(_ a: UInt64, _ b: UInt64) -> UInt64 {
    a / b + (a % b == 0 ? 0 : 1)
}

@inline(__always)
func alignUp(_ a: UInt64, _ b: UInt64) -> UInt64 {
    divRoundUp(a, b) &* b
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

// MARK: - Big-endian fields

extension Array where Element == UInt8 {
    @inline(__always)
    mutating func putBE64(_ v: UInt64, at i: Int) {
        for k in 0..<8 { self[i + k] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(k))) }
    }
    @inline(__always)
    mutating func putBE32(_ v: UInt32, at i: Int) {
        for k in 0..<4 { self[i + k] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(k))) }
    }
    @inline(__always)
    func be64(at i: Int) -> UInt64 {
        var v: UInt64 = 0
        for k in 0..<8 { v = v << 8 | UInt64(self[i + k]) }
        return v
    }
    @inline(__always)
    func be32(at i: Int) -> UInt32 {
        var v: UInt32 = 0
        for k in 0..<4 { v = v << 8 | UInt32(self[i + k]) }
        return v
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func be64(at i: Int) -> UInt64 {
        UInt64(bigEndian: self.loadUnaligned(fromByteOffset: i, as: UInt64.self))
    }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    func putBE64(_ v: UInt64, at i: Int) {
        self.storeBytes(of: v.bigEndian, toByteOffset: i, as: UInt64.self)
    }
}

/// Decodes `count` big-endian 64-bit words from `bytes`.
func decodeBE64Array(_ bytes: [UInt8], count: Int) -> [UInt64] {
    var out = [UInt64](repeating: 0, count: count)
    bytes.withUnsafeBytes { raw in
        out.withUnsafeMutableBufferPointer { dst in
            for i in 0..<count { dst[i] = raw.be64(at: i * 8) }
        }
    }
    return out
}

// MARK: - CRC (zlib's crc32, IEEE polynomial)

/// All hotimage checksums are zlib's CRC-32 (IEEE 802.3 polynomial, the
/// value `crc32(0, bytes, n)` returns), chosen because zlib's implementation
/// is fast and already linked.
@inline(__always)
func crc32Update(_ crc: UInt32, _ p: UnsafeRawPointer?, _ n: Int) -> UInt32 {
    guard n > 0, let p else { return crc }
    var c = UInt(crc)
    var ptr = p.assumingMemoryBound(to: Bytef.self)
    var left = n
    while left > 0 {
        let step = Swift.min(left, 1 << 30)
        c = CZlib.crc32(c, ptr, uInt(step))
        ptr += step
        left -= step
    }
    return UInt32(truncatingIfNeeded: c)
}

func crc32Of(_ bytes: [UInt8]) -> UInt32 {
    bytes.withUnsafeBytes { crc32Update(0, $0.baseAddress, $0.count) }
}

func crc32Of(_ buf: UnsafeRawBufferPointer) -> UInt32 {
    crc32Update(0, buf.baseAddress, buf.count)
}

/// CRC of `count` zero bytes.
func crc32OfZeros(_ count: Int) -> UInt32 {
    let chunk = [UInt8](repeating: 0, count: Swift.min(count, 1 << 20))
    var crc: UInt32 = 0
    var left = count
    chunk.withUnsafeBytes { z in
        while left > 0 {
            let n = Swift.min(left, z.count)
            crc = crc32Update(crc, z.baseAddress, n)
            left -= n
        }
    }
    return crc
}

// MARK: - File I/O

func errnoText(_ e: Int32) -> String { String(cString: strerror(e)) }

/// Reads exactly `count` bytes at `offset`, retrying short reads and EINTR.
/// Returns the number of bytes read (less than `count` only at end of file).
func preadFull(_ fd: Int32, _ buf: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) throws -> Int {
    var done = 0
    while done < count {
        guard let off = checkedAdd(offset, UInt64(done)), off <= UInt64(Int64.max) else {
            throw QCow2Error("read at file offset \(hex(offset)) + \(done) overflows")
        }
        let n = pread(fd, buf + done, count - done, off_t(off))
        if n < 0 {
            let e = errno
            if e == EINTR { continue }
            throw QCow2Error("read of \(count) bytes at file offset \(hex(offset)) failed: \(errnoText(e))")
        }
        if n == 0 { break }
        done += n
    }
    return done
}

/// Writes all `count` bytes at `offset`, retrying short writes and EINTR.
func pwriteFull(_ fd: Int32, _ buf: UnsafeRawPointer, _ count: Int, _ offset: UInt64) throws {
    var done = 0
    while done < count {
        let n = pwrite(fd, buf + done, count - done, off_t(offset + UInt64(done)))
        if n < 0 {
            let e = errno
            if e == EINTR { continue }
            throw QCow2Error("write of \(count) bytes at file offset \(hex(offset)) failed: \(errnoText(e))")
        }
        if n == 0 {
            throw QCow2Error("write of \(count) bytes at file offset \(hex(offset)) made no progress")
        }
        done += n
    }
}

/// Reads `count` bytes at `offset` into a new array; throws if the file ends first.
func preadArray(_ fd: Int32, count: Int, offset: UInt64, what: @autoclosure () -> String) throws -> [UInt8] {
    if count == 0 { return [] }
    var out = [UInt8](repeating: 0, count: count)
    let got = try out.withUnsafeMutableBytes { try preadFull(fd, $0.baseAddress!, count, offset) }
    if got != count {
        throw QCow2Error("\(what()) at file offset \(hex(offset)) (\(count) bytes) is cut short by the end of the file (only \(got) bytes readable)")
    }
    return out
}
