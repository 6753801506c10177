// A set directory: the images of a coherent multi-volume backup
// (`hotimage backup SRC SRC… -o DIR`), one DIR/NAME.qcow2 per member, each
// carrying the same SetRecord (ImageMetadata.set) but for `member`.
//
// A set directory is whole when every *.qcow2 in it is a readable hotimage
// image with a set record, all records carry the same set id, cut time and
// member list, every member listed has its image NAME.qcow2 there, complete,
// and every image's `member` is the name of its file. Anything else is a
// problem, named by member and file: a missing member, an image of another
// set or of no set, a renamed image, an incomplete one (kept by
// --keep-partial). A backup's temporary file (.NAME.qcow2.PID.hotimage-partial,
// Backup+PartialImage.swift) is not an image: it is noted and ignored.
//
// `info`, `verify` and `restore` of a directory read it through ImageSet.open.
import Foundation
import QCow2

public struct ImageSet: Encodable, Sendable {
    /// A member the set lists, and what the directory holds for it.
    public struct Member: Codable, Sendable {
        public var name: String
        public var source: String
        public var device: String
        public var deviceBytes: UInt64
        public var filesystemUUID: String?
        /// DIR/NAME.qcow2
        public var image: String
        /// Its image is there and is this member's image of this set.
        public var present: Bool
        /// The image is complete (nil: not present).
        public var complete: Bool?
        /// The image file's size (nil: not present).
        public var imageBytes: UInt64?
    }

    public var directory: String
    /// The set id (nil: no image in the directory has a set record).
    public var id: String?
    public var cutTime: String?
    /// In the set's order (the backup's command line).
    public var members: [Member]
    /// What keeps the set from being whole, each naming its member or file.
    public var problems: [String]
    /// Said, not a problem: temporary files of a backup, ignored.
    public var notes: [String]
    public var whole: Bool { problems.isEmpty }

    enum CodingKeys: String, CodingKey { case directory, id, cutTime, members, problems, notes, whole }
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(directory, forKey: .directory)
        try c.encode(id, forKey: .id)
        try c.encode(cutTime, forKey: .cutTime)
        try c.encode(members, forKey: .members)
        try c.encode(problems, forKey: .problems)
        try c.encode(notes, forKey: .notes)
        try c.encode(whole, forKey: .whole)
    }

    public func member(_ name: String) -> Member? { members.first { $0.name == name } }

    /// Whether `path` is a directory (the commands take a set directory or an image).
    public static func isDirectory(_ path: String) -> Bool {
        var isDir: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDir) && isDir.boolValue
    }

    /// One image file of the directory, as read.
    struct Found {
        var file: String
        var path: String
        var record: SetRecord?
        var complete: Bool
        var bytes: UInt64
        /// Why it has no set record to speak of (unreadable, not hotimage's…).
        var unusable: String?
    }

    /// Reads every *.qcow2 in `dir` and judges the set. Throws only when the
    /// directory cannot be listed.
    public static func open(_ dir: String) throws -> ImageSet {
        let names: [String]
        do { names = try FileManager.default.contentsOfDirectory(atPath: dir).sorted() } catch {
            throw SetError(description: "cannot read the directory \(dir): \(error.localizedDescription)")
        }
        var notes: [String] = []
        var found: [Found] = []
        for n in names {
            let p = (dir as NSString).appendingPathComponent(n)
            if n.hasPrefix(".") && n.hasSuffix(PartialImage.suffix) {
                notes.append("\(n) is a backup's temporary file (being written, or left by a killed backup): ignored")
                continue
            }
            guard n.hasSuffix(".qcow2"), !isDirectory(p) else { continue }
            found.append(read(file: n, path: p))
        }
        return judge(dir: dir, found: found, notes: notes)
    }

    static func read(file: String, path: String) -> Found {
        var st = stat()
        let bytes = stat(path, &st) == 0 ? UInt64(st.st_size) : 0
        var f = Found(file: file, path: path, record: nil, complete: false, bytes: bytes, unusable: nil)
        let r: QCow2Reader
        do { r = try QCow2Reader(path: path) } catch {
            f.unusable = "cannot be read as a qcow2 image (\(error))"
            return f
        }
        guard let h = r.hotimage else {
            f.unusable = r.hotimageProblems.first.map { "has damaged hotimage metadata (\($0))" }
                ?? "was not made by hotimage (it has no set record)"
            return f
        }
        f.complete = h.complete
        guard let m = ImageMetadata.decode(h.metadata) else {
            f.unusable = "has unreadable hotimage metadata"
            return f
        }
        guard let s = m.set else {
            f.unusable = "is not a member of a set (a single-volume image: no set record)"
            return f
        }
        f.record = s
        return f
    }

    static func judge(dir: String, found: [Found], notes: [String]) -> ImageSet {
        var problems: [String] = []
        var set = ImageSet(directory: dir, id: nil, cutTime: nil, members: [], problems: [], notes: notes)
        // The set the directory is about: the id most images carry (ties:
        // the one of the first file by name).
        var count: [String: Int] = [:]
        for f in found { if let r = f.record { count[r.id, default: 0] += 1 } }
        let best = count.values.max() ?? 0
        let first = found.compactMap(\.record).first { count[$0.id] == best }
        guard let refRecord = first else {
            set.problems = [found.isEmpty ? "\(dir) holds no .qcow2 image" : "no image in \(dir) is a member of a set"]
                + found.compactMap { f in f.unusable.map { "\(f.file) \($0)" } }
            return set
        }
        set.id = refRecord.id
        set.cutTime = refRecord.cutTime
        let names = refRecord.members.map(\.name)
        let dup = Dictionary(grouping: names, by: { $0 }).filter { $0.value.count > 1 }.keys.sorted()
        for d in dup { problems.append("the set lists member '\(d)' more than once") }

        // Why each file is not a good image of this set (nil: it is).
        var reason: [String: String] = [:]
        for f in found {
            if let u = f.unusable { reason[f.file] = u; continue }
            let r = f.record!
            if r.id != refRecord.id {
                reason[f.file] = "belongs to another set (id \(r.id), cut \(r.cutTime), members \(r.members.map(\.name).joined(separator: ", ")))"
            } else if r.members != refRecord.members || r.cutTime != refRecord.cutTime {
                reason[f.file] = "records set \(r.id) with a different cut time or member list than the other images"
            } else if !names.contains(r.member) {
                reason[f.file] = "says it is member '\(r.member)', which the set does not list"
            } else if f.file != SetRecord.imageName(r.member) {
                reason[f.file] = "is the image of member '\(r.member)', whose file is \(SetRecord.imageName(r.member)) (renamed?)"
            }
        }
        let byFile = Dictionary(found.map { ($0.file, $0) }, uniquingKeysWith: { a, _ in a })
        var claimed = Set<String>()
        for m in refRecord.members {
            let file = SetRecord.imageName(m.name)
            claimed.insert(file)
            var mem = Member(name: m.name, source: m.source, device: m.device, deviceBytes: m.deviceBytes,
                             filesystemUUID: m.filesystemUUID, image: (dir as NSString).appendingPathComponent(file),
                             present: false, complete: nil, imageBytes: nil)
            if let f = byFile[file] {
                if let why = reason[file] {
                    problems.append("member '\(m.name)' (\(file)) is missing: \(file) \(why)")
                } else {
                    mem.present = true
                    mem.complete = f.complete
                    mem.imageBytes = f.bytes
                    if !f.complete {
                        problems.append("member '\(m.name)': \(file) is incomplete (a partial image kept by --keep-partial)")
                    }
                }
            } else {
                problems.append("member '\(m.name)' (\(file)) is missing")
            }
            set.members.append(mem)
        }
        for f in found where !claimed.contains(f.file) {
            problems.append("\(f.file) \(reason[f.file] ?? "is not an image of this set")")
        }
        set.problems = problems
        return set
    }

    public var text: String {
        var s = ""
        func line(_ k: String, _ v: String) { s += k.padding(toLength: 20, withPad: " ", startingAt: 0) + v + "\n" }
        line("set directory:", directory)
        if let id { line("set id:", id) }
        if let cutTime { line("cut time:", cutTime) }
        line("members:", "\(members.count)")
        for m in members {
            s += "\n"
            line("member:", m.name)
            line("  source:", m.source)
            line("  device:", m.device)
            line("  size:", "\(formatBytes(m.deviceBytes)) (\(m.deviceBytes) bytes)")
            line("  filesystem UUID:", m.filesystemUUID ?? "none")
            line("  image:", m.image + (m.imageBytes.map { ", \(formatBytes($0))" } ?? ""))
            line("  complete:", m.complete.map { $0 ? "yes" : "NO (a partial image kept by --keep-partial)" } ?? "no image")
        }
        s += "\n"
        line("whole:", whole ? "yes" : "NO")
        for p in problems { line("problem:", p) }
        for n in notes { line("note:", n) }
        return s
    }
}

public struct SetError: Error, CustomStringConvertible, Sendable {
    public var description: String
}

/// `hotimage verify DIR`: every member's image, and the set's wholeness.
public struct SetVerifyOutcome: Encodable, Sendable {
    public struct MemberOutcome: Encodable, Sendable {
        public var member: String
        public var image: String
        /// nil: the image was not verified (missing, or not this set's).
        public var outcome: VerifyOutcome?
        public var error: String?
    }
    public var set: ImageSet
    public var members: [MemberOutcome]
    /// The set's problems, then each member's, each naming its member.
    public var problems: [String]
    public var seconds: Double

    public static func run(_ dir: String, log: (String) -> Void = { _ in }) throws -> SetVerifyOutcome {
        let t0 = Date()
        let set = try ImageSet.open(dir)
        var problems = set.problems
        var members: [MemberOutcome] = []
        for m in set.members {
            var mo = MemberOutcome(member: m.name, image: m.image, outcome: nil, error: nil)
            if m.present {
                log("verifying member '\(m.name)' (\(m.image))")
                do {
                    let o = try VerifyOutcome.run(m.image)
                    mo.outcome = o
                    problems += o.problems.map { "member '\(m.name)' (\(SetRecord.imageName(m.name))): \($0)" }
                } catch {
                    mo.error = "\(error)"
                    problems.append("member '\(m.name)' (\(SetRecord.imageName(m.name))): \(error)")
                }
            }
            members.append(mo)
        }
        return SetVerifyOutcome(set: set, members: members, problems: problems, seconds: Date().timeIntervalSince(t0))
    }
}
