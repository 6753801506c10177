import Foundation
import HotControl
import Testing
@testable import HotImager

/// SessionClient.readChanges: the change map file a `map` reply names is
/// taken only when it is exactly what the reply says.
@Suite struct ChangesFileTests {
    func write(_ words: [UInt64]) -> String {
        let path = NSTemporaryDirectory() + "/changes-\(UUID().uuidString).bin"
        var bytes = Data()
        for w in words { withUnsafeBytes(of: w.littleEndian) { bytes.append(contentsOf: $0) } }
        FileManager.default.createFile(atPath: path, contents: bytes)
        return path
    }
    func info(_ path: String?, changed: UInt64) -> ChangeInfo {
        ChangeInfo(trusted: true, since: "x", reason: nil, clusterBytes: 65536, changedClusters: changed, path: path)
    }

    @Test func readsTheBitsAsWritten() throws {
        let p = write([0b1011, 1 << 63, 0x3])   // 130 clusters: 3 words, the last two bits in use
        defer { unlink(p) }
        let w = try SessionClient.readChanges(info(p, changed: 6), clusters: 130)
        #expect(w == [0b1011, 1 << 63, 0x3])
    }

    @Test func refusesWhatDoesNotMatchTheReply() {
        let short = write([1, 2])
        let past = write([0, 0, 1 << 5])          // bit 133 of a 130-cluster map
        let good = write([1, 0, 0])
        defer { unlink(short); unlink(past); unlink(good) }
        #expect(throws: (any Error).self) { try SessionClient.readChanges(info(short, changed: 2), clusters: 130) }
        #expect(throws: (any Error).self) { try SessionClient.readChanges(info(past, changed: 1), clusters: 130) }
        #expect(throws: (any Error).self) { try SessionClient.readChanges(info(good, changed: 2), clusters: 130) }
        #expect(throws: (any Error).self) { try SessionClient.readChanges(info(nil, changed: 0), clusters: 130) }
        #expect(throws: (any Error).self) { try SessionClient.readChanges(info("/nonexistent/changes.bin", changed: 0), clusters: 130) }
        #expect((try? SessionClient.readChanges(info(good, changed: 1), clusters: 130)) == [1, 0, 0])
    }
}
