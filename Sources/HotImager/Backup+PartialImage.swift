// The image is never seen half-written under its final name.
//
//   .NAME.PID.hotimage-partial   created (O_EXCL), flock'ed, written by
//                                QCow2Writer, fsynced by its finish
//          │ complete                        │ failure
//          ▼                                 ▼
//   rename → NAME (directory fsynced)   unlinked (abandon), or with
//                                       --keep-partial finished marked
//                                       incomplete and renamed → NAME
//
// A backup killed with SIGKILL cannot remove its partial image; it leaves
// the dot file, whose lock died with it. The next backup into the same
// directory removes every such file whose lock it can take (a running
// backup holds its own), and says so.
//
// The lock is taken on the file before QCow2Writer opens it (O_TRUNC, same
// inode), and the path is checked to still be that inode, so a sweeper
// never removes the file of a backup that is starting.
import Foundation
import HotOS

struct PartialImage {
    static let suffix = ".hotimage-partial"
    let final: String
    let temp: String
    private let lockFD: Int32

    /// Creates and locks the temporary file next to `final`.
    init(final: String) throws {
        self.final = final
        let dir = (final as NSString).deletingLastPathComponent
        let base = (final as NSString).lastPathComponent
        temp = (dir.isEmpty ? "" : dir + "/") + "." + base + ".\(getpid())" + PartialImage.suffix
        let fd = open(temp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SessionError("cannot create \(temp): \(String(cString: strerror(errno)))") }
        var a = stat(), b = stat()
        guard flock(fd, LOCK_EX | LOCK_NB) == 0, fstat(fd, &a) == 0, stat(temp, &b) == 0,
              a.st_ino == b.st_ino, a.st_dev == b.st_dev else {
            close(fd)
            throw SessionError("cannot lock \(temp) (another backup removed or holds it)")
        }
        lockFD = fd
    }

    /// The image is finished (and fsynced): give it its final name.
    func commit() throws {
        guard rename(temp, final) == 0 else {
            throw SessionError("renaming \(temp) to \(final): \(String(cString: strerror(errno)))")
        }
        let dir = (final as NSString).deletingLastPathComponent
        let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); close(dfd) }
    }

    /// Lets go of the lock (after commit, or after the writer removed the file).
    func release() {
        unlink(temp)   // nothing there after a commit or an abandon; a leftover otherwise
        close(lockFD)
    }

    /// Removes partial images in `dir` left by killed backups (lock free).
    static func sweep(dir: String, log: (String) -> Void) {
        let d = dir.isEmpty ? "." : dir
        for n in (try? FileManager.default.contentsOfDirectory(atPath: d)) ?? [] where n.hasPrefix(".") && n.hasSuffix(suffix) {
            let p = d + "/" + n
            let fd = open(p, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { continue }   // a running backup's
            if unlink(p) == 0 { log("removed the partial image \(p) left by a killed backup") }
        }
    }
}

/// A test hook, for the machine tests only (Tests/Machine/t_backup_faults.sh):
/// HOTIMAGE_TEST_STALL=PHASE:FILE makes the backup, on reaching PHASE
/// (frozen: inside the map read while the filesystem is frozen; imaging:
/// the first progress report; emergency: the first report in emergency
/// mode; finish: before the image's final metadata write), create FILE and
/// sleep up to 120 s (until interrupted), once, so that a test can signal
/// it in a phase too short to catch otherwise. Read once; unset, it costs a
/// string comparison.
enum TestStall {
    static let spec: (phase: String, file: String)? = {
        guard let v = ProcessInfo.processInfo.environment["HOTIMAGE_TEST_STALL"],
              let colon = v.firstIndex(of: ":") else { return nil }
        return (String(v[..<colon]), String(v[v.index(after: colon)...]))
    }()
    nonisolated(unsafe) static var done = false

    static func at(_ phase: String, interrupted: () -> Bool) {
        guard let s = spec, s.phase == phase, !done else { return }
        done = true
        FileManager.default.createFile(atPath: s.file, contents: Data("\(getpid())\n".utf8))
        let end = monotonicNanos() + 120_000_000_000
        while monotonicNanos() < end && !interrupted() { usleep(50_000) }
    }
}
