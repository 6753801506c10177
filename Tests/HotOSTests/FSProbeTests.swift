import Foundation
import Testing
import HotOS

// FSProbe: real images made by mkfs.* (each cross-checked with blkid) and
// crafted headers. Also home of FSTestTools, the helpers the FIEMAP, swap
// and ext2 tests share: running tools, temporary directories, loop mounts.

// MARK: - Shared helpers

enum FSTestTools {
    /// Full path of a system tool, or nil.
    static func tool(_ name: String) -> String? {
        for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
            let p = dir + "/" + name
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    struct Result {
        var status: Int32
        var out: String
        var err: String
    }

    /// Runs `argv` (argv[0] a tool name or path) and waits for it.
    @discardableResult
    static func run(_ argv: [String]) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0].hasPrefix("/") ? argv[0] : (tool(argv[0]) ?? argv[0]))
        p.arguments = Array(argv.dropFirst())
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        // Drain stderr on another thread so neither pipe can fill up and stall the tool.
        let errBox = Box()
        let t = Thread { errBox.data = err.fileHandleForReading.readDataToEndOfFile(); errBox.done.signal() }
        t.start()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        errBox.done.wait()
        p.waitUntilExit()
        return Result(status: p.terminationStatus, out: String(decoding: o, as: UTF8.self),
                      err: String(decoding: errBox.data, as: UTF8.self))
    }

    private final class Box: @unchecked Sendable {
        var data = Data()
        let done = DispatchSemaphore(value: 0)
    }

    /// Runs `argv` and fails (throws) unless it exits 0.
    @discardableResult
    static func must(_ argv: [String]) throws -> String {
        let r = try run(argv)
        guard r.status == 0 else { throw ToolError(argv: argv, result: r) }
        return r.out
    }

    struct ToolError: Error, CustomStringConvertible {
        var argv: [String]
        var result: Result
        var description: String { "\(argv.joined(separator: " ")) exited \(result.status): \(result.err)" }
    }

    /// Skips the running test with `reason` (printed too).
    static func skip(_ reason: String) throws -> Never {
        print("SKIP: \(reason)")
        try Test.cancel(Comment(rawValue: reason))
    }

    /// Skips unless every tool is installed.
    static func require(_ tools: String...) throws {
        for t in tools where tool(t) == nil { try skip("\(t) is not installed") }
    }

    /// A sparse file of `bytes` bytes.
    static func makeImage(_ path: String, bytes: UInt64) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw OSError("open", errno: errno, object: path) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(bytes)) == 0 else { throw OSError("ftruncate", errno: errno, object: path) }
    }

    /// `count` bytes of `path` from `offset`.
    static func readBytes(_ path: String, offset: UInt64, count: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw OSError("open", errno: errno, object: path) }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + got, count - got, off_t(offset) + off_t(got)) }
            guard n > 0 else { throw OSError("pread", errno: n < 0 ? errno : EIO, object: path) }
            got += n
        }
        return buf
    }

    /// Attaches `image` to a new loop device (losetup -f --show), runs
    /// `body` with its name and detaches exactly that device afterwards.
    /// Skips the test when loop devices cannot be made.
    static func withLoop<T>(_ image: String, readOnly: Bool = false, _ body: (String) throws -> T) throws -> T {
        guard geteuid() == 0 else { try skip("loop devices need root") }
        try require("losetup")
        let r = try run(["losetup", "-f", "--show"] + (readOnly ? ["-r"] : []) + [image])
        let dev = r.out.trimmingCharacters(in: .whitespacesAndNewlines)
        guard r.status == 0, dev.hasPrefix("/dev/loop") else {
            try skip("losetup -f --show failed: \(r.err.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        defer { _ = try? run(["losetup", "-d", dev]) }
        return try body(dev)
    }

    /// Attaches `image` to a new loop device, mounts it on `mountPoint`,
    /// runs `body` with the loop device name, then unmounts and detaches.
    static func withLoopMount<T>(_ image: String, at mountPoint: String, _ body: (String) throws -> T) throws -> T {
        try require("mount", "umount")
        return try withLoop(image) { dev in
            let m = try run(["mount", dev, mountPoint])
            guard m.status == 0 else { try skip("cannot mount \(dev): \(m.err.trimmingCharacters(in: .whitespacesAndNewlines))") }
            defer { _ = try? run(["umount", mountPoint]) }
            return try body(dev)
        }
    }
}

/// A fresh directory under /tmp, deleted with everything in it.
final class FSTestDir {
    let path: String
    init(_ tag: String) throws {
        path = "/tmp/hotos-\(tag)-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func sub(_ name: String) -> String { path + "/" + name }
}

// MARK: - Crafted headers

private func putLE(_ a: inout [UInt8], _ off: Int, _ v: UInt64, _ n: Int) {
    for i in 0 ..< n { a[off + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
}
private func putBE(_ a: inout [UInt8], _ off: Int, _ v: UInt64, _ n: Int) {
    for i in 0 ..< n { a[off + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - i))) }
}
private func put(_ a: inout [UInt8], _ off: Int, _ s: String) {
    for (i, c) in s.utf8.enumerated() { a[off + i] = c }
}
private let uuidBytes: [UInt8] = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0,
                                  0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
private let uuidText = "12345678-9abc-def0-0123-456789abcdef"

private func fatBootSector(fat32: Bool) -> [UInt8] {
    var a = [UInt8](repeating: 0, count: 4096)
    a[0] = 0xeb; a[1] = 0x3c; a[2] = 0x90
    put(&a, 3, "mkfs.fat")
    putLE(&a, 11, 512, 2)            // bytes per sector
    a[13] = 4                         // sectors per cluster
    putLE(&a, 14, fat32 ? 32 : 4, 2)  // reserved sectors
    a[16] = 2                         // FATs
    a[21] = 0xf8                      // media
    if fat32 {
        putLE(&a, 32, 1_048_576, 4)   // total sectors (512 MiB)
        putLE(&a, 36, 2048, 4)        // FAT size (32-bit)
        a[66] = 0x29
        putLE(&a, 67, 0xdeadbeef, 4)
        put(&a, 71, "BIGFAT     ")
        put(&a, 82, "FAT32   ")
    } else {
        putLE(&a, 17, 512, 2)         // root entries
        putLE(&a, 19, 40960, 2)       // total sectors (20 MiB)
        putLE(&a, 22, 40, 2)          // FAT size
        a[38] = 0x29
        putLE(&a, 39, 0x0a1b2c3d, 4)
        put(&a, 43, "NO NAME    ")
        put(&a, 54, "FAT16   ")
    }
    a[510] = 0x55; a[511] = 0xaa
    return a
}

/// A deterministic byte generator for the no-crash checks.
private struct Lcg {
    var s: UInt64
    mutating func next() -> UInt8 {
        s = s &* 6364136223846793005 &+ 1442695040888963407
        return UInt8(truncatingIfNeeded: s >> 33)
    }
}

@Suite("FSProbe")
struct FSProbeTests {

    // MARK: Real images

    /// Makes a `mib` MiB sparse image with `mkfs`, probes it and checks the
    /// result against `expect` and against blkid's view.
    private func probeImage(_ tag: String, mib: UInt64, mkfs: (String) -> [String], expect: FSProbe) throws {
        try FSTestTools.require(mkfs("x")[0])
        let dir = try FSTestDir("probe-" + tag)
        let img = dir.sub("fs.img")
        try FSTestTools.makeImage(img, bytes: mib << 20)
        try FSTestTools.must(mkfs(img))
        let got = try probeFilesystem(path: img)
        #expect(got == expect)
        if FSTestTools.tool("blkid") != nil {
            let r = try FSTestTools.run(["blkid", "-p", "-o", "export", img])
            var kv: [String: String] = [:]
            for line in r.out.split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1)
                // export format escapes shell specials with a backslash
                if parts.count == 2 { kv[String(parts[0])] = String(parts[1]).replacingOccurrences(of: "\\ ", with: " ") }
            }
            #expect(kv["TYPE"] == got?.type)
            #expect(kv["UUID"] == got?.uuid)
            #expect(kv["LABEL"] == got?.label)
        }
    }

    @Test("ext4 image: type, UUID, label, block size, size")
    func ext4() throws {
        let u = "0b7e1c2a-5d1f-4c3e-9a8b-7c6d5e4f3a2b"
        try probeImage("ext4", mib: 64, mkfs: { ["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", u, "-L", "hot data", $0] },
                       expect: FSProbe(type: "ext4", uuid: u, label: "hot data", blockSize: 4096, sizeBytes: 64 << 20))
    }

    @Test("ext3 image (journal, no ext4 features)")
    func ext3() throws {
        let u = "11111111-2222-4333-8444-555555555555"
        try probeImage("ext3", mib: 32, mkfs: { ["mkfs.ext3", "-q", "-F", "-b", "1024", "-U", u, "-L", "old3", $0] },
                       expect: FSProbe(type: "ext3", uuid: u, label: "old3", blockSize: 1024, sizeBytes: 32 << 20))
    }

    @Test("ext2 image with 1 KiB blocks")
    func ext2() throws {
        let u = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
        try probeImage("ext2", mib: 16, mkfs: { ["mkfs.ext2", "-q", "-F", "-b", "1024", "-U", u, "-L", "boot", $0] },
                       expect: FSProbe(type: "ext2", uuid: u, label: "boot", blockSize: 1024, sizeBytes: 16 << 20))
    }

    @Test("XFS image (300 MiB, sparse)")
    func xfs() throws {
        let u = "3f1e2d3c-4b5a-4697-8877-665544332211"
        try probeImage("xfs", mib: 300, mkfs: { ["mkfs.xfs", "-q", "-f", "-b", "size=4096", "-m", "uuid=" + u, "-L", "xfsvol", $0] },
                       expect: FSProbe(type: "xfs", uuid: u, label: "xfsvol", blockSize: 4096, sizeBytes: 300 << 20))
    }

    @Test("swap area made by mkswap")
    func swap() throws {
        let u = "c0ffee00-1234-4567-89ab-cdef01234567"
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        try probeImage("swap", mib: 64, mkfs: { ["mkswap", "-U", u, "-L", "swappy", $0] },
                       expect: FSProbe(type: "swap", uuid: u, label: "swappy", blockSize: page, sizeBytes: 64 << 20))
    }

    @Test("FAT image made by mkfs.vfat")
    func vfat() throws {
        try FSTestTools.require("mkfs.vfat")
        let dir = try FSTestDir("probe-vfat")
        let img = dir.sub("fat.img")
        try FSTestTools.makeImage(img, bytes: 64 << 20)
        try FSTestTools.must(["mkfs.vfat", "-i", "1A2B3C4D", "-n", "FATVOL", img])
        let got = try probeFilesystem(path: img)
        #expect(got?.type == "vfat")
        #expect(got?.uuid == "1A2B-3C4D")
        #expect(got?.label == "FATVOL")
        #expect(got?.sizeBytes == 64 << 20)
    }

    @Test("A block device (loop, read with O_DIRECT) probes like its image")
    func blockDevice() throws {
        try FSTestTools.require("mkfs.ext4")
        let dir = try FSTestDir("probe-loop")
        let img = dir.sub("fs.img")
        try FSTestTools.makeImage(img, bytes: 32 << 20)
        try FSTestTools.must(["mkfs.ext4", "-q", "-F", "-L", "viadev", img])
        let fromFile = try probeFilesystem(path: img)
        let fromDev = try FSTestTools.withLoop(img, readOnly: true) { try probeFilesystem(path: $0) }
        #expect(fromFile != nil)
        #expect(fromDev == fromFile)
    }

    @Test("An image of zeros, a directory, a missing path")
    func nothingThere() throws {
        let dir = try FSTestDir("probe-none")
        let img = dir.sub("zero.img")
        try FSTestTools.makeImage(img, bytes: 1 << 20)
        #expect(try probeFilesystem(path: img) == nil)
        let small = dir.sub("small.img")
        try FSTestTools.makeImage(small, bytes: 100)
        #expect(try probeFilesystem(path: small) == nil)
        #expect(throws: FSProbeError.notADeviceOrFile(dir.path)) { try probeFilesystem(path: dir.path) }
        #expect(throws: OSError.self) { try probeFilesystem(path: dir.sub("missing")) }
    }

    @Test("Every prefix of a real ext4 header decodes without a crash")
    func truncatedReal() throws {
        try FSTestTools.require("mkfs.ext4")
        let dir = try FSTestDir("probe-trunc")
        let img = dir.sub("fs.img")
        try FSTestTools.makeImage(img, bytes: 16 << 20)
        try FSTestTools.must(["mkfs.ext4", "-q", "-F", img])
        let head = try FSTestTools.readBytes(img, offset: 0, count: FSProbe.probeBytes)
        #expect(probeFilesystem(bytes: head)?.type == "ext4")
        for n in stride(from: 0, through: 2048, by: 1) {
            let p = probeFilesystem(bytes: Array(head.prefix(n)))
            // The superblock fields read end at 1024+0x154; before that, nothing.
            if n < 1024 + 58 { #expect(p == nil, "prefix \(n)") }
        }
    }

    // MARK: Crafted bytes

    @Test("Empty and tiny buffers give nil")
    func tiny() {
        #expect(probeFilesystem(bytes: []) == nil)
        #expect(probeFilesystem(bytes: [0x58]) == nil)
        #expect(probeFilesystem(bytes: Array("XFSB".utf8)) == nil)   // magic, nothing else
        #expect(probeFilesystem(bytes: [UInt8](repeating: 0, count: 512)) == nil)
    }

    @Test("ext4 crafted: 64-bit block count, feature flags decide the type")
    func extCrafted() {
        var a = [UInt8](repeating: 0, count: 4096)
        let sb = 1024
        putLE(&a, sb + 56, 0xEF53, 2)
        putLE(&a, sb + 24, 2, 4)               // 4 KiB blocks
        putLE(&a, sb + 4, 0x10, 4)             // blocks lo
        putLE(&a, sb + 0x150, 1, 4)            // blocks hi
        putLE(&a, sb + 96, 0x80 | 0x40, 4)     // 64bit | extents
        for (i, v) in uuidBytes.enumerated() { a[sb + 104 + i] = v }
        put(&a, sb + 120, "sixteen-chars-ok")  // a label using all 16 bytes
        #expect(probeFilesystem(bytes: a) == FSProbe(type: "ext4", uuid: uuidText, label: "sixteen-chars-ok",
                                                     blockSize: 4096, sizeBytes: ((1 << 32) + 0x10) * 4096))
        putLE(&a, sb + 96, 0x2, 4)             // filetype only
        putLE(&a, sb + 92, 0x4, 4)             // has_journal
        #expect(probeFilesystem(bytes: a)?.type == "ext3")
        #expect(probeFilesystem(bytes: a)?.sizeBytes == 0x10 * 4096)   // hi ignored without 64bit
        putLE(&a, sb + 92, 0, 4)
        #expect(probeFilesystem(bytes: a)?.type == "ext2")
        putLE(&a, sb + 100, 0x400, 4)          // metadata_csum
        #expect(probeFilesystem(bytes: a)?.type == "ext4")
        putLE(&a, sb + 96, 0x8, 4)             // journal_dev
        #expect(probeFilesystem(bytes: a)?.type == "jbd")
        putLE(&a, sb + 24, 40, 4)              // absurd block size
        #expect(probeFilesystem(bytes: a) == nil)
    }

    @Test("btrfs crafted: fsid, label, sector size, device size")
    func btrfsCrafted() {
        var a = [UInt8](repeating: 0, count: FSProbe.probeBytes)
        let sb = 0x10000
        put(&a, sb + 0x40, "_BHRfS_M")
        for (i, v) in uuidBytes.enumerated() { a[sb + 0x20 + i] = v }
        putLE(&a, sb + 0x90, 4096, 4)
        putLE(&a, sb + 0xc9 + 8, 5 << 30, 8)
        put(&a, sb + 0x12b, "rootfs")
        #expect(probeFilesystem(bytes: a) == FSProbe(type: "btrfs", uuid: uuidText, label: "rootfs",
                                                     blockSize: 4096, sizeBytes: 5 << 30))
        // Cut inside the superblock: still recognised, fields out of reach are nil.
        let cut = probeFilesystem(bytes: Array(a.prefix(sb + 0x48)))
        #expect(cut?.type == "btrfs")
        #expect(cut?.label == nil)
        #expect(cut?.sizeBytes == nil)
        #expect(probeFilesystem(bytes: Array(a.prefix(sb + 0x47))) == nil)
    }

    @Test("LUKS1 and LUKS2 crafted")
    func luksCrafted() {
        var a = [UInt8](repeating: 0, count: 4096)
        a[0 ..< 6] = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]
        putBE(&a, 6, 1, 2)
        put(&a, 168, uuidText.uppercased())
        #expect(probeFilesystem(bytes: a) == FSProbe(type: "crypto_LUKS", uuid: uuidText))
        putBE(&a, 6, 2, 2)
        put(&a, 24, "secret")
        #expect(probeFilesystem(bytes: a) == FSProbe(type: "crypto_LUKS", uuid: uuidText, label: "secret"))
    }

    @Test("XFS crafted: big-endian fields")
    func xfsCrafted() {
        var a = [UInt8](repeating: 0, count: 512)
        put(&a, 0, "XFSB")
        putBE(&a, 4, 4096, 4)
        putBE(&a, 8, 76800, 8)
        for (i, v) in uuidBytes.enumerated() { a[32 + i] = v }
        put(&a, 108, "twelve_chars")
        #expect(probeFilesystem(bytes: a) == FSProbe(type: "xfs", uuid: uuidText, label: "twelve_chars",
                                                     blockSize: 4096, sizeBytes: 76800 * 4096))
        putBE(&a, 4, 4097, 4)   // not a power of two
        #expect(probeFilesystem(bytes: a) == nil)
    }

    @Test("swap crafted: 64 KiB pages, big-endian header, old format, hibernation image")
    func swapCrafted() {
        var a = [UInt8](repeating: 0, count: FSProbe.probeBytes)
        put(&a, 65536 - 10, "SWAPSPACE2")
        putBE(&a, 1024, 1, 4)
        putBE(&a, 1028, 99, 4)
        for (i, v) in uuidBytes.enumerated() { a[1036 + i] = v }
        put(&a, 1052, "bigpages")
        #expect(probeFilesystem(bytes: a) == FSProbe(type: "swap", uuid: uuidText, label: "bigpages",
                                                     blockSize: 65536, sizeBytes: 100 * 65536))
        #expect(probeFilesystem(bytes: Array(a.prefix(65535))) == nil)   // signature cut off
        var old = [UInt8](repeating: 0, count: 4096)
        put(&old, 4096 - 10, "SWAP-SPACE")
        #expect(probeFilesystem(bytes: old) == FSProbe(type: "swap", blockSize: 4096))
        var hib = [UInt8](repeating: 0, count: 4096)
        put(&hib, 4096 - 10, "S1SUSPEND")
        #expect(probeFilesystem(bytes: hib)?.type == "swsuspend")
    }

    @Test("FAT16 and FAT32 crafted; an MBR is not FAT")
    func fatCrafted() {
        #expect(probeFilesystem(bytes: fatBootSector(fat32: false)) ==
                FSProbe(type: "vfat", uuid: "0A1B-2C3D", label: nil, blockSize: 2048, sizeBytes: 40960 * 512))
        #expect(probeFilesystem(bytes: fatBootSector(fat32: true)) ==
                FSProbe(type: "vfat", uuid: "DEAD-BEEF", label: "BIGFAT", blockSize: 2048, sizeBytes: 1_048_576 * 512))
        var mbr = [UInt8](repeating: 0, count: 512)
        mbr[446] = 0x80; mbr[450] = 0x83     // one bootable Linux partition
        mbr[510] = 0x55; mbr[511] = 0xaa
        #expect(probeFilesystem(bytes: mbr) == nil)
        #expect(probeFilesystem(bytes: Array(fatBootSector(fat32: true).prefix(511))) == nil)
    }

    @Test("NTFS and exFAT crafted")
    func ntfsExfatCrafted() {
        var n = [UInt8](repeating: 0, count: 512)
        put(&n, 3, "NTFS    ")
        putLE(&n, 11, 512, 2); n[13] = 8
        putLE(&n, 0x28, 2_097_151, 8)
        putLE(&n, 0x48, 0x0123456789abcdef, 8)
        n[510] = 0x55; n[511] = 0xaa
        #expect(probeFilesystem(bytes: n) == FSProbe(type: "ntfs", uuid: "0123456789ABCDEF",
                                                     blockSize: 4096, sizeBytes: 2_097_151 * 512))
        var x = [UInt8](repeating: 0, count: 512)
        put(&x, 3, "EXFAT   ")
        putLE(&x, 72, 1 << 21, 8)
        putLE(&x, 100, 0x1234abcd, 4)
        x[108] = 9; x[109] = 6
        x[510] = 0x55; x[511] = 0xaa
        #expect(probeFilesystem(bytes: x) == FSProbe(type: "exfat", uuid: "1234-ABCD",
                                                     blockSize: 32768, sizeBytes: (1 << 21) * 512))
    }

    @Test("Random bytes and random cuts of crafted headers never crash")
    func noCrash() {
        var g = Lcg(s: 42)
        let seeds: [[UInt8]] = [fatBootSector(fat32: true), fatBootSector(fat32: false)]
        for round in 0 ..< 300 {
            var a: [UInt8]
            if round % 3 == 0 {
                a = (0 ..< Int(g.next()) * 300).map { _ in g.next() }
            } else {
                a = seeds[round % 2]
                for _ in 0 ..< 8 { a[Int(g.next()) % 64] = g.next() }
                a = Array(a.prefix(Int(g.next()) * 20))
            }
            _ = probeFilesystem(bytes: a)
        }
        // Signatures with garbage around them.
        for sig in ["XFSB", "LUKS", "NTFS    ", "EXFAT   "] {
            var a = (0 ..< 600).map { _ in g.next() }
            put(&a, sig == "XFSB" || sig == "LUKS" ? 0 : 3, sig)
            _ = probeFilesystem(bytes: a)
        }
    }
}
