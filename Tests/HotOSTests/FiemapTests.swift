import Foundation
import Testing
import HotOS

// FIEMAP: extents of files on a loop-mounted ext4 image are checked against
// the image itself (read after unmount, so no cache is involved); the batch
// loop and the directory walk run in a temporary directory under /tmp.

/// `count` bytes that differ from block to block and from file to file.
private func pattern(_ tag: UInt8, count: Int) -> [UInt8] {
    (0 ..< count).map { i in UInt8(truncatingIfNeeded: i &* 31 &+ (i >> 12) &* 7 &+ Int(tag) &* 101) }
}

private func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
        throw OSError("create", errno: errno, object: path)
    }
    let fd = open(path, O_RDONLY)
    defer { close(fd) }
    fsync(fd)
}

/// Rebuilds a file's content from its extents, reading `image` (holes read as zeros).
private func contentFromExtents(_ extents: [FileExtent], size: Int, image: String) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: size)
    for e in extents where e.logical < UInt64(size) {
        let n = Int(min(e.length, UInt64(size) - e.logical))
        let bytes = try FSTestTools.readBytes(image, offset: e.physical, count: n)
        out.replaceSubrange(Int(e.logical) ..< Int(e.logical) + n, with: bytes)
    }
    return out
}

/// Skips the test unless the filesystem under `dir` answers FIEMAP.
private func requireFiemap(in dir: String) throws {
    let probe = dir + "/.fiemap-probe"
    try writeFile(probe, [1, 2, 3])
    defer { unlink(probe) }
    do {
        _ = try fileExtents(path: probe)
    } catch let e as OSError {
        try FSTestTools.skip("the filesystem under \(dir) does not support FIEMAP: \(e)")
    }
}

@Suite("FIEMAP")
struct FiemapTests {

    @Test("Extents of files on a loop-mounted ext4 hold the files' bytes on the device")
    func extentsHoldContent() throws {
        try FSTestTools.require("mkfs.ext4")
        let dir = try FSTestDir("fiemap-loop")
        let img = dir.sub("fs.img")
        let mnt = dir.sub("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: false)
        try FSTestTools.makeImage(img, bytes: 64 << 20)
        try FSTestTools.must(["mkfs.ext4", "-q", "-F", "-b", "4096", img])

        // Sizes: one block, not a block multiple, several MiB, a few bytes.
        let files: [(String, [UInt8])] = [
            ("one", pattern(1, count: 4096)),
            ("odd", pattern(2, count: 1_000_003)),
            ("big", pattern(3, count: 5 << 20)),
            ("tiny", pattern(4, count: 37)),
        ]
        let mapped: [String: [FileExtent]] = try FSTestTools.withLoopMount(img, at: mnt) { _ in
            // Interleave appends to two files, so at least one gets several extents.
            for (name, bytes) in files { try writeFile(mnt + "/" + name, bytes) }
            let a = mnt + "/frag-a", b = mnt + "/frag-b"
            for i in 0 ..< 16 {
                for (p, tag) in [(a, UInt8(10)), (b, UInt8(11))] {
                    let h = FileHandle(forUpdatingAtPath: p) ?? {
                        _ = FileManager.default.createFile(atPath: p, contents: nil)
                        return FileHandle(forUpdatingAtPath: p)!
                    }()
                    h.seekToEndOfFile()
                    h.write(Data(pattern(tag &+ UInt8(i), count: 64 << 10)))
                    try h.synchronize()
                    try h.close()
                }
            }
            sync()
            var m: [String: [FileExtent]] = [:]
            for name in files.map({ $0.0 }) + ["frag-a", "frag-b"] {
                m[name] = try fileExtents(path: mnt + "/" + name)
            }
            return m
        }
        // Unmounted and detached: the image file is now the truth.
        var expected = Dictionary(uniqueKeysWithValues: files)
        expected["frag-a"] = (0 ..< 16).flatMap { pattern(10 &+ UInt8($0), count: 64 << 10) }
        expected["frag-b"] = (0 ..< 16).flatMap { pattern(11 &+ UInt8($0), count: 64 << 10) }
        for (name, bytes) in expected {
            let ext = try #require(mapped[name])
            #expect(!ext.isEmpty, "\(name) has no extents")
            #expect(ext.last?.flags.contains(.last) == true, "\(name): last extent lacks LAST")
            for e in ext {
                #expect(e.isExcludable, "\(name): \(e.flags)")
                #expect(e.physical % 4096 == 0)
            }
            #expect(ext.reduce(0) { $0 + $1.length } >= UInt64(bytes.count))
            let back = try contentFromExtents(ext, size: bytes.count, image: img)
            #expect(back == bytes, "\(name): bytes at its extents differ")
        }
        print("frag-a: \(mapped["frag-a"]!.count) extents, frag-b: \(mapped["frag-b"]!.count) extents")
        // Distinct files never share device bytes.
        let all = mapped.values.flatMap { $0 }.sorted { $0.physical < $1.physical }
        for (x, y) in zip(all, all.dropFirst()) { #expect(x.physical + x.length <= y.physical) }
    }

    @Test("More extents than one batch: the loop over FIEMAP calls")
    func manyExtents() throws {
        let dir = try FSTestDir("fiemap-many")
        try requireFiemap(in: dir.path)
        let path = dir.sub("sparse")
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        defer { close(fd) }
        // 300 separate 4 KiB pieces, a hole after each: 300 extents.
        let block = pattern(9, count: 4096)
        for i in 0 ..< 300 {
            let n = block.withUnsafeBytes { pwrite(fd, $0.baseAddress!, 4096, off_t(i * 8192)) }
            #expect(n == 4096)
        }
        fsync(fd)
        let whole = try fileExtents(fd: fd, name: path)
        let small = try fileExtents(fd: fd, name: path, batch: 7)
        #expect(whole.count == 300)
        #expect(small == whole)
        #expect(whole.map { $0.logical } == (0 ..< 300).map { UInt64($0 * 8192) })
        #expect(whole.allSatisfy { $0.length == 4096 })
        #expect(whole.filter { $0.flags.contains(.last) }.count == 1)
        #expect(try fileExtents(path: path) == whole)
    }

    @Test("An empty file has no extents; a directory or missing path throws")
    func emptyAndErrors() throws {
        let dir = try FSTestDir("fiemap-err")
        try requireFiemap(in: dir.path)
        try writeFile(dir.sub("empty"), [])
        #expect(try fileExtents(path: dir.sub("empty")).isEmpty)
        #expect(throws: OSError.self) { try fileExtents(path: dir.path) }
        #expect(throws: OSError.self) { try fileExtents(path: dir.sub("missing")) }
        symlink(dir.sub("empty"), dir.sub("link"))
        #expect(throws: OSError.self) { try fileExtents(path: dir.sub("link")) }   // O_NOFOLLOW
    }

    @Test("Directory walk: counts regular files, skips symlinks and special files")
    func directoryWalk() throws {
        let dir = try FSTestDir("fiemap-walk")
        try requireFiemap(in: dir.path)
        let root = dir.sub("tree")
        let fm = FileManager.default
        try fm.createDirectory(atPath: root + "/sub/deeper", withIntermediateDirectories: true)
        try writeFile(root + "/a", pattern(1, count: 10_000))
        try writeFile(root + "/sub/b", pattern(2, count: 20_000))
        try writeFile(root + "/sub/deeper/c", pattern(3, count: 30_000))
        try writeFile(root + "/sub/empty", [])
        try writeFile(dir.sub("outside"), pattern(4, count: 40_000))
        symlink(root + "/a", root + "/link-to-a")
        symlink(dir.path, root + "/link-to-outside-dir")   // would reach "outside" if followed
        mkfifo(root + "/fifo", 0o644)
        link(root + "/sub/b", root + "/hardlink-to-b")      // mapped once

        let r = try directoryExtents(path: root)
        #expect(r.files == 4)
        let skipped = Dictionary(uniqueKeysWithValues: r.skipped)
        #expect(skipped.count == 3, "\(r.skipped)")
        #expect(skipped[root + "/link-to-a"]?.contains("symbolic link") == true)
        #expect(skipped[root + "/link-to-outside-dir"]?.contains("symbolic link") == true)
        #expect(skipped[root + "/fifo"] == "fifo")
        // Exactly the extents of a, b and c (the empty file has none), sorted.
        var want: [FileExtent] = []
        for p in ["/a", "/sub/b", "/sub/deeper/c"] { want += try fileExtents(path: root + p) }
        #expect(Set(r.extents) == Set(want))
        #expect(r.extents.count == want.count)
        #expect(r.extents.map { $0.physical } == r.extents.map { $0.physical }.sorted())

        // One regular file instead of a directory; a symlink as the root.
        let single = try directoryExtents(path: root + "/a")
        #expect(single.files == 1)
        #expect(throws: OSError.self) { try directoryExtents(path: root + "/link-to-outside-dir") }
    }

    @Test("Directory walk stays on one filesystem: a mount inside is skipped")
    func oneFileSystem() throws {
        try FSTestTools.require("mkfs.ext4")
        let dir = try FSTestDir("fiemap-xdev")
        try requireFiemap(in: dir.path)
        let root = dir.sub("tree")
        let mnt = root + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        try writeFile(root + "/here", pattern(5, count: 8192))
        let img = dir.sub("fs.img")
        try FSTestTools.makeImage(img, bytes: 32 << 20)
        try FSTestTools.must(["mkfs.ext4", "-q", "-F", img])
        try FSTestTools.withLoopMount(img, at: mnt) { _ in
            try writeFile(mnt + "/there", pattern(6, count: 8192))
            let same = try directoryExtents(path: root)
            #expect(same.files == 1)
            #expect(same.skipped.contains { $0.0 == mnt && $0.1.contains("another filesystem") })
            let cross = try directoryExtents(path: root, oneFileSystem: false)
            #expect(cross.files == 2)   // "here" and "there" (lost+found is empty)
        }
    }

    @Test("Flags: names, and which extents may be left out of a backup")
    func flags() {
        let plain = FileExtent(logical: 0, physical: 4096, length: 4096, flags: [.last])
        #expect(plain.isExcludable)
        #expect(plain.physicalRange == 4096 ..< 8192)
        #expect(FileExtent(logical: 0, physical: 0, length: 4096, flags: [.unwritten]).isExcludable)
        for f: FileExtent.Flags in [.unknown, .delalloc, .inline, .tail, .notAligned, .encoded, .shared] {
            #expect(!FileExtent(logical: 0, physical: 4096, length: 4096, flags: f).isExcludable, "\(f)")
        }
        #expect(!FileExtent(logical: 0, physical: 4096, length: 0).isExcludable)
        #expect(FileExtent.Flags([.last, .unknown, .delalloc]).description == "[last,unknown,delalloc]")
        #expect(FileExtent.Flags(rawValue: 0x1 | 0x10000).description == "[last,0x10000]")
    }
}
