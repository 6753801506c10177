import Testing
import Foundation
@testable import QCow2
@Test func tmpOne() throws {
    let lab = try DamageLab(compression: .zlib(level: 6))
    let s = try lab.reader.clusterState(9)
    print("STATE", s, lab.streamLength(9) as Any)
    guard case .compressed(let host, _) = s else { return }
    let report = lab.verify { $0[Int(host) + 3008] ^= 1 }
    print("REPORT", report)
}
