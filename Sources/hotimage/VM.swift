// `hotimage vm`: Paragon's Virtual Server scripts (vm_layout, stop_all,
// stop_vol, stop_vm, resume_all, resume_vm, resume_in) on libvirt, over the
// libvirt writer's code (HotWriters/LibvirtControl.swift), so what an admin
// does by hand is what a backup with the libvirt writer does.
import ArgumentParser
import Foundation
import HotOS
import HotWriters

struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "libvirt guests: which files they keep where; stop and resume them around a backup.",
        discussion: """
        Each libvirt domain keeps files: disk images with their backing chains, CD-ROM \
        and floppy images, a managed-save file while it is saved, an NVRAM file, its \
        definition. 'layout' shows them and how well a set of volumes covers them; \
        'stop' saves the domains whose files must not change during a backup, \
        'resume' brings them back. 'hotimage backup' does the same for you with the \
        libvirt writer (guest agent freeze when the guest has an agent that answers).

        STATES (libvirt's) AND WHAT A BACKUP MUST DO
          shut off, crashed                          may be backed up as is
          running, idle, paused, in shutdown,        must be stopped
          pmsuspended
          A managed-saved domain is shut off: its memory is in the save file.

        COVERAGE (of the volumes given to layout and stop --volumes)
          fully      every file that counts is on one of the volumes
          partially  some are
          not        none is
          A file is on a volume when its real path is under the mount point (or
          directory) and on the same filesystem. CD-ROM and floppy images and the
          definition do not count unless --cdrom-counts (the definition never).

        STOP AND RESUME
          stop saves each selected domain that must be stopped with 'virsh
          managedsave', all at once, and records what it stopped (name, prior
          state, method) in --record. A domain shutting down is waited for. resume
          starts domains from their managed save ('virsh start'); a domain that was
          paused comes back paused. 'resume --from' resumes what a record lists and
          removes those that came back from it.

        Libvirt is reached with virsh (libvirt-clients); --uri names the connection. \
        Managed saves go to /var/lib/libvirt/qemu/save for qemu:///system: for a \
        backup that restores a guest with its memory, that directory must be on a \
        volume being backed up (layout says so when it is not).

        \(ExitCodes.help(ExitCodes.vm))

        Examples:
          hotimage vm layout /srv/vms
          hotimage vm stop --volumes /srv/vms --record /run/hotimage/vms.json
          hotimage backup /srv/vms -o /backup/vms.qcow2
          hotimage vm resume --from /run/hotimage/vms.json
          hotimage vm stop web db --wait 60
          hotimage vm resume --all
        """,
        subcommands: [VMLayout.self, VMStop.self, VMResume.self])
}

struct VMOptions: ParsableArguments {
    @Option(name: .customLong("uri"), help: ArgumentHelp("libvirt connection URI (default qemu:///system; resume --from: the record's).", valueName: "uri"))
    var givenURI: String?
    var uri: String { givenURI ?? "qemu:///system" }

    @Option(help: ArgumentHelp("Where libvirt keeps managed saves (default: libvirt's for the URI).", valueName: "dir"))
    var saveDir: String?

    func settings(cdromCounts: Bool = false) -> LibvirtSettings {
        var s = LibvirtSettings(uri: uri, saveDir: saveDir)
        s.cdromCounts = cdromCounts
        return s
    }

    func connect(default d: String? = nil) throws -> Virsh {
        do { return try Virsh.connect(uri: givenURI ?? d ?? uri) } catch { throw CLIExit.fail(.unreachable, "\(error)") }
    }
}

/// Every domain (or the named ones, which must all exist), inspected at once.
func inspectDomains(_ virsh: Virsh, _ s: LibvirtSettings, names: [String]? = nil) throws -> [LibvirtDomainInfo] {
    let all: [String]
    do { all = try virsh.domainNames() } catch { throw CLIExit.fail(.unreachable, "\(error)") }
    let wanted = names ?? all
    let unknown = wanted.filter { !all.contains($0) }
    if !unknown.isEmpty {
        throw CLIExit.fail(.refused, "no such domain: \(unknown.joined(separator: ", ")) (there are: \(all.isEmpty ? "none" : all.joined(separator: ", "))); nothing done")
    }
    let paths = s.paths, cd = s.cdromCounts
    let found = inParallel(wanted) { n -> Result<LibvirtDomainInfo, Error> in
        Result { try virsh.inspect(n, paths: paths, cdromCounts: cd) }
    }
    var out: [LibvirtDomainInfo] = []
    for (n, r) in zip(wanted, found) {
        switch r {
        case .success(let d): out.append(d)
        case .failure(let e):
            if names != nil { throw CLIExit.fail(.failed, "\(n): \(e)") }
            writeStderr("hotimage: \(n): \(e) (left out)\n")  // undefined while we looked
        }
    }
    return out
}

func checkVolumes(_ volumes: [String]) throws {
    for v in volumes {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: v, isDirectory: &isDir), isDir.boolValue else {
            throw CLIExit.fail(.usage, "volume \(v): not a mount point or directory")
        }
    }
}

struct VMLayout: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "layout",
        abstract: "Show each domain's state, files and coverage by VOLUMEs.")

    @Argument(help: ArgumentHelp("Mount points or directories being backed up.", valueName: "volume"))
    var volumes: [String] = []

    @Flag(help: "CD-ROM and floppy images count for coverage.")
    var cdromCounts = false

    @Flag(help: "One JSON object on stdout.")
    var json = false

    @OptionGroup var vm: VMOptions

    struct FileOut: Codable { var path: String; var role: String; var counts: Bool; var volume: String? }
    struct DomainOut: Codable {
        var name: String, state: String, disposition: String, persistent: Bool, agent: String
        var managedSave: Bool, saveFile: String, coverage: String?, files: [FileOut], notes: [String]
    }
    struct LayoutOut: Codable { var uri: String; var volumes: [String]; var domains: [DomainOut] }

    func run() throws {
        try checkVolumes(volumes)
        let s = vm.settings(cdromCounts: cdromCounts)
        let virsh = try vm.connect()
        let domains = try inspectDomains(virsh, s)
        let out = LayoutOut(uri: virsh.uri, volumes: volumes, domains: domains.map { d in
            var notes = d.notes
            if !volumes.isEmpty && !d.state.mayBackUpAsIs && volume(of: s.paths.saveDir, volumes: volumes) == nil {
                notes.append("a managed save goes to \(s.paths.saveDir), not on these volumes: an image would hold its disks, not its memory")
            }
            return DomainOut(
                name: d.name, state: d.state.rawValue, disposition: d.state.disposition, persistent: d.persistent,
                agent: d.agent.rawValue, managedSave: d.managedSave, saveFile: d.saveFile,
                coverage: volumes.isEmpty ? nil : coverage(of: d.files, volumes: volumes).rawValue,
                files: d.files.map {
                    FileOut(path: $0.path, role: $0.role ?? "", counts: $0.countsForCoverage,
                            volume: volumes.isEmpty ? nil : volume(of: $0.path, volumes: volumes))
                }, notes: notes)
        })
        if json { print(jsonLine(out)); return }
        if out.domains.isEmpty { print("no libvirt domains at \(virsh.uri)"); return }
        for d in out.domains {
            var head = "\(d.name): \(d.state), \(d.disposition); \(d.persistent ? "persistent" : "transient"); agent \(d.agent)"
            if let c = d.coverage { head += "; \(c) covered" }
            print(head)
            let w = d.files.map(\.role.count).max() ?? 0
            for f in d.files {
                var where_ = ""
                if !f.counts { where_ = "  (does not count)" } else if !volumes.isEmpty {
                    where_ = f.volume.map { "  on \($0)" } ?? "  NOT on the volumes"
                }
                print("  \(f.role.padding(toLength: w, withPad: " ", startingAt: 0))  \(f.path)\(where_)")
            }
            for n in d.notes { print("  note: \(n)") }
        }
    }
}
