// ChainTests.swift — incremental images: backing files, digest tables,
// QCow2Chain, verify through a chain, and folding links. qemu-img is the
// oracle where it is installed (the qemu parts are skipped otherwise).

import Foundation
import Testing
@testable import QCow2

/// One link of a test chain: what it writes over its backing file.
enum Put {
    case data(seed: UInt64)
    case zero
}

/// A chain built link by link with a byte model of each point in time.
struct ChainLab {
    let dir = TempDir("chain")
    let bits: Int
    let cs: Int
    let size: Int
    let compression: QCow2Compression
    /// The guest contents at each link's point in time (oldest first).
    var models: [[UInt8]] = []
    /// Paths, oldest first.
    var paths: [String] = []

    init(bits: Int, size: Int, compression: QCow2Compression = .zstd(level: 1)) {
        self.bits = bits
        cs = 1 << bits
        self.size = size
        self.compression = compression
    }

    var clusters: UInt64 { UInt64((size + cs - 1) / cs) }

    static func clusterBytes(_ seed: UInt64, _ n: Int) -> [UInt8] {
        var rng = SeededRNG(seed: seed)
        if seed % 3 == 0 {          // compressible
            return (0..<n).map { UInt8(truncatingIfNeeded: ($0 / 7) &+ Int(seed)) }
        }
        return (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
    }

    /// Adds a link named `name` over the last one (relative backing name).
    /// Digests: the written clusters' from write(); every other cluster
    /// with content gets its digest copied from the model (as the imager
    /// copies the base's). Returns the path.
    @discardableResult
    mutating func add(_ name: String, _ puts: [UInt64: Put], setDigests: Bool = true,
                      backingName: String? = nil) throws -> String {
        let path = dir.file(name)
        let backing = paths.last.map { QCow2Backing(fileName: backingName ?? URL(fileURLWithPath: $0).lastPathComponent) }
        let w = try QCow2Writer(path: path, virtualSize: UInt64(size), clusterBits: bits, compression: compression,
                                backing: backing)
        let enc = ClusterEncoder(compression: compression, clusterSize: cs)
        var model = models.last ?? [UInt8](repeating: 0, count: size)
        for (c, put) in puts.sorted(by: { $0.key < $1.key }) {
            let lo = Int(c) * cs, hi = min(size, lo + cs)
            switch put {
            case .data(let seed):
                let bytes = Self.clusterBytes(seed, hi - lo)
                model.replaceSubrange(lo..<hi, with: bytes)
                try w.write(bytes.withUnsafeBytes { enc.encode(index: c, data: $0) })
            case .zero:
                model.replaceSubrange(lo..<hi, with: repeatElement(0, count: hi - lo))
                try w.write(enc.zeroCluster(index: c))
            }
        }
        if setDigests {
            for c in 0..<clusters where puts[c] == nil {
                let lo = Int(c) * cs, hi = min(size, lo + cs)
                let slice = Array(model[lo..<hi])
                if slice.contains(where: { $0 != 0 }) {
                    w.setDigest(cluster: c, slice.withUnsafeBytes { ClusterDigest.of($0, clusterSize: cs) })
                }
            }
        }
        _ = try w.finish(metadata: Array("{\"link\":\"\(name)\"}".utf8), complete: true)
        models.append(model)
        paths.append(path)
        return path
    }

    /// base: data everywhere except a few holes; mid: new data, zeros over
    /// base data; top: new data, zeros, and clusters left to fall through.
    static func threeLinks(bits: Int, clusters: Int, extra: Int = 0) throws -> ChainLab {
        var lab = ChainLab(bits: bits, size: clusters * (1 << bits) + extra)
        let n = lab.clusters
        var base: [UInt64: Put] = [:]
        for c in 0..<n where c % 5 != 4 { base[c] = .data(seed: 1000 + c) }
        try lab.add("base.qcow2", base)
        var mid: [UInt64: Put] = [:]
        for c in 0..<n {
            if c % 7 == 1 { mid[c] = .data(seed: 2000 + c) }
            if c % 7 == 3 { mid[c] = .zero }            // over base data (or a hole)
        }
        try lab.add("mid.qcow2", mid)
        var top: [UInt64: Put] = [:]
        for c in 0..<n {
            if c % 11 == 2 { top[c] = .data(seed: 3000 + c) }
            if c % 11 == 5 { top[c] = .zero }
            if c % 11 == 8, c % 7 == 1 { top[c] = .zero }   // zero over mid data
        }
        try lab.add("top.qcow2", top)
        return lab
    }
}

private func qemuAvailable() -> Bool {
    if Tools.qemuImg == nil {
        print("SKIPPED: qemu-img not found on PATH; the qemu-img parts of the chain tests did not run")
        return false
    }
    return true
}

private func qemuRaw(_ path: String, _ dir: TempDir, _ name: String = "out.raw") throws -> [UInt8] {
    let raw = dir.file(name)
    let conv = try Tools.run(Tools.qemuImg!, ["convert", "-O", "raw", path, raw])
    #expect(conv.status == 0, "\(conv.stderr)")
    return Fixture.bytes(raw)
}

private func chainReadAll(_ chain: QCow2Chain) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Int(chain.virtualSize))
    try out.withUnsafeMutableBytes { try chain.read(offset: 0, count: $0.count, into: $0.baseAddress!) }
    return out
}

private func expectChainFailure(_ path: String, maxDepth: Int = 64, _ check: (QCow2ChainFailure) -> Bool) {
    do {
        _ = try QCow2Chain(path: path, maxDepth: maxDepth)
        Issue.record("\(path): the chain opened; expected a failure")
    } catch let e as QCow2Error {
        guard let f = e.chain else {
            Issue.record("untyped error: \(e)")
            return
        }
        #expect(check(f), "unexpected failure \(f): \(e)")
        #expect(e.message.contains("link"), "\(e)")
    } catch {
        Issue.record("non-QCow2Error: \(error)")
    }
}

@Suite("Backing chains and digests")
struct ChainTests {
    @Test func digestDefinition() throws {
        let cs = 4096
        let data = ChainLab.clusterBytes(7, 1000)
        let padded = data + [UInt8](repeating: 0, count: cs - 1000)
        let a = data.withUnsafeBytes { ClusterDigest.of($0, clusterSize: cs) }
        let b = padded.withUnsafeBytes { ClusterDigest.of($0, clusterSize: cs) }
        #expect(a == b)
        #expect(a != ClusterDigest.zeros(clusterSize: cs))
        let z = [UInt8](repeating: 0, count: cs).withUnsafeBytes { ClusterDigest.of($0, clusterSize: cs) }
        #expect(z == ClusterDigest.zeros(clusterSize: cs))
        #expect([UInt8]().withUnsafeBytes { ClusterDigest.of($0, clusterSize: cs) } == z)
        let enc = ClusterEncoder(compression: .zstd(level: 1), clusterSize: cs)
        #expect(data.withUnsafeBytes { enc.encode(index: 0, data: $0) }.digest == a)
        let e2 = padded.withUnsafeBytes { enc.encode(index: 1, data: $0) }
        #expect(e2.digest == a)
        #expect(enc.zeroCluster(index: 9).isZero && enc.zeroCluster(index: 9).index == 9)
        #expect(EncodedCluster.zero(index: 4, clusterSize: cs).isZero)
    }

    @Test func writerWithBackingIsAValidQcow2Chain() throws {
        var lab = ChainLab(bits: 16, size: 20 << 16)
        try lab.add("base.qcow2", [0: .data(seed: 1), 1: .data(seed: 2), 5: .data(seed: 3)])
        let top = try lab.add("top.qcow2", [1: .zero, 2: .data(seed: 4)])
        let r = try QCow2Reader(path: top)
        #expect(r.backingFileName == "base.qcow2")
        #expect(r.backingFormat == "qcow2")
        #expect(try QCow2Reader(path: lab.paths[0]).backingFileName == nil)
        let report = r.verify()
        #expect(report.isClean, "\(report)")
        // The header CRC covers the backing name: another valid name is caught.
        var bytes = Fixture.bytes(top)
        let nameAt = Int(bytes.be64(at: 8))
        bytes[nameAt] = UInt8(ascii: "c")             // "case.qcow2"
        Fixture.store(bytes, lab.dir.file("renamed.qcow2"))
        let renamed = QCow2Reader.verifyImage(at: lab.dir.file("renamed.qcow2"))
        #expect(!renamed.isClean)
        #expect(try QCow2Reader(path: lab.dir.file("renamed.qcow2")).backingFileName == "case.qcow2")
        guard qemuAvailable() else { return }
        let (clean, out) = try Tools.qemuCheck(top)
        #expect(clean, "qemu-img check:\n\(out)")
        let info = try Tools.run(Tools.qemuImg!, ["info", "--backing-chain", "--output=json", top])
        #expect(info.status == 0, "\(info.stderr)")
        let arr = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [[String: Any]]
        #expect(arr?.count == 2)
        #expect(arr?.first?["backing-filename"] as? String == "base.qcow2")
        #expect(arr?.first?["backing-filename-format"] as? String == "qcow2")
        #expect((arr?.last?["filename"] as? String)?.hasSuffix("base.qcow2") == true)
        #expect(try qemuRaw(top, lab.dir) == lab.models.last!)
    }

    @Test func backingNameLimits() throws {
        let dir = TempDir("chain")
        let long = String(repeating: "n", count: 1024)
        #expect(throws: QCow2Error.self) {
            _ = try QCow2Writer(path: dir.file("a.qcow2"), virtualSize: 1 << 20, clusterBits: 16, compression: .none,
                                backing: QCow2Backing(fileName: long))
        }
        // 512-byte clusters: 112 + 40 + 16 + 8 leave 336 bytes for the name.
        #expect(throws: QCow2Error.self) {
            _ = try QCow2Writer(path: dir.file("b.qcow2"), virtualSize: 1 << 20, clusterBits: 9, compression: .none,
                                backing: QCow2Backing(fileName: String(repeating: "x", count: 337)))
        }
        let w = try QCow2Writer(path: dir.file("c.qcow2"), virtualSize: 1 << 20, clusterBits: 9, compression: .none,
                                backing: QCow2Backing(fileName: String(repeating: "x", count: 336)))
        w.abandon()
        #expect(throws: QCow2Error.self) {
            _ = try QCow2Writer(path: dir.file("d.qcow2"), virtualSize: 1 << 20, clusterBits: 16, compression: .none,
                                backing: QCow2Backing(fileName: "a\u{0}b"))
        }
        #expect(throws: QCow2Error.self) {
            _ = try QCow2Writer(path: dir.file("e.qcow2"), virtualSize: 1 << 20, clusterBits: 16, compression: .none,
                                backing: QCow2Backing(fileName: "base", format: String(repeating: "f", count: 17)))
        }
    }

    @Test(arguments: [(9, 200, 0), (12, 40, 1024)])
    func threeLinkChainReadsLikeQemu(_ arg: (Int, Int, Int)) throws {
        let lab = try ChainLab.threeLinks(bits: arg.0, clusters: arg.1, extra: arg.2)
        let top = lab.paths.last!
        let chain = try QCow2Chain(path: top)
        #expect(chain.links.count == 3)
        #expect(chain.paths.map { URL(fileURLWithPath: $0).lastPathComponent } == ["top.qcow2", "mid.qcow2", "base.qcow2"])
        let expected = lab.models.last!
        #expect(try chainReadAll(chain) == expected)
        // Unaligned reads.
        var rng = SeededRNG(seed: 9)
        for _ in 0..<50 {
            let off = Int.random(in: 0..<expected.count, using: &rng)
            let n = Int.random(in: 0...min(3 * lab.cs, expected.count - off), using: &rng)
            var buf = [UInt8](repeating: 0xEE, count: n)
            try buf.withUnsafeMutableBytes { try chain.read(offset: UInt64(off), count: n, into: $0.baseAddress!) }
            #expect(buf == Array(expected[off..<(off + n)]), "read \(n) at \(off)")
        }
        // Per-cluster resolution.
        let c5 = try chain.allocated(cluster: 5)          // top zero (5 % 11)
        #expect(c5?.link == 0 && c5?.state == .zero)
        let c4 = try chain.allocated(cluster: 4)          // a hole everywhere
        #expect(c4 == nil)
        let c3 = try chain.allocated(cluster: 3)          // mid zero over base data
        #expect(c3?.link == 1 && c3?.state == .zero)
        // Each link verifies alone; the chain's content matches the top's table.
        for p in lab.paths {
            let rep = QCow2Reader.verifyImage(at: p)
            #expect(rep.isClean, "\(p): \(rep)")
        }
        let content = try verifyChainContent(chain)
        #expect(content.isClean, "\(content)")
        #expect(content.clustersChecked > 0)
        // Concurrent reads agree.
        let cs = lab.cs
        let n = Int(chain.guestClusters)
        let bad = Counter()
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            var buf = [UInt8](repeating: 0, count: cs)
            for c in stride(from: t, to: n, by: 4) {
                _ = try? buf.withUnsafeMutableBytes { try chain.read(cluster: UInt64(c), into: $0.baseAddress!) }
                let lo = c * cs, hi = min(expected.count, lo + cs)
                if Array(buf[0..<(hi - lo)]) != Array(expected[lo..<hi]) { bad.add() }
            }
        }
        #expect(bad.value == 0)
        guard qemuAvailable() else { return }
        #expect(try qemuRaw(top, lab.dir) == expected, "qemu-img reads the chain differently")
        for p in lab.paths {
            let (clean, out) = try Tools.qemuCheck(p)
            #expect(clean, "\(p):\n\(out)")
        }
    }

    @Test func chainFailuresAreTyped() throws {
        let lab = try ChainLab.threeLinks(bits: 12, clusters: 10)
        let top = lab.paths[2]
        // Depth.
        expectChainFailure(top, maxDepth: 2) { if case .tooDeep(link: 1, maxDepth: 2) = $0 { return true }; return false }
        // Missing base.
        let dir = lab.dir
        try FileManager.default.moveItem(atPath: lab.paths[0], toPath: dir.file("gone.qcow2"))
        expectChainFailure(top) {
            if case .missingBackingFile(link: 1, name: "base.qcow2", let file) = $0 { return file == dir.file("base.qcow2") }
            return false
        }
        // Not qcow2 (no format probe passes on raw bytes).
        Fixture.store([UInt8](repeating: 7, count: 40960), dir.file("base.qcow2"))
        expectChainFailure(top) { if case .notQCow2(link: 1, _, _) = $0 { return true }; return false }
        // Size mismatch.
        var other = ChainLab(bits: 12, size: 11 << 12)
        let small = try other.add("small.qcow2", [0: .data(seed: 5)])
        try FileManager.default.removeItem(atPath: dir.file("base.qcow2"))
        try FileManager.default.copyItem(atPath: small, toPath: dir.file("base.qcow2"))
        expectChainFailure(top) {
            if case .virtualSizeMismatch(link: 1, _, size: 11 << 12, topSize: 10 << 12) = $0 { return true }
            return false
        }
        // Cluster size mismatch.
        var other2 = ChainLab(bits: 16, size: 10 << 12)
        let big = try other2.add("big.qcow2", [0: .data(seed: 5)])
        try FileManager.default.removeItem(atPath: dir.file("base.qcow2"))
        try FileManager.default.copyItem(atPath: big, toPath: dir.file("base.qcow2"))
        expectChainFailure(top) { if case .clusterSizeMismatch(link: 1, _, clusterSize: 65536, topClusterSize: 4096) = $0 { return true }; return false }
        // A backing format other than qcow2.
        let d2 = TempDir("chain")
        let w = try QCow2Writer(path: d2.file("t.qcow2"), virtualSize: 1 << 16, clusterBits: 12, compression: .none,
                                backing: QCow2Backing(fileName: "b.raw", format: "raw"))
        _ = try w.finish(metadata: [], complete: true)
        Fixture.store([UInt8](repeating: 0, count: 1 << 16), d2.file("b.raw"))
        expectChainFailure(d2.file("t.qcow2")) { if case .unsupportedBackingFormat(link: 0, format: "raw", _) = $0 { return true }; return false }
        // A loop: a <- b <- a.
        let d3 = TempDir("chain")
        for (n, b) in [("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")] {
            let w = try QCow2Writer(path: d3.file(n), virtualSize: 1 << 16, clusterBits: 12, compression: .none,
                                    backing: QCow2Backing(fileName: b))
            _ = try w.finish(metadata: [], complete: true)
        }
        expectChainFailure(d3.file("a.qcow2")) { if case .loop(link: 1, let f) = $0 { return f.hasSuffix("a.qcow2") }; return false }
        // An absolute backing name resolves as is.
        let d4 = TempDir("chain")
        let w4 = try QCow2Writer(path: d4.file("t.qcow2"), virtualSize: 10 << 12, clusterBits: 12, compression: .none,
                                 backing: QCow2Backing(fileName: lab.paths[1]))
        _ = try w4.finish(metadata: [], complete: true)
        try FileManager.default.removeItem(atPath: dir.file("base.qcow2"))
        try FileManager.default.moveItem(atPath: dir.file("gone.qcow2"), toPath: dir.file("base.qcow2"))
        // ... and mid's relative name against mid's directory, not t's.
        let c4 = try QCow2Chain(path: d4.file("t.qcow2"))
        #expect(c4.paths == [d4.file("t.qcow2"), lab.paths[1], dir.file("base.qcow2")])
    }

    @Test func digestTableRoundTrip() throws {
        let dir = TempDir("chain")
        let cs = 512
        let n: UInt64 = 300        // 5 regions of 64 clusters
        let w = try QCow2Writer(path: dir.file("d.qcow2"), virtualSize: n * 512, clusterBits: 9, compression: .zstd(level: 1))
        let enc = ClusterEncoder(compression: .zstd(level: 1), clusterSize: cs)
        var want: [UInt64: ClusterDigest] = [:]
        for c in stride(from: UInt64(0), to: n, by: 3) {
            let bytes = ChainLab.clusterBytes(c + 1, cs)
            let e = bytes.withUnsafeBytes { enc.encode(index: c, data: $0) }
            try w.write(e)
            want[c] = e.digest
        }
        try w.write(enc.zeroCluster(index: 1))
        // A cluster this image does not write (copied from a base) and a
        // zero cluster that had a copied digest first.
        let copied = ClusterDigest(high: 0x1234, low: 0x5678)
        w.setDigest(cluster: 200, copied)
        want[200] = copied
        w.setDigest(cluster: 4, copied)
        try w.write(enc.zeroCluster(index: 4))
        let summary = try w.finish(metadata: [], complete: true)
        #expect(summary.digestCount == want.count)
        let t = try #require(try QCow2Reader(path: dir.file("d.qcow2")).digests())
        #expect(t.count == want.count)
        for c in 0..<n { #expect(t[cluster: c] == want[c], "cluster \(c)") }
        let pairs = Array(t)
        #expect(pairs.map(\.cluster) == want.keys.sorted())
        #expect(pairs.allSatisfy { want[$0.cluster] == $0.digest })
        #expect(t[cluster: n + 1000] == nil)
        // An image from before digest tables: the corpus file below was
        // written by the tail-version-1 writer (while the corpus is not
        // regenerated); and the same image with its tail marked version 1.
        let old = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Corpus/verify-dirty-bit.qcow2").path
        let oldReader = try QCow2Reader(path: old)
        if oldReader.tail?.version == 1 {
            #expect(try oldReader.digests() == nil)
        }
        var bytes = Fixture.bytes(dir.file("d.qcow2"))
        let tailOffset = Int(bytes.be64(at: Q.headerLength + 8 + 8))
        bytes.putBE32(1, at: tailOffset + 8)
        Fixture.store(bytes, dir.file("v1.qcow2"))
        let v1 = try QCow2Reader(path: dir.file("v1.qcow2"))
        #expect(v1.hotimageProblems.isEmpty, "\(v1.hotimageProblems)")
        #expect(try v1.digests() == nil)
        // Empty table.
        let w2 = try QCow2Writer(path: dir.file("e.qcow2"), virtualSize: 1 << 20, compression: .none)
        _ = try w2.finish(metadata: [], complete: true)
        let t2 = try #require(try QCow2Reader(path: dir.file("e.qcow2")).digests())
        #expect(t2.count == 0 && Array(t2).isEmpty)
        #expect(QCow2Reader.verifyImage(at: dir.file("d.qcow2")).isClean)
    }

    @Test func verifyChecksDigestsOfWrittenClusters() throws {
        let dir = TempDir("chain")
        let cs = 4096
        func make(_ name: String, _ tweak: (QCow2Writer) -> Void) throws -> VerifyReport {
            let w = try QCow2Writer(path: dir.file(name), virtualSize: 16 * 4096, clusterBits: 12, compression: .zstd(level: 1))
            let enc = ClusterEncoder(compression: .zstd(level: 1), clusterSize: cs)
            for c in UInt64(0)..<8 {
                try w.write(ChainLab.clusterBytes(c + 10, cs).withUnsafeBytes { enc.encode(index: c, data: $0) })
            }
            try w.write(enc.zeroCluster(index: 9))
            tweak(w)
            _ = try w.finish(metadata: [], complete: true)
            return QCow2Reader.verifyImage(at: dir.file(name))
        }
        #expect(try make("clean.qcow2") { _ in }.isClean)
        // A wrong digest stored for a data cluster.
        let wrong = try make("wrong.qcow2") { $0.setDigest(cluster: 3, ClusterDigest(high: 1, low: 2)) }
        #expect(wrong.problems.count == 1, "\(wrong)")
        #expect(wrong.problems.first?.kind == .digest && wrong.problems.first?.cluster == 3)
        #expect(wrong.problems.first?.description.hasPrefix("guest bytes 0x3000–0x3fff (cluster 3): digest mismatch") == true, "\(wrong)")
        // A zero cluster with a digest.
        let zero = try make("zero.qcow2") { $0.setDigest(cluster: 9, ClusterDigest(high: 1, low: 2)) }
        #expect(zero.problems.count == 1, "\(zero)")
        #expect(zero.problems.first?.kind == .digest && zero.problems.first?.cluster == 9)
        // Digests for unwritten clusters are not checked alone.
        #expect(try make("copied.qcow2") { $0.setDigest(cluster: 12, ClusterDigest(high: 1, low: 2)) }.isClean)
        // A damaged digest section (its CRC) is reported.
        var bytes = Fixture.bytes(dir.file("clean.qcow2"))
        bytes[bytes.count - 3] ^= 0x10          // the section is last in the tail
        Fixture.store(bytes, dir.file("damaged.qcow2"))
        #expect(throws: QCow2Error.self) { _ = try QCow2Reader(path: dir.file("damaged.qcow2")).digests() }
        let rep = QCow2Reader.verifyImage(at: dir.file("damaged.qcow2"))
        #expect(rep.problems.contains { $0.kind == .digest }, "\(rep)")
    }

    @Test func verifyChainContentFindsASwappedBase() throws {
        var lab = try ChainLab.threeLinks(bits: 12, clusters: 30)
        let chain = try QCow2Chain(path: lab.paths[2])
        #expect(try verifyChainContent(chain).isClean)
        // Another image of the same size in the base's place.
        var other = ChainLab(bits: 12, size: lab.size)
        var puts: [UInt64: Put] = [:]
        for c in 0..<lab.clusters where c % 5 != 4 { puts[c] = .data(seed: 9000 + c) }
        let impostor = try other.add("other.qcow2", puts)
        try FileManager.default.removeItem(atPath: lab.paths[0])
        try FileManager.default.copyItem(atPath: impostor, toPath: lab.paths[0])
        let swapped = try QCow2Chain(path: lab.paths[2])
        let rep = try verifyChainContent(swapped)
        #expect(!rep.isClean)
        #expect(rep.problems.allSatisfy { $0.kind == .digest })
        // Exactly the clusters read from the base.
        var fromBase: [UInt64] = []
        for c in 0..<lab.clusters where try swapped.allocated(cluster: c)?.link == 2 { fromBase.append(c) }
        #expect(rep.problems.compactMap(\.cluster) == fromBase)
        #expect(rep.problems.first?.description.contains("guest bytes 0x") == true)
        // An image without a table cannot be checked.
        var v1 = Fixture.bytes(lab.paths[1])
        let tailOffset = Int(v1.be64(at: Q.headerLength + 8 + 8))
        v1.putBE32(1, at: tailOffset + 8)
        Fixture.store(v1, lab.dir.file("v1.qcow2"))
        let v1Chain = try QCow2Chain(path: lab.dir.file("v1.qcow2"))
        #expect(throws: QCow2Error.self) { _ = try verifyChainContent(v1Chain) }
        // A top that did not copy its base's digests is caught too.
        lab = try ChainLab.threeLinks(bits: 12, clusters: 12)
        try FileManager.default.removeItem(atPath: lab.paths[2])
        lab.models.removeLast()
        lab.paths.removeLast()
        try lab.add("top.qcow2", [2: .data(seed: 1)], setDigests: false)
        let rep2 = try verifyChainContent(QCow2Chain(path: lab.paths[2]))
        #expect(!rep2.isClean && rep2.problems.allSatisfy { $0.message.contains("should read as zeros") })
    }

    @Test(arguments: [1, 2, 3])
    func foldReadsLikeTheOldTop(_ k: Int) throws {
        let lab = try ChainLab.threeLinks(bits: 12, clusters: 40, extra: 1024)
        let chain = try QCow2Chain(path: lab.paths[2])
        let out = lab.dir.file("folded-\(k).qcow2")
        // links are top first: link k is lab.paths[2 - k].
        let backing = k < 3 ? QCow2Backing(fileName: URL(fileURLWithPath: lab.paths[2 - k]).lastPathComponent) : nil
        let w = try QCow2Writer(path: out, virtualSize: chain.virtualSize, clusterBits: 12, compression: .zlib(level: 6),
                                backing: backing)
        let s = try QCow2Merge.fold(chain: chain, links: k, into: w, threads: 2)
        #expect(s.dataClusters > 0)
        _ = try w.finish(metadata: [], complete: true)
        let folded = try QCow2Chain(path: out)
        #expect(folded.links.count == 4 - k)
        #expect(try chainReadAll(folded) == lab.models.last!)
        let t0 = try #require(try chain.top.digests())
        let t1 = try #require(try folded.top.digests())
        #expect(Array(t0).map(\.cluster) == Array(t1).map(\.cluster))
        #expect(Array(t0).map(\.digest) == Array(t1).map(\.digest))
        #expect(QCow2Reader.verifyImage(at: out).isClean)
        #expect(try verifyChainContent(folded).isClean)
        // A writer whose backing is not link k is refused.
        if k < 3 {
            let bad = try QCow2Writer(path: lab.dir.file("bad-\(k).qcow2"), virtualSize: chain.virtualSize, clusterBits: 12,
                                      compression: .none, backing: QCow2Backing(fileName: "top.qcow2"))
            #expect(throws: QCow2Error.self) { try QCow2Merge.fold(chain: chain, links: k, into: bad) }
            bad.abandon()
        }
        guard qemuAvailable() else { return }
        let (clean, text) = try Tools.qemuCheck(out)
        #expect(clean, "\(text)")
        #expect(try qemuRaw(out, lab.dir, "f.raw") == (try qemuRaw(lab.paths[2], lab.dir, "t.raw")))
    }

    /// QCOW2_BENCH=1 prints XXH3-128 and CRC-32 speed on 64 KiB clusters
    /// (one core); nothing is asserted.
    @Test func digestSpeedWhenAsked() throws {
        guard ProcessInfo.processInfo.environment["QCOW2_BENCH"] == "1" else { return }
        let cs = 65536
        let data = ChainLab.clusterBytes(1, cs * 64)
        let rounds = 40
        func time(_ f: (UnsafeRawBufferPointer) -> Void) -> Double {
            var ts = timespec(), te = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            data.withUnsafeBytes { all in
                for _ in 0..<rounds {
                    for k in 0..<64 { f(UnsafeRawBufferPointer(rebasing: all[(k * cs)..<((k + 1) * cs)])) }
                }
            }
            clock_gettime(CLOCK_MONOTONIC, &te)
            let dt = Double(te.tv_sec - ts.tv_sec) + Double(te.tv_nsec - ts.tv_nsec) / 1e9
            return Double(rounds * 64 * cs) / dt / 1e9
        }
        var sink: UInt64 = 0
        let xxh = time { sink &+= ClusterDigest.of($0, clusterSize: cs).low }
        var crcSink: UInt32 = 0
        let crc = time { crcSink &+= crc32Update(0, $0.baseAddress, $0.count) }
        print("BENCH 64 KiB clusters, one core: XXH3-128 \(String(format: "%.2f", xxh)) GB/s, zlib CRC-32 \(String(format: "%.2f", crc)) GB/s (\(sink &+ UInt64(crcSink)))")
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}
