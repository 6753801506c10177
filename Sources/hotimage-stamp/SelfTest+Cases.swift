// Selftest cases where the checker must fail, the candidate rule on a hand-made log,
// and a --no-init run ended by a stop file.
import Glibc

extension SelfTest {
    /// (a) and (c), plus misdirected, forged and wrongly zeroed blocks: each tampered copy of
    /// the final device must give exactly one mismatch, at the tampered block.
    func tamperCases(checker: StampChecker, device: String) throws {
        let original = try readFile(device)
        let bs = Stamp.blockSize
        func content(_ b: UInt64) -> Stamp.Content {
            original.withUnsafeBytes { Stamp.decode($0.baseAddress! + Int(b) * bs) }
        }
        let range = firstBlock..<(firstBlock + blockCount)
        let stamped = range.filter { if case .stamp = content($0) { return true } else { return false } }
        let zeroed = range.filter { content($0) == .zeros }
        guard stamped.count >= 2, !zeroed.isEmpty else {
            expect("tamper: final state has stamped and zeroed blocks", false,
                   "\(stamped.count) stamped, \(zeroed.count) zeroed")
            return
        }

        func variant(_ name: String, block: UInt64, text: String, _ mutate: (UnsafeMutableRawPointer) -> Void) throws {
            var bytes = original
            bytes.withUnsafeMutableBytes { mutate($0.baseAddress! + Int(block) * bs) }
            try writeFile(path("tamper.img"), bytes)
            let r = try checker.check(imagePath: path("tamper.img"), options: CheckOptions())
            let found = r.samples.first?.found ?? ""
            expect(name, r.mismatches == 1 && r.mismatchedBlocks == [block] && found.contains(text),
                   r.textReport.joined(separator: "\n"))
        }

        let b0 = stamped[0]
        try variant("check (a): one flipped byte in a stamped block is caught", block: b0, text: "checksum bad") {
            $0.storeBytes(of: $0.load(fromByteOffset: 1000, as: UInt8.self) ^ 0x01, toByteOffset: 1000, as: UInt8.self)
        }
        let z = zeroed[0]
        try variant("check (a): one set byte in a zeroed block is caught", block: z, text: "garbage") {
            $0.storeBytes(of: UInt8(1), toByteOffset: 17, as: UInt8.self)
        }

        // (c): an older, superseded write of the same block written back.
        var older: OpRecord?
        for b in stamped where older == nil {
            older = checker.opIndices(ofBlock: b).lazy.map { checker.log.ops[Int($0)] }.first {
                $0.kind == .write && !$0.failed && !$0.isInit && checker.supersedingOp(of: $0, cut: UInt64.max) != nil
            }
        }
        if let o = older {
            try variant("check (c): an older stamp (seq \(o.seq)) written back is caught", block: o.block,
                        text: "older write superseded") {
                Stamp.fill($0, block: o.block, seq: o.seq, thread: UInt64(o.thread))
            }
        } else {
            expect("check (c): a superseded older write exists", false)
        }

        let (x, y) = (stamped[0], stamped[1])
        try variant("check: block \(x)'s stamp in block \(y) (misdirected write) is caught", block: y,
                    text: "misdirected") { dst in
            original.withUnsafeBytes { _ = memcpy(dst, $0.baseAddress! + Int(x) * bs, bs) }
        }
        try variant("check: a forged body with a valid header and checksum is caught", block: b0,
                    text: "body differs") { p in
            Stamp.setWord(p, 100, Stamp.word(p, 100) ^ 0xFF)
            Stamp.setWord(p, Stamp.checksumWord, Stamp.checksum(p))
        }

        var scratch: [UInt32] = []
        let writeOnly = stamped.first { b in
            _ = checker.candidates(ofBlock: b, cut: UInt64.max, into: &scratch)
            return scratch.allSatisfy { checker.log.ops[Int($0)].kind == .write }
        }
        if let w = writeOnly {
            try variant("check: zeros where only writes are candidates are caught", block: w, text: "zeros") {
                _ = memset($0, 0, bs)
            }
        }
    }

    /// A copy holding only the range checks clean with a negative image offset; read
    /// without it, it is too short, which is an I/O error rather than a pass.
    func offsetCases(checker: StampChecker, device: String) throws {
        let bs = Stamp.blockSize
        let bytes = try readFile(device)
        try writeFile(path("range.img"),
                      Array(bytes[Int(firstBlock) * bs ..< Int(firstBlock + blockCount) * bs]))
        let r = try checker.check(imagePath: path("range.img"),
                                  options: CheckOptions(imageOffsetBlocks: -Int64(firstBlock)))
        expect("check: range-only image passes with --image-offset-blocks=-\(firstBlock)", r.mismatches == 0,
               r.summaryLine)
        var threw = false
        do { _ = try checker.check(imagePath: path("range.img"), options: CheckOptions()) } catch { threw = true }
        expect("check: a too-short image is an error", threw)
    }

    /// The candidate rule on a hand-made log (thread 1 everywhere, times in ns):
    ///   block 0: 1 write [10,20]  2 write [30,50]  3 write [45,60]
    ///   block 1: 4 write [10,20]  5 write [15,25]  6 write [30,35]
    ///   block 2: 7 trim  [10,20]  8 write [21,30]
    ///   block 3: 9 write [10,20] 10 write [30,40] (failed, EIO)
    func ruleCases() throws {
        func op(_ seq: UInt64, _ block: UInt64, _ start: UInt64, _ end: UInt64,
                _ kind: OpKind = .write, failed: Bool = false) -> OpRecord {
            OpRecord(seq: seq, block: block, startNs: start, endNs: end, thread: 1, kind: kind,
                     flags: failed ? OpRecord.failedFlag : 0, errorCode: failed ? EIO : 0)
        }
        let log = OpLog(firstBlock: 0, blockCount: 4, seed: 0, threads: 1, initDone: false, ops: [
            op(1, 0, 10, 20), op(2, 0, 30, 50), op(3, 0, 45, 60),
            op(4, 1, 10, 20), op(5, 1, 15, 25), op(6, 1, 30, 35),
            op(7, 2, 10, 20, .trim), op(8, 2, 21, 30),
            op(9, 3, 10, 20), op(10, 3, 30, 40, failed: true),
        ])
        let checker = StampChecker(log: log)
        // Block contents: a seq (its write stamp), 0 = zeros, -1 = garbage.
        func run(_ name: String, cut: UInt64?, _ contents: [Int], mismatches: [UInt64], unlogged: Int = 0,
                 exact: Int? = nil) throws {
            let image = AlignedBuffer(bytes: 4 * Stamp.blockSize)
            for (b, c) in contents.enumerated() {
                let p = image.block(b)
                if c > 0 { Stamp.fill(p, block: UInt64(b), seq: UInt64(c), thread: 1) }
                if c < 0 { memset(p, 0xA5, Stamp.blockSize) }
            }
            try writeFile(path("rule.img"), Array(UnsafeRawBufferPointer(start: image.pointer, count: image.count)))
            let r = try checker.check(imagePath: path("rule.img"), options: CheckOptions(cutNs: cut))
            expect("rule: \(name)", r.mismatchedBlocks == mismatches && r.unlogged == unlogged
                   && (exact == nil || r.exact == exact!), r.textReport.joined(separator: "\n"))
        }
        try run("cut 40 accepts settled, straddling and failed writes", cut: 40, [1, 6, 8, 9],
                mismatches: [], exact: 2)
        try run("cut 40 rejects post-cut, superseded and missing writes", cut: 40, [3, 5, 8, 0],
                mismatches: [0, 1, 3])
        try run("cut 40 accepts the other candidates", cut: 40, [2, 6, 8, 10], mismatches: [])
        try run("cut 28 rejects a write that starts at 30", cut: 28, [2, 5, 0, 9], mismatches: [0])
        try run("cut 28 accepts overlapping settled writes", cut: 28, [1, 4, 8, 9], mismatches: [])
        try run("final state: overlap is ambiguous, superseded trim is not zeros", cut: nil, [2, 6, 0, 10],
                mismatches: [2])
        try run("final state rejects the superseded first write", cut: nil, [1, 6, 8, 9], mismatches: [0])
        try run("cut 15: nothing settled, any content is unlogged", cut: 15, [3, -1, 8, 0],
                mismatches: [], unlogged: 4)
    }

    /// A --no-init run ended by a stop file created 300 ms after the ready file appeared.
    func stopFileRun() throws {
        let device = path("stop.img")
        try createFile(device)
        let stopFile = path("stop"), readyFile = path("ready")
        var config = WriterConfig(devicePath: device, blockCount: 64, seed: 7)
        config.threads = 2
        config.stopFile = stopFile
        config.readyFile = readyFile
        config.burstNs = 100_000_000
        config.pauseNs = 50_000_000
        config.trimPercent = 5
        config.zeroPercent = 5
        config.doInit = false
        config.handleSignals = false
        let helper = spawnThread {
            let give = Sys.monotonicNs() + 5_000_000_000
            while !Sys.fileExists(readyFile) && Sys.monotonicNs() < give { Sys.sleepNs(5_000_000) }
            Sys.sleepNs(300_000_000)
            _ = try? self.createFile(stopFile)
        }
        let t0 = Sys.monotonicNs()
        let log = try StampWriter(config: config).run()
        let elapsed = Sys.monotonicNs() - t0
        pthread_join(helper, nil)
        expect("writer: a stop file ends an open-ended run (\(elapsed / 1_000_000) ms, \(log.ops.count) ops)",
               elapsed < 3_000_000_000 && !log.ops.isEmpty && !log.initDone && log.ops.allSatisfy { !$0.failed })
        let r = try StampChecker(log: log).check(imagePath: device, options: CheckOptions())
        expect("check: the --no-init run passes (\(r.unlogged) untouched blocks unlogged)",
               r.mismatches == 0 && r.exact + r.ambiguous + r.unlogged == 64, r.textReport.joined(separator: "\n"))
    }
}
