// `hotimage-stamp selftest`: a real writer run against a temporary regular file in /tmp,
// checked in its final state and at a cut taken in a quiescent pause, followed by cases
// where the checker must fail (SelfTest+Cases.swift).
import Glibc

final class SelfTest {
    let firstBlock: UInt64 = 8
    let blockCount: UInt64 = 256
    let pauseNs: UInt64 = 150_000_000

    private(set) var passed = 0
    private(set) var failed = 0
    var dir = ""

    /// Runs every case; returns the number of failed checks.
    func run() throws -> Int {
        var template = Array("/tmp/hotimage-stamp-selftest.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw StampError.errno("mkdtemp in /tmp") }
        dir = String(cString: made)
        print("selftest: working in \(dir)")

        do {
            try mainRun()
            try ruleCases()
            try stopFileRun()
        } catch {
            expect("no I/O error", false, "\(error)")
        }

        print("selftest: \(passed) passed, \(failed) failed")
        if failed == 0 {
            removeTree(dir)
        } else {
            print("selftest: files kept in \(dir)")
        }
        return failed
    }

    func expect(_ name: String, _ ok: Bool, _ detail: @autoclosure () -> String = "") {
        if ok {
            passed += 1
            print("selftest: ok   \(name)")
        } else {
            failed += 1
            print("selftest: FAIL \(name): \(detail())")
        }
    }

    func path(_ name: String) -> String { dir + "/" + name }

    // MARK: The main run

    private func mainRun() throws {
        let device = path("device.img")
        try createFile(device)
        var config = WriterConfig(devicePath: device, blockCount: blockCount, seed: 0x5EED_2024)
        config.logPath = path("ops.log")
        config.firstBlock = firstBlock
        config.threads = 2
        config.durationNs = 1_500_000_000
        config.burstNs = 250_000_000
        config.pauseNs = pauseNs
        config.trimPercent = 10
        config.zeroPercent = 10
        config.handleSignals = false

        // In the first pause no op is in flight: copy the device there, like a snapshot
        // taken at that instant, and take that instant as the cut.
        var cut: UInt64 = 0
        var copyError: Error?
        let writer = StampWriter(config: config)
        writer.onQuiescent = { [self] pause in
            guard pause == 1 else { return }
            cut = Sys.monotonicNs()
            do { try copyFile(device, path("pause1.img")) } catch { copyError = error }
        }
        let log = try writer.run()
        if let copyError { throw copyError }
        let summary = WriterSummary(ops: log.ops)
        print("selftest: writer: \(summary.line.dropFirst("stamp: ".count)), cut \(cut)")

        expect("writer: no failed ops", summary.failed == 0, summary.failureLine ?? "")
        expect("writer: init wrote every block, then writes, trims and zeroes followed",
               log.initDone && summary.writes > Int(blockCount) + 100 && summary.trims > 10 && summary.zeroes > 10,
               "\(summary.line)")
        expect("writer: seqs are exactly 1...\(log.ops.count)",
               log.ops.enumerated().allSatisfy { $0.element.seq == UInt64($0.offset + 1) })
        expect("writer: pause 1 happened after init", cut > writer.mainPhaseStartNs, "cut \(cut)")
        let inFlight = log.ops.filter { $0.endNs > cut && $0.startNs < cut + pauseNs }
        expect("writer: pause 1 is a window of >= \(pauseNs / 1_000_000) ms with no op in flight",
               inFlight.isEmpty, "\(inFlight.count) ops overlap it, first seq \(inFlight.first?.seq ?? 0)")
        let loaded = try OpLog.load(from: path("ops.log"))
        expect("log: round trip through the file", sameLog(loaded, log))

        let checker = StampChecker(log: loaded)
        let final = try checker.check(imagePath: device, options: CheckOptions())
        expect("check: final state passes", final.mismatches == 0 && final.unlogged == 0
               && final.exact + final.ambiguous == Int(blockCount), final.textReport.joined(separator: "\n"))
        print("selftest:   \(final.summaryLine)")

        let atCut = try checker.check(imagePath: path("pause1.img"), options: CheckOptions(cutNs: cut))
        expect("check: copy taken in pause 1 passes at its cut", atCut.mismatches == 0 && atCut.unlogged == 0,
               atCut.textReport.joined(separator: "\n"))
        print("selftest:   \(atCut.summaryLine)")

        try cutCases(checker: checker, device: device, cut: cut)
        try tamperCases(checker: checker, device: device)
        try offsetCases(checker: checker, device: device)
    }

    /// (b): the final state checked at the mid-run cut must fail, and exactly where
    /// a write that started after the cut is what the block holds.
    private func cutCases(checker: StampChecker, device: String, cut: UInt64) throws {
        let result = try checker.check(imagePath: device, options: CheckOptions(cutNs: cut))
        print("selftest:   \(result.summaryLine)")
        let image = try readFile(device)
        var lateBlocks: Set<UInt64> = []
        for b in firstBlock..<(firstBlock + blockCount) {
            let content = image.withUnsafeBytes { Stamp.decode($0.baseAddress! + Int(b) * Stamp.blockSize) }
            if case let .stamp(_, seq, _) = content, let op = checker.op(block: b, seq: seq), op.startNs >= cut {
                lateBlocks.insert(b)
            }
        }
        let mismatched = Set(result.mismatchedBlocks)
        expect("check (b): final state at the pause-1 cut fails", result.mismatches > 0 && !lateBlocks.isEmpty,
               "\(result.mismatches) mismatches, \(lateBlocks.count) blocks hold post-cut writes")
        expect("check (b): every block holding a write started after the cut is a mismatch (\(lateBlocks.count))",
               lateBlocks.isSubset(of: mismatched), "missed \(lateBlocks.subtracting(mismatched).sorted().prefix(5))")
        let unexplained = mismatched.filter { b in
            !checker.opIndices(ofBlock: b).contains { checker.log.ops[Int($0)].startNs >= cut }
        }
        expect("check (b): every mismatch is a block changed after the cut", unexplained.isEmpty,
               "unexplained blocks \(unexplained.sorted().prefix(5))")
        expect("check (b): mismatch lines name the post-cut write",
               result.samples.contains { $0.found.contains("after the cut") },
               result.samples.first.map { "\($0.found)" } ?? "no samples")

        let stale = try checker.check(imagePath: path("pause1.img"), options: CheckOptions())
        expect("check: the pause-1 copy fails as the final state", stale.mismatches > 0, stale.summaryLine)
    }

    private func sameLog(_ a: OpLog, _ b: OpLog) -> Bool {
        guard a.firstBlock == b.firstBlock, a.blockCount == b.blockCount, a.seed == b.seed,
              a.threads == b.threads, a.initDone == b.initDone, a.ops.count == b.ops.count else { return false }
        return zip(a.ops, b.ops).allSatisfy { x, y in
            x.seq == y.seq && x.block == y.block && x.startNs == y.startNs && x.endNs == y.endNs
                && x.thread == y.thread && x.kind == y.kind && x.flags == y.flags && x.errorCode == y.errorCode
        }
    }

    // MARK: Files

    func createFile(_ path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StampError.errno("cannot create \(path)") }
        close(fd)
    }

    func readFile(_ path: String) throws -> [UInt8] {
        try OpLog.readWholeFile(path)
    }

    func writeFile(_ path: String, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StampError.errno("cannot create \(path)") }
        defer { close(fd) }
        var done = 0
        try bytes.withUnsafeBytes { raw in
            while done < raw.count {
                let n = write(fd, raw.baseAddress! + done, raw.count - done)
                guard n > 0 else { throw StampError.errno("cannot write \(path)") }
                done += n
            }
        }
    }

    func copyFile(_ from: String, _ to: String) throws {
        try writeFile(to, readFile(from))
    }

    private func removeTree(_ dir: String) {
        guard let d = opendir(dir) else { return }
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name != "." && name != ".." { unlink(dir + "/" + name) }
        }
        closedir(d)
        rmdir(dir)
    }
}
