// Stopping and resuming libvirt domains: what the libvirt writer does
// around a snapshot and what `hotimage vm stop/resume` do by hand (Paragon's
// stop_vm / resume_vm on libvirt).
//
// A domain that must be stopped (LibvirtDomain.swift) is
//   agent-fsfreeze  frozen inside the guest (domfsfreeze) when it has a guest
//                   agent that answers and the caller allows it (the writer
//                   does, `vm stop` does not: stop means stop); the guest
//                   keeps running, its filesystems flushed and still.
//                   Undone by domfsthaw.
//   managed-save    saved by libvirt (memory to the save file, qemu exits,
//                   the disks are closed after a flush). Undone by `virsh
//                   start`, which restores the save, and restores a guest
//                   that was paused as paused (libvirt records it).
// A domain shutting down is waited for (saving it would bring back a guest
// in the middle of its shutdown); one shut off or crashed is left as is.
import Foundation
import HotOS

/// What was done to a domain, enough to undo it (also `vm stop`'s record).
public struct StoppedDomain: Codable, Sendable, Equatable {
    public var name: String
    public var priorState: String
    public var method: String
    public var time: String?
    public init(name: String, priorState: String, method: String, time: String? = nil) {
        self.name = name; self.priorState = priorState; self.method = method; self.time = time
    }
    /// Whether resuming has anything to do.
    public var needsResume: Bool { method == LibvirtControl.managedSave || method == LibvirtControl.agentFreeze }
}

/// The libvirt settings of the writer and of `hotimage vm`.
public struct LibvirtSettings: Sendable {
    public var uri = "qemu:///system"
    /// CD-ROM and floppy images decide coverage (HotBackup: no).
    public var cdromCounts = false
    /// Wait limit of one stop or resume, seconds (HotBackup: 300).
    public var wait: Double = 300
    /// Resume waits until the domain runs again (HotBackup: yes).
    public var resumeWait = true
    /// Freeze through the guest agent when it answers.
    public var useAgent = true
    public var paths: LibvirtPaths

    public init(uri: String = "qemu:///system", saveDir: String? = nil) {
        self.uri = uri
        let env = ProcessInfo.processInfo.environment
        paths = LibvirtPaths(uri: uri, home: env["HOME"], xdgConfig: env["XDG_CONFIG_HOME"])
        if let s = saveDir { paths.saveDir = s }
    }

    /// From writer settings: libvirt-uri, vm-cdrom-counts, vm-wait,
    /// vm-resume-wait, vm-agent, vm-save-dir.
    public init(_ s: WriterSettings) throws {
        self.init(uri: s.value("libvirt-uri") ?? "qemu:///system", saveDir: s.value("vm-save-dir"))
        cdromCounts = try s.bool("vm-cdrom-counts", default: false)
        wait = try s.seconds("vm-wait", default: 300)
        resumeWait = try s.bool("vm-resume-wait", default: true)
        useAgent = try s.bool("vm-agent", default: true)
    }
}

public struct LibvirtControl: Sendable {
    public static let managedSave = "managed-save"
    public static let agentFreeze = "agent-fsfreeze"

    public var virsh: Virsh
    /// After a save's wait: how long virsh gets to abort its job on SIGINT,
    /// and how long the abort may then take to settle.
    public var interruptGrace: Double = 10
    public var settleSeconds: Double = 30
    public init(virsh: Virsh) { self.virsh = virsh }

    /// Limits that fit one freeze (or thaw) into `timeout` seconds with time
    /// to answer: the writer must reply before hotimage kills it, because
    /// a killed writer cannot thaw.
    public static func within(_ timeout: Double, virsh: Virsh, wait: Double) -> (LibvirtControl, Double) {
        var c = LibvirtControl(virsh: virsh)
        let budget = max(1, timeout - 3)
        c.interruptGrace = min(c.interruptGrace, budget * 0.1)
        c.settleSeconds = min(c.settleSeconds, budget * 0.2)
        return (c, min(wait, budget * 0.7))
    }

    /// Stops (or freezes) one domain within `wait` seconds. The record is
    /// what resume needs; nil when nothing was done or it failed.
    public func stop(_ d: LibvirtDomainInfo, useAgent: Bool, wait: Double) -> (ComponentResult, StoppedDomain?) {
        let name = d.name
        func ok(_ method: String, _ msg: String? = nil) -> (ComponentResult, StoppedDomain?) {
            let rec = StoppedDomain(name: name, priorState: d.state.rawValue, method: method, time: isoNow())
            return (ComponentResult(id: name, ok: true, method: method, message: msg), rec.needsResume ? rec : nil)
        }
        func failed(_ msg: String, method: String? = nil) -> (ComponentResult, StoppedDomain?) {
            (ComponentResult(id: name, ok: false, method: method, message: msg), nil)
        }
        switch d.state {
        case .shutOff: return ok(d.managedSave ? "none (shut off, managed save)" : "none (shut off)")
        case .crashed: return ok("none (crashed)")
        case .inShutdown:
            let s = virsh.waitForState(name, seconds: wait) { $0 == .shutOff || $0 == .crashed || $0 == nil }
            if s == .shutOff || s == .crashed { return ok("none (shut down)", "waited for its shutdown") }
            return failed("still \(s?.rawValue ?? "unknown") after \(fmtSeconds(wait))")
        default: break
        }
        var note: String?
        if useAgent && d.agent == .answers {
            let r = virsh.run(["domfsfreeze", name], timeout: min(wait, 60), quiet: false)
            if r.ok { return ok(Self.agentFreeze, r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) }
            note = "guest agent freeze failed (\(r.timedOut ? "no answer" : Virsh.clean(r.message))), managed save instead"
        }
        guard d.persistent else {
            return failed([note, "a transient domain has no managed save (libvirt keeps those for defined domains): "
                + "define it (virsh define) or give it a guest agent"].compactMap { $0 }.joined(separator: "; "),
                method: Self.managedSave)
        }
        let r = virsh.run(["managedsave", name], timeout: wait, interruptGrace: interruptGrace)
        if r.timedOut {
            switch settleAbortedSave(name) {
            case .saved: return ok(Self.managedSave, "saved, after the wait limit of \(fmtSeconds(wait))")
            case .running: return failed("managed save did not finish within \(fmtSeconds(wait)): aborted, the domain keeps running",
                                         method: Self.managedSave)
            case .unknown(let s): return failed("managed save did not finish within \(fmtSeconds(wait)) and could not be aborted: the domain is \(s)",
                                                method: Self.managedSave)
            }
        }
        guard r.ok else { return failed(Virsh.clean(r.message), method: Self.managedSave) }
        let after = virsh.state(name)
        guard after == .shutOff else {
            return failed("managed save returned but the domain is \(after?.rawValue ?? "gone")", method: Self.managedSave)
        }
        return ok(Self.managedSave, note ?? "saved to \(d.saveFile)")
    }

    enum SaveEnd { case saved, running, unknown(String) }

    /// After giving up on a managed save: make sure it either happened or
    /// did not, and say which, so the report matches libvirt. virsh aborts
    /// its job on SIGINT, but the job may also have finished meanwhile, or
    /// (virsh killed right after sending the request) start late: abort
    /// until libvirt shows no job twice in a row, for up to `settleSeconds`.
    func settleAbortedSave(_ name: String) -> SaveEnd {
        let end = monotonicNanos() + UInt64(settleSeconds * 1e9)
        var idle = 0
        while monotonicNanos() < end {
            let st = virsh.state(name)
            if st == .shutOff { return .saved }
            if virsh.hasJob(name) == false {
                idle += 1
                if idle == 2 { return .running }
            } else {
                idle = 0
                _ = virsh.run(["domjobabort", name], timeout: 10)
            }
            usleep(300_000)
        }
        return .unknown(virsh.state(name)?.rawValue ?? "unknown")
    }

    /// Undoes a stop within `wait` seconds. `waitRunning`: wait until the
    /// domain is back in its prior state (running, or paused if it was;
    /// either when the prior state is unknown, "").
    public func resume(_ s: StoppedDomain, waitRunning: Bool, wait: Double) -> ComponentResult {
        let name = s.name
        let end = monotonicNanos() + UInt64(wait * 1e9)
        func left() -> Double { max(0.5, Double(Int64(end) - Int64(monotonicNanos())) / 1e9) }
        switch s.method {
        case Self.agentFreeze:
            let r = virsh.run(["domfsthaw", name], timeout: min(wait, 60), quiet: false)
            return ComponentResult(id: name, ok: r.ok, method: s.method,
                                   message: r.ok ? r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                                       : r.timedOut ? "guest agent thaw: no answer" : Virsh.clean(r.message))
        case Self.managedSave:
            // Unknown prior state (resume by name): running or paused, as libvirt restores it.
            let prior = LibvirtState(rawValue: s.priorState)
            let now = virsh.state(name)
            guard now == .shutOff else {
                let msg = now.map { "already \($0.rawValue)" } ?? "no such domain"
                return ComponentResult(id: name, ok: now != nil, method: s.method, message: msg)
            }
            let r = virsh.run(["start", name], timeout: left())
            guard r.ok else {
                return ComponentResult(id: name, ok: false, method: s.method,
                                       message: r.timedOut ? "start: no answer within \(fmtSeconds(wait))" : Virsh.clean(r.message))
            }
            guard waitRunning else { return ComponentResult(id: name, ok: true, method: s.method, message: "started") }
            let back = { (st: LibvirtState?) -> Bool in
                guard let st else { return false }
                switch prior {
                case .paused?: return st == .paused
                case nil: return st == .running || st == .idle || st == .paused
                default: return st == .running || st == .idle || st == prior
                }
            }
            guard let got = virsh.waitForState(name, seconds: left(), back), back(got) else {
                let target = prior == .paused ? "paused" : prior == nil ? "running or paused" : "running"
                return ComponentResult(id: name, ok: false, method: s.method,
                                       message: "started but not \(target) after \(fmtSeconds(wait))")
            }
            return ComponentResult(id: name, ok: true, method: s.method, message: "restored, \(got.rawValue)")
        default:
            return ComponentResult(id: name, ok: true, method: s.method, message: "nothing to resume")
        }
    }
}

func fmtSeconds(_ s: Double) -> String { s == s.rounded() ? "\(Int(s)) s" : String(format: "%.1f s", s) }

func isoNow() -> String {
    let f = ISO8601DateFormatter()
    return f.string(from: Date())
}

/// What `hotimage vm stop` stopped, for `vm resume --from` (Paragon's
/// resume_in): JSON {"uri": …, "stopped": [{name, priorState, method, time}]}.
public struct StopRecord: Codable, Sendable, Equatable {
    public var uri: String
    public var stopped: [StoppedDomain]
    public init(uri: String, stopped: [StoppedDomain] = []) { self.uri = uri; self.stopped = stopped }

    /// Adds newly stopped domains; a name stopped again keeps its first
    /// entry (the state it had before any of the stops).
    public mutating func add(_ new: [StoppedDomain]) {
        for n in new where !stopped.contains(where: { $0.name == n.name }) { stopped.append(n) }
    }

    public static func load(_ path: String) throws -> StopRecord? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else { throw WriterError("\(path): cannot read") }
        do { return try JSONDecoder().decode(StopRecord.self, from: data) } catch {
            throw WriterError("\(path): not a record of 'hotimage vm stop'")
        }
    }

    /// Writes it atomically, or removes the file when nothing is left stopped.
    public func save(_ path: String) throws {
        if stopped.isEmpty {
            try? FileManager.default.removeItem(atPath: path)
            return
        }
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir.isEmpty ? "." : dir, withIntermediateDirectories: true)
        try e.encode(self).write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}
