// Changed-block tracking across restarts (issue 17): the engine's change map
// (HotCore/SnapshotEngine+Changes.swift) saved in a state file beside the
// buffer directory, and whether it can be trusted.
//
//   <parent of the buffer dir>/<its basename>.cbt  (default /var/tmp/hotimage-NAME.cbt)
//   0600, written atomically (temp file, fsync, rename, fsync of the directory);
//   never on the tracked volume (checked like the buffer directory).
//
//   line 1   JSON header (StateHeader): format, the device's identity (path,
//            major:minor, size, a loop device's backing file st_dev/st_ino),
//            the boot id, the device's sectors-written counter
//            (/sys/dev/block/M:m/stat field 7), clean, trusted, reason, since,
//            sinceTime, generation, clusterBytes, clusterCount
//   then     the map: ceil(clusterCount/64) little-endian UInt64 words
//
// Trust. At attach, before any write is served, the saved map is trusted
// only if the file exists and parses, was saved clean (a clean detach) and
// trusted, on this boot, for this device and size, and the device's
// sectors-written counter is what it was at the clean detach (nothing wrote
// it while detached). Else the map starts empty and untrusted, with the
// reason. Either way the file is rewritten at once with clean=false: a crash
// from now on leaves it untrusted. A clean detach saves it clean with the
// counter read after the device is flushed. A committed cut (`end` with
// `commit`) makes the map trusted from that image on and saves it.
//
// Not covered: a write to the real device *while attached* that bypasses
// HotCore (the device is opened O_EXCL, which stops mounts and other
// exclusive openers, not a plain open).
import Foundation
import HotControl
import HotCore
import HotOS
import HotSync
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The state file's header line.
struct ChangeStateHeader: Codable, Equatable {
    var format: Int = 1
    var device: String
    var devMajor: UInt32?
    var devMinor: UInt32?
    var sizeBytes: UInt64
    var backingDev: UInt64?
    var backingIno: UInt64?
    var bootId: String?
    var sectorsWritten: UInt64?
    /// A loop device's backing file at the save: "size mtime-ns ctime-ns"
    /// (a write to the file by another way than this loop device moves it).
    var backingStamp: String?
    var clean: Bool
    var trusted: Bool
    var reason: String?
    var since: String?
    var sinceTime: String?
    var generation: UInt64
    var clusterBytes: Int
    var clusterCount: UInt64
}

/// The identity of the real device, and its counter now.
struct DeviceIdentity: Equatable {
    var device: String
    var devMajor: UInt32?
    var devMinor: UInt32?
    var sizeBytes: UInt64
    var backingDev: UInt64?
    var backingIno: UInt64?

    static func of(path: String, size: UInt64) -> DeviceIdentity {
        let d = DevNum(blockDevice: path)
        var id = DeviceIdentity(device: path, devMajor: d?.major, devMinor: d?.minor, sizeBytes: size)
        if let d, let file = Loop.backingFile(major: d.major, minor: d.minor) {
            var st = stat()
            if stat(file, &st) == 0 { id.backingDev = UInt64(st.st_dev); id.backingIno = UInt64(st.st_ino) }
        }
        return id
    }

    func matches(_ h: ChangeStateHeader) -> Bool {
        device == h.device && devMajor == h.devMajor && devMinor == h.devMinor && sizeBytes == h.sizeBytes
            && backingDev == h.backingDev && backingIno == h.backingIno
    }

    /// Sectors written plus sectors discarded: fields 7 and 14 of
    /// /sys/dev/block/M:m/stat (a discard while detached changes the device
    /// too; field 14 exists since Linux 4.18). nil: not a block device, or
    /// no stat file.
    func sectorsWritten() -> UInt64? {
        guard let ma = devMajor, let mi = devMinor,
              let t = try? String(contentsOfFile: "/sys/dev/block/\(ma):\(mi)/stat", encoding: .utf8) else { return nil }
        let f = t.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).compactMap { UInt64($0) }
        guard f.count >= 7 else { return nil }
        return f[6] &+ (f.count >= 14 ? f[13] : 0)
    }

    /// A loop device's backing file now: size, mtime and ctime in ns (nil:
    /// not a loop device). Writes to the file that bypass this loop device
    /// (another loop device over it, a program writing it) move it, and the
    /// device's counter does not see them.
    func backingStamp() -> String? {
        guard let ma = devMajor, let mi = devMinor, let file = Loop.backingFile(major: ma, minor: mi) else { return nil }
        var st = stat()
        guard stat(file, &st) == 0 else { return nil }
        let m = UInt64(st.st_mtim.tv_sec) &* 1_000_000_000 &+ UInt64(st.st_mtim.tv_nsec)
        let c = UInt64(st.st_ctim.tv_sec) &* 1_000_000_000 &+ UInt64(st.st_ctim.tv_nsec)
        return "\(st.st_size) \(m) \(c)"
    }
}

/// This boot's id (/proc/sys/kernel/random/boot_id).
func currentBootID() -> String? {
    guard let s = try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8) else { return nil }
    let t = s.trimmingCharacters(in: .whitespacesAndNewlines)
    return t.isEmpty ? nil : t
}

/// What a loaded state file decided.
struct ChangeLoad {
    var trusted: Bool
    var reason: String?
    var header: ChangeStateHeader?
    var bits: ChangeBits?
}

enum ChangeStateFile {
    /// `<parent of bufferDir>/<basename of bufferDir>.cbt`.
    static func path(bufferDir: String) -> String {
        var b = bufferDir
        while b.count > 1 && b.hasSuffix("/") { b.removeLast() }
        let u = URL(fileURLWithPath: b)
        return u.deletingLastPathComponent().path + "/" + u.lastPathComponent + ".cbt"
    }

    /// The header line: sorted-key JSON and a newline.
    static func headerLine(_ h: ChangeStateHeader) -> [UInt8] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return Array((try? enc.encode(h)) ?? Data()) + [0x0a]
    }

    static func encode(_ h: ChangeStateHeader, _ words: [UInt64]) -> [UInt8] {
        var out = headerLine(h)
        out.reserveCapacity(out.count + words.count * 8)
        for w in words { withUnsafeBytes(of: w.littleEndian) { out.append(contentsOf: $0) } }
        return out
    }

    /// Header and words; nil if it does not parse (or the word count is off).
    static func decode(_ bytes: [UInt8]) -> (ChangeStateHeader, [UInt64])? {
        guard let nl = bytes.firstIndex(of: 0x0a),
              let h = try? JSONDecoder().decode(ChangeStateHeader.self, from: Data(bytes[..<nl])),
              h.format == 1, h.clusterBytes > 0 else { return nil }
        let body = bytes[(nl + 1)...]
        let n = ChangeBits.wordCount(clusters: h.clusterCount)
        guard body.count == n * 8 else { return nil }
        var words = [UInt64](repeating: 0, count: n)
        body.withUnsafeBytes { raw in
            for i in 0..<n { words[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        }
        return (h, words)
    }

    /// Writes `bytes` to `path` atomically: a 0600 temp file beside it,
    /// fsync, rename, fsync of the directory.
    static func writeAtomically(_ path: String, _ bytes: [UInt8]) throws {
        try writeAtomically(path) { put in try bytes.withUnsafeBytes { try put($0) } }
    }

    /// A state file: the header line, then the map streamed in pieces.
    static func write(_ path: String, header h: ChangeStateHeader, bits: ChangeBits) throws {
        let head = headerLine(h)
        try writeAtomically(path) { put in
            try head.withUnsafeBytes { try put($0) }
            try bits.forEachLittleEndianChunk { try put($0) }
        }
    }

    /// As above, the content given piece by piece to `put` by `fill`.
    static func writeAtomically(_ path: String, fill: ((UnsafeRawBufferPointer) throws -> Void) throws -> Void) throws {
        let tmp = path + ".tmp"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw DaemonError.failed("cannot create \(tmp): \(String(cString: strerror(errno)))") }
        _ = fchmod(fd, 0o600)
        var err: Int32 = 0
        struct WriteFailed: Error {}
        do {
            try fill { raw in
                var done = 0
                while done < raw.count {
                    let n = Glibc.write(fd, raw.baseAddress! + done, raw.count - done)
                    if n < 0 { if errno == EINTR { continue }; err = errno; throw WriteFailed() }
                    done += n
                }
            }
        } catch {
            if err == 0 { err = EIO }
        }
        if err == 0 && fsync(fd) != 0 { err = errno }
        close(fd)
        if err != 0 {
            unlink(tmp)
            throw DaemonError.failed("cannot write \(tmp): \(String(cString: strerror(err)))")
        }
        if rename(tmp, path) != 0 {
            let e = errno
            unlink(tmp)
            throw DaemonError.failed("cannot rename \(tmp) to \(path): \(String(cString: strerror(e)))")
        }
        let dir = (path as NSString).deletingLastPathComponent
        let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); close(dfd) }
    }

    static func read(_ path: String) -> [UInt8]? {
        guard let d = FileManager.default.contents(atPath: path) else { return nil }
        return Array(d)
    }

    /// The trust decision for a saved file (nil bytes: no file).
    static func judge(_ bytes: [UInt8]?, identity: DeviceIdentity, bootID: String?, sectorsNow: UInt64?,
                      backingStampNow: String? = nil, clusterBytes: Int, clusterCount: UInt64) -> ChangeLoad {
        guard let bytes else { return ChangeLoad(trusted: false, reason: "no saved map") }
        guard let (h, words) = decode(bytes) else { return ChangeLoad(trusted: false, reason: "the saved map is unreadable") }
        func no(_ r: String) -> ChangeLoad { ChangeLoad(trusted: false, reason: r, header: h) }
        guard identity.matches(h) else { return no("another device or size") }
        guard h.clean else { return no("the daemon stopped without a clean detach") }
        guard h.trusted else { return no(h.reason ?? "the saved map was not trusted") }
        guard let boot = bootID, h.bootId == boot else { return no("another boot") }
        guard let now = sectorsNow, let then = h.sectorsWritten else {
            return no("cannot tell whether the device was written while detached (no sectors-written counter)")
        }
        guard now == then else {
            return no("the device was written while detached (\(now >= then ? now - then : now) sectors)")
        }
        guard h.backingStamp == backingStampNow else {
            return no("the loop device's backing file changed while detached")
        }
        guard h.clusterBytes == clusterBytes, h.clusterCount == clusterCount,
              let bits = ChangeBits(clusterBytes: clusterBytes, clusterCount: clusterCount, words: words) else {
            return no("another cluster size")
        }
        return ChangeLoad(trusted: true, reason: nil, header: h, bits: bits)
    }
}

/// The daemon's part of change tracking: trust, since, the state file.
final class ChangeTracker: @unchecked Sendable {
    let engine: SnapshotEngine
    let identity: DeviceIdentity
    /// nil: not persisted (the file would be on the tracked volume).
    let stateFile: String?
    let logger: Logger
    private let m = Monitor()
    private let io = Monitor()   // one save at a time
    private var trusted = false
    private var reason: String?
    private var since: String?
    private var sinceTime: String?
    private var generation: UInt64 = 0

    /// This boot's id and the device's sectors-written counter now
    /// (replaceable for tests).
    let bootID: @Sendable () -> String?
    let sectorsWritten: @Sendable () -> UInt64?

    init(engine: SnapshotEngine, identity: DeviceIdentity, stateFile: String?, logger: Logger,
         bootID: (@Sendable () -> String?)? = nil, sectorsWritten: (@Sendable () -> UInt64?)? = nil) {
        self.engine = engine
        self.identity = identity
        self.stateFile = stateFile
        self.logger = logger
        self.bootID = bootID ?? { currentBootID() }
        self.sectorsWritten = sectorsWritten ?? { identity.sectorsWritten() }
    }

    /// At attach, before any write is served: load, judge, rewrite unclean.
    func load(persistRefusal: String?) {
        guard engine.tracksChanges else { return }
        let clusterBytes = engine.config.changeClusterBytes
        let r: ChangeLoad
        if let stateFile {
            r = ChangeStateFile.judge(ChangeStateFile.read(stateFile), identity: identity, bootID: bootID(),
                                      sectorsNow: sectorsWritten(), backingStampNow: identity.backingStamp(),
                                      clusterBytes: clusterBytes,
                                      clusterCount: engine.clusterCount)
        } else {
            r = ChangeLoad(trusted: false, reason: persistRefusal ?? "no state file")
        }
        m.withLock {
            trusted = r.trusted
            reason = r.reason
            generation = r.header?.generation ?? 0
            if r.trusted, let h = r.header {
                since = h.since
                sinceTime = h.sinceTime
            }
        }
        if let bits = r.bits {
            do { try engine.loadChanges(bits) } catch {
                m.withLock { trusted = false; reason = "\(error)"; since = nil; sinceTime = nil }
            }
        }
        if r.trusted {
            logger.info("changes: a trusted map of \(r.bits?.count ?? 0) clusters since image \(since ?? "?") (\(stateFile ?? ""))")
        } else {
            logger.info("changes: untrusted (\(r.reason ?? "?")); the next incremental compares")
        }
        save(clean: false)
    }

    /// A committed cut: the map continues from image `id`, trusted.
    func committed(_ id: String) {
        let now = ISO8601DateFormatter().string(from: Date())
        m.withLock {
            trusted = true
            reason = nil
            since = id
            sinceTime = now
            generation &+= 1
        }
        logger.info("changes: committed image \(id); the map continues from it")
        save(clean: false)
    }

    /// A clean detach: the device is flushed, nothing writes it any more.
    func saveClean() { save(clean: true) }

    private func save(clean: Bool) {
        guard let stateFile, let bits = engine.exportChanges() else { return }
        io.withLock {
            let (t, r, s, st, g) = m.withLock { (trusted, reason, since, sinceTime, generation) }
            let h = ChangeStateHeader(device: identity.device, devMajor: identity.devMajor, devMinor: identity.devMinor,
                                      sizeBytes: identity.sizeBytes, backingDev: identity.backingDev,
                                      backingIno: identity.backingIno, bootId: bootID(),
                                      sectorsWritten: sectorsWritten(), backingStamp: identity.backingStamp(),
                                      clean: clean, trusted: t,
                                      reason: r, since: t ? s : nil, sinceTime: t ? st : nil, generation: g,
                                      clusterBytes: bits.clusterBytes, clusterCount: bits.clusterCount)
            do { try ChangeStateFile.write(stateFile, header: h, bits: bits) } catch {
                logger.error("changes: \(error)")
            }
        }
    }

    /// What a `map` reply says (the caller writes the file).
    func info(cut: ChangeBits, path: String?) -> ChangeInfo {
        m.withLock {
            ChangeInfo(trusted: trusted, since: trusted ? since : nil, reason: trusted ? nil : reason,
                       clusterBytes: cut.clusterBytes, changedClusters: cut.count, path: path)
        }
    }

    func status() -> TrackingStatus? {
        guard let c = engine.changeCounts() else { return nil }
        return m.withLock {
            TrackingStatus(trusted: trusted, since: trusted ? since : nil, sinceTime: trusted ? sinceTime : nil,
                           reason: trusted ? nil : reason, changedClusters: c.changedClusters,
                           changedBytes: min(c.changedClusters * UInt64(c.clusterBytes), identity.sizeBytes),
                           clusterBytes: c.clusterBytes, stateFile: stateFile)
        }
    }
}
