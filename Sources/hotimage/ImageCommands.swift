import ArgumentParser
import Foundation
import HotErrors
import HotImager

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Write an image back to a block device or file.",
        discussion: """
        Verifies IMAGE (every checksum) and refuses a damaged one before touching \
        TARGET; then writes every allocated cluster of IMAGE to TARGET, discards (or zeroes) \
        the rest so TARGET reads exactly as the imaged volume, and flushes. A TARGET \
        that does not exist is created as a file of the volume's size.

        Refuses: an incomplete image (kept by --keep-partial), a mounted or busy \
        target, a target smaller than the volume, a target that already holds a \
        filesystem (unless --force).

        Files that writers handed over when they thawed (PostgreSQL's backup label, \
        as backup_label.hotimage in the data directory) are kept in \
        the image; once the volume is written, TARGET is mounted in a private \
        directory (through a loop device if it is a file), they are written at their \
        place, owned like their directory, mode 0600, and TARGET is unmounted \
        (--no-writer-files skips this; 'hotimage info --json' shows them).

        \(ExitCodes.help(ExitCodes.restore))
        """)

    @Argument(help: "The qcow2 image.") var image: String
    @Argument(help: "Block device or file to write.") var target: String
    @Flag(help: "Overwrite a target that holds a filesystem.") var force = false
    @Flag(help: "Leave unused space as it is (faster on a target known to read as zeros).") var noDiscard = false
    @Flag(help: "Skip verifying the image before writing (faster; a damaged image is then noticed only where decompression fails).") var noVerify = false
    @Flag(help: "Do not write the writers' files (e.g. PostgreSQL's backup_label) into the restored filesystem.") var noWriterFiles = false
    @Flag(help: "Print the summary as JSON on stdout.") var json = false

    func run() throws {
        var o = RestoreOptions(image: image, target: target)
        o.verifyFirst = !noVerify
        o.writerFiles = !noWriterFiles
        o.force = force
        o.discard = !noDiscard
        let r = TerminalReporter(quiet: json)
        do {
            let s = try RestoreJob.run(o, reporter: r)
            if json { printJSON(s) } else {
                r.log(String(format: "restored %@ (%llu clusters) to %@ in %.1f s; %@ of unused space %@", formatBytes(s.bytes),
                             s.clusters, s.target, s.seconds, formatBytes(s.zeroedBytes), s.discarded ? "discarded" : "left as it was"))
            }
        } catch let e as RestoreFailure {
            throw CLIExit.fail(e.kind, e.description)
        }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show what an image holds: size, compression, source, filesystem, snapshot.",
        discussion: """
        \(ExitCodes.help(ExitCodes.info))
        """)

    @Argument(help: "The qcow2 image.") var image: String
    @Flag(help: "Print JSON on stdout.") var json = false

    func run() throws {
        let info: ImageInfo
        do { info = try ImageInfo.read(image) } catch { throw CLIExit.fail(.failed, "\(error)") }
        if json { printJSON(info) } else { print(info.text, terminator: "") }
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every stored byte of an image against its checksums.",
        discussion: """
        Checks the qcow2 structures (header, L1/L2 tables, refcounts, as qemu-img \
        check does) and hotimage's checksums of the metadata and of every cluster \
        (each is decompressed); names the guest region of each problem.

        \(ExitCodes.help(ExitCodes.verify))
        """)

    @Argument(help: "The qcow2 image.") var image: String
    @Flag(help: "Print the report as JSON on stdout.") var json = false

    func run() throws {
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
}

func printJSON<T: Encodable>(_ v: T) {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    if let d = try? e.encode(v) { print(String(decoding: d, as: UTF8.self)) }
}
