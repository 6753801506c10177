// libvirt through `virsh` (libvirt-clients) run as a subprocess: no build
// dependency on libvirt-dev, a hung libvirt call is a process we kill, and
// what we do is what an admin would type. Output is parsed in the C locale.
// Inspecting a domain (its state, files, agent) lives here too; what to do
// with it is in LibvirtControl.swift.
import Foundation
import HotOS
import HotSync

public struct Virsh: Sendable {
    public var uri: String
    public var executable: String

    /// The default wait of one libvirt call that should be quick (dominfo, dumpxml).
    public static let quick: Double = 30

    /// virsh for `uri`, if virsh is installed and the daemon answers; else
    /// throws why (the writer says it on stderr and has no components).
    public static func connect(uri: String) throws -> Virsh {
        guard let x = ProcessControl.which("virsh") else {
            throw WriterError("virsh is not installed (Debian: libvirt-clients): no libvirt domains", kind: .unreachable, unavailable: true)
        }
        let v = Virsh(uri: uri, executable: x)
        let r = v.run(["uri"], timeout: 15)
        guard r.ok else {
            // Refused at once (no socket, no daemon): libvirt is not on this
            // host. A hang is a problem with a libvirt that is there.
            throw WriterError("libvirt at \(uri) does not answer: \(r.timedOut ? "timed out" : clean(r.message))", kind: .unreachable, unavailable: !r.timedOut)
        }
        return v
    }

    /// `interruptGrace`: at the timeout, SIGINT first (virsh then aborts
    /// the domain job it started) and this long to finish. `quiet` (-q)
    /// drops headers and messages such as "Froze 1 filesystem(s)".
    public func run(_ args: [String], timeout: Double = Virsh.quick, interruptGrace: Double = 0,
                    quiet: Bool = true) -> CapturedRun {
        ProcessControl.capture([executable] + (quiet ? ["-q"] : []) + ["-c", uri] + args, environment: ["LC_ALL": "C"],
                               timeout: timeout, interruptGrace: interruptGrace)
    }

    /// Whether libvirt runs a job (a save, a migration) on the domain now.
    public func hasJob(_ name: String) -> Bool? {
        let r = run(["domjobinfo", name], timeout: 15)
        guard r.ok else { return nil }
        return parseVirshInfo(r.stdout)["Job type"].map { $0 != "None" }
    }

    /// Runs and throws the command's own message on failure.
    public func check(_ args: [String], timeout: Double = Virsh.quick) throws -> String {
        let r = run(args, timeout: timeout)
        if r.timedOut { throw WriterError("virsh \(args.joined(separator: " ")): no answer within \(Int(timeout)) s") }
        guard r.ok else { throw WriterError(Self.clean(r.message)) }
        return r.stdout
    }

    /// "error: failed to get domain 'x'\nerror: …" → one line without the prefixes.
    static func clean(_ m: String) -> String {
        m.split(separator: "\n").map { $0.hasPrefix("error: ") ? String($0.dropFirst(7)) : String($0) }
            .filter { !$0.isEmpty }.joined(separator: ": ")
    }

    public func domainNames() throws -> [String] {
        try check(["list", "--all", "--name"]).split(separator: "\n")
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    public func state(_ name: String) -> LibvirtState? {
        let r = run(["domstate", name], timeout: 15)
        return r.ok ? LibvirtState(virsh: r.stdout) : nil
    }

    /// Polls the state every 0.2 s until `want` holds or `seconds` pass; the last state seen.
    public func waitForState(_ name: String, seconds: Double, _ want: (LibvirtState?) -> Bool) -> LibvirtState? {
        let end = monotonicNanos() + UInt64(max(0, seconds) * 1e9)
        while true {
            let s = state(name)
            if want(s) || monotonicNanos() >= end { return s }
            usleep(200_000)
        }
    }

    /// Whether the guest agent answers a ping within `timeout` seconds.
    public func agentAnswers(_ name: String, timeout: Int = 5) -> Bool {
        run(["qemu-agent-command", name, #"{"execute":"guest-ping"}"#, "--timeout", String(timeout)],
            timeout: Double(timeout + 10)).ok
    }
}

public enum AgentStatus: String, Codable, Sendable {
    case answers = "yes"
    case silent = "no (channel, no answer)"
    case none = "no"
}

/// A domain as the writer sees it.
public struct LibvirtDomainInfo: Sendable {
    public var name: String
    public var state: LibvirtState
    public var persistent: Bool
    public var managedSave: Bool
    public var definition: LibvirtDefinition
    /// The definition to record: the persistent one (what `virsh define`
    /// takes back) for a persistent domain, else the live one.
    public var xml: String
    public var agent: AgentStatus
    public var files: [ComponentFile]
    /// Where a managed save of it goes.
    public var saveFile: String
    public var notes: [String]

    /// As a writer component. The domain XML goes into details["xml"]
    /// rather than as a file: libvirt keeps it under /etc (usually not a
    /// backed-up volume, and not the place a restore should overwrite), but
    /// the image metadata records the writer's components, so the
    /// definition travels with the image and the domain can be defined
    /// again from it after a restore. Its file is listed with counts=false.
    public var component: WriterComponent {
        var d: [String: String] = [
            "disposition": state.disposition,
            "persistent": persistent ? "yes" : "no",
            "agent": agent.rawValue,
            "managed-save": managedSave ? "yes" : "no",
            "save-file": saveFile,
            "xml": xml,
        ]
        if !notes.isEmpty { d["notes"] = notes.joined(separator: "; ") }
        return WriterComponent(id: name, description: "libvirt domain \(name)", state: state.rawValue,
                               files: files, details: d)
    }
}

extension Virsh {
    /// Everything the writer shows about `name`. `cdromCounts`: whether CD
    /// and floppy images decide coverage (HotBackup's default: they do not,
    /// they are usually read-only media kept elsewhere).
    public func inspect(_ name: String, paths: LibvirtPaths, cdromCounts: Bool) throws -> LibvirtDomainInfo {
        let info = parseVirshInfo(try check(["dominfo", name]))
        guard let state = info["State"].flatMap(LibvirtState.init(virsh:)) else {
            throw WriterError("\(name): unknown state '\(info["State"] ?? "")'")
        }
        let persistent = info["Persistent"] == "yes"
        let live = try check(["dumpxml", name])
        // Without --security-info: passwords (VNC, SPICE) stay out of the image metadata.
        let xml = persistent ? try check(["dumpxml", "--inactive", name]) : live
        let def = try LibvirtDefinition(xml: live)
        var files: [ComponentFile] = []
        var notes: [String] = []
        var seen = Set<String>()
        func add(_ path: String, _ role: String, counts: Bool = true) {
            guard seen.insert(path).inserted else { return }
            files.append(ComponentFile(path: path, role: role, counts: counts))
        }
        for disk in def.disks {
            guard let src = disk.source else { continue }  // an empty CD drive
            let counts = disk.role == "disk" || cdromCounts
            guard disk.isLocalPath else {
                add(src, disk.role, counts: counts)
                notes.append("\(disk.target) is \(disk.type) storage (\(src)), not a file on a volume")
                continue
            }
            add(src, disk.role, counts: counts)
            for b in backingChain(disk) { add(b, disk.role, counts: counts) }
        }
        let managedSave = info["Managed save"] == "yes"
        let saveFile = paths.save(name)
        if managedSave {
            if access(saveFile, F_OK) == 0 { add(saveFile, "save") } else {
                notes.append("libvirt reports a managed save but \(saveFile) does not exist")
            }
        }
        if let nv = def.nvram { add(nv, "nvram") }
        if persistent, access(paths.config(name), F_OK) == 0 { add(paths.config(name), "config", counts: false) }
        for b in def.bootFiles { add(b, "boot", counts: false) }
        var agent = AgentStatus.none
        if def.hasAgentChannel {
            agent = state == .running && agentAnswers(name) ? .answers : .silent
        }
        return LibvirtDomainInfo(name: name, state: state, persistent: persistent, managedSave: managedSave,
                                 definition: def, xml: xml, agent: agent, files: files, saveFile: saveFile, notes: notes)
    }

    /// The backing files below a disk's top image, from qemu-img (it reads
    /// an image in use with -U), else from libvirt's live <backingStore>.
    func backingChain(_ disk: LibvirtDisk) -> [String] {
        guard disk.type == "file", let src = disk.source, disk.format != "raw",
              let qi = ProcessControl.which("qemu-img") else { return disk.backing.filter { $0.hasPrefix("/") } }
        let r = ProcessControl.capture([qi, "info", "-U", "--backing-chain", "--output=json", src],
                                       environment: ["LC_ALL": "C"], timeout: Virsh.quick)
        guard r.ok, let chain = try? parseBackingChain(r.stdout) else { return disk.backing.filter { $0.hasPrefix("/") } }
        return Array(chain.dropFirst())
    }
}

/// Runs `body` for each item on its own thread (libvirt calls wait, they do
/// not compute: every domain is stopped at once, not two at a time as a
/// CPU-sized pool would), results in the order of `items`.
public func inParallel<A, R>(_ items: [A], _ body: @escaping (A) -> R) -> [R] {
    if items.count <= 1 { return items.map(body) }
    let lock = Lock()
    var results = [R?](repeating: nil, count: items.count)
    let group = DispatchGroup()
    for (i, item) in items.enumerated() {
        group.enter()
        Threads.start(name: "writer-\(i)") {
            let r = body(item)
            lock.withLock { results[i] = r }
            group.leave()
        }
    }
    group.wait()
    return results.map { $0! }
}
