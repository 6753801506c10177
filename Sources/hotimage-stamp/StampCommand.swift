// Command line of hotimage-stamp. Exit status: 0 ok; 1 check found mismatches (or a
// selftest case failed); 2 usage or I/O error; 3 the writer had a failed op ("live write
// failed"; the log is still written).
//
//   write DEVICE --log LOG --blocks N [--first-block 0] [--threads 2]
//         [--duration SECONDS] [--stop-file PATH] [--burst-ms 300] [--pause-ms 400]
//         [--trim-percent 0] [--zero-percent 0] [--seed S] [--no-init] [--ready-file PATH]
//     stdout: "stamp: N writes, T trims, Z zeroes, F failed, seq max M,
//              first start S ns, last end E ns" (counts and times include the init phase)
//   check LOG IMAGE [--cut-ns C] [--image-offset-blocks K] [--json]
//     stdout: "check: B blocks, E exact, A ambiguous (k candidates max), M mismatches",
//             then "check: U blocks unlogged ..." if U > 0, then up to 10 "mismatch: ..." lines
//   selftest
//   dump LOG [--block B]
import ArgumentParser
import Glibc

struct HotStamp: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hotimage-stamp",
        abstract: "Stamped-block writer and checker for point-in-time snapshot proofs.",
        subcommands: [WriteCommand.self, CheckCommand.self, SelftestCommand.self, DumpCommand.self])
}

struct WriteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "write",
        abstract: "Stamp blocks of DEVICE with logged writes, trims and zeroes in bursts.")

    @Argument(help: "Block device or regular file.")
    var device: String

    @Option(help: "Where to write the op log (written at the end).")
    var log: String

    @Option(help: "Number of 4 KiB blocks in the range.")
    var blocks: UInt64

    @Option(help: "First block of the range.")
    var firstBlock: UInt64 = 0

    @Option(help: "Writer threads in the main phase.")
    var threads: Int = 2

    @Option(help: "Main-phase duration in seconds (default: until --stop-file exists or SIGTERM/SIGINT).")
    var duration: Double?

    @Option(help: "Stop the main phase once this file exists.")
    var stopFile: String?

    @Option(help: "Length of a write burst, ms.")
    var burstMs: Int = 300

    @Option(help: "Length of the common pause after each burst, ms (0: no pauses).")
    var pauseMs: Int = 400

    @Option(help: "Percentage of ops that are TRIM.")
    var trimPercent: Int = 0

    @Option(help: "Percentage of ops that are ZERO.")
    var zeroPercent: Int = 0

    @Option(help: "PRNG seed (default: from the clock; printed on stderr).")
    var seed: UInt64?

    @Flag(help: "Skip the init phase that stamps every block once.")
    var noInit = false

    @Option(help: "Create this file when the init phase is done (holds the CLOCK_MONOTONIC ns).")
    var readyFile: String?

    func validate() throws {
        guard blocks > 0 else { throw ValidationError("--blocks must be positive") }
        let limit = UInt64(Int64.max) / UInt64(Stamp.blockSize)
        guard firstBlock < limit, blocks <= limit - firstBlock else {
            throw ValidationError("block range too large")
        }
        guard (1...256).contains(threads) else { throw ValidationError("--threads must be 1...256") }
        guard burstMs > 0 else { throw ValidationError("--burst-ms must be positive") }
        guard pauseMs >= 0 else { throw ValidationError("--pause-ms must not be negative") }
        guard (0...100).contains(trimPercent), (0...100).contains(zeroPercent), trimPercent + zeroPercent <= 100 else {
            throw ValidationError("--trim-percent and --zero-percent must be 0...100 and add up to at most 100")
        }
        if let duration, !(duration > 0) { throw ValidationError("--duration must be positive") }
    }

    func run() throws {
        let seed = self.seed ?? (Sys.monotonicNs() ^ UInt64(getpid()) &* 0x9E37_79B9_7F4A_7C15)
        var config = WriterConfig(devicePath: device, blockCount: blocks, seed: seed)
        config.logPath = log
        config.firstBlock = firstBlock
        config.threads = threads
        config.durationNs = duration.map { UInt64($0 * 1e9) }
        config.stopFile = stopFile
        config.burstNs = UInt64(burstMs) * 1_000_000
        config.pauseNs = UInt64(pauseMs) * 1_000_000
        config.trimPercent = trimPercent
        config.zeroPercent = zeroPercent
        config.doInit = !noInit
        config.readyFile = readyFile
        warn("stamp: \(device) blocks [\(firstBlock), \(firstBlock + blocks)), \(threads) threads, seed \(seed)")
        let log = try StampWriter(config: config).run()
        let summary = WriterSummary(ops: log.ops)
        print(summary.line)
        if let failure = summary.failureLine {
            warn(failure)
            throw ExitCode(3)
        }
    }
}

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check that IMAGE holds the state of the logged range at the cut.")

    @Argument(help: "Op log written by 'write'.")
    var log: String

    @Argument(help: "File or device holding the blocks (block b at byte b*4096).")
    var image: String

    @Option(help: "The cut, CLOCK_MONOTONIC ns (default: +infinity, i.e. the final state).")
    var cutNs: UInt64?

    @Option(parsing: .unconditional, help: "Read block b at byte (b + this) * 4096; may be negative.")
    var imageOffsetBlocks: Int64 = 0

    @Flag(help: "Print the summary as one JSON object.")
    var json = false

    func run() throws {
        let opLog = try OpLog.load(from: log)
        let checker = StampChecker(log: opLog)
        let result = try checker.check(
            imagePath: image, options: CheckOptions(cutNs: cutNs, imageOffsetBlocks: imageOffsetBlocks))
        if json {
            print(result.json)
        } else {
            for line in result.textReport { print(line) }
        }
        if result.mismatches > 0 { throw ExitCode(1) }
    }
}

struct SelftestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Run writer and checker against a temporary file in /tmp, including must-fail cases.")

    func run() throws {
        let failed = try SelfTest().run()
        if failed > 0 { throw ExitCode(1) }
    }
}

struct DumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Print an op log as text: one line per op.")

    @Argument(help: "Op log written by 'write'.")
    var log: String

    @Option(help: "Only ops on this block.")
    var block: UInt64?

    func run() throws {
        let opLog = try OpLog.load(from: log)
        print("# blocks [\(opLog.firstBlock), \(opLog.endBlock)) threads \(opLog.threads) seed \(opLog.seed) "
              + "init \(opLog.initDone ? "done" : "no") ops \(opLog.ops.count)")
        print("# seq block kind thread start_ns end_ns [init] [failed errno]")
        for op in opLog.ops where block == nil || op.block == block! {
            var line = "\(op.seq) \(op.block) \(op.kind.name) \(op.thread) \(op.startNs) \(op.endNs)"
            if op.isInit { line += " init" }
            if op.failed { line += " failed \(op.errorCode)" }
            print(line)
        }
    }
}
