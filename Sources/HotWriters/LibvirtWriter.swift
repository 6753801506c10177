// The libvirt writer: one component per domain (id = its name), its files
// (disk images with their backing chains, CD-ROM and floppy images, the
// managed-save file, NVRAM, the definition), its state and whether it may be
// backed up as is. Freeze stops the domains that must be stopped, all at
// once (guest agent freeze, else managed save); thaw undoes exactly that.
//
// Settings (hotimage.conf or --setting):
//   libvirt-uri      connection URI (default qemu:///system)
//   vm-cdrom-counts  CD-ROM and floppy images decide coverage (default no)
//   vm-wait          seconds one stop or resume may take (default 300),
//                    never more than the freeze request allows
//   vm-resume-wait   thaw waits until a restored domain runs (default yes)
//   vm-agent         freeze through a guest agent that answers (default yes)
//   vm-save-dir      where libvirt puts managed saves, if not its default
//
// A machine without virsh or without a running libvirt daemon has nothing
// to freeze: `components` says why on stderr and lists none.
import Foundation
import HotOS

public final class LibvirtWriter: BuiltinWriter {
    public static let name = "libvirt"
    public static let summary = "libvirt domains: guest-agent freeze or managed save; disks with backing chains, saves, NVRAM"

    let settings: LibvirtSettings
    /// What freeze did, for thaw.
    var stopped: [String: StoppedDomain] = [:]
    /// The freeze request's time limit: hotimage allows the thaw as long.
    var timeout: Double = 60

    public init(settings: WriterSettings) throws {
        self.settings = try LibvirtSettings(settings)
    }

    public func components(volumes: [String]) throws -> [WriterComponent] {
        let virsh: Virsh
        do { virsh = try Virsh.connect(uri: settings.uri) } catch {
            if (error as? WriterError)?.unavailable == true { unavailableNote("libvirt", "\(error)") } else {
                writeStderr("writer libvirt: \(error)\n")
            }
            return []
        }
        let names = try virsh.domainNames()
        let paths = settings.paths, cd = settings.cdromCounts
        return inParallel(names) { n -> WriterComponent? in
            do { return try virsh.inspect(n, paths: paths, cdromCounts: cd).component } catch {
                // Undefined between the listing and now, or libvirt refused.
                writeStderr("writer libvirt: \(n): \(error)\n")
                return nil
            }
        }.compactMap { $0 }
    }

    public func freeze(_ ids: [String], request: FreezeRequest) -> [ComponentResult] {
        let virsh: Virsh
        do { virsh = try Virsh.connect(uri: settings.uri) } catch {
            return ids.map { ComponentResult(id: $0, ok: false, message: "\(error)") }
        }
        timeout = request.timeoutSeconds
        let (control, wait) = LibvirtControl.within(timeout, virsh: virsh, wait: settings.wait)
        let paths = settings.paths, agent = settings.useAgent
        let outcomes = inParallel(ids) { id -> (ComponentResult, StoppedDomain?) in
            do {
                let d = try virsh.inspect(id, paths: paths, cdromCounts: false)
                return control.stop(d, useAgent: agent, wait: wait)
            } catch {
                return (ComponentResult(id: id, ok: false, message: "\(error)"), nil)
            }
        }
        for case (_, let rec?) in outcomes { stopped[rec.name] = rec }
        return outcomes.map(\.0)
    }

    public func thaw(_ ids: [String]) -> [ComponentResult] {
        let todo = ids.map { stopped[$0] ?? StoppedDomain(name: $0, priorState: "", method: "none") }
        guard todo.contains(where: \.needsResume) else {
            return todo.map { ComponentResult(id: $0.name, ok: true, method: $0.method, message: "nothing to thaw") }
        }
        let virsh: Virsh
        do { virsh = try Virsh.connect(uri: settings.uri) } catch {
            return todo.map { ComponentResult(id: $0.name, ok: !$0.needsResume, method: $0.method, message: "\(error)") }
        }
        let (control, wait) = LibvirtControl.within(timeout, virsh: virsh, wait: settings.wait)
        let waitRunning = settings.resumeWait
        return inParallel(todo) { control.resume($0, waitRunning: waitRunning, wait: wait) }
    }
}
