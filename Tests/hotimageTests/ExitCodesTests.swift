import Testing
import HotErrors
@testable import hotimage

struct ExitCodesTests {
    @Test("the table: each kind's exit code")
    func table() {
        let expected: [FailureKind: Int32] = [
            .failed: 1, .usage: 2, .refused: 2, .sessionFailed: 3, .hookAborted: 4,
            .writerFreezeFailed: 5, .completeWithWarnings: 6, .unreachable: 7, .interrupted: 130,
        ]
        for k in FailureKind.allCases { #expect(ExitCodes.code(k) == expected[k], "\(k)") }
        #expect(ExitCodes.code(nil as FailureKind?) == 0)
    }

    @Test("no exit code means two kinds of outcome, but 2 (usage or refused: nothing done)")
    func oneMeaningPerNumber() {
        var byCode: [Int32: Set<FailureKind>] = [:]
        for k in FailureKind.allCases { byCode[ExitCodes.code(k), default: []].insert(k) }
        #expect(byCode[0] == nil)
        for (code, kinds) in byCode where kinds.count > 1 {
            #expect(code == 2 && kinds == [.usage, .refused], "exit \(code) means \(kinds)")
        }
    }

    @Test("each command's help lists a code once, in order")
    func listsAreOrdered() {
        for (command, lines) in ExitCodes.byCommand {
            let codes = lines.map(\.code)
            #expect(codes == codes.sorted() && Set(codes).count == codes.count, "\(command): \(codes)")
            #expect(codes.first == 0, "\(command) lists success first")
        }
    }

    @Test("the helps print their lists with the table's numbers")
    func helpsPrintTheTable() {
        let backup = ExitCodes.help(ExitCodes.backup)
        #expect(backup.contains("\n  5  a writer could not freeze a component; nothing was imaged"))
        #expect(backup.contains("\n  130 interrupted"))
        #expect(backup.contains("\n  2  refused: usage, the image exists, offline mode on a volume in\n     use (mounted"))
        #expect(ExitCodes.help(ExitCodes.vm).contains("\n  7  libvirt cannot be reached"))
        for (help, lines) in [(BackupCommand.configuration.discussion, ExitCodes.backup),
                              (RestoreCommand.configuration.discussion, ExitCodes.restore),
                              (InfoCommand.configuration.discussion, ExitCodes.info),
                              (VerifyCommand.configuration.discussion, ExitCodes.verify),
                              (WritersCommand.configuration.discussion, ExitCodes.writers),
                              (Status.configuration.discussion, ExitCodes.status),
                              (VMCommand.configuration.discussion, ExitCodes.vm)] {
            #expect(help.contains(ExitCodes.help(lines)))
        }
    }
}
