// The op log written by `write` and read by `check` and `dump`. Binary, little-endian.
//
// Header, 64 bytes:
//    0..7   ASCII "HOTSLOG1"
//    8..11  u32 header size (64)
//   12..15  u32 record size (40)
//   16..23  u64 first block of the range
//   24..31  u64 block count of the range
//   32..39  u64 op count (records that follow; the file is exactly 64 + 40 * count bytes)
//   40..47  u64 PRNG seed of the run
//   48..51  u32 writer threads
//   52..55  u32 flags: bit 0 = the init phase wrote every block of the range
//   56..59  u32 block size (4096)
//   60..63  u32 reserved (0)
// Records, 40 bytes each, sorted by seq:
//    0..7   u64 seq (1-based, unique)
//    8..15  u64 block (absolute block index on the device)
//   16..23  u64 start, CLOCK_MONOTONIC ns, taken after seq was assigned
//   24..31  u64 end, CLOCK_MONOTONIC ns, taken after the op returned
//   32..33  u16 thread (0 = init phase, 1...T = writer threads)
//   34      u8  kind: 1 = WRITE, 2 = TRIM, 3 = ZERO
//   35      u8  flags: bit 0 = failed, bit 1 = init phase
//   36..39  i32 errno of a failed op (0 otherwise)
import Glibc

enum OpKind: UInt8 {
    case write = 1, trim = 2, zero = 3

    var name: String {
        switch self {
        case .write: return "write"
        case .trim: return "trim"
        case .zero: return "zero"
        }
    }
}

struct OpRecord {
    var seq: UInt64
    var block: UInt64
    var startNs: UInt64
    var endNs: UInt64
    var thread: UInt16
    var kind: OpKind
    var flags: UInt8
    var errorCode: Int32

    static let failedFlag: UInt8 = 1
    static let initFlag: UInt8 = 2

    var failed: Bool { flags & OpRecord.failedFlag != 0 }
    var isInit: Bool { flags & OpRecord.initFlag != 0 }
}

struct OpLog {
    static let magic = Array("HOTSLOG1".utf8)
    static let headerSize = 64
    static let recordSize = 40

    var firstBlock: UInt64
    var blockCount: UInt64
    var seed: UInt64
    var threads: UInt32
    var initDone: Bool
    var ops: [OpRecord]

    var endBlock: UInt64 { firstBlock + blockCount }

    // MARK: Encoding

    func encoded() -> [UInt8] {
        let total = OpLog.headerSize + OpLog.recordSize * ops.count
        return [UInt8](unsafeUninitializedCapacity: total) { buf, count in
            let p = UnsafeMutableRawPointer(buf.baseAddress!)
            memset(p, 0, total)
            for (i, c) in OpLog.magic.enumerated() { p.storeBytes(of: c, toByteOffset: i, as: UInt8.self) }
            OpLog.put32(p, 8, UInt32(OpLog.headerSize))
            OpLog.put32(p, 12, UInt32(OpLog.recordSize))
            OpLog.put64(p, 16, firstBlock)
            OpLog.put64(p, 24, blockCount)
            OpLog.put64(p, 32, UInt64(ops.count))
            OpLog.put64(p, 40, seed)
            OpLog.put32(p, 48, threads)
            OpLog.put32(p, 52, initDone ? 1 : 0)
            OpLog.put32(p, 56, UInt32(Stamp.blockSize))
            var r = p + OpLog.headerSize
            for op in ops {
                OpLog.put64(r, 0, op.seq)
                OpLog.put64(r, 8, op.block)
                OpLog.put64(r, 16, op.startNs)
                OpLog.put64(r, 24, op.endNs)
                r.storeBytes(of: op.thread.littleEndian, toByteOffset: 32, as: UInt16.self)
                r.storeBytes(of: op.kind.rawValue, toByteOffset: 34, as: UInt8.self)
                r.storeBytes(of: op.flags, toByteOffset: 35, as: UInt8.self)
                OpLog.put32(r, 36, UInt32(bitPattern: op.errorCode))
                r += OpLog.recordSize
            }
            count = total
        }
    }

    static func decode(_ bytes: [UInt8], source: String) throws -> OpLog {
        try bytes.withUnsafeBytes { raw -> OpLog in
            guard raw.count >= headerSize, Array(raw[0..<8]) == magic else {
                throw StampError("\(source): not a hotimage-stamp log (bad magic)")
            }
            let p = raw.baseAddress!
            guard get32(p, 8) == UInt32(headerSize), get32(p, 12) == UInt32(recordSize),
                  get32(p, 56) == UInt32(Stamp.blockSize) else {
                throw StampError("\(source): unsupported log layout")
            }
            let count = get64(p, 32)
            guard UInt64(raw.count) == UInt64(headerSize) + UInt64(recordSize) * count else {
                throw StampError("\(source): size \(raw.count) does not match \(count) records (truncated log?)")
            }
            var log = OpLog(firstBlock: get64(p, 16), blockCount: get64(p, 24), seed: get64(p, 40),
                            threads: get32(p, 48), initDone: get32(p, 52) & 1 != 0, ops: [])
            log.ops.reserveCapacity(Int(count))
            var r = p + headerSize
            for i in 0..<Int(count) {
                let rawKind = r.load(fromByteOffset: 34, as: UInt8.self)
                guard let kind = OpKind(rawValue: rawKind) else {
                    throw StampError("\(source): record \(i) has unknown kind \(rawKind)")
                }
                let op = OpRecord(seq: get64(r, 0), block: get64(r, 8), startNs: get64(r, 16), endNs: get64(r, 24),
                                  thread: UInt16(littleEndian: r.loadUnaligned(fromByteOffset: 32, as: UInt16.self)),
                                  kind: kind, flags: r.load(fromByteOffset: 35, as: UInt8.self),
                                  errorCode: Int32(bitPattern: get32(r, 36)))
                guard op.block >= log.firstBlock, op.block < log.endBlock else {
                    throw StampError("\(source): record \(i) (seq \(op.seq)) names block \(op.block) outside the range")
                }
                log.ops.append(op)
                r += recordSize
            }
            return log
        }
    }

    // MARK: Files

    /// Writes the log to `path` through a temporary file and rename, so a reader never sees half a log.
    func save(to path: String) throws {
        let bytes = encoded()
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StampError.errno("cannot create \(tmp)") }
        defer { close(fd) }
        var done = 0
        try bytes.withUnsafeBytes { raw in
            while done < raw.count {
                let n = write(fd, raw.baseAddress! + done, raw.count - done)
                if n < 0 { if errno == EINTR { continue }; throw StampError.errno("cannot write \(tmp)") }
                done += n
            }
        }
        guard fsync(fd) == 0 else { throw StampError.errno("cannot fsync \(tmp)") }
        guard rename(tmp, path) == 0 else { throw StampError.errno("cannot rename \(tmp) to \(path)") }
    }

    static func load(from path: String) throws -> OpLog {
        try decode(readWholeFile(path), source: path)
    }

    static func readWholeFile(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw StampError.errno("cannot open \(path)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StampError.errno("cannot stat \(path)") }
        let size = Int(st.st_size)
        var failure: Int32 = 0
        let bytes = [UInt8](unsafeUninitializedCapacity: size) { buf, count in
            var done = 0
            while done < size {
                let n = read(fd, buf.baseAddress! + done, size - done)
                if n < 0 { if errno == EINTR { continue }; failure = errno; break }
                if n == 0 { break }
                done += n
            }
            count = done
        }
        if failure != 0 { throw StampError.errno("cannot read \(path)", failure) }
        return bytes
    }

    // MARK: Little-endian helpers

    @inline(__always) static func put64(_ p: UnsafeMutableRawPointer, _ o: Int, _ v: UInt64) {
        p.storeBytes(of: v.littleEndian, toByteOffset: o, as: UInt64.self)
    }
    @inline(__always) static func put32(_ p: UnsafeMutableRawPointer, _ o: Int, _ v: UInt32) {
        p.storeBytes(of: v.littleEndian, toByteOffset: o, as: UInt32.self)
    }
    @inline(__always) static func get64(_ p: UnsafeRawPointer, _ o: Int) -> UInt64 {
        UInt64(littleEndian: p.loadUnaligned(fromByteOffset: o, as: UInt64.self))
    }
    @inline(__always) static func get32(_ p: UnsafeRawPointer, _ o: Int) -> UInt32 {
        UInt32(littleEndian: p.loadUnaligned(fromByteOffset: o, as: UInt32.self))
    }
}
