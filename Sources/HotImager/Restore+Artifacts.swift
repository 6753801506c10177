// Restore, last step: the writers' thaw-time files. A writer may hand over
// files that exist only after the snapshot (PostgreSQL's backup_label comes
// from pg_backup_stop); the image keeps them in its metadata, and restore
// writes them into the restored filesystem, at the same place relative to
// the volume's mount point, owned like the directory that holds them, mode
// 0600. The target is mounted for this (through a loop device if it is a
// file) in a private directory and unmounted again; XFS with nouuid, since
// the original volume is likely mounted with the same UUID.
import Foundation
import HotOS
import HotWriters

extension RestoreJob {
    static func placeArtifacts(_ meta: ImageMetadata, target: String, reporter r: Reporter) throws -> [String] {
        var files: [(rel: String, content: String, owner: String)] = []
        for c in meta.components ?? [] {
            for a in c.artifacts ?? [] {
                guard let mp = meta.source.mountPoint, let rel = relative(a.path, to: mp) else {
                    r.log("warning: \(c.writer) '\(c.id)': \(a.path) is not on the imaged volume; not restored")
                    continue
                }
                files.append((rel, a.content, "\(c.writer) '\(c.id)'"))
            }
        }
        guard !files.isEmpty else { return [] }
        guard let fs = meta.filesystem.type, ["ext2", "ext3", "ext4", "xfs"].contains(fs) else {
            throw RestoreFailure(kind: .failed, description: "the image holds \(files.count) writer file(s) (\(files.map(\.rel).joined(separator: ", "))) but its filesystem (\(meta.filesystem.type ?? "unknown")) cannot be mounted to write them; the volume itself is restored. See 'hotimage info --json' for their contents")
        }
        var st = stat()
        guard stat(target, &st) == 0 else { throw RestoreFailure(kind: .failed, description: "\(target): \(String(cString: strerror(errno)))") }
        var loop: String?
        var dev = target
        if (st.st_mode & S_IFMT) == S_IFREG {
            do { loop = try Loop.attach(file: target, directIO: false); dev = loop! } catch {
                throw RestoreFailure(kind: .failed, description: "attaching \(target) to a loop device to write the writers' files: \(error)")
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
            throw RestoreFailure(kind: .failed, description: "mounting the restored \(fs) to write the writers' files: \(m.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        var unmounted = false
        defer { if !unmounted { _ = try? ProcessControl.run(["umount", dir]) } }
        var placed: [String] = []
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
            throw RestoreFailure(kind: .failed, description: "unmounting the restored filesystem after writing the writers' files: \(u.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return placed
    }

    /// `path` relative to the directory `base`, or nil when it is not under it.
    static func relative(_ path: String, to base: String) -> String? {
        let b = base.hasSuffix("/") ? base : base + "/"
        guard path.hasPrefix(b), path.count > b.count else { return nil }
        let rel = String(path.dropFirst(b.count))
        return rel.split(separator: "/").contains("..") ? nil : rel
    }
}
