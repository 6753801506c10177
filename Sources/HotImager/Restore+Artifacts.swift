// Restore, last step: the writers' thaw-time files, and the files writers
// mark to leave out. A writer may hand over files that exist only after the
// snapshot (PostgreSQL's backup_label comes from pg_backup_stop); the image
// keeps them in its metadata, and restore writes them into the restored
// filesystem, at the same place relative to the volume's mount point, owned
// like the directory that holds them, mode 0600. A writer may also name
// files that belong to the running application only (PostgreSQL's
// postmaster.pid, ComponentRecord.restoreOmit): restore removes them from
// the restored filesystem (regular files only; a missing one is fine).
// Either way only paths under the imaged volume's mount point count (taken
// relative to it, no `..`, no symbolic link on the way out of it). The
// target is mounted for this, only when there is something to do (through
// a loop device if it is a file), in a private directory and unmounted
// again; XFS with nouuid, since the original volume is likely mounted with
// the same UUID.
import Foundation
import HotOS
import HotWriters

extension RestoreJob {
    /// What the writers left for restore: files to write, files to remove
    /// (paths relative to the volume's mount point), and the warnings about
    /// paths that are not on the imaged volume.
    struct WriterFileWork {
        var write: [(rel: String, content: String, owner: String)] = []
        var remove: [(rel: String, owner: String)] = []
        var warnings: [String] = []
        var isEmpty: Bool { write.isEmpty && remove.isEmpty }
    }

    static func writerFileWork(_ components: [ComponentRecord], mountPoint: String?) -> WriterFileWork {
        var w = WriterFileWork()
        for c in components {
            let owner = "\(c.writer) '\(c.id)'"
            for a in c.artifacts ?? [] {
                guard let mp = mountPoint, let rel = relative(a.path, to: mp) else {
                    w.warnings.append("warning: \(owner): \(a.path) is not on the imaged volume; not restored")
                    continue
                }
                w.write.append((rel, a.content, owner))
            }
            for p in c.restoreOmit ?? [] {
                guard let mp = mountPoint, let rel = relative(p, to: mp) else {
                    w.warnings.append("warning: \(owner): \(p) is not on the imaged volume; not removed")
                    continue
                }
                w.remove.append((rel, owner))
            }
        }
        return w
    }

    /// Writes the writers' files and removes the files they leave out.
    /// Returns the paths written and removed (inside the restored
    /// filesystem).
    static func placeArtifacts(_ meta: ImageMetadata, target: String, reporter r: Reporter) throws -> (placed: [String], removed: [String]) {
        let work = writerFileWork(meta.components ?? [], mountPoint: meta.source.mountPoint)
        for m in work.warnings { r.log(m) }
        let files = work.write
        guard !work.isEmpty else { return ([], []) }
        guard let fs = meta.filesystem.type, ["ext2", "ext3", "ext4", "xfs"].contains(fs) else {
            let what = (files.map(\.rel) + work.remove.map { $0.rel + " (to remove)" }).joined(separator: ", ")
            throw RestoreFailure(kind: .failed, description: "the image holds \(files.count + work.remove.count) writer file(s) to write or remove (\(what)) but its filesystem (\(meta.filesystem.type ?? "unknown")) cannot be mounted for that; the volume itself is restored. See 'hotimage info --json' for them")
        }
        var st = stat()
        guard stat(target, &st) == 0 else { throw RestoreFailure(kind: .failed, description: "\(target): \(String(cString: strerror(errno)))") }
        var loop: String?
        var dev = target
        if (st.st_mode & S_IFMT) == S_IFREG {
            do { loop = try Loop.attach(file: target, directIO: false); dev = loop! } catch {
                throw RestoreFailure(kind: .failed, description: "attaching \(target) to a loop device for the writers' files: \(error)")
            }
        }
        defer { if let l = loop { try? Loop.detach(l) } }
        // A fresh directory of our own (mkdtemp: 0700, never one that
        // someone else made in advance under a predictable name).
        var template = Array((NSTemporaryDirectory() + "hotimage-restore-XXXXXX").utf8CString)
        guard mkdtemp(&template) != nil else {
            throw RestoreFailure(kind: .failed, description: "creating a directory to mount the restored filesystem: \(String(cString: strerror(errno)))")
        }
        let dir = String(cString: template)
        defer { rmdir(dir) }
        var opts = ["-t", fs]
        if fs == "xfs" { opts += ["-o", "nouuid"] }
        let m = (try? ProcessControl.run(["mount"] + opts + [dev, dir])) ?? (status: 127, output: "cannot run mount")
        guard m.status == 0 else {
            throw RestoreFailure(kind: .failed, description: "mounting the restored \(fs) for the writers' files: \(m.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        var unmounted = false
        defer { if !unmounted { _ = try? ProcessControl.run(["umount", dir]) } }
        var placed: [String] = [], removed: [String] = []
        for f in work.remove {
            switch removeOmitted(f.rel, in: dir) {
            case .removed:
                r.log("\(f.owner): removed /\(f.rel) from the restored filesystem")
                removed.append("/" + f.rel)
            case .missing: break
            case .refused(let why):
                r.log("warning: \(f.owner): /\(f.rel) not removed: \(why)")
            }
        }
        for f in files {
            let path = dir + "/" + f.rel
            let parent = (path as NSString).deletingLastPathComponent
            var pst = stat()
            guard stat(parent, &pst) == 0 else {
                r.log("warning: \(f.owner): the directory of \(f.rel) is not in the restored filesystem; not written")
                continue
            }
            // umount writes it back; a failure there is reported by umount's exit.
            guard FileManager.default.createFile(atPath: path, contents: Data(f.content.utf8), attributes: [.posixPermissions: 0o600]) else {
                throw RestoreFailure(kind: .failed, description: "writing \(f.rel) into the restored filesystem failed")
            }
            _ = chown(path, pst.st_uid, pst.st_gid)
            r.log("\(f.owner): wrote /\(f.rel) into the restored filesystem")
            placed.append("/" + f.rel)
        }
        let u = (try? ProcessControl.run(["umount", dir])) ?? (status: 127, output: "cannot run umount")
        unmounted = true
        guard u.status == 0 else {
            throw RestoreFailure(kind: .failed, description: "unmounting the restored filesystem after the writers' files: \(u.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return (placed, removed)
    }

    enum OmitOutcome: Equatable {
        case removed, missing
        case refused(String)
    }

    /// Removes `rel` under `dir` (the restored filesystem's mount point) if
    /// it is a regular file whose directory is inside `dir` (a symbolic link
    /// on the way would lead out of the restored filesystem).
    static func removeOmitted(_ rel: String, in dir: String) -> OmitOutcome {
        let path = dir + "/" + rel
        let parent = (path as NSString).deletingLastPathComponent
        guard let root = realPath(dir) else { return .refused("\(dir): \(String(cString: strerror(errno)))") }
        guard let rp = realPath(parent) else { return errno == ENOENT || errno == ENOTDIR ? .missing : .refused(String(cString: strerror(errno))) }
        guard rp == root || rp.hasPrefix(root.hasSuffix("/") ? root : root + "/") else {
            return .refused("its directory leads out of the restored filesystem (a symbolic link)")
        }
        let file = rp + "/" + (path as NSString).lastPathComponent
        var st = stat()
        guard lstat(file, &st) == 0 else { return errno == ENOENT ? .missing : .refused(String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return .refused("not a regular file") }
        guard unlink(file) == 0 else { return .refused(String(cString: strerror(errno))) }
        return .removed
    }

    /// `path` relative to the directory `base`, or nil when it is not under it.
    static func relative(_ path: String, to base: String) -> String? {
        let b = base.hasSuffix("/") ? base : base + "/"
        guard path.hasPrefix(b), path.count > b.count else { return nil }
        let rel = String(path.dropFirst(b.count))
        return rel.split(separator: "/").contains("..") ? nil : rel
    }
}
