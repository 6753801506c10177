// `hotimage restore DIR --to NAME=TARGET… [--only NAME…]`: the members of a
// set directory back, each with RestoreJob.
//
// Everything that can refuse is checked before any member is written:
//   the set is whole (ImageSet); every NAME given is a member; without
//   --only every member has a target, with --only each one named does; no
//   two members go to the same target, and no target is an image of the
//   directory; each target passes RestoreJob's checks (a block device or
//   file, not mounted, not busy, large enough, no filesystem unless
//   --force; a new file's directory exists); every member restored is
//   verified (unless --no-verify).
// Then the members are restored in the set's order. A member that fails
// stops the restore: the members before it are restored, the rest are not
// touched, and the result says which.
import Foundation
import HotErrors
import HotOS
import QCow2

public struct SetRestoreOptions: Sendable {
    public var directory: String
    /// NAME → TARGET, in the order given.
    public var targets: [(member: String, target: String)]
    /// nil: every member.
    public var only: [String]?
    public var force = false
    public var discard = true
    public var workers = 4
    public var verifyFirst = true
    public var writerFiles = true
    public init(directory: String, targets: [(member: String, target: String)], only: [String]?) {
        self.directory = directory; self.targets = targets; self.only = only
    }
}

public struct SetRestoreResult: Codable, Sendable {
    public struct MemberResult: Codable, Sendable {
        public var member: String
        public var image: String
        public var target: String
        /// restored | failed | not-restored (a member before it failed)
        public var status: String
        public var summary: RestoreSummary?
        public var error: String?
    }
    public var directory: String
    public var setID: String
    public var cutTime: String
    public var members: [MemberResult]
    /// nil: every member asked for was restored.
    public var failure: FailureKind? { members.contains { $0.status != "restored" } ? .failed : nil }

    enum CodingKeys: String, CodingKey { case directory, setID, cutTime, members }
}

public enum SetRestoreJob {
    /// The members to restore, in the set's order, with their targets; a
    /// refusal (nothing written) otherwise.
    public static func plan(_ o: SetRestoreOptions, set: ImageSet) throws -> [(member: ImageSet.Member, target: String)] {
        func refuse(_ s: String) -> RestoreFailure { RestoreFailure(kind: .refused, description: s) }
        if set.id == nil || !set.whole {
            throw refuse("\(o.directory) is not a whole set; nothing was restored:\n  " + set.problems.joined(separator: "\n  "))
        }
        let names = set.members.map(\.name)
        var given: [String: String] = [:]
        for (m, t) in o.targets {
            guard names.contains(m) else {
                throw refuse("--to \(m)=\(t): the set has no member '\(m)' (members: \(names.joined(separator: ", ")))")
            }
            if let t0 = given[m], t0 != t { throw refuse("member '\(m)' is given two targets: \(t0) and \(t)") }
            given[m] = t
        }
        var chosen: [String]
        if let only = o.only {
            for n in only where !names.contains(n) {
                throw refuse("--only \(n): the set has no member '\(n)' (members: \(names.joined(separator: ", ")))")
            }
            chosen = names.filter { only.contains($0) }
            let lacking = chosen.filter { given[$0] == nil }
            if !lacking.isEmpty {
                throw refuse("no target for \(list(lacking)): give --to NAME=TARGET for every member named by --only")
            }
            let extra = given.keys.filter { !only.contains($0) }.sorted()
            if !extra.isEmpty {
                throw refuse("--to names \(list(extra)), not named by --only: add --only for it, or drop its --to")
            }
        } else {
            chosen = names
            let lacking = names.filter { given[$0] == nil }
            if !lacking.isEmpty {
                throw refuse("no target for \(list(lacking)): give --to NAME=TARGET for every member, or restore a subset with --only NAME")
            }
        }
        // No two members to one target, and no target is an image of the set.
        var seen: [String: String] = [:]
        for img in set.members { seen[fileIdentity(img.image)] = "the image \(img.image)" }
        for n in chosen {
            let t = given[n]!
            let id = fileIdentity(t)
            if let other = seen[id] {
                throw refuse("member '\(n)': target \(t) is also \(other)")
            }
            seen[id] = "the target of member '\(n)'"
        }
        return chosen.map { n in (set.member(n)!, given[n]!) }
    }

    /// Plans, checks every target and verifies every image, then restores
    /// the members one after another.
    public static func run(_ o: SetRestoreOptions, reporter r: Reporter) throws -> SetRestoreResult {
        let set: ImageSet
        do { set = try ImageSet.open(o.directory) } catch { throw RestoreFailure(kind: .refused, description: "\(error)") }
        let plan = try self.plan(o, set: set)
        for (m, t) in plan {
            try checkTarget(t, size: try volumeSize(m), force: o.force, member: m.name)
        }
        if o.verifyFirst {
            for (m, _) in plan {
                r.log("verifying member '\(m.name)' (\(m.image)) before writing anything (--no-verify skips this)")
                let rep: VerifyOutcome
                do { rep = try VerifyOutcome.run(m.image) } catch {
                    throw RestoreFailure(kind: .refused, description: "member '\(m.name)': \(m.image): \(error); nothing was restored")
                }
                if let p = rep.problems.first {
                    let more = rep.problems.count > 1 ? " (and \(rep.problems.count - 1) more; see 'hotimage verify')" : ""
                    throw RestoreFailure(kind: .refused, description: "member '\(m.name)': \(m.image) is damaged: \(p)\(more); nothing was restored")
                }
            }
        }
        var result = SetRestoreResult(directory: o.directory, setID: set.id!, cutTime: set.cutTime ?? "", members: [])
        var stopped = false
        for (m, t) in plan {
            var mr = SetRestoreResult.MemberResult(member: m.name, image: m.image, target: t, status: "not-restored")
            if stopped { result.members.append(mr); continue }
            r.log("restoring member '\(m.name)' (\(m.image)) to \(t)")
            var ro = RestoreOptions(image: m.image, target: t)
            ro.force = o.force
            ro.discard = o.discard
            ro.workers = o.workers
            ro.verifyFirst = false          // verified above
            ro.writerFiles = o.writerFiles
            do {
                mr.summary = try RestoreJob.run(ro, reporter: r)
                mr.status = "restored"
            } catch {
                mr.status = "failed"
                mr.error = "\(error)"
                stopped = true
                r.log("member '\(m.name)' failed: \(error); the members after it are not restored")
            }
            result.members.append(mr)
        }
        return result
    }

    static func list(_ names: [String]) -> String {
        (names.count == 1 ? "member " : "members ") + names.map { "'\($0)'" }.joined(separator: ", ")
    }

    /// The image's volume size (what the target must hold).
    static func volumeSize(_ m: ImageSet.Member) throws -> UInt64 {
        do { return try QCow2Reader(path: m.image).virtualSize } catch {
            throw RestoreFailure(kind: .refused, description: "member '\(m.name)': \(m.image): \(error)")
        }
    }

    /// RestoreJob's target checks, made without writing or creating
    /// anything: a block device or regular file, not mounted, not busy,
    /// large enough, without a filesystem unless `force`; a file to create
    /// needs its directory.
    static func checkTarget(_ t: String, size need: UInt64, force: Bool, member: String) throws {
        func refuse(_ s: String) -> RestoreFailure { RestoreFailure(kind: .refused, description: "member '\(member)': \(s); nothing was restored") }
        var st = stat()
        guard stat(t, &st) == 0 else {
            let dir = (t as NSString).deletingLastPathComponent
            if !dir.isEmpty && !ImageSet.isDirectory(dir) { throw refuse("cannot create \(t): no directory \(dir)") }
            return
        }
        let type = st.st_mode & S_IFMT
        if type != S_IFBLK && type != S_IFREG { throw refuse("\(t) is not a block device or a regular file") }
        if type == S_IFBLK, let mnt = Mounts.of(device: t).first {
            throw refuse("\(t) is mounted at \(mnt.mountPoint); unmount it first")
        }
        let dev: BlockDevice
        do { dev = try BlockDevice(path: t, readOnly: true, exclusive: true) } catch {
            throw refuse("\(error) (is it in use?)")
        }
        if dev.size < need { throw refuse("\(t) holds \(dev.size) bytes, the member's volume \(need): too small") }
        if !force, let fs = try? probeFilesystem(path: t) {
            throw refuse("\(t) already holds a filesystem (\(fs.type)\(fs.uuid.map { " \($0)" } ?? "")); use --force to overwrite it")
        }
    }
}

/// What a path is, for telling two files apart: the device of a block
/// device, the inode of a file, the resolved path of a file to create.
func fileIdentity(_ path: String) -> String {
    var st = stat()
    if stat(path, &st) == 0 {
        if (st.st_mode & S_IFMT) == S_IFBLK { return "blk:\(st.st_rdev)" }
        return "ino:\(st.st_dev):\(st.st_ino)"
    }
    let dir = (path as NSString).deletingLastPathComponent
    let base = (path as NSString).lastPathComponent
    var real = dir.isEmpty ? "." : dir
    if let p = realpath(real, nil) { real = String(cString: p); free(p) }
    return "new:" + real + "/" + base
}
