// DataFileAccessTests.swift — an image is 0600 (0640 with a group) whatever
// the umask, including one that would take the owner's own bits away.
//
// The umask is per process and other suites run in parallel, so each test
// sets it only around the one open and puts it back at once.

import Foundation
import Testing
@testable import QCow2

@Suite(.serialized) struct DataFileAccessTests {
    func mode(_ path: String) -> (mode: mode_t, uid: uid_t, gid: gid_t) {
        var st = stat()
        #expect(stat(path, &st) == 0)
        return (st.st_mode & 0o7777, st.st_uid, st.st_gid)
    }

    func writer(_ path: String, umask u: mode_t, overwrite: Bool = false,
                access: DataFileAccess = .ownerOnly) throws -> QCow2Writer {
        let saved = umask(u)
        defer { umask(saved) }
        return try QCow2Writer(path: path, virtualSize: 4096, compression: .none, overwrite: overwrite, access: access)
    }

    @Test(arguments: [
        0o022,  // the usual umask: open(0644) gave a world-readable image
        0o000,  // no umask at all
        0o077,  // a strict one
        0o277,  // one that takes the owner's write bit: still exactly 0600
    ] as [mode_t])
    func imageIsOwnerOnly(umask u: mode_t) throws {
        let dir = TempDir("access")
        let path = dir.file("a.qcow2")
        let w = try writer(path, umask: u)
        #expect(mode(path).mode == 0o600)
        _ = try w.finish(metadata: [], complete: true)
        #expect(mode(path).mode == 0o600)
        #expect(mode(path).uid == geteuid())
    }

    @Test func groupReadsAt0640() throws {
        let dir = TempDir("access")
        let path = dir.file("g.qcow2")
        let w = try writer(path, umask: 0o022, access: DataFileAccess(group: getegid()))
        w.abandon()
        let w2 = try writer(path, umask: 0o022, access: DataFileAccess(group: getegid()))
        let m = mode(path)
        #expect(m.mode == 0o640)
        #expect(m.gid == getegid())
        w2.abandon()
    }

    @Test func overwriteTakesTheOldModeAway() throws {
        let dir = TempDir("access")
        let path = dir.file("o.qcow2")
        #expect(FileManager.default.createFile(atPath: path, contents: Data("old".utf8)))
        #expect(chmod(path, 0o666) == 0)
        let w = try writer(path, umask: 0o022, overwrite: true)
        #expect(mode(path).mode == 0o600)
        w.abandon()
    }

    @Test func aNonRegularFileKeepsItsMode() throws {
        // A block device given as a restore target keeps its mode; a FIFO
        // stands in for it (harmless to open, no root needed).
        let dir = TempDir("access")
        let path = dir.file("fifo")
        #expect(mkfifo(path, 0o644) == 0)
        #expect(chmod(path, 0o644) == 0)
        let fd = open(path, O_RDWR | O_NONBLOCK)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(DataFileAccess.ownerOnly.apply(to: fd) == nil)
        #expect(mode(path).mode == 0o644)
    }
}
