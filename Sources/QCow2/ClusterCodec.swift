// ClusterCodec.swift — per-thread cluster encoding (zero detection, CRC,
// zstd/deflate compression) and decoding.
//
// Compressed cluster formats, as qemu reads them (block/qcow2-threads.c):
//  - zlib: a raw deflate stream (no zlib header) with a 4 KiB window
//    (windowBits -12). qemu inflates with Z_FINISH and accepts the result when
//    the output cluster is full.
//  - zstd: one zstd frame (no checksum flag). qemu streams it until the
//    output cluster is full and then requires the frame to have ended; bytes
//    after the frame (the rest of the last 512-byte sector) are ignored.
// Every compressed cluster decompresses to exactly one full cluster; the
// last, partial cluster of a disk is padded with zeros before compression.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CZstd
import CZlib
import CXXHash

/// One guest cluster, encoded on a worker thread and written later by
/// `QCow2Writer`.
public struct EncodedCluster: Sendable {
    public enum Payload: Sendable {
        /// The cluster is all zeros (stored as an L2 zero-flag entry).
        case zero
        /// Exactly `clusterSize` bytes stored uncompressed.
        case raw([UInt8])
        /// One compressed stream, shorter than `clusterSize`.
        case compressed([UInt8])
    }

    /// Guest cluster number.
    public let index: UInt64
    public let payload: Payload
    /// zlib CRC-32 (IEEE) of the full guest cluster (zero-padded when the
    /// disk ends inside the cluster).
    public let crc: UInt32
    /// XXH3-128 of the same bytes (`ClusterDigest.of`); the writer records
    /// it in the image's digest table unless the payload is `.zero`.
    public let digest: ClusterDigest

    public init(index: UInt64, payload: Payload, crc: UInt32, digest: ClusterDigest) {
        self.index = index
        self.payload = payload
        self.crc = crc
        self.digest = digest
    }

    /// Hand-made clusters in tests (the digest is a placeholder).
    init(index: UInt64, payload: Payload, crc: UInt32) {
        self.init(index: index, payload: payload, crc: crc, digest: ClusterDigest(high: 0, low: 0))
    }

    /// An explicit all-zero cluster at `index` (an L2 zero-flag entry: reads
    /// as zeros even over a backing file; no digest is recorded).
    public static func zero(index: UInt64, clusterSize: Int) -> EncodedCluster {
        EncodedCluster(index: index, payload: .zero, crc: crc32OfZeros(clusterSize),
                       digest: ClusterDigest.zeros(clusterSize: clusterSize))
    }

    public var isZero: Bool {
        if case .zero = payload { return true }
        return false
    }
}

/// A page of zeros large enough for the biggest cluster, shared read-only.
let sharedZeros: UnsafeRawPointer = {
    let p = UnsafeMutableRawPointer.allocate(byteCount: 1 << Q.maxClusterBits, alignment: 64)
    p.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << Q.maxClusterBits)
    return UnsafeRawPointer(p)
}()

@inline(__always)
func isAllZero(_ p: UnsafeRawPointer, _ n: Int) -> Bool {
    if n == 0 { return true }
    if p.load(fromByteOffset: 0, as: UInt8.self) != 0 || p.load(fromByteOffset: n - 1, as: UInt8.self) != 0 { return false }
    return memcmp(p, sharedZeros, n) == 0
}

func validClusterSize(_ n: Int) -> Bool {
    n >= 1 << Q.minClusterBits && n <= 1 << Q.maxClusterBits && n & (n - 1) == 0
}

/// Encodes guest clusters. Not thread-safe: make one per worker thread. It
/// keeps the compression context and one cluster-sized output buffer; only
/// the returned `EncodedCluster` owns a right-sized copy of the result.
public final class ClusterEncoder {
    public let compression: QCow2Compression
    public let clusterSize: Int
    private let out: UnsafeMutableRawPointer
    private var pad: UnsafeMutableRawPointer?
    private var zstd: OpaquePointer?
    private var zs: UnsafeMutablePointer<z_stream>?
    private let zeroCRC: UInt32
    private let zeroDigest: ClusterDigest

    /// `clusterSize` must be a power of two from 512 to 2 MiB (a programming
    /// error otherwise).
    public init(compression: QCow2Compression, clusterSize: Int) {
        precondition(validClusterSize(clusterSize), "cluster size \(clusterSize) is not a power of two from 512 to 2 MiB")
        self.compression = compression
        self.clusterSize = clusterSize
        out = .allocate(byteCount: clusterSize, alignment: 64)
        zeroCRC = crc32OfZeros(clusterSize)
        zeroDigest = ClusterDigest.zeros(clusterSize: clusterSize)
        switch compression {
        case .none:
            break
        case .zstd:
            zstd = ZSTD_createCCtx()
        case .zlib(let level):
            let s = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            s.initialize(to: z_stream())
            if deflateInit2_(s, level, Z_DEFLATED, -12, 8, Z_DEFAULT_STRATEGY, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK {
                zs = s
            } else {
                s.deallocate()
            }
        }
    }

    deinit {
        out.deallocate()
        pad?.deallocate()
        if let zstd { ZSTD_freeCCtx(zstd) }
        if let zs {
            deflateEnd(zs)
            zs.deallocate()
        }
    }

    /// Encodes one guest cluster. `data.count <= clusterSize`; shorter data
    /// (the last cluster of the disk) is padded with zeros. All-zero data
    /// gives `.zero`; compressed output is used only when it is shorter than
    /// a cluster, otherwise the cluster is stored `.raw`.
    public func encode(index: UInt64, data: UnsafeRawBufferPointer) -> EncodedCluster {
        precondition(data.count <= clusterSize, "cluster \(index): \(data.count) bytes exceed the cluster size \(clusterSize)")
        let cs = clusterSize
        let src: UnsafeRawPointer
        if data.count == cs, let base = data.baseAddress {
            src = base
        } else {
            if pad == nil { pad = .allocate(byteCount: cs, alignment: 64) }
            let p = pad!
            if data.count > 0, let base = data.baseAddress { p.copyMemory(from: base, byteCount: data.count) }
            (p + data.count).initializeMemory(as: UInt8.self, repeating: 0, count: cs - data.count)
            src = UnsafeRawPointer(p)
        }
        if isAllZero(src, cs) {
            return EncodedCluster(index: index, payload: .zero, crc: zeroCRC, digest: zeroDigest)
        }
        let crc = crc32Update(0, src, cs)
        let digest = ClusterDigest(XXH3_128bits_withSeed(src, cs, 0))
        if let n = compress(src) {
            let bytes = [UInt8](UnsafeRawBufferPointer(start: out, count: n))
            return EncodedCluster(index: index, payload: .compressed(bytes), crc: crc, digest: digest)
        }
        let bytes = [UInt8](UnsafeRawBufferPointer(start: src, count: cs))
        return EncodedCluster(index: index, payload: .raw(bytes), crc: crc, digest: digest)
    }

    /// An explicit zero cluster at `index` (see `EncodedCluster.zero`).
    public func zeroCluster(index: UInt64) -> EncodedCluster {
        EncodedCluster(index: index, payload: .zero, crc: zeroCRC, digest: zeroDigest)
    }

    /// Compresses one full cluster into `out`; nil when it does not get
    /// smaller than a cluster (or compression is off or failed).
    private func compress(_ src: UnsafeRawPointer) -> Int? {
        let cs = clusterSize
        switch compression {
        case .none:
            return nil
        case .zstd(let level):
            guard let zstd else { return nil }
            let n = ZSTD_compressCCtx(zstd, out, cs - 1, src, cs, level)
            if ZSTD_isError(n) != 0 || n == 0 || n >= cs { return nil }
            return n
        case .zlib:
            guard let zs else { return nil }
            guard deflateReset(zs) == Z_OK else { return nil }
            zs.pointee.next_in = UnsafeMutablePointer(mutating: src.assumingMemoryBound(to: Bytef.self))
            zs.pointee.avail_in = uInt(cs)
            zs.pointee.next_out = out.assumingMemoryBound(to: Bytef.self)
            zs.pointee.avail_out = uInt(cs - 1)
            let r = deflate(zs, Z_FINISH)
            guard r == Z_STREAM_END else { return nil }
            let n = cs - 1 - Int(zs.pointee.avail_out)
            return n > 0 ? n : nil
        }
    }
}

/// Per-thread decompression state: a zstd decompression context, an
/// inflate stream and an input buffer, created on first use and reused.
public final class ClusterDecoder {
    private var dctx: OpaquePointer?
    private var zs: UnsafeMutablePointer<z_stream>?
    private var input: UnsafeMutableRawPointer?
    private var inputCapacity = 0
    /// After a successful decompress: how many input bytes the stream used
    /// (the exact length of the compressed stream).
    private(set) var lastInputConsumed = 0

    /// The largest zstd window accepted (8 MiB). Frames qemu or hotimage
    /// write for clusters of at most 2 MiB never need more; the bound keeps a
    /// hostile frame from making the decoder allocate up to 128 MiB.
    static let zstdWindowLogMax: Int32 = 23

    public init() {}

    deinit {
        if let dctx { ZSTD_freeDCtx(dctx) }
        if let zs {
            inflateEnd(zs)
            zs.deallocate()
        }
        input?.deallocate()
    }

    /// The compressed stream the last successful decompress used, when its
    /// input came from `inputBuffer` (as the reader's does).
    var lastStream: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: input, count: input == nil ? 0 : lastInputConsumed)
    }

    /// A scratch input buffer of at least `n` bytes.
    func inputBuffer(_ n: Int) -> UnsafeMutableRawPointer {
        if n > inputCapacity || input == nil {
            input?.deallocate()
            let cap = Swift.max(n, 4096)
            input = .allocate(byteCount: cap, alignment: 64)
            inputCapacity = cap
        }
        return input!
    }

    /// Decompresses `src` to exactly `dst.count` bytes. Returns nil on
    /// success, otherwise why it failed. `strict` also requires the stream
    /// to end exactly at the end of the cluster (the verifier's rule; qemu,
    /// and reads, only need the output filled).
    func decompress(_ type: QCow2CompressionType, src: UnsafeRawBufferPointer,
                    dst: UnsafeMutableRawBufferPointer, strict: Bool) -> String? {
        lastInputConsumed = 0
        guard dst.count > 0, let dstBase = dst.baseAddress else { return "empty output buffer" }
        guard src.count > 0, let srcBase = src.baseAddress else { return "no compressed data" }
        switch type {
        case .zstd:
            if dctx == nil {
                dctx = ZSTD_createDCtx()
                guard let d = dctx else { return "cannot allocate a zstd decompression context" }
                _ = ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, Self.zstdWindowLogMax)
            } else {
                _ = ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only)
            }
            var inb = ZSTD_inBuffer(src: srcBase, size: src.count, pos: 0)
            var outb = ZSTD_outBuffer(dst: dstBase, size: dst.count, pos: 0)
            var ret = 1
            while outb.pos < outb.size {
                let lastIn = inb.pos, lastOut = outb.pos
                ret = ZSTD_decompressStream(dctx, &outb, &inb)
                if ZSTD_isError(ret) != 0 {
                    return "invalid zstd data (\(String(cString: ZSTD_getErrorName(ret)))) after \(outb.pos) of \(outb.size) bytes"
                }
                if inb.pos <= lastIn && outb.pos <= lastOut {
                    return "zstd data ends after \(outb.pos) of \(outb.size) bytes"
                }
            }
            if ret != 0 {
                return "zstd frame does not end at the end of the cluster (it would produce more than \(dst.count) bytes)"
            }
            lastInputConsumed = inb.pos
            return nil
        case .zlib:
            if zs == nil {
                let s = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
                s.initialize(to: z_stream())
                guard inflateInit2_(s, -12, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                    s.deallocate()
                    return "cannot initialise zlib inflate"
                }
                zs = s
            } else if inflateReset(zs) != Z_OK {
                return "cannot reset zlib inflate"
            }
            let s = zs!
            s.pointee.next_in = UnsafeMutablePointer(mutating: srcBase.assumingMemoryBound(to: Bytef.self))
            s.pointee.avail_in = uInt(src.count)
            s.pointee.next_out = dstBase.assumingMemoryBound(to: Bytef.self)
            s.pointee.avail_out = uInt(dst.count)
            let r = inflate(s, Z_FINISH)
            let produced = dst.count - Int(s.pointee.avail_out)
            if r == Z_DATA_ERROR || r == Z_STREAM_ERROR || r == Z_MEM_ERROR || r == Z_NEED_DICT {
                let msg = s.pointee.msg.map { String(cString: $0) } ?? "error \(r)"
                return "invalid deflate data (\(msg)) after \(produced) of \(dst.count) bytes"
            }
            if s.pointee.avail_out != 0 {
                return "deflate data ends after \(produced) of \(dst.count) bytes"
            }
            if r != Z_STREAM_END && strict {
                return "deflate stream does not end at the end of the cluster"
            }
            lastInputConsumed = src.count - Int(s.pointee.avail_in)
            return nil
        }
    }
}
