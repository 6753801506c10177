// The exit codes: one table from failure kinds (HotErrors) to numbers, and
// what each command's help says about the codes it returns. The helps
// print these lists, and the commands exit through CLIExit with a kind, so
// a help cannot promise a number the command does not use for that kind.
// A number means the same kind of outcome in every command (2 is both a
// usage error and a refusal: nothing was done).
import ArgumentParser
import HotErrors
import HotOS

enum ExitCodes {
    /// The one table.
    static func code(_ kind: FailureKind) -> Int32 {
        switch kind {
        case .failed: return 1
        case .usage, .refused: return 2
        case .sessionFailed: return 3
        case .hookAborted: return 4
        case .writerFreezeFailed: return 5
        case .completeWithWarnings: return 6
        case .unreachable: return 7
        case .interrupted: return 130
        }
    }

    /// nil is success: 0.
    static func code(_ outcome: FailureKind?) -> Int32 { outcome.map { code($0) } ?? 0 }

    /// One line of a help's EXIT CODES list: an outcome (nil: success) and
    /// what it means for that command, one string per printed line.
    struct Line {
        var outcome: FailureKind?
        var meaning: [String]
        init(_ outcome: FailureKind?, _ meaning: String...) {
            self.outcome = outcome
            self.meaning = meaning
        }
        var code: Int32 { ExitCodes.code(outcome) }
    }

    /// "EXIT CODES" and the lines, as the helps print them.
    static func help(_ lines: [Line], title: String = "EXIT CODES") -> String {
        var out = [title]
        for l in lines {
            let c = "\(l.code)"
            out.append("  " + c + String(repeating: " ", count: max(1, 3 - c.count)) + l.meaning[0])
            out += l.meaning.dropFirst().map { "     " + $0 }
        }
        return out.joined(separator: "\n")
    }

    // MARK: each command's list

    static let overview: [Line] = [
        Line(nil, "success"),
        Line(.failed, "an operation failed (the message says which and why)"),
        Line(.usage, "usage error, or refused"),
        Line(.sessionFailed, "the backup session failed (the live volume is unharmed)"),
    ]

    static let backup: [Line] = [
        Line(nil, "the image is complete"),
        Line(.failed, "reading the volume or writing the image failed"),
        Line(.refused, "refused: usage, the image exists, offline mode on a volume in",
             "use (mounted read-write, stacked on, or open), online mode",
             "without HotCore or device-mapper, a backend the source does not",
             "have"),
        Line(.sessionFailed, "the snapshot or the session failed, e.g. the dm-snapshot COW store",
             "overflowed (the live volume is unharmed)"),
        Line(.hookAborted, "a before-snapshot hook failed; nothing was done"),
        Line(.writerFreezeFailed, "a writer could not freeze a component; nothing was imaged"),
        Line(.completeWithWarnings, "the image is complete but an after-snapshot or after-backup hook,",
             "or a writer's thaw, failed"),
        Line(.interrupted, "interrupted"),
    ]

    static let restore: [Line] = [
        Line(nil, "restored (of a set directory: every member asked for)"),
        Line(.failed, "reading an image or writing a target failed (of a set: the members",
             "before it are restored, the rest are not; the output says which)"),
        Line(.refused, "refused (see above; an incremental's base missing or not the image",
             "it was made against) or usage error; nothing was written"),
    ]

    static let info: [Line] = [
        Line(nil, "shown (a set directory's problems are shown, not failed on)"),
        Line(.failed, "the file is not a readable qcow2 image, or the directory cannot be read"),
    ]

    static let verify: [Line] = [
        Line(nil, "the image is intact (a set directory: whole, and every member intact)"),
        Line(.failed, "problems were found (listed), or the image is incomplete"),
        Line(.refused, "the file cannot be opened as a qcow2 image, the directory cannot be",
             "read, an incremental's base is missing or is not the image it was",
             "made against, or usage error"),
    ]

    static let merge: [Line] = [
        Line(nil, "merged: the result is complete and in place"),
        Line(.failed, "the chain does not verify, or reading or writing failed (IMAGE is",
             "unchanged)"),
        Line(.refused, "not an incremental, a base missing or not the image it was made",
             "against, --into exists, or usage error; nothing was written"),
    ]

    static let writers: [Line] = [
        Line(nil, "listed"),
        Line(.failed, "a writer failed to list its components (said on stderr and in the list)"),
        Line(.usage, "usage error, or an unknown writer named"),
    ]

    static let status: [Line] = [
        Line(nil, "shown"),
        Line(.failed, "no daemon of that name, or a daemon did not answer (said on stderr)"),
        Line(.usage, "usage error"),
    ]

    static let attach: [Line] = [
        Line(nil, "attached: the protected device is the last line of the output"),
        Line(.failed, "DEVICE is mounted, held or too small, a daemon of that name is",
             "attached, or the daemon could not start (the message says why)"),
        Line(.usage, "usage error, or refused: not root, no nbd or device-mapper in the",
             "kernel, a buffer directory on DEVICE or on anything stacked on it"),
    ]

    static let detach: [Line] = [
        Line(nil, "detached, or what a dead daemon left was removed"),
        Line(.failed, "no such daemon, detach refused (mounted, a session running, open),",
             "or a leftover could not be removed (it is named; run detach again)"),
        Line(.usage, "usage error"),
    ]

    static let vm: [Line] = [
        Line(nil, "done for every domain"),
        Line(.failed, "some domain could not be stopped or resumed (the others were; the",
             "record lists what was stopped)"),
        Line(.refused, "usage or refused: no selection or two, an unknown domain name",
             "(nothing was done), a volume that is not a directory, a bad record"),
        Line(.unreachable, "libvirt cannot be reached (virsh missing, the daemon not answering)"),
    ]

    /// The lists the helps print, by command (for the tests).
    static let byCommand: [(command: String, lines: [Line])] = [
        ("hotimage", overview), ("backup", backup), ("restore", restore), ("info", info),
        ("verify", verify), ("writers", writers), ("status", status), ("vm", vm),
        ("attach", attach), ("detach", detach),
    ]
}

enum CLIExit {
    /// One line on stderr, and the kind's exit code.
    static func fail(_ kind: FailureKind, _ message: String) -> ExitCode {
        writeStderr("hotimage: \(message)\n")
        return status(kind)
    }

    /// A failure: one line on stderr, exit code of `failed`.
    static func fail(_ message: String) -> ExitCode { fail(.failed, message) }

    /// The exit code of an outcome already reported (nil: success).
    static func status(_ outcome: FailureKind?) -> ExitCode { ExitCode(ExitCodes.code(outcome)) }
}
