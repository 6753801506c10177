// `hotimage writers`: the writers, their components and how much of each a
// set of volumes covers.
import ArgumentParser
import Foundation
import HotImager
import HotOS
import HotWriters

struct WritersCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "writers",
        abstract: "List the writers, their components and the volumes' coverage of them.",
        discussion: """
        A writer knows a set of components (a libvirt guest, a container, a \
        PostgreSQL cluster), the files each keeps, and how to freeze and thaw it. \
        'backup' asks every enabled writer which components keep files on the volume \
        it images and freezes those around the snapshot (see 'hotimage backup --help').

        For each component this prints its state, its files (with their role and the \
        volume each is on) and, with --volumes, its coverage by those volumes:
          fully      every file that counts is on the volumes
          partially  some are
          not        none are (or the component has no files that count)
        Files marked "(does not count)" are listed but left out of coverage: a \
        domain's XML (recorded in the image instead), CD-ROM and floppy images \
        (unless vm-cdrom-counts = yes).

        WRITERS
          libvirt      libvirt domains (see also 'hotimage vm')
          containers   cgroup-v2 containers: those in machine.slice, and those
                       named by 'container = CGROUP [ROOT]'
          postgresql   running PostgreSQL clusters (pg_backup_start/stop)
          external     every executable in /etc/hotimage/writers.d, speaking the
                       writer protocol (docs/WRITERS.md): 'NAME components' prints
                       the components as JSON; 'NAME freeze' freezes what it is
                       sent, answers, waits for a line (or end of file), thaws,
                       answers.
        Writers, their directory and their settings come from the configuration \
        file (/etc/hotimage/hotimage.conf) as for 'backup', then from the options.

        \(ExitCodes.help(ExitCodes.writers))
        """)

    @Option(parsing: .upToNextOption, help: ArgumentHelp("Mount points (or directories) whose coverage to show.", valueName: "volume"))
    var volumes: [String] = []

    @Option(help: ArgumentHelp("Writers to ask: all (default), or a comma-separated list of names.", valueName: "list"))
    var writers: String?

    @Option(help: ArgumentHelp("A setting for the built-in writers (repeatable).", valueName: "key=value"))
    var writerSetting: [String] = []

    @Option(help: ArgumentHelp("Directory of the external writers (default /etc/hotimage/writers.d).", valueName: "dir"))
    var writersDir: String?

    @Option(help: ArgumentHelp("Configuration file (default /etc/hotimage/hotimage.conf if it exists).", valueName: "file"))
    var config: String?

    @Flag(help: "Print JSON on stdout.") var json = false

    struct Row: Codable {
        var writer: String
        var kind: String
        var error: String?
        var components: [Entry]
    }
    struct Entry: Codable {
        var component: WriterComponent
        var coverage: Coverage?
        var volumeOf: [String: String]
    }

    func run() throws {
        let cfg: HotimageConfig
        do { cfg = try HotimageConfig.load(path: config ?? HotimageConfig.defaultPath, required: config != nil) } catch {
            throw CLIExit.fail(.usage, "\(error)")
        }
        var wc = cfg.writers
        if let w = writers { wc.selection = WriterSelection(parsing: w) }
        if let d = writersDir { wc.directory = d }
        do { wc.settings.pairs += try WriterSettings.parse(arguments: writerSetting).pairs } catch { throw CLIExit.fail(.usage, "\(error)") }
        for v in volumes where !FileManager.default.fileExists(atPath: v) { throw CLIExit.fail(.usage, "no such volume or directory: \(v)") }
        let (found, missing) = WriterDiscovery.find(wc)
        if !missing.isEmpty { throw CLIExit.fail(.usage, "no such writer: \(missing.joined(separator: ", "))") }
        let listings = WriterHost.list(found, volumes: volumes, config: wc)
        let rows = listings.map { l in
            Row(writer: l.writer.name, kind: l.writer.kind, error: l.error, components: l.components.map { c in
                var on: [String: String] = [:]
                for f in c.files { if let v = volume(of: f.path, volumes: volumes) { on[f.path] = v } }
                return Entry(component: c, coverage: volumes.isEmpty ? nil : coverage(of: c.files, volumes: volumes), volumeOf: on)
            })
        }
        if json { printJSON(rows) } else { printText(rows) }
        for l in listings { if let e = l.error { writeStderr("hotimage: writer \(l.writer.name): \(e)\n") } }
        if listings.contains(where: { $0.error != nil }) { throw CLIExit.status(.failed) }
    }

    func printText(_ rows: [Row]) {
        for r in rows {
            let head = "\(r.writer) (\(r.kind))"
            if let e = r.error { print("\(head): FAILED: \(e)"); continue }
            print("\(head): \(r.components.count) component(s)")
            for e in r.components {
                let c = e.component
                var line = "  \(c.id)"
                if let s = c.state { line += "  [\(s)]" }
                if let cov = e.coverage { line += "  \(cov.rawValue) covered" }
                print(line)
                if let d = c.description { print("    \(d)") }
                for (k, v) in (c.details ?? [:]).sorted(by: { $0.key < $1.key }) where !v.contains("\n") { print("    \(k): \(v)") }
                for f in c.files {
                    var fl = "    \(f.role ?? "file"): \(f.path)"
                    if !f.countsForCoverage { fl += " (does not count)" }
                    if let v = e.volumeOf[f.path] { fl += "  on \(v)" } else if !volumes.isEmpty { fl += "  not on the volumes" }
                    print(fl)
                }
            }
        }
    }
}
