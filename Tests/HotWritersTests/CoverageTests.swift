import Foundation
import Testing
@testable import HotWriters

@Suite struct CoverageTests {
    func tmpdir() throws -> String {
        let d = NSTemporaryDirectory() + "hw-cov-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: d + "/vol/sub", withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: d + "/vol/sub/disk.img", contents: Data([1]))
        FileManager.default.createFile(atPath: d + "/outside.img", contents: Data([2]))
        return d
    }

    @Test func pathsUnderTheVolumeCount() throws {
        let d = try tmpdir(); defer { try? FileManager.default.removeItem(atPath: d) }
        let files = [ComponentFile(path: d + "/vol/sub/disk.img", role: "disk"),
                     ComponentFile(path: d + "/outside.img", role: "disk")]
        #expect(coverage(of: files, volumes: [d + "/vol"]) == .partial)
        #expect(coverage(of: files, volumes: [d + "/vol", d]) == .full)
        #expect(coverage(of: [files[0]], volumes: [d + "/vol"]) == .full)
        #expect(coverage(of: [files[1]], volumes: [d + "/vol"]) == .none)
        // A sibling whose name starts like the volume is not under it.
        try FileManager.default.createDirectory(atPath: d + "/volume2", withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: d + "/volume2/x", contents: Data([3]))
        #expect(volume(of: d + "/volume2/x", volumes: [d + "/vol"]) == nil)
    }

    @Test func filesThatDoNotCountAreIgnoredAndMissingFilesAreNowhere() throws {
        let d = try tmpdir(); defer { try? FileManager.default.removeItem(atPath: d) }
        let files = [ComponentFile(path: d + "/vol/sub/disk.img", role: "disk"),
                     ComponentFile(path: d + "/outside.img", role: "cdrom", counts: false)]
        #expect(coverage(of: files, volumes: [d + "/vol"]) == .full)
        #expect(coverage(of: [ComponentFile(path: d + "/vol/gone.img")], volumes: [d + "/vol"]) == .none)
        #expect(coverage(of: [ComponentFile(path: d + "/outside.img", counts: false)], volumes: [d]) == .none)
    }

    @Test func symlinksAreResolved() throws {
        let d = try tmpdir(); defer { try? FileManager.default.removeItem(atPath: d) }
        try FileManager.default.createSymbolicLink(atPath: d + "/link.img", withDestinationPath: d + "/vol/sub/disk.img")
        #expect(volume(of: d + "/link.img", volumes: [d + "/vol"]) == d + "/vol")
    }

    @Test func anotherFilesystemUnderTheMountPointIsAnotherVolume() throws {
        // /dev/shm (tmpfs) lives under / but is a different filesystem.
        guard let devShm = deviceOf("/dev/shm"), let root = deviceOf("/"), devShm != root else {
            print("skipped: /dev/shm is not a separate filesystem here"); return
        }
        let f = "/dev/shm/hw-cov-\(getpid())"
        FileManager.default.createFile(atPath: f, contents: Data([1]))
        defer { unlink(f) }
        #expect(volume(of: f, volumes: ["/"]) == nil)
        #expect(volume(of: f, volumes: ["/", "/dev/shm"]) == "/dev/shm")
    }
}
