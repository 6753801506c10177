import ArgumentParser
import Foundation
import HotErrors
import HotImager
import QCow2

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Write an image, or a set directory's members, back to devices or files.",
        discussion: """
        Verifies IMAGE (every checksum) and refuses a damaged one before touching \
        TARGET; then writes every allocated cluster of IMAGE to TARGET, discards (or zeroes) \
        the rest so TARGET reads exactly as the imaged volume, and flushes. A TARGET \
        that does not exist is created as a file of the volume's size.

        Refuses: an incomplete image (kept by --keep-partial), a mounted or busy \
        target, a target smaller than the volume, a target that already holds a \
        filesystem (unless --force).

        An incremental (made with 'backup --base') is restored through its chain: \
        IMAGE's point in time, whatever links lie below it. Every base must be \
        where IMAGE's backing file names it and be the image IMAGE was made \
        against (by id, not by name); a missing, replaced or edited base is named \
        and refused before anything is written.

        Files that writers handed over when they thawed (PostgreSQL's backup label, \
        as backup_label.hotimage in the data directory) are kept in \
        the image, and so are the files writers mark to leave out (PostgreSQL's \
        postmaster.pid and postmaster.opts); once the volume is written, TARGET is \
        mounted in a private directory (through a loop device if it is a file), the \
        former are written at their place, owned like their directory, mode 0600, the \
        latter removed (regular files on the imaged volume only), and TARGET is \
        unmounted (--no-writer-files skips this; 'hotimage info' shows them).

        SET DIRECTORIES
          A directory written by 'backup SRC SRC… -o DIR' holds one image per
          member, DIR/NAME.qcow2, all cut at one point in time. Give it in
          place of IMAGE, and each member's target with --to NAME=TARGET (no
          positional TARGET). Without --only every member needs a --to; with
          --only NAME (repeatable) just those members are restored, each
          with its --to.

        Nothing is written unless all of these hold: the set is whole ('hotimage \
        verify DIR' says why not), every NAME is a member, no two members go to one \
        target and no target is an image of the directory, every target passes the \
        checks above, and every member to restore verifies (unless --no-verify). The \
        members are then restored one after another, in the set's order, each as a \
        single image is; if one fails the restore stops there, and the output says \
        which members were restored and which were not. --json prints one object \
        with a summary per member.

        \(ExitCodes.help(ExitCodes.restore))

        Examples:
          hotimage restore /backup/data.qcow2 /dev/sdc1
          hotimage restore /backup/set1 --to db=/dev/vg0/db --to wal=/dev/vg0/wal
          hotimage restore /backup/set1 --only wal --to wal=/srv/wal.img
        """)

    @Argument(help: "The qcow2 image, or a set directory.") var image: String
    @Argument(help: "Block device or file to write (a single image; a set directory takes --to).") var target: String?
    @Option(name: .customLong("to"), help: ArgumentHelp("A set member's target (repeatable).", valueName: "name=target"))
    var to: [String] = []
    @Option(help: ArgumentHelp("Restore only this member of the set (repeatable).", valueName: "name")) var only: [String] = []
    @Flag(help: "Overwrite a target that holds a filesystem.") var force = false
    @Flag(help: "Leave unused space as it is (faster on a target known to read as zeros).") var noDiscard = false
    @Flag(help: "Skip verifying the image before writing (faster; a damaged image is then noticed only where decompression fails).") var noVerify = false
    @Flag(help: "Do not write the writers' files (e.g. PostgreSQL's backup_label) into the restored filesystem, nor remove the files they leave out (postmaster.pid).") var noWriterFiles = false
    @Flag(help: "Print the summary as JSON on stdout.") var json = false

    func validate() throws {
        if ImageSet.isDirectory(image) {
            if let t = target {
                throw ValidationError("\(image) is a set directory: give each member's target with --to NAME=TARGET, not '\(t)'")
            }
            if to.isEmpty { throw ValidationError("\(image) is a set directory: give each member's target with --to NAME=TARGET") }
            for t in to {
                guard let eq = t.firstIndex(of: "="), eq != t.startIndex, t.index(after: eq) != t.endIndex else {
                    throw ValidationError("--to '\(t)': give NAME=TARGET")
                }
            }
        } else {
            if !to.isEmpty || !only.isEmpty { throw ValidationError("--to and --only apply to a set directory; \(image) is not one") }
            if target == nil { throw ValidationError("Missing expected argument '<target>'") }
        }
    }

    func run() throws {
        if ImageSet.isDirectory(image) { return try runSet() }
        var o = RestoreOptions(image: image, target: target!)
        o.verifyFirst = !noVerify
        o.writerFiles = !noWriterFiles
        o.force = force
        o.discard = !noDiscard
        let r = TerminalReporter(quiet: json)
        do {
            let s = try RestoreJob.run(o, reporter: r)
            if json { printJSON(s) } else { r.log(Self.line(s)) }
        } catch let e as RestoreFailure {
            throw CLIExit.fail(e.kind, e.description)
        }
    }

    static func line(_ s: RestoreSummary) -> String {
        String(format: "restored %@ (%llu clusters) to %@ in %.1f s; %@ of unused space %@", formatBytes(s.bytes),
               s.clusters, s.target, s.seconds, formatBytes(s.zeroedBytes), s.discarded ? "discarded" : "left as it was")
    }

    func runSet() throws {
        let targets = to.map { t -> (member: String, target: String) in
            let eq = t.firstIndex(of: "=")!
            return (String(t[..<eq]), String(t[t.index(after: eq)...]))
        }
        var o = SetRestoreOptions(directory: image, targets: targets, only: only.isEmpty ? nil : only)
        o.verifyFirst = !noVerify
        o.writerFiles = !noWriterFiles
        o.force = force
        o.discard = !noDiscard
        let r = TerminalReporter(quiet: json)
        let res: SetRestoreResult
        do { res = try SetRestoreJob.run(o, reporter: r) } catch let e as RestoreFailure {
            throw CLIExit.fail(e.kind, e.description)
        }
        if json { printJSON(res) } else {
            for m in res.members {
                switch m.status {
                case "restored": r.log("member '\(m.member)': " + Self.line(m.summary!))
                case "failed": r.log("member '\(m.member)': FAILED: \(m.error ?? "")")
                default: r.log("member '\(m.member)': not restored (a member before it failed)")
                }
            }
        }
        if let f = res.failure { throw CLIExit.status(f) }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show what an image or a set directory holds: source, filesystem, snapshot.",
        discussion: """
        Given an image, shows its qcow2 layout and what hotimage recorded: the \
        source, filesystem, snapshot time and consistency, what was left out, the \
        hooks and writers; for a member of a set, the set's id and cut time and \
        which member it is; the image's id, and for an incremental its base (id, \
        cut, file), how the changes were found (tracked or compared, and why) \
        and a line per link of its chain.

        Given a set directory (written by 'backup SRC SRC… -o DIR'), shows the \
        set: its id and cut time, and per member its name, source, device, size, \
        filesystem UUID, image file and whether that image is complete; then \
        whether the set is whole, and each problem that keeps it from being whole \
        (a missing member, an image of another set or of none, a renamed or \
        incomplete image). 'hotimage verify DIR' also checks every stored byte, \
        and exits 1 on a problem.

        \(ExitCodes.help(ExitCodes.info))

        Examples:
          hotimage info /backup/data.qcow2
          hotimage info /backup/set1 --json
        """)

    @Argument(help: "The qcow2 image, or a set directory.") var image: String
    @Flag(help: "Print JSON on stdout.") var json = false

    func run() throws {
        if ImageSet.isDirectory(image) {
            let set: ImageSet
            do { set = try ImageSet.open(image) } catch { throw CLIExit.fail(.failed, "\(error)") }
            if json { printJSON(set) } else { print(set.text, terminator: "") }
            return
        }
        let info: ImageInfo
        do { info = try ImageInfo.read(image) } catch { throw CLIExit.fail(.failed, "\(error)") }
        if json { printJSON(info) } else { print(info.text, terminator: "") }
    }
}

struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Fold an incremental into its base, or a whole chain into a full image.",
        discussion: """
        An incremental (made with 'backup --base') reads through its chain of \
        base images. merge shortens that chain:

          merge IMAGE             IMAGE and its base are folded into one image that
                                  replaces IMAGE (written beside it, renamed over
                                  it once complete); its base is then the base's
                                  base, or none. The base itself is left as it is:
                                  other incrementals may still use it; remove it
                                  when nothing does.
          merge IMAGE --into OUT  the whole chain is folded into OUT, a full image;
                                  the chain is left as it is.

        The result is IMAGE's point in time: it keeps IMAGE's id (incrementals \
        made against IMAGE stay valid), its metadata and its cluster digests, and \
        lists the ids folded in ('hotimage info'). The chain is verified first \
        (--no-verify skips it); a damaged link is refused, and IMAGE is never \
        touched until the result is complete. The result is recompressed with \
        --compress.

        \(ExitCodes.help(ExitCodes.merge))

        Examples:
          hotimage merge /backup/data-2.qcow2
          hotimage merge /backup/data-5.qcow2 --into /backup/data-full.qcow2
        """)

    @Argument(help: "The incremental image.") var image: String
    @Option(help: ArgumentHelp("Write the whole chain into this new full image instead.", valueName: "out")) var into: String?
    @Option(help: ArgumentHelp("zstd[:LEVEL] (default zstd:1), zlib[:LEVEL] or none.", valueName: "method")) var compress: String?
    @Flag(help: "Overwrite OUT if it exists.") var force = false
    @Flag(help: "Skip verifying the chain first.") var noVerify = false
    @Flag(help: "Print the summary as JSON on stdout.") var json = false

    func validate() throws {
        if let c = compress { do { _ = try QCow2Compression(parsing: c) } catch { throw ValidationError("--compress: \(error)") } }
    }

    func run() throws {
        var o = MergeOptions(image: image)
        o.into = into
        o.overwrite = force
        o.verifyFirst = !noVerify
        if let c = compress { o.compression = try! QCow2Compression(parsing: c) }
        let reporter: Reporter = json ? JSONReporter() : TerminalReporter()
        let s: MergeSummary
        do { s = try MergeJob.run(o, reporter: reporter) } catch let f as ChainFailure {
            throw CLIExit.fail(f.kind, f.description)
        }
        if json { printJSON(s) }
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every stored byte of an image or a set directory against checksums.",
        discussion: """
        Checks the qcow2 structures (header, L1/L2 tables, refcounts, as qemu-img \
        check does) and hotimage's checksums of the metadata and of every cluster \
        (each is decompressed); names the guest region of each problem.

        An incremental (made with 'backup --base') is verified with its whole \
        chain: every link as above, each link against the base it names (by id \
        and cut time: a replaced base is found whatever its name; a missing or \
        wrong base exits \(ExitCodes.code(.refused))), and the content through the chain: every \
        cluster the image's digest table lists is read through the links and its \
        XXH3-128 digest compared, and every other cluster must read as zeros.

        Given a set directory (written by 'backup SRC SRC… -o DIR'), verifies \
        every member's image so, and that the set is whole: every *.qcow2 there \
        carries the same set record, every member listed has its image NAME.qcow2, \
        complete, and no image of another set, of no set, or renamed lies there \
        (a backup's temporary .NAME.qcow2.PID.hotimage-partial file is ignored). \
        Each problem names its member or file. --json prints the set, each \
        member's result and the problems.

        \(ExitCodes.help(ExitCodes.verify))

        Examples:
          hotimage verify /backup/data.qcow2
          hotimage verify /backup/set1
        """)

    @Argument(help: "The qcow2 image, or a set directory.") var image: String
    @Flag(help: "Print the report as JSON on stdout.") var json = false

    func run() throws {
        if ImageSet.isDirectory(image) { return try runSet() }
        let rep: VerifyOutcome
        do { rep = try VerifyOutcome.run(image) } catch { throw CLIExit.fail(.refused, "\(error)") }
        if json { printJSON(rep) } else {
            for n in rep.notes { print("note: \(n)") }
            for p in rep.problems { print("problem: \(p)") }
            print(rep.problems.isEmpty ? "\(image): OK, \(rep.clustersChecked) clusters checked in \(String(format: "%.1f", rep.seconds)) s"
                                       : "\(image): \(rep.problems.count) problem(s)")
        }
        if !rep.problems.isEmpty { throw CLIExit.status(.failed) }
    }

    func runSet() throws {
        let rep: SetVerifyOutcome
        do { rep = try SetVerifyOutcome.run(image) } catch { throw CLIExit.fail(.refused, "\(error)") }
        if json { printJSON(rep) } else {
            for n in rep.set.notes { print("note: \(n)") }
            for m in rep.members {
                for n in m.outcome?.notes ?? [] { print("note: member '\(m.member)': \(n)") }
                if let o = m.outcome {
                    print("member '\(m.member)': " + (o.problems.isEmpty ? "OK, \(o.clustersChecked) clusters checked" : "\(o.problems.count) problem(s)"))
                } else {
                    print("member '\(m.member)': not verified (\(m.error ?? "no image of this member"))")
                }
            }
            for p in rep.problems { print("problem: \(p)") }
            let id = rep.set.id.map { " (set \($0))" } ?? ""
            print(rep.problems.isEmpty
                  ? "\(image)\(id): OK, \(rep.members.count) member(s) whole and intact, in \(String(format: "%.1f", rep.seconds)) s"
                  : "\(image)\(id): \(rep.problems.count) problem(s)")
        }
        if !rep.problems.isEmpty { throw CLIExit.status(.failed) }
    }
}

func printJSON<T: Encodable>(_ v: T) {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    if let d = try? e.encode(v) { print(String(decoding: d, as: UTF8.self)) }
}
