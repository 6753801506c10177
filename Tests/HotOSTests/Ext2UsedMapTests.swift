import Foundation
import Testing
import HotOS

// ext2UsedExtents on images made by mke2fs and filled by debugfs (no mount,
// no root), checked against dumpe2fs's counts and debugfs's block lists.

/// "Key: value" lines of `dumpe2fs -h`.
private func superblockFields(_ image: String) throws -> [String: String] {
    let out = try FSTestTools.must(["dumpe2fs", "-h", image])
    var kv: [String: String] = [:]
    for line in out.split(separator: "\n") {
        guard let colon = line.firstIndex(of: ":") else { continue }
        kv[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
    return kv
}

/// Blocks of `file` in the image, from debugfs (data blocks).
private func debugfsBlocks(_ image: String, _ file: String) throws -> [UInt64] {
    let out = try FSTestTools.must(["debugfs", "-R", "blocks \(file)", image])
    return out.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }
}

/// Makes a filesystem with `mkfs`, writes /etc/services and a 3 MiB file
/// into it with debugfs, and checks the used map.
private func checkUsedMap(mkfs: [String], mib: UInt64, expectBlockSize: Int) throws {
    try FSTestTools.require(mkfs[0], "debugfs", "dumpe2fs")
    let dir = try FSTestDir("ext2map")
    let img = dir.sub("fs.img")
    try FSTestTools.makeImage(img, bytes: mib << 20)
    try FSTestTools.must(mkfs + [img])
    let big = dir.sub("big")
    _ = FileManager.default.createFile(atPath: big, contents: Data((0 ..< (3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 13) }))
    var written: [String] = ["big"]
    try FSTestTools.must(["debugfs", "-w", "-R", "write \(big) big", img])
    if FileManager.default.fileExists(atPath: "/etc/services") {
        try FSTestTools.must(["debugfs", "-w", "-R", "write /etc/services services", img])
        written.append("services")
    }

    let r = try ext2UsedExtents(devicePath: img)
    let sb = try superblockFields(img)
    let blockSize = try #require(sb["Block size"].flatMap { Int($0) })
    let blockCount = try #require(sb["Block count"].flatMap { UInt64($0) })
    let freeBlocks = try #require(sb["Free blocks"].flatMap { UInt64($0) })
    #expect(r.blockSize == expectBlockSize)
    #expect(r.blockSize == blockSize)
    #expect(r.totalBytes == blockCount * UInt64(blockSize))
    #expect(!r.needsRecovery)

    // Sorted, merged, inside the filesystem, starting with the boot block.
    #expect(r.used.first?.lowerBound == 0)
    for (a, b) in zip(r.used, r.used.dropFirst()) { #expect(a.upperBound < b.lowerBound) }
    #expect((r.used.last?.upperBound ?? 0) <= r.totalBytes)
    for u in r.used { #expect(u.lowerBound % UInt64(blockSize) == 0 && u.upperBound % UInt64(blockSize) == 0) }

    // Used bytes = (blocks - free) x block size: block 0 of a 1 KiB-block
    // filesystem is outside the bitmap but inside the block count.
    let usedBytes = r.used.reduce(UInt64(0)) { $0 + ($1.upperBound - $1.lowerBound) }
    #expect(usedBytes == (blockCount - freeBlocks) * UInt64(blockSize))
    print("\(mkfs[0]) \(blockSize): \(r.used.count) used ranges, \(usedBytes) bytes")

    for f in written {
        let blocks = try debugfsBlocks(img, f)
        #expect(!blocks.isEmpty, "no blocks for \(f)")
        for blk in blocks {
            let off = blk * UInt64(blockSize)
            #expect(r.used.contains { $0.contains(off) && $0.upperBound >= off + UInt64(blockSize) },
                    "\(f): block \(blk) is not in the used map")
        }
    }
}

@Suite("Ext2UsedMap")
struct Ext2UsedMapTests {

    @Test("ext4, 4 KiB blocks: used bytes match dumpe2fs, file blocks are used")
    func ext4() throws {
        try checkUsedMap(mkfs: ["mkfs.ext4", "-q", "-F", "-b", "4096"], mib: 64, expectBlockSize: 4096)
    }

    @Test("ext2, 1 KiB blocks: block 0 (before the first data block) counts as used")
    func ext2OneK() throws {
        try checkUsedMap(mkfs: ["mkfs.ext2", "-q", "-F", "-b", "1024"], mib: 64, expectBlockSize: 1024)
    }

    @Test("64-bit ext4 with bigalloc clusters")
    func bigalloc() throws {
        try checkUsedMap(mkfs: ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "64bit,bigalloc", "-C", "16384"],
                         mib: 64, expectBlockSize: 4096)
    }

    @Test("The RECOVER flag is reported")
    func needsRecovery() throws {
        try FSTestTools.require("mkfs.ext4", "debugfs")
        let dir = try FSTestDir("ext2map-rec")
        let img = dir.sub("fs.img")
        try FSTestTools.makeImage(img, bytes: 32 << 20)
        try FSTestTools.must(["mkfs.ext4", "-q", "-F", img])
        #expect(try ext2UsedExtents(devicePath: img).needsRecovery == false)
        try FSTestTools.must(["debugfs", "-w", "-R", "feature needs_recovery", img])
        #expect(try ext2UsedExtents(devicePath: img).needsRecovery == true)
    }

    @Test("Not an ext filesystem, or missing: a clear error")
    func notExt() throws {
        let dir = try FSTestDir("ext2map-bad")
        let img = dir.sub("zeros.img")
        try FSTestTools.makeImage(img, bytes: 4 << 20)
        do {
            _ = try ext2UsedExtents(devicePath: img)
            Issue.record("a file of zeros opened as ext2")
        } catch let e as Ext2Error {
            print(e)
            #expect(e.description.contains(img))
            #expect(e.message.lowercased().contains("magic"))
        }
        do {
            _ = try ext2UsedExtents(devicePath: dir.sub("missing"))
            Issue.record("a missing file opened as ext2")
        } catch let e as Ext2Error {
            print(e)
            #expect(e.code == Int(ENOENT))
            #expect(e.message == String(cString: strerror(ENOENT)))
        }
    }
}
