import Foundation
import Testing
import HotOS

// /proc/swaps: the parser on fixed texts, and the live file (often empty).

@Suite("Swaps")
struct SwapsTests {
    static let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"

    @Test("Header only, empty text: no entries")
    func headerOnly() {
        #expect(parseSwaps(Self.header).isEmpty)
        #expect(parseSwaps("").isEmpty)
        #expect(parseSwaps("\n\n").isEmpty)
    }

    @Test("A file and a partition")
    func fileAndPartition() {
        let text = Self.header
            + "/swapfile                               file\t\t2097148\t\t1024\t\t-2\n"
            + "/dev/vdb2                               partition\t8388604\t\t0\t\t10\n"
        #expect(parseSwaps(text) == [
            SwapEntry(path: "/swapfile", type: .file, sizeBytes: 2_097_148 * 1024, usedBytes: 1024 * 1024, priority: -2),
            SwapEntry(path: "/dev/vdb2", type: .partition, sizeBytes: 8_388_604 * 1024, usedBytes: 0, priority: 10),
        ])
    }

    @Test("Octal escapes in paths: space, tab, backslash, newline; a deleted file")
    func escapes() {
        let text = Self.header
            + "/mnt/my\\040disk/swap\\011file\tfile\t1024\t0\t-3\n"
            + "/srv/back\\134slash/new\\012line file 2048 4 -4\n"
            + "/old/swap\\040(deleted) file 4096 0 -5\n"
        let e = parseSwaps(text)
        #expect(e.map { $0.path } == ["/mnt/my disk/swap\tfile", "/srv/back\\slash/new\nline", "/old/swap (deleted)"])
        #expect(e.map { $0.sizeBytes } == [1 << 20, 2 << 20, 4 << 20])
        #expect(e[1].usedBytes == 4096)
        #expect(e.allSatisfy { $0.type == .file })
    }

    @Test("Malformed lines are ignored, unknown types are kept")
    func malformed() {
        let text = Self.header
            + "/swapfile file\n"                          // too few fields
            + "/swapfile file abc 0 -2\n"                 // size not a number
            + "/swapfile file 18446744073709551615 0 1\n" // overflows in bytes
            + "/dev/zram0 zram 1000 10 100\n"
        #expect(parseSwaps(text) == [SwapEntry(path: "/dev/zram0", type: .other("zram"),
                                               sizeBytes: 1_024_000, usedBytes: 10_240, priority: 100)])
    }

    @Test("The live /proc/swaps and swapFiles(onDevice:)")
    func live() throws {
        guard FileManager.default.fileExists(atPath: "/proc/swaps") else {
            try FSTestTools.skip("/proc/swaps does not exist")
        }
        let all = activeSwaps()
        print("active swaps: \(all.count)")
        for e in all { #expect(e.sizeBytes >= e.usedBytes) }
        var st = stat()
        #expect(stat("/", &st) == 0)
        let files = swapFiles(onDevice: st.st_dev)
        let known = Set(all.filter { $0.type == .file }.map { $0.path })
        for f in files {
            #expect(known.contains(f))
            var fst = stat()
            #expect(stat(f, &fst) == 0 && fst.st_dev == st.st_dev)
        }
        #expect(activeSwaps(procSwaps: "/nonexistent/swaps").isEmpty)
    }
}
