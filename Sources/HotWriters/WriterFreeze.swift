// The freeze and thaw of a backup: which components to freeze, freezing
// them (every writer at once, each writer freezing its components as it
// sees fit), thawing them, and the record of it all for the image.
import Foundation
import HotOS

/// What happened to one component in one backup: stored in the image.
public struct ComponentRecord: Codable, Sendable {
    public var writer: String
    public var id: String
    public var description: String?
    public var state: String?
    public var coverage: Coverage
    public var files: [ComponentFile]
    public var details: [String: String]?
    /// frozen | freeze-failed | not-covered | partial-not-frozen | writer-failed
    public var action: String
    public var method: String?
    public var freezeMessage: String?
    public var freezeSeconds: Double?
    /// nil: never frozen.
    public var thawed: Bool?
    public var thawMessage: String?
    public var thawSeconds: Double?
    public var artifacts: [Artifact]?
    /// Files `restore` removes from the restored filesystem (absolute
    /// paths at backup time; the writer's `restoreOmit`).
    public var restoreOmit: [String]?

    public var frozen: Bool { action == "frozen" }
}

/// The writers' part of one backup.
public final class FreezeSession: @unchecked Sendable {
    public private(set) var records: [ComponentRecord]
    /// Writers whose components are unknown (their `components` failed).
    public private(set) var writerErrors: [String]
    private var running: [(WriterSpec, WriterProcess, [String])] = []
    let config: WriterConfig
    let volumes: [String]

    /// Lists every writer's components and decides what to freeze.
    public init(config: WriterConfig, volumes: [String], log: (String) -> Void) {
        self.config = config
        self.volumes = volumes
        let (writers, missing) = WriterDiscovery.find(config)
        writerErrors = missing.map { "writer '\($0)': no such writer (built-ins: \(builtinWriters.map { $0.name }.joined(separator: ", ")); external ones in \(config.directory))" }
        records = []
        for l in WriterHost.list(writers, volumes: volumes, config: config) {
            if let e = l.error {
                writerErrors.append("writer '\(l.writer.name)': \(e)")
                continue
            }
            for c in l.components {
                let cov = coverage(of: c.files, volumes: volumes)
                let action: String
                switch cov {
                case .full: action = "freeze"
                case .partial: action = config.freezePartial ? "freeze" : "partial-not-frozen"
                case .none: action = "not-covered"
                }
                records.append(ComponentRecord(writer: l.writer.name, id: c.id, description: c.description, state: c.state,
                                               coverage: cov, files: c.files, details: c.details, action: action,
                                               restoreOmit: c.restoreOmit))
            }
        }
        for e in writerErrors { log(e) }
        for r in records where r.action != "not-covered" {
            log("writer \(r.writer): component '\(r.id)' is \(r.coverage.rawValue) covered\(r.action == "freeze" ? "" : "; not frozen (freeze-partial = no)")")
        }
        self.writersByName = Dictionary(uniqueKeysWithValues: writers.map { ($0.name, $0) })
    }

    private let writersByName: [String: WriterSpec]

    public var toFreeze: [ComponentRecord] { records.filter { $0.action == "freeze" || $0.action == "frozen" } }

    /// Freezes every selected component, all writers in parallel, within
    /// `config.timeout`. Returns the failures (empty: all frozen). Components
    /// that froze stay frozen until `thaw`, whatever the outcome.
    public func freeze(log: (String) -> Void) -> [String] {
        var byWriter: [String: [String]] = [:]
        for r in records where r.action == "freeze" { byWriter[r.writer, default: []].append(r.id) }
        let jobs = byWriter.keys.sorted().compactMap { n in writersByName[n].map { ($0, byWriter[n]!) } }
        let cfg = config, vols = volumes
        let outcomes = parallelMap(jobs) { (w, ids) -> (WriterProcess?, [ComponentResult], String?, Double) in
            let t0 = monotonicNanos()
            var proc: WriterProcess?
            do {
                let p = try WriterProcess(w.argv("freeze", settings: cfg.settings), volumes: vols, quiet: cfg.quietUnavailable)
                proc = p
                p.send(jsonLine(FreezeRequest(components: ids, volumes: vols, timeoutSeconds: cfg.timeout)))
                let reply = try decodeLine(FreezeReply.self, try p.readLine(timeout: cfg.timeout, what: "freeze"))
                return (p, reply.frozen, nil, Double(monotonicNanos() - t0) / 1e9)
            } catch {
                return (proc, [], "\(error)", Double(monotonicNanos() - t0) / 1e9)
            }
        }
        var failures: [String] = []
        for ((w, ids), (proc, results, err, secs)) in zip(jobs, outcomes) {
            if let p = proc, err == nil { running.append((w, p, ids)) } else { proc?.killGroup() }
            for id in ids {
                guard let i = records.firstIndex(where: { $0.writer == w.name && $0.id == id }) else { continue }
                records[i].freezeSeconds = secs
                if let r = results.first(where: { $0.id == id }) {
                    records[i].method = r.method
                    records[i].freezeMessage = r.message
                    records[i].action = r.ok ? "frozen" : "freeze-failed"
                } else {
                    records[i].action = "freeze-failed"
                    records[i].freezeMessage = err ?? "the writer's freeze answer does not name it"
                }
                let rec = records[i]
                if rec.frozen {
                    log(String(format: "writer %@: '%@' frozen (%@) in %.2f s", w.name, id, rec.method ?? "?", secs))
                } else {
                    let m = "writer \(w.name): '\(id)' failed to freeze: \(rec.freezeMessage ?? "no reason given")"
                    log(m); failures.append(m)
                }
            }
        }
        return failures
    }

    /// Thaws everything frozen (every writer at once). Returns the failures.
    /// A writer that does not answer within the timeout is killed; its
    /// components count as not thawed.
    @discardableResult
    public func thaw(log: (String) -> Void) -> [String] {
        let jobs = running
        running = []
        let timeout = config.timeout
        let outcomes = parallelMap(jobs.map { $0.1 }) { p -> ([ComponentResult], String?, Double) in
            let t0 = monotonicNanos()
            p.send(jsonLine(ThawRequest()))
            p.closeInput()
            do {
                let reply = try decodeLine(ThawReply.self, try p.readLine(timeout: timeout, what: "thaw"))
                let code = p.waitExit(timeout: 5)
                return (reply.thawed, code == 0 ? nil : "exit \(code.map(String.init) ?? "(killed: did not exit)") after thawing",
                        Double(monotonicNanos() - t0) / 1e9)
            } catch {
                p.killGroup()
                return ([], "\(error)", Double(monotonicNanos() - t0) / 1e9)
            }
        }
        var failures: [String] = []
        for ((w, _, ids), (results, err, secs)) in zip(jobs, outcomes) {
            for id in ids {
                guard let i = records.firstIndex(where: { $0.writer == w.name && $0.id == id }), records[i].frozen else { continue }
                records[i].thawSeconds = secs
                if let r = results.first(where: { $0.id == id }) {
                    records[i].thawed = r.ok
                    records[i].thawMessage = r.message
                    records[i].artifacts = r.artifacts
                } else {
                    records[i].thawed = false
                    records[i].thawMessage = err ?? "the writer's thaw answer does not name it"
                }
                if records[i].thawed == true {
                    log(String(format: "writer %@: '%@' thawed in %.2f s", w.name, id, secs))
                } else {
                    let m = "writer \(w.name): '\(id)' failed to thaw: \(records[i].thawMessage ?? "no reason given")"
                    log(m); failures.append(m)
                }
            }
            // An error beside a usable answer (a bad exit after thawing) is only logged.
            if let e = err, !results.isEmpty { log("writer \(w.name): \(e)") }
        }
        return failures
    }

    /// Marks components that were never asked to freeze because of an
    /// earlier failure.
    public func markNotFrozen(_ why: String) {
        for i in records.indices where records[i].action == "freeze" {
            records[i].action = "freeze-failed"; records[i].freezeMessage = why
        }
    }
}
