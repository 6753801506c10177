import Foundation
import Testing
@testable import HotOS

// HBFileStore: the hb_NN.tmp file tier of the COW buffer. Every test works in its own
// temporary directory under /tmp and deletes it. Small slots (512 B) and files
// (4 slots = 2048 B) so a handful of stores spans several files.

private final class TempDir {
    let path: String
    init() throws {
        path = "/tmp/hbfilestore-test-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// The file names in the directory, sorted.
    var files: [String] { ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted() }

    func fileSize(_ name: String) -> UInt64? {
        (try? FileManager.default.attributesOfItem(atPath: path + "/" + name))?[.size] as? UInt64
    }
}

/// 512 distinct-looking bytes for `tag`.
private func slotData(_ tag: Int, count: Int = 512) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ tag &* 131 &+ ($0 >> 8) &* tag) }
}

private extension HBFileStore {
    func store(_ bytes: [UInt8]) throws -> UInt64 {
        try bytes.withUnsafeBytes { try store($0.baseAddress!, count: $0.count) }
    }
    func load(_ loc: UInt64, count: Int = 512) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: count)
        try out.withUnsafeMutableBytes { try load(loc, into: $0.baseAddress!, count: count) }
        return out
    }
}

private func isFull(_ error: Error, limit: UInt64) -> Bool {
    if case HBFileStore.StoreError.full(let l) = error { return l == limit }
    return false
}

@Suite("HBFileStore")
struct HBFileStoreTests {

    @Test("File names: hb_NN.tmp, two digits at least",
          arguments: [
              (0, "hb_00.tmp"),     // first file
              (7, "hb_07.tmp"),     // one digit, zero-padded
              (10, "hb_10.tmp"),    // two digits
              (99, "hb_99.tmp"),    // last two-digit name
              (100, "hb_100.tmp"),  // three digits, no truncation
          ])
    func fileNames(_ i: Int, _ name: String) {
        #expect(HBFileStore.fileName(i) == name)
    }

    @Test("Store and load round trip across several files, named hb_00.tmp, hb_01.tmp, …")
    func roundTrip() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        #expect(s.fileCount == 0 && s.bytesInUse == 0 && s.bytesAllocated == 0)
        #expect(dir.files.isEmpty)                               // no file before the first store
        var locs: [UInt64] = []
        for i in 0..<10 { locs.append(try s.store(slotData(i))) }
        #expect(Set(locs).count == 10)
        // Locations are (file << 32 | slot), slots handed out in order.
        let expected: [UInt64] = (0..<10).map { (i: Int) -> UInt64 in UInt64(i / 4) << 32 | UInt64(i % 4) }
        #expect(locs == expected)
        #expect(dir.files == ["hb_00.tmp", "hb_01.tmp", "hb_02.tmp"])
        #expect(s.fileCount == 3)
        #expect(s.bytesInUse == 10 * 512)
        #expect(s.bytesAllocated == 10 * 512)
        #expect(dir.fileSize("hb_00.tmp") == 2048)
        #expect(dir.fileSize("hb_02.tmp") == 1024)
        for (i, loc) in locs.enumerated().reversed() { #expect(try s.load(loc) == slotData(i), "slot \(i)") }
    }

    @Test("A short block (the device's partial last block) round-trips")
    func shortBlock() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        let a = try s.store(slotData(1, count: 100))
        let b = try s.store(slotData(2))
        #expect(try s.load(a, count: 100) == slotData(1, count: 100))
        #expect(try s.load(b) == slotData(2))
        #expect(s.bytesInUse == 1024)                          // slots, not bytes stored
    }

    @Test("The limit: no file beyond limitBytes; full until a slot is freed")
    func limit() throws {
        let dir = try TempDir()
        // 2 files of 2048 fit in 5000 bytes; a third would not.
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 5000)
        var locs: [UInt64] = []
        for i in 0..<8 { locs.append(try s.store(slotData(i))) }
        #expect(s.fileCount == 2)
        do {
            _ = try s.store(slotData(8))
            Issue.record("a ninth slot was stored beyond the limit")
        } catch {
            #expect(isFull(error, limit: 5000), "\(error)")
            #expect("\(error)".contains("5000"))
        }
        #expect(s.fileCount == 2)
        #expect(dir.files == ["hb_00.tmp", "hb_01.tmp"])
        #expect(s.bytesInUse == 8 * 512)
        s.free(locs[5])
        let again = try s.store(slotData(42))
        #expect(again == locs[5])
        #expect(try s.load(again) == slotData(42))
        #expect(try s.load(locs[4]) == slotData(4))
    }

    @Test("A limit below one file: nothing can be stored")
    func limitBelowOneFile() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1000)
        #expect(throws: HBFileStore.StoreError.self) { try s.store(slotData(0)) }
        #expect(dir.files.isEmpty)
        #expect(s.fileCount == 0)
    }

    @Test("Freed slots are reused, lowest file first; the high-water size stays")
    func freeAndReuse() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        var locs: [UInt64] = []
        for i in 0..<10 { locs.append(try s.store(slotData(i))) }
        s.free(locs[6])                                        // file 1
        s.free(locs[1])                                        // file 0
        #expect(s.bytesInUse == 8 * 512)
        #expect(s.bytesAllocated == 10 * 512)
        #expect(s.fileCount == 3)
        #expect(try s.store(slotData(100)) == locs[1])        // file 0 first
        #expect(try s.store(slotData(101)) == locs[6])        // then file 1
        let tail: UInt64 = 2 << 32 | 2
        #expect(try s.store(slotData(102)) == tail)          // then the unused tail of file 2
        #expect(try s.load(locs[1]) == slotData(100))
        #expect(try s.load(locs[6]) == slotData(101))
        #expect(try s.load(locs[0]) == slotData(0))
        #expect(try s.load(locs[7]) == slotData(7))
        #expect(s.bytesInUse == 11 * 512)
    }

    @Test("Trailing files with nothing live are deleted: the files shrink")
    func shrink() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        var locs: [UInt64] = []
        for i in 0..<10 { locs.append(try s.store(slotData(i))) }
        // Empty the middle file first: it is not trailing, so it stays.
        for l in locs[4..<8] { s.free(l) }
        #expect(s.fileCount == 3)
        #expect(dir.files == ["hb_00.tmp", "hb_01.tmp", "hb_02.tmp"])
        // Empty the last file: it and the empty middle file go.
        s.free(locs[8])
        #expect(s.fileCount == 3)
        s.free(locs[9])
        #expect(s.fileCount == 1)
        #expect(dir.files == ["hb_00.tmp"])
        #expect(s.bytesInUse == 4 * 512)
        #expect(s.bytesAllocated == 4 * 512)
        for l in locs[0..<4] { s.free(l) }
        #expect(s.fileCount == 0)
        #expect(dir.files.isEmpty)
        #expect(s.bytesInUse == 0 && s.bytesAllocated == 0)
        // Storing again starts a fresh hb_00.tmp.
        let l = try s.store(slotData(77))
        #expect(l == 0)
        #expect(dir.files == ["hb_00.tmp"])
        #expect(try s.load(l) == slotData(77))
    }

    @Test("removeAll deletes every file; the store is usable afterwards")
    func removeAll() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        var locs: [UInt64] = []
        for i in 0..<9 { locs.append(try s.store(slotData(i))) }
        s.free(locs[0])
        #expect(dir.files.count == 3)
        s.removeAll()
        #expect(dir.files.isEmpty)
        #expect(s.fileCount == 0 && s.bytesInUse == 0 && s.bytesAllocated == 0)
        #expect(throws: (any Error).self) { try s.load(locs[8]) }
        s.free(locs[3])                                        // a stale free is harmless
        #expect(s.fileCount == 0)
        let l = try s.store(slotData(5))
        #expect(try s.load(l) == slotData(5))
        #expect(dir.files == ["hb_00.tmp"])
    }

    @Test("Dropping the store deletes its files")
    func deinitDeletes() throws {
        let dir = try TempDir()
        do {
            let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
            for i in 0..<5 { _ = try s.store(slotData(i)) }
            #expect(dir.files.count == 2)
        }
        #expect(dir.files.isEmpty)
    }

    @Test("Loading an unknown location or a missing directory fails cleanly")
    func errors() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        #expect(throws: (any Error).self) { try s.load(5 << 32) }
        let missing = HBFileStore(directory: dir.path + "/nope", slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        do {
            _ = try missing.store(slotData(0))
            Issue.record("stored into a missing directory")
        } catch {
            #expect("\(error)".contains("hb_00.tmp"))
        }
        #expect(missing.fileCount == 0)
    }

    @Test("Concurrent store, load and free from several threads")
    func concurrent() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 4096, limitBytes: 1 << 22)
        let problems = NSLock()
        var bad: [String] = []
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            var mine: [(UInt64, Int)] = []
            for i in 0..<300 {
                let tag = t * 1000 + i
                do {
                    mine.append((try s.store(slotData(tag)), tag))
                    if i % 3 == 2 {
                        let (l, tg) = mine.removeFirst()
                        if try s.load(l) != slotData(tg) { problems.lock(); bad.append("slot \(l)"); problems.unlock() }
                        s.free(l)
                    }
                } catch {
                    problems.lock(); bad.append("\(error)"); problems.unlock()
                }
            }
            for (l, tg) in mine {
                if (try? s.load(l)) != slotData(tg) { problems.lock(); bad.append("slot \(l) at the end"); problems.unlock() }
                s.free(l)
            }
        }
        #expect(bad.isEmpty, "\(bad.prefix(5))")
        #expect(s.bytesInUse == 0)
        #expect(s.fileCount == 0)
        #expect(dir.files.isEmpty)
    }
}

// O_DIRECT files (4 KiB slots): the batch path with aligned slots, a short
// last block and an unaligned source (both through the bounce slot), loads
// into unaligned and short buffers, in a directory on the disk and in one
// on tmpfs (O_DIRECT there or the buffered fallback, whichever the kernel
// gives; the bytes must be right either way).
@Suite("HBFileStore, O_DIRECT")
struct HBFileStoreDirectTests {
    static let slot = 4096

    func exercise(_ dir: String) throws -> Bool {
        let s = HBFileStore(directory: dir, slotBytes: Self.slot, fileBytes: UInt64(Self.slot * 8), limitBytes: 1 << 20)
        defer { s.removeAll() }
        let arena = UnsafeMutableRawPointer.allocate(byteCount: Self.slot * 12 + 1, alignment: 4096)
        defer { arena.deallocate() }
        let fill = slotData(5, count: Self.slot * 12 + 1)
        fill.withUnsafeBytes { arena.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        // Ten aligned slots, then a short one (the device's last block).
        var batch: [(UnsafeRawPointer, Int)] = (0..<10).map { (UnsafeRawPointer(arena + $0 * Self.slot), Self.slot) }
        batch.append((UnsafeRawPointer(arena + 10 * Self.slot), 1000))
        let locs = try s.store(batch: batch)
        #expect(locs.count == 11)
        #expect(s.fileCount == 2)   // 8 slots per file
        // An unaligned source through the single-slot path.
        let odd = try s.store(UnsafeRawPointer(arena + 1), count: Self.slot)
        for (k, loc) in locs.enumerated() {
            let n = k == 10 ? 1000 : Self.slot
            #expect(try s.load(loc, count: n) == Array(fill[(k * Self.slot)..<(k * Self.slot + n)]), "slot \(k)")
        }
        #expect(try s.load(odd, count: Self.slot) == Array(fill[1...Self.slot]))
        // A load into an unaligned buffer, and a partial one.
        let buf = UnsafeMutableRawPointer.allocate(byteCount: Self.slot + 3, alignment: 4096)
        defer { buf.deallocate() }
        try s.load(locs[3], into: buf + 3, count: Self.slot)
        #expect(Array(UnsafeRawBufferPointer(start: buf + 3, count: Self.slot)) == Array(fill[(3 * Self.slot)..<(4 * Self.slot)]))
        try s.load(locs[4], into: buf, count: 10)
        #expect(Array(UnsafeRawBufferPointer(start: buf, count: 10)) == Array(fill[(4 * Self.slot)..<(4 * Self.slot + 10)]))
        return s.directIO
    }

    @Test("Round trips on the disk use O_DIRECT")
    func onDisk() throws {
        let dir = try TempDir()
        let direct = try exercise(dir.path)
        // /tmp here is ext4 or XFS, which take O_DIRECT.
        #expect(direct, "the buffer files on \(dir.path) fell back to buffered I/O")
    }

    @Test("O_DIRECT refused at the first write: that write and every later one go buffered, nothing lost")
    func refusedAtWrite() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: Self.slot, fileBytes: UInt64(Self.slot * 4), limitBytes: 1 << 20)
        defer { s.removeAll() }
        #expect(s.directIO)
        let arena = UnsafeMutableRawPointer.allocate(byteCount: Self.slot * 6, alignment: 4096)
        defer { arena.deallocate() }
        let fill = slotData(3, count: Self.slot * 6)
        fill.withUnsafeBytes { arena.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        s.refuseNextDirectWrite = true
        let first = try s.store(batch: (0..<3).map { (UnsafeRawPointer(arena + $0 * Self.slot), Self.slot) })
        #expect(!s.refuseNextDirectWrite)           // the refusal was met
        #expect(!s.directIO)                        // and O_DIRECT is off for new files
        // More slots: the rest of file 0 and a new, buffered, file 1.
        let more = try s.store(batch: (3..<6).map { (UnsafeRawPointer(arena + $0 * Self.slot), Self.slot) })
        #expect(s.fileCount == 2)
        for (k, loc) in (first + more).enumerated() {
            #expect(try s.load(loc, count: Self.slot) == Array(fill[(k * Self.slot)..<((k + 1) * Self.slot)]), "slot \(k)")
        }
        // The file on disk holds the bytes (not only a cache of this process).
        let fd = open(dir.path + "/hb_00.tmp", O_RDONLY)
        defer { close(fd) }
        var back = [UInt8](repeating: 0, count: Self.slot)
        #expect(back.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, Self.slot, off_t(Self.slot)) } == Self.slot)
        #expect(back == Array(fill[Self.slot..<(2 * Self.slot)]))
    }

    @Test("Round trips on tmpfs (O_DIRECT or its fallback)")
    func onTmpfs() throws {
        guard FileManager.default.fileExists(atPath: "/dev/shm") else {
            print("skipped: no /dev/shm")
            return
        }
        let path = "/dev/shm/hbfilestore-test-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let direct = try exercise(path)
        print("tmpfs buffer files: \(direct ? "O_DIRECT" : "buffered (fallback)")")
    }

    @Test("Slots smaller than 4 KiB never use O_DIRECT")
    func smallSlots() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        #expect(!s.directIO)
        let loc = try s.store(slotData(1))
        #expect(try s.load(loc) == slotData(1))
    }
}

// The daemon holds the buffer directory open and makes hb files relative to
// it: a mount over the path later must not move them; files are 0600.
@Suite("HBFileStore relative to a held directory")
struct HBFileStoreHeldDirectoryTests {
    @Test("Files go to the directory opened, not to what its path names later; 0600 under umask 0")
    func heldDirectory() throws {
        let dir = try TempDir()
        let held = dir.path + "/hb"
        mkdir(held, 0o700)
        let fd = open(held, O_RDONLY | O_DIRECTORY)
        #expect(fd >= 0)
        defer { close(fd) }
        // The path now names another directory (as after a mount over it).
        rename(held, dir.path + "/moved")
        mkdir(held, 0o700)
        let old = umask(0)
        defer { umask(old) }
        let s = HBFileStore(directory: held, directoryFD: fd, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        let data = slotData(3)
        let loc = try data.withUnsafeBytes { try s.store($0.baseAddress!, count: 512) }
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: held)) ?? []).isEmpty)
        var st = stat()
        #expect(stat(dir.path + "/moved/hb_00.tmp", &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        var back = [UInt8](repeating: 0, count: 512)
        try back.withUnsafeMutableBytes { try s.load(loc, into: $0.baseAddress!, count: 512) }
        #expect(back == data)
        s.removeAll()
        #expect(access(dir.path + "/moved/hb_00.tmp", F_OK) != 0)
    }

    @Test("A stale hb file with wide permissions is made 0600 when reused")
    func staleFileMode() throws {
        let dir = try TempDir()
        let stale = dir.path + "/hb_00.tmp"
        FileManager.default.createFile(atPath: stale, contents: Data([1, 2, 3]))
        chmod(stale, 0o644)
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20)
        let data = slotData(5)
        _ = try data.withUnsafeBytes { try s.store($0.baseAddress!, count: 512) }
        var st = stat()
        #expect(stat(stale, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        s.removeAll()
    }
}

// The daemon's store defers closes and unlinks to its movers
// (collectGarbage), so no file-system call runs under the engine's lock.
@Suite("HBFileStore with deferred deletes")
struct HBFileStoreDeferredTests {
    @Test("removeAll only queues; collectGarbage deletes; a queued name is not reused meanwhile")
    func deferred() throws {
        let dir = try TempDir()
        let s = HBFileStore(directory: dir.path, slotBytes: 512, fileBytes: 2048, limitBytes: 1 << 20, deferDeletes: true)
        let a = slotData(1), b = slotData(2)
        _ = try a.withUnsafeBytes { try s.store($0.baseAddress!, count: 512) }
        #expect(dir.files == ["hb_00.tmp"])
        s.removeAll()
        // Nothing touched the file system yet.
        #expect(dir.files == ["hb_00.tmp"])
        #expect(s.pendingGarbage == 2)
        // A new session stores before the movers collect: another name.
        let loc = try b.withUnsafeBytes { try s.store($0.baseAddress!, count: 512) }
        #expect(dir.files == ["hb_00.tmp", "hb_01.tmp"])
        s.collectGarbage()
        #expect(dir.files == ["hb_01.tmp"])
        var back = [UInt8](repeating: 0, count: 512)
        try back.withUnsafeMutableBytes { try s.load(loc, into: $0.baseAddress!, count: 512) }
        #expect(back == b)
        // Freeing the last live slot queues the file's deletion too.
        s.free(loc)
        #expect(dir.files == ["hb_01.tmp"])
        s.collectGarbage()
        #expect(dir.files.isEmpty)
        #expect(s.pendingGarbage == 0)
    }
}
