// `hotimage vm stop` and `vm resume` (stop_all/stop_vol/stop_vm and
// resume_all/resume_vm/resume_in). Stop means managed save, never a guest
// agent freeze: a freeze lasts only as long as the process that holds it,
// and these commands exit between the stop and the resume.
import ArgumentParser
import Foundation
import HotOS
import HotWriters

let defaultStopRecord = "/run/hotimage/vm-stopped.json"

func printOutcome(_ r: ComponentResult, verb: String, seconds: Double) {
    let how = [r.method, r.message].compactMap { $0 }.joined(separator: ": ")
    if r.ok { print("\(r.id): \(verb) (\(how), \(String(format: "%.1f", seconds)) s)") } else {
        print("\(r.id): FAILED to \(verb == "stopped" ? "stop" : "resume"): \(how)")
    }
}

struct VMStop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "Save (managed save) the domains that must be stopped: --all, --volumes V…, or by NAME.")

    @Argument(help: ArgumentHelp("Domains to stop.", valueName: "name"))
    var names: [String] = []

    @Flag(help: "Every domain.")
    var all = false

    @Option(parsing: .upToNextOption, help: ArgumentHelp("The domains these mount points or directories cover.", valueName: "volume"))
    var volumes: [String] = []

    @Option(help: ArgumentHelp("yes: also stop partially covered domains (with --volumes).", valueName: "yes|no"))
    var partial: String = "yes"

    @Flag(help: "CD-ROM and floppy images count for coverage.")
    var cdromCounts = false

    @Option(help: ArgumentHelp("Seconds one domain may take to save.", valueName: "seconds"))
    var wait: Double = 300

    @Option(help: ArgumentHelp("Where to record what was stopped.", valueName: "file"))
    var record: String = defaultStopRecord

    @OptionGroup var vm: VMOptions

    func validate() throws {
        let ways = [all, !volumes.isEmpty, !names.isEmpty].filter { $0 }.count
        if ways != 1 { throw ValidationError("name the domains to stop: --all, --volumes V…, or NAME… (one of them)") }
        if partial != "yes" && partial != "no" { throw ValidationError("--partial must be yes or no") }
        if !(wait > 0) { throw ValidationError("--wait must be seconds > 0") }
    }

    func run() throws {
        try checkVolumes(volumes)
        var rec: StopRecord
        do { rec = try StopRecord.load(record) ?? StopRecord(uri: vm.uri) } catch { throw CLIExit.fail(.usage, "\(error)") }
        if rec.uri != vm.uri && !rec.stopped.isEmpty {
            throw CLIExit.fail(.refused, "\(record) records domains of \(rec.uri), not \(vm.uri): resume them first or use another --record")
        }
        let s = vm.settings(cdromCounts: cdromCounts)
        let virsh = try vm.connect()
        var chosen = try inspectDomains(virsh, s, names: names.isEmpty ? nil : names)
        if !volumes.isEmpty {
            chosen = chosen.filter {
                let c = coverage(of: $0.files, volumes: volumes)
                return c == .full || (c == .partial && partial == "yes")
            }
        }
        for d in chosen where d.state.mayBackUpAsIs { print("\(d.name): \(d.state.rawValue), left as is") }
        let todo = chosen.filter { !$0.state.mayBackUpAsIs }
        if todo.isEmpty { print("nothing to stop"); return }
        let control = LibvirtControl(virsh: virsh)
        let outcomes = inParallel(todo) { d -> (ComponentResult, StoppedDomain?, Double) in
            let t0 = monotonicNanos()
            let (r, st) = control.stop(d, useAgent: false, wait: wait)
            return (r, st, Double(monotonicNanos() - t0) / 1e9)
        }
        for (r, _, t) in outcomes { printOutcome(r, verb: "stopped", seconds: t) }
        rec.add(outcomes.compactMap(\.1))
        do { try rec.save(record) } catch { throw CLIExit.fail(.failed, "record \(record): \(error)") }
        if !rec.stopped.isEmpty { print("recorded in \(record): \(rec.stopped.map(\.name).joined(separator: " "))") }
        let failed = outcomes.filter { !$0.0.ok }.count
        if failed > 0 { throw CLIExit.fail(.failed, "\(failed) of \(todo.count) domains could not be stopped") }
    }
}

struct VMResume: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resume",
        abstract: "Start domains from their managed save: --all, by NAME, or --from a stop record.")

    @Argument(help: ArgumentHelp("Domains to resume.", valueName: "name"))
    var names: [String] = []

    @Flag(help: "Every domain that has a managed save.")
    var all = false

    @Option(help: ArgumentHelp("Resume what 'vm stop' recorded in this file.", valueName: "file"))
    var from: String?

    @Option(help: ArgumentHelp("Seconds one domain may take to come back.", valueName: "seconds"))
    var wait: Double = 300

    @Flag(help: "Do not wait until each domain runs again.")
    var noWaitRunning = false

    @OptionGroup var vm: VMOptions

    func validate() throws {
        let ways = [all, from != nil, !names.isEmpty].filter { $0 }.count
        if ways != 1 { throw ValidationError("name the domains to resume: --all, --from FILE, or NAME… (one of them)") }
        if !(wait > 0) { throw ValidationError("--wait must be seconds > 0") }
    }

    func run() throws {
        var rec: StopRecord?
        if let f = from {
            do { rec = try StopRecord.load(f) } catch { throw CLIExit.fail(.usage, "\(error)") }
            guard rec != nil else { throw CLIExit.fail(.usage, "\(f): no such record (nothing was stopped, or all was resumed)") }
        }
        let virsh = try vm.connect(default: rec?.uri)
        var todo: [StoppedDomain]
        if let r = rec {
            todo = r.stopped
        } else {
            let domains = try inspectDomains(virsh, vm.settings(), names: names.isEmpty ? nil : names)
            todo = []
            for d in domains {
                if d.managedSave { todo.append(StoppedDomain(name: d.name, priorState: "", method: LibvirtControl.managedSave)); continue }
                if names.isEmpty { continue }  // --all: only what has a managed save
                if d.state.mayBackUpAsIs {
                    throw CLIExit.fail(.refused, "\(d.name) is \(d.state.rawValue) without a managed save: nothing to resume ('virsh start' boots it); nothing done")
                }
                print("\(d.name): already \(d.state.rawValue)")
            }
        }
        if todo.isEmpty { print("nothing to resume"); return }
        let control = LibvirtControl(virsh: virsh)
        let outcomes = inParallel(todo) { st -> (ComponentResult, Double) in
            let t0 = monotonicNanos()
            let r = control.resume(st, waitRunning: !noWaitRunning, wait: wait)
            return (r, Double(monotonicNanos() - t0) / 1e9)
        }
        for (r, t) in outcomes { printOutcome(r, verb: "resumed", seconds: t) }
        if var r = rec, let f = from {
            let back = Set(outcomes.filter { $0.0.ok }.map(\.0.id))
            r.stopped.removeAll { back.contains($0.name) }
            do { try r.save(f) } catch { throw CLIExit.fail(.failed, "record \(f): \(error)") }
            if !r.stopped.isEmpty { print("still recorded in \(f): \(r.stopped.map(\.name).joined(separator: " "))") }
        }
        let failed = outcomes.filter { !$0.0.ok }.count
        if failed > 0 { throw CLIExit.fail(.failed, "\(failed) of \(todo.count) domains could not be resumed") }
    }
}
