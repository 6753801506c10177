// The checker: does an image hold, for every block, exactly the last write completed
// before the cut C (and never a write that started at or after C)?
//
// Candidate rule, per block b (times are CLOCK_MONOTONIC ns, C = +infinity without --cut-ns):
//   - An op o is "settled" when it succeeded and o.end < C: it certainly took effect
//     before the cut.
//   - o is superseded when some settled op o2 on b has o2.start > o.end: o2 was issued
//     after o had completed, so o2's data replaced o's before the cut.
//   - Candidates = ops on b with o.start < C that are not superseded. Ops that overlap
//     each other or straddle the cut leave several candidates; an op that started at or
//     after C is never a candidate. Failed ops can be candidates (they may have reached
//     the medium) but never supersede anything.
//   - Equivalently, with M = max start of the settled ops on b: candidates are the ops with
//     start < C and end >= M. That makes the rule O(ops on b).
//   - No settled op on b (never written, e.g. --no-init, or a cut inside the init phase):
//     the block's unlogged earlier content is possible too, so any content is accepted
//     and the block counts as "unlogged".
// The block must equal one candidate: the regenerated stamp of a WRITE (block, seq,
// thread, body and checksum byte for byte), or all zeros for a TRIM/ZERO.
import Glibc

struct CheckOptions {
    /// nil = +infinity: the image must hold the final state.
    var cutNs: UInt64?
    /// Block b of the log is read at byte (b + imageOffsetBlocks) * 4096 of the image.
    var imageOffsetBlocks: Int64 = 0
    /// How many mismatches are described in detail.
    var sampleLimit = 10
}

struct Mismatch {
    let block: UInt64
    let found: String
    let expected: String
}

struct CheckResult {
    var blocks = 0
    var exact = 0
    var ambiguous = 0
    var maxCandidates = 0
    var mismatches = 0
    var unlogged = 0
    var ops = 0
    var cutNs: UInt64?
    var firstBlock: UInt64 = 0
    var samples: [Mismatch] = []
    var mismatchedBlocks: [UInt64] = []
}

final class StampChecker {
    let log: OpLog
    /// Ops of block firstBlock + g are order[groupStart[g] ..< groupStart[g + 1]], by seq.
    private var groupStart: [Int]
    private var order: [UInt32]

    init(log: OpLog) {
        self.log = log
        let groups = Int(log.blockCount)
        var start = [Int](repeating: 0, count: groups + 1)
        for op in log.ops { start[Int(op.block - log.firstBlock) + 1] += 1 }
        for g in 0..<groups { start[g + 1] += start[g] }
        var fill = start
        var order = [UInt32](repeating: 0, count: log.ops.count)
        for (i, op) in log.ops.enumerated() {
            let g = Int(op.block - log.firstBlock)
            order[fill[g]] = UInt32(i)
            fill[g] += 1
        }
        groupStart = start
        self.order = order
    }

    /// Indices into log.ops of the ops on `block`, ascending seq.
    func opIndices(ofBlock block: UInt64) -> ArraySlice<UInt32> {
        guard block >= log.firstBlock, block < log.endBlock else { return [] }
        let g = Int(block - log.firstBlock)
        return order[groupStart[g]..<groupStart[g + 1]]
    }

    /// Candidate op indices for `block` at `cut`, or nil when no op on it is settled.
    func candidates(ofBlock block: UInt64, cut: UInt64, into result: inout [UInt32]) -> Bool {
        result.removeAll(keepingCapacity: true)
        let indices = opIndices(ofBlock: block)
        return log.ops.withUnsafeBufferPointer { ops in
            var settledStart: UInt64?
            for i in indices {
                let op = ops[Int(i)]
                if !op.failed && op.endNs < cut { settledStart = max(settledStart ?? 0, op.startNs) }
            }
            guard let m = settledStart else { return false }
            for i in indices {
                let op = ops[Int(i)]
                if op.startNs < cut && op.endNs >= m { result.append(i) }
            }
            return true
        }
    }

    func check(imagePath: String, options: CheckOptions) throws -> CheckResult {
        let image = try BlockTarget.openForReading(imagePath)
        let cut = options.cutNs ?? UInt64.max
        var result = CheckResult()
        result.blocks = Int(log.blockCount)
        result.ops = log.ops.count
        result.cutNs = options.cutNs
        result.firstBlock = log.firstBlock

        let chunk = 256
        let buffer = AlignedBuffer(bytes: chunk * Stamp.blockSize)
        var scratch: [UInt32] = []
        scratch.reserveCapacity(64)
        var block = log.firstBlock
        while block < log.endBlock {
            let n = Int(min(UInt64(chunk), log.endBlock - block))
            let imageBlock = Int64(bitPattern: block) + options.imageOffsetBlocks
            guard imageBlock >= 0 else {
                throw StampError("block \(block) maps before the start of \(imagePath) (--image-offset-blocks)")
            }
            let offset = UInt64(imageBlock) * UInt64(Stamp.blockSize)
            let got = try image.read(into: buffer.pointer, count: n * Stamp.blockSize, at: offset)
            guard got == n * Stamp.blockSize else {
                throw StampError("\(imagePath) ends at byte \(offset + UInt64(got)); block \(block) "
                                 + "needs bytes up to \(offset + UInt64(n * Stamp.blockSize))")
            }
            for i in 0..<n {
                verify(block: block + UInt64(i), content: buffer.block(i), cut: cut,
                       scratch: &scratch, result: &result, options: options)
            }
            block += UInt64(n)
        }
        return result
    }

    private func verify(block: UInt64, content p: UnsafeRawPointer, cut: UInt64, scratch: inout [UInt32],
                        result: inout CheckResult, options: CheckOptions) {
        guard candidates(ofBlock: block, cut: cut, into: &scratch) else {
            result.unlogged += 1
            return
        }
        result.maxCandidates = max(result.maxCandidates, scratch.count)
        let matched = log.ops.withUnsafeBufferPointer { ops -> Bool in
            if Stamp.isZero(p) {
                return scratch.contains { ops[Int($0)].kind != .write }
            }
            let seq = Stamp.word(p, 2)
            return scratch.contains {
                let op = ops[Int($0)]
                return op.kind == .write && op.seq == seq
                    && Stamp.matches(p, block: block, seq: seq, thread: UInt64(op.thread))
            }
        }
        if matched {
            if scratch.count == 1 { result.exact += 1 } else { result.ambiguous += 1 }
            return
        }
        result.mismatches += 1
        result.mismatchedBlocks.append(block)
        if result.samples.count < options.sampleLimit {
            result.samples.append(Mismatch(block: block, found: describeFound(block: block, content: p, cut: cut),
                                           expected: describeExpected(scratch)))
        }
    }
}
