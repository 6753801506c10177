import Foundation
import Testing
import HotWriters
@testable import HotImager

/// The path rules of restore's last step (Restore+Artifacts.swift): the
/// writers' files to write and to leave out count only under the imaged
/// volume's mount point.
@Suite struct RestoreArtifactsTests {
    func record(artifacts: [String] = [], omit: [String]?) throws -> ComponentRecord {
        var o: [String: Any] = ["writer": "postgresql", "id": "5432:/srv/pg/data", "coverage": "fully", "files": [], "action": "frozen",
                                "artifacts": artifacts.map { ["path": $0, "content": "label"] }]
        if let omit { o["restoreOmit"] = omit }
        return try JSONDecoder().decode(ComponentRecord.self, from: JSONSerialization.data(withJSONObject: o))
    }

    @Test func relativeToTheMountPoint() {
        #expect(RestoreJob.relative("/srv/pg/data/postmaster.pid", to: "/srv") == "pg/data/postmaster.pid")
        #expect(RestoreJob.relative("/srv/pg/data/postmaster.pid", to: "/srv/") == "pg/data/postmaster.pid")
        #expect(RestoreJob.relative("/srv/x", to: "/") == "srv/x")
        // Outside, or the mount point itself.
        #expect(RestoreJob.relative("/srv2/x", to: "/srv") == nil)
        #expect(RestoreJob.relative("/etc/passwd", to: "/srv") == nil)
        #expect(RestoreJob.relative("/srv", to: "/srv") == nil)
        #expect(RestoreJob.relative("/srv/", to: "/srv") == nil)
        // Not absolute, or climbing out with `..`.
        #expect(RestoreJob.relative("pg/data/postmaster.pid", to: "/srv") == nil)
        #expect(RestoreJob.relative("/srv/pg/../../etc/passwd", to: "/srv") == nil)
        #expect(RestoreJob.relative("/srv/..", to: "/srv") == nil)
    }

    @Test func omittedFilesOnTheVolumeOnly() throws {
        let c = try record(artifacts: ["/srv/pg/data/backup_label.hotimage"],
                           omit: ["/srv/pg/data/postmaster.pid", "/etc/passwd", "/srv/../etc/shadow", "postmaster.opts"])
        let w = RestoreJob.writerFileWork([c], mountPoint: "/srv")
        #expect(w.remove.map(\.rel) == ["pg/data/postmaster.pid"])
        #expect(w.write.map(\.rel) == ["pg/data/backup_label.hotimage"])
        #expect(w.warnings.count == 3)
        #expect(w.warnings.allSatisfy { $0.contains("not on the imaged volume; not removed") })
        // No mount point recorded: nothing at all.
        let none = RestoreJob.writerFileWork([c], mountPoint: nil)
        #expect(none.isEmpty && none.warnings.count == 5)
        // Nothing to do: restore does not mount.
        #expect(RestoreJob.writerFileWork([try record(omit: nil)], mountPoint: "/srv").isEmpty)
        #expect(RestoreJob.writerFileWork([try record(omit: [])], mountPoint: "/srv").isEmpty)
    }

    /// Regular files only, a missing one is fine, and never through a
    /// symbolic link out of the restored filesystem.
    @Test func removesRegularFilesInsideOnly() throws {
        let fm = FileManager.default
        let base = NSTemporaryDirectory() + "hotimage-omit-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let root = base + "/root", outside = base + "/outside"
        try fm.createDirectory(atPath: root + "/pg/data/sub", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: outside, withIntermediateDirectories: true)
        defer { try? fm.removeItem(atPath: base) }
        fm.createFile(atPath: root + "/pg/data/postmaster.pid", contents: Data("123\n".utf8))
        fm.createFile(atPath: outside + "/postmaster.pid", contents: Data("456\n".utf8))
        try fm.createSymbolicLink(atPath: root + "/pg/link", withDestinationPath: outside)
        try fm.createSymbolicLink(atPath: root + "/pg/data/pidlink", withDestinationPath: outside + "/postmaster.pid")

        #expect(RestoreJob.removeOmitted("pg/data/postmaster.pid", in: root) == .removed)
        #expect(!fm.fileExists(atPath: root + "/pg/data/postmaster.pid"))
        #expect(RestoreJob.removeOmitted("pg/data/postmaster.pid", in: root) == .missing)
        #expect(RestoreJob.removeOmitted("pg/gone/postmaster.pid", in: root) == .missing)
        if case .refused = RestoreJob.removeOmitted("pg/data/sub", in: root) {} else { Issue.record("a directory was not refused") }
        if case .refused = RestoreJob.removeOmitted("pg/data/pidlink", in: root) {} else { Issue.record("a symbolic link was not refused") }
        if case .refused = RestoreJob.removeOmitted("pg/link/postmaster.pid", in: root) {} else {
            Issue.record("a file through a symbolic link out of the filesystem was not refused")
        }
        #expect(fm.fileExists(atPath: outside + "/postmaster.pid"))
        #expect(fm.fileExists(atPath: root + "/pg/data/sub"))
        #expect((try? fm.destinationOfSymbolicLink(atPath: root + "/pg/data/pidlink")) != nil)
    }
}
