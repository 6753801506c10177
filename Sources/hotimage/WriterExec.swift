// `hotimage writer-exec NAME VERB`: serves one built-in writer through the
// writer protocol (HotWriters/WriterProtocol.swift). Hidden: backup and
// `writers` run it; it is also how a site tests a built-in by hand.
import ArgumentParser
import Foundation
import HotWriters

struct WriterExecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "writer-exec",
        abstract: "Serve a built-in writer over the writer protocol (internal).",
        shouldDisplay: false)

    @Argument(help: "The built-in writer.") var name: String
    @Argument(help: "components or freeze.") var verb: String
    @Option(help: ArgumentHelp("A writer setting (repeatable).", valueName: "key=value")) var setting: [String] = []

    func run() throws {
        guard let w = builtinWriter(named: name) else {
            throw CLIExit.fail(.usage, "no built-in writer '\(name)' (there are: \(builtinWriters.map { $0.name }.joined(separator: ", ")))")
        }
        let s: WriterSettings
        do { s = try WriterSettings.parse(arguments: setting) } catch { throw CLIExit.fail(.usage, "\(error)") }
        let code = WriterExec.serve(w, verb: verb, settings: s)
        if code != 0 { throw ExitCode(code) }
    }
}
