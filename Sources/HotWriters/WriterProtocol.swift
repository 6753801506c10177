// The writer protocol: how hotimage talks to a writer, built-in or external.
//
// A writer knows a set of components (a guest, a container, a database
// cluster), the files each keeps, and how to freeze and thaw them. Every
// writer is an executable run with one verb; the built-ins are the same
// executable as hotimage (`hotimage writer-exec NAME VERB`), so they go
// through exactly this protocol too. One JSON object per line on stdout;
// stderr is for humans (it goes to hotimage's log). Environment:
// HOTIMAGE_VOLUMES (the mount points being backed up, space separated),
// HOTIMAGE_WRITER_PROTOCOL=1, and HOTIMAGE_WRITER_QUIET=1 when a writer
// should not say that its application is simply not on this host (backup
// without --verbose; `hotimage writers` leaves it unset, since saying so is
// its job).
//
//   WRITER components
//     stdin:  {"protocol":1,"volumes":["/srv/data"]}
//     stdout: {"writer":"myapp","components":[
//               {"id":"main","description":"myapp instance",
//                "state":"running",                        (free text, shown)
//                "files":[{"path":"/srv/data/myapp","role":"data"},
//                         {"path":"/etc/myapp.conf","role":"config","counts":false}]}]}
//     exit 0. A file with "counts": false is listed but does not decide
//     coverage (a configuration file backed up by other means, a CD image).
//     A component may add "restoreOmit":["/srv/data/myapp/myapp.pid"]:
//     files that belong to the running application only (a pid file) and
//     that `restore` removes from the restored filesystem (absolute paths
//     as seen now; only regular files on the imaged volume; a missing one
//     is fine). hotimage stores them in the image.
//
//   WRITER freeze
//     stdin, first line:  {"protocol":1,"components":["main"],"volumes":[...],"timeoutSeconds":60}
//     the writer freezes them and prints one line:
//       {"frozen":[{"id":"main","ok":true,"method":"pause","message":"..."}]}
//     then waits for the next stdin line, {"thaw":true}, or for end of file
//     (hotimage died: thaw at once), thaws, prints one line:
//       {"thawed":[{"id":"main","ok":true,"artifacts":[{"path":"/srv/data/x","content":"..."}]}]}
//     and exits 0. A component missing from an answer failed. Artifacts are
//     files the restored volume needs that exist only after the thaw (a
//     PostgreSQL backup_label): hotimage stores them in the image and
//     `restore` writes them into the restored filesystem.
//
// A writer must survive writing an answer nobody reads (ignore SIGPIPE; in
// sh: trap '' PIPE): if hotimage dies while the writer freezes, the answer
// goes nowhere and the writer must still read end of file and thaw.
//
// hotimage kills the writer's process group when an answer does not come
// within the timeout, which counts as a failure of every component it was
// asked about; a writer that exits before answering fails the same way.
import Foundation
import HotErrors
import HotOS

public let writerProtocolVersion = 1

public struct ComponentFile: Codable, Sendable, Equatable {
    public var path: String
    /// disk, cdrom, floppy, save, nvram, config, data, wal, tablespace, root…
    public var role: String?
    /// false: listed, but not part of coverage. Default true.
    public var counts: Bool?
    public init(path: String, role: String? = nil, counts: Bool? = nil) {
        self.path = path; self.role = role; self.counts = counts
    }
    public var countsForCoverage: Bool { counts ?? true }
}

public struct WriterComponent: Codable, Sendable, Equatable {
    public var id: String
    public var description: String?
    public var state: String?
    public var files: [ComponentFile]
    /// Extra facts a writer wants shown and recorded (libvirt: persistent, agent…).
    public var details: [String: String]?
    /// Files (absolute paths, as seen at backup time) that `restore`
    /// removes from the restored filesystem: the running application's own
    /// (PostgreSQL's postmaster.pid), wrong in any copy.
    public var restoreOmit: [String]?
    public init(id: String, description: String? = nil, state: String? = nil, files: [ComponentFile] = [],
                details: [String: String]? = nil, restoreOmit: [String]? = nil) {
        self.id = id; self.description = description; self.state = state; self.files = files; self.details = details
        self.restoreOmit = restoreOmit
    }
}

public struct ComponentsRequest: Codable, Sendable {
    public var `protocol` = writerProtocolVersion
    public var volumes: [String]
    public init(volumes: [String]) { self.volumes = volumes }
}

public struct ComponentsReply: Codable, Sendable {
    public var writer: String
    public var components: [WriterComponent]
    public init(writer: String, components: [WriterComponent]) { self.writer = writer; self.components = components }
}

public struct FreezeRequest: Codable, Sendable {
    public var `protocol` = writerProtocolVersion
    public var components: [String]
    public var volumes: [String]
    public var timeoutSeconds: Double
    public init(components: [String], volumes: [String], timeoutSeconds: Double) {
        self.components = components; self.volumes = volumes; self.timeoutSeconds = timeoutSeconds
    }
}

/// A file the restored volume needs, known only at thaw time.
public struct Artifact: Codable, Sendable, Equatable {
    public var path: String
    public var content: String
    public init(path: String, content: String) { self.path = path; self.content = content }
}

public struct ComponentResult: Codable, Sendable, Equatable {
    public var id: String
    public var ok: Bool
    /// How it was frozen: agent-fsfreeze, managed-save, cgroup-freeze, pg-backup…
    public var method: String?
    public var message: String?
    public var artifacts: [Artifact]?
    public init(id: String, ok: Bool, method: String? = nil, message: String? = nil, artifacts: [Artifact]? = nil) {
        self.id = id; self.ok = ok; self.method = method; self.message = message; self.artifacts = artifacts
    }
}

public struct FreezeReply: Codable, Sendable {
    public var frozen: [ComponentResult]
    public init(frozen: [ComponentResult]) { self.frozen = frozen }
}

public struct ThawReply: Codable, Sendable {
    public var thawed: [ComponentResult]
    public init(thawed: [ComponentResult]) { self.thawed = thawed }
}

public struct ThawRequest: Codable, Sendable {
    public var thaw = true
    public init() {}
}

public struct WriterError: CodedError, Sendable {
    public var description: String
    /// `unreachable` when the application's service does not answer (or
    /// is not installed); otherwise `failed`.
    public var kind: FailureKind
    /// The application is not on this host (no virsh, no cgroup v2): not a
    /// failure, and said only when asked (unavailableNote).
    public var unavailable = false
    public init(_ d: String, kind: FailureKind = .failed, unavailable: Bool = false) {
        description = d
        self.kind = kind
        self.unavailable = unavailable
    }
}

/// The environment variable that asks writers to keep quiet about
/// applications that are not on this host.
public let writerQuietVariable = "HOTIMAGE_WRITER_QUIET"

/// Says on stderr (hotimage's log) that a writer's application is not on
/// this host, unless hotimage asked for quiet (backup without --verbose).
func unavailableNote(_ writer: String, _ text: String) {
    if ProcessInfo.processInfo.environment[writerQuietVariable] == "1" { return }
    writeStderr("writer \(writer): \(text)\n")
}

/// One line of JSON (no pretty printing, sorted keys, no trailing newline).
public func jsonLine<T: Encodable>(_ v: T) -> String {
    let e = JSONEncoder()
    e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: (try? e.encode(v)) ?? Data("{}".utf8), as: UTF8.self)
}

public func decodeLine<T: Decodable>(_ t: T.Type, _ line: String) throws -> T {
    do { return try JSONDecoder().decode(t, from: Data(line.utf8)) } catch {
        let shown = line.count > 200 ? String(line.prefix(200)) + "…" : line
        throw WriterError("not a valid \(t) line: \(shown.isEmpty ? "(empty)" : shown)")
    }
}
