// hotimage's side of the writers: find them, ask each for its components,
// freeze the ones the backup needs in parallel, thaw them, and record what
// happened per component.
//
// Writers are the built-ins (run as `hotimage writer-exec NAME VERB`) and
// the executables in /etc/hotimage/writers.d (not hidden, not ending in ~,
// .dpkg-*, .rpm*, .bak or .disabled). Every writer runs as its own process
// in its own session: a hang is killed by process group without touching the
// backup, and if hotimage dies the writer reads end of file and thaws.
import Foundation
import HotOS
import HotSync

public struct WriterSpec: Sendable, Codable {
    public var name: String
    /// builtin | external
    public var kind: String
    /// The command without the verb.
    public var command: [String]
    public func argv(_ verb: String, settings: WriterSettings) -> [String] {
        kind == "builtin" ? command + [verb] + settings.arguments : command + [verb]
    }
}

public enum WriterSelection: Sendable, Equatable {
    case all, none
    case only([String])

    /// all | none | a comma-separated list of writer names.
    public init(parsing s: String) {
        switch s.trimmingCharacters(in: .whitespaces) {
        case "all", "": self = .all
        case "none": self = .none
        default: self = .only(s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })
        }
    }
    func includes(_ n: String) -> Bool {
        switch self { case .all: return true; case .none: return false; case .only(let l): return l.contains(n) }
    }
}

public struct WriterConfig: Sendable {
    public var selection: WriterSelection = .all
    public var directory = "/etc/hotimage/writers.d"
    /// For the built-ins: this executable.
    public var selfExecutable = WriterConfig.currentExecutable()
    public var settings = WriterSettings()
    /// Seconds for a components answer.
    public var listTimeout: Double = 30
    /// Seconds for the freeze answer of every writer (they run in parallel),
    /// and again for the thaw: the snapshot deadline by default.
    public var timeout: Double = 60
    /// Freeze partially covered components too (their part on the volume
    /// is then consistent).
    public var freezePartial = true
    /// Ask the writers not to say that their application is not on this
    /// host (backup without --verbose).
    public var quietUnavailable = false
    public init() {}

    public static func currentExecutable() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }
}

public enum WriterDiscovery {
    static let skippedSuffixes = ["~", ".bak", ".disabled", ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".rpmnew", ".rpmsave"]

    /// The writers `config` selects; names a selection asks for that do not
    /// exist are returned as errors.
    public static func find(_ config: WriterConfig) -> (writers: [WriterSpec], missing: [String]) {
        var out: [WriterSpec] = []
        for b in builtinWriters where config.selection.includes(b.name) {
            out.append(WriterSpec(name: b.name, kind: "builtin", command: [config.selfExecutable, "writer-exec", b.name]))
        }
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: config.directory)) ?? []).sorted()
        for n in names where !n.hasPrefix(".") && !skippedSuffixes.contains(where: { n.hasSuffix($0) }) {
            let p = config.directory + "/" + n
            var st = stat()
            guard stat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, access(p, X_OK) == 0 else { continue }
            guard config.selection.includes(n) else { continue }
            if out.contains(where: { $0.name == n }) { continue }   // a built-in's name: the built-in wins
            out.append(WriterSpec(name: n, kind: "external", command: [p]))
        }
        var missing: [String] = []
        if case .only(let l) = config.selection { missing = l.filter { n in !out.contains { $0.name == n } } }
        return (out, missing)
    }
}

/// A writer's answer to `components`, or why there is none.
public struct WriterListing: Sendable, Codable {
    public var writer: WriterSpec
    public var components: [WriterComponent]
    public var error: String?
}

/// Runs `body` for every element on its own thread; results in order.
final class ResultBox<R>: @unchecked Sendable { var r: [R?]; init(_ n: Int) { r = Array(repeating: nil, count: n) } }

func parallelMap<T, R>(_ items: [T], _ body: @escaping @Sendable (T) -> R) -> [R] where T: Sendable, R: Sendable {
    let box = ResultBox<R>(items.count)
    let group = DispatchGroup()
    let lock = Lock()
    for (i, it) in items.enumerated() {
        group.enter()
        Threads.start(name: "writer") {
            let v = body(it)
            lock.withLock { box.r[i] = v }
            group.leave()
        }
    }
    group.wait()
    return box.r.map { $0! }
}

public enum WriterHost {
    /// Asks every writer for its components, in parallel.
    public static func list(_ writers: [WriterSpec], volumes: [String], config: WriterConfig) -> [WriterListing] {
        let settings = config.settings, timeout = config.listTimeout, quiet = config.quietUnavailable
        return parallelMap(writers) { w in
            do {
                let p = try WriterProcess(w.argv("components", settings: settings), volumes: volumes, quiet: quiet)
                p.send(jsonLine(ComponentsRequest(volumes: volumes)))
                p.closeInput()
                let line = try p.readLine(timeout: timeout, what: "components")
                let reply = try decodeLine(ComponentsReply.self, line)
                if let code = p.waitExit(timeout: 5), code != 0 { throw WriterError("exit \(code) after its components answer") }
                let ids = reply.components.map(\.id)
                if Set(ids).count != ids.count { throw WriterError("two components share an id") }
                return WriterListing(writer: w, components: reply.components, error: nil)
            } catch {
                return WriterListing(writer: w, components: [], error: "\(error)")
            }
        }
    }
}
