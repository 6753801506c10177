// hotimage-stamp: stamped-block writer and checker for point-in-time snapshot proofs.
// See StampCommand.swift for the command line, Stamp.swift for the block layout,
// OpLog.swift for the log format and StampChecker.swift for the candidate rule.
import ArgumentParser
import Glibc

do {
    var command = try HotStamp.parseAsRoot()
    try command.run()
} catch {
    // Help, --version and our own exit codes (1, 3) go through ArgumentParser;
    // everything else is a usage or I/O error: exit status 2.
    if error is ExitCode || HotStamp.exitCode(for: error) == .success {
        HotStamp.exit(withError: error)
    }
    warn(HotStamp.fullMessage(for: error))
    exit(2)
}
