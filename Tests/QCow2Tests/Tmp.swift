import Testing
import Foundation
@testable import QCow2
@Test(arguments: [QCow2Compression.zstd(level: 1), .zlib(level: 6), .zstd(level: 19)])
func tmpSweep(_ c: QCow2Compression) throws {
    let lab = try DamageLab(compression: c)
    let compressed = try lab.clusters { if case .compressed = $0 { return true } else { return false } }
    var cases = 0, missed = 0
    for (cl, state) in compressed {
        guard case .compressed(let host, _) = state, let n = lab.streamLength(cl) else { continue }
        for pos in 0..<n {
            for x: UInt8 in [0x01, 0x80] {
                cases += 1
                let report = lab.verify { $0[Int(host) + pos] ^= x }
                let data = report.problems.filter { $0.kind == .data && $0.cluster == cl }
                if data.isEmpty { missed += 1; if missed < 10 { print("MISSED", c, cl, pos, n, x) } }
            }
        }
    }
    print("SWEEP", c, cases, "missed", missed)
}
