// FuzzTests.swift — hostile images must never crash, trap or hang the reader
// or the verifier; they must be refused with a QCow2Error or verified with
// problems.
//
// Design: small valid images (512 B – 4 KiB clusters, every payload kind,
// two L1 entries) are mutated with a fixed seed — bit flips anywhere, stores
// of interesting bytes (0, 0xFF, 0x80, 0x7F, 1) at header/table offsets,
// header fields overwritten with boundary values, truncation, appended
// garbage, copied ranges — and each result is opened, every cluster read
// (states, data, allocation list) and verified. A trap fails the run; each
// case must finish within a time bound. QCOW2_FUZZ_ITERATIONS runs longer
// (default 3000). Corpus/ holds hand-made hostile headers and images plus
// earlier mutations worth keeping; every file there must be refused or fail
// verification. QCOW2_REGEN_CORPUS=1 rewrites the corpus (deterministic).

import Foundation
import Testing
@testable import QCow2

enum FuzzOutcome: Equatable {
    case refused(String)
    case verified(problems: UInt64)
}

enum FuzzHarness {
    /// Header fields: (offset, width in bytes).
    static let headerFields: [(Int, Int)] = [
        (0, 4), (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
        (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
        (112, 4), (116, 4), (120, 4), (124, 4), (128, 8), (136, 8), (144, 4), (148, 4),
    ]
    static let interestingBytes: [UInt8] = [0, 0xFF, 0x80, 0x7F, 1]

    static func interestingValue(width: Int, fileLength: Int, rng: inout SeededRNG) -> UInt64 {
        let mask: UInt64 = width >= 8 ? .max : (UInt64(1) << UInt64(width * 8)) - 1
        let choices: [UInt64] = [
            0, 1, mask, mask >> 1, (mask >> 1) + 1, 7, 8, 9, 21, 22, 30, 63, 64, 104, 105, 112, 0x200, 0x1000,
            0x1_0000, UInt64(fileLength), UInt64(fileLength) + 1, UInt64(fileLength) - 8, UInt64(fileLength) * 2,
            0xFFFF_FFF8, 1 << 40, 1 << 56, 1 << 62, rng.next(),
        ]
        return choices.randomElement(using: &rng)! & mask
    }

    static func put(_ v: UInt64, width: Int, at: Int, in b: inout [UInt8]) {
        guard at + width <= b.count else { return }
        for k in 0..<width { b[at + k] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (width - 1 - k))) }
    }

    /// Offsets where structures live (header, L1, L2, refcount table and
    /// blocks, tail header), for targeted stores.
    static func hotOffsets(_ image: [UInt8], path: String) -> [Int] {
        var hot = Array(0..<min(image.count, 200))
        guard let r = try? QCow2Reader(path: path) else { return hot }
        hot += (0..<(r.l1Size * 8)).map { Int(r.l1Offset) + $0 }
        for e in r.l1 where e & Q.offsetMask != 0 {
            hot += stride(from: 0, to: r.clusterSize, by: 1).map { Int(e & Q.offsetMask) + $0 }
        }
        hot += (0..<64).map { Int(r.refcountTableOffset) + $0 }
        if let info = r.hotimage { hot += (0..<Q.tailHeaderLength + 64).map { Int(info.tailOffset) + $0 } }
        return hot.filter { $0 < image.count }
    }

    static func mutate(_ base: [UInt8], hot: [Int], rng: inout SeededRNG) -> ([UInt8], String) {
        var b = base
        var what: [String] = []
        for _ in 0..<Int.random(in: 1...3, using: &rng) {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0...2:
                let at = Int.random(in: 0..<b.count, using: &rng)
                let bit = UInt8(1) << UInt8.random(in: 0...7, using: &rng)
                b[at] ^= bit
                what.append("flip \(bit) at \(at)")
            case 3...4:
                let at = hot.randomElement(using: &rng)!
                guard at < b.count else { continue }
                let v = interestingBytes.randomElement(using: &rng)!
                b[at] = v
                what.append("store \(v) at \(at)")
            case 5...6:
                let (at, width) = headerFields.randomElement(using: &rng)!
                let v = interestingValue(width: width, fileLength: b.count, rng: &rng)
                put(v, width: width, at: at, in: &b)
                what.append("field \(at) = \(hex(v))")
            case 7:
                let cut = Int.random(in: 0..<b.count, using: &rng)
                b.removeSubrange(cut...)
                what.append("truncate to \(cut)")
                if b.isEmpty { return (b, what.joined(separator: ", ")) }
            case 8:
                let n = Int.random(in: 1...4096, using: &rng)
                b += (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
                what.append("append \(n)")
            default:
                let n = Int.random(in: 1...64, using: &rng)
                guard b.count > n else { continue }
                let from = hot.filter { $0 + n <= b.count }.randomElement(using: &rng) ?? 0
                let to = Int.random(in: 0..<(b.count - n), using: &rng)
                b.replaceSubrange(to..<(to + n), with: b[from..<(from + n)])
                what.append("copy \(n) from \(from) to \(to)")
            }
        }
        return (b, what.joined(separator: ", "))
    }

    /// Opens, reads everything and verifies. Errors must be QCow2Errors.
    static func exercise(_ path: String) -> FuzzOutcome {
        let reader: QCow2Reader
        do {
            reader = try QCow2Reader(path: path)
        } catch let e as QCow2Error {
            #expect(!e.message.isEmpty)
            return .refused(e.message)
        } catch {
            Issue.record("non-QCow2Error thrown: \(error)")
            return .refused("\(error)")
        }
        let dec = ClusterDecoder()
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: reader.clusterSize, alignment: 64)
        defer { buf.deallocate() }
        let n = min(reader.guestClusters, 4096)
        for c in 0..<n {
            _ = try? reader.clusterState(c)
            do { _ = try reader.readCluster(c, into: buf, decoder: dec) } catch is QCow2Error {} catch {
                Issue.record("non-QCow2Error from readCluster: \(error)")
            }
        }
        if reader.guestClusters > 0 {
            _ = try? reader.clusterState(reader.guestClusters - 1)
        }
        #expect(throws: QCow2Error.self) { try reader.clusterState(reader.guestClusters) }
        _ = try? reader.allocatedClusters()
        // The digest table and the backing name are bounded like the rest.
        if let t = try? reader.digests() {
            var n = 0
            for (c, _) in t {
                #expect(c < reader.guestClusters)
                n += 1
            }
            #expect(n == t.count)
        }
        if let name = reader.backingFileName {
            #expect(!name.isEmpty && name.utf8.count <= 1023 && !name.utf8.contains(0))
        }
        #expect((reader.backingFormat?.utf8.count ?? 0) <= 16)
        let report = reader.verify()
        return .verified(problems: report.problemCount)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Small base images: (name, bytes).
    static func baseImages(in dir: TempDir) throws -> [(String, [UInt8])] {
        let specs: [(String, QCow2Compression, Int, Int, Bool)] = [
            ("zstd-512", .zstd(level: 1), 9, 72, true),
            ("zlib-1k", .zlib(level: 6), 10, 140, true),
            ("none-4k", .none, 12, 20, true),
            ("zstd-512-partial", .zstd(level: 3), 9, 70, false),
        ]
        var out: [(String, [UInt8])] = []
        for (k, (name, c, bits, clusters, complete)) in specs.enumerated() {
            let cs = 1 << bits
            let l2e = cs / 8
            let disk = Fixture.clusteredDisk(size: cs * clusters, clusterSize: cs, seed: UInt64(k + 77))
            // A few clusters in each of the first two L2 tables.
            let built = try Fixture.build(path: dir.file("\(name).qcow2"), disk: disk, clusterBits: bits,
                                          compression: c, seed: UInt64(k),
                                          keep: { ($0 < 8 || (Int($0) >= l2e && Int($0) < l2e + 6)) && $0 != 3 },
                                          complete: complete, metadata: Array("{\"fuzz\":\(k)}".utf8))
            out.append((name, Fixture.bytes(built.path)))
        }
        return out
    }

    /// The base of the hand-made corpus: 512-byte clusters, a two-entry L1
    /// table with one L2 table, compressed, raw, zero and unwritten clusters
    /// (about 4 KB, so the corpus stays small).
    static func corpusBase(in dir: TempDir, complete: Bool = true) throws -> [UInt8] {
        let cs = 512
        var disk = [UInt8](repeating: 0, count: cs * 72)
        let text = Array(String(repeating: "hotimage corpus text 0123456789 ", count: 20).utf8)
        var rng = SeededRNG(seed: 2024)
        for c in [0, 3, 5] { for k in 0..<cs { disk[c * cs + k] = text[(k + c) % text.count] } }
        for k in 0..<cs { disk[2 * cs + k] = UInt8.random(in: 0...255, using: &rng) }
        let name = complete ? "corpus-base.qcow2" : "corpus-base-partial.qcow2"
        let built = try Fixture.build(path: dir.file(name), disk: disk, clusterBits: 9, compression: .zstd(level: 1),
                                      keep: { $0 <= 5 && $0 != 4 }, complete: complete, metadata: Array("{\"c\":1}".utf8))
        return Fixture.bytes(built.path)
    }

    static var corpusDir: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Corpus").path
    }
}

@Suite("Fuzz and corpus")
struct FuzzTests {
    static let iterations = Int(ProcessInfo.processInfo.environment["QCOW2_FUZZ_ITERATIONS"] ?? "") ?? 3000
    /// Per-case time bound (debug builds, a loaded 2-core machine).
    static let caseSeconds = 5.0

    @Test(arguments: 0..<4)
    func mutatedImagesNeverCrash(_ baseIndex: Int) throws {
        let dir = TempDir("fuzz")
        let bases = try FuzzHarness.baseImages(in: dir)
        let (name, base) = bases[baseIndex]
        let basePath = dir.file("\(name).qcow2")
        #expect(FuzzHarness.exercise(basePath) == (name.hasSuffix("partial") ? .verified(problems: 1) : .verified(problems: 0)))
        let hot = FuzzHarness.hotOffsets(base, path: basePath)
        var rng = SeededRNG(seed: 0x5EED_0000 + UInt64(baseIndex))
        let path = dir.file("case.qcow2")
        var refused = 0, flagged = 0, silent = 0
        var slowest = 0.0
        for _ in 0..<(Self.iterations / bases.count) {
            let (bytes, what) = FuzzHarness.mutate(base, hot: hot, rng: &rng)
            Fixture.store(bytes, path)
            let t0 = FuzzHarness.now()
            let outcome = FuzzHarness.exercise(path)
            let dt = FuzzHarness.now() - t0
            slowest = max(slowest, dt)
            #expect(dt < Self.caseSeconds, "case took \(dt) s: \(what)")
            switch outcome {
            case .refused: refused += 1
            case .verified(let n) where n > 0: flagged += 1
            case .verified: silent += 1
            }
        }
        print("fuzz \(name): \(refused) refused, \(flagged) flagged by verify, \(silent) unnoticed (mutations of unused bytes), slowest case \(String(format: "%.3f", slowest)) s")
        // Most mutations hit something that matters.
        #expect(refused + flagged > silent * 3)
    }

    @Test func corpusReplay() throws {
        let dir = FuzzHarness.corpusDir
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".qcow2") }.sorted()
        #expect(files.count >= 30, "corpus at \(dir) is missing")
        var total = 0
        for f in files {
            let path = "\(dir)/\(f)"
            total += Fixture.bytes(path).count
            let t0 = FuzzHarness.now()
            let outcome = FuzzHarness.exercise(path)
            #expect(FuzzHarness.now() - t0 < Self.caseSeconds, "\(f) is slow")
            switch outcome {
            case .refused(let why):
                #expect(!f.hasPrefix("verify-"), "\(f) was refused at open (\(why)); expected it to open and fail verification")
            case .verified(let n):
                #expect(n > 0, "\(f) verified clean")
                #expect(!f.hasPrefix("refuse-"), "\(f) opened; expected it to be refused")
            }
        }
        #expect(total < 320_000, "corpus is \(total) bytes")
    }

    /// Hand-made hostile inputs, checked for the specific refusal.
    @Test func handMadeHeadersAreRefusedClearly() throws {
        let dir = TempDir("hand")
        let base = try FuzzHarness.corpusBase(in: dir)
        #expect(FuzzHarness.exercise(dir.file("corpus-base.qcow2")) == .verified(problems: 0))
        for (name, bytes, expect) in HostileImages.make(base: base) {
            let path = dir.file(name)
            Fixture.store(bytes, path)
            switch FuzzHarness.exercise(path) {
            case .refused(let why):
                #expect(expect.isEmpty || why.contains(expect), "\(name): \(why)")
            case .verified(let n):
                #expect(n > 0, "\(name) verified clean")
                if !expect.isEmpty {
                    let report = QCow2Reader.verifyImage(at: path)
                    #expect(report.problems.contains { $0.description.contains(expect) }, "\(name): \(report)")
                }
            }
        }
    }

    /// QCOW2_REGEN_CORPUS=1 rewrites Corpus/ from the hand-made list and a
    /// seeded selection of fuzz mutations.
    @Test func regenerateCorpusWhenAsked() throws {
        guard ProcessInfo.processInfo.environment["QCOW2_REGEN_CORPUS"] == "1" else { return }
        let out = FuzzHarness.corpusDir
        for f in (try? FileManager.default.contentsOfDirectory(atPath: out)) ?? [] where f.hasSuffix(".qcow2") {
            try FileManager.default.removeItem(atPath: "\(out)/\(f)")
        }
        let dir = TempDir("regen")
        let base = try FuzzHarness.corpusBase(in: dir)
        for (name, bytes, _) in HostileImages.make(base: base) {
            Fixture.store(bytes, "\(out)/\(name)")
        }
        // Mutations: keep the first few that are refused or flagged.
        let bases = [("base", base), ("partial", try FuzzHarness.corpusBase(in: dir, complete: false))]
        for (k, (name, bytes)) in bases.enumerated() {
            let basePath = dir.file(k == 0 ? "corpus-base.qcow2" : "corpus-base-partial.qcow2")
            let hot = FuzzHarness.hotOffsets(bytes, path: basePath)
            var rng = SeededRNG(seed: 0xC0DE + UInt64(k))
            var kept = 0, tries = 0
            while kept < 4 && tries < 500 {
                tries += 1
                let (mutated, _) = FuzzHarness.mutate(bytes, hot: hot, rng: &rng)
                let path = dir.file("m.qcow2")
                Fixture.store(mutated, path)
                let prefix: String
                switch FuzzHarness.exercise(path) {
                case .refused: prefix = "refuse"
                case .verified(let n) where n > 0 && k == 0: prefix = "verify"
                case .verified(let n) where n > 1: prefix = "verify"       // beyond "incomplete"
                default: continue
                }
                Fixture.store(mutated, "\(out)/\(prefix)-fuzz-\(name)-\(kept).qcow2")
                kept += 1
            }
        }
    }
}

/// Hand-made hostile images derived from `FuzzHarness.corpusBase`. Name prefix: "refuse-" (the reader must refuse to
/// open it) or "verify-" (it opens; verify must report a problem). The third
/// element is text the error or a problem must contain.
enum HostileImages {
    static func make(base: [UInt8]) -> [(String, [UInt8], String)] {
        var out: [(String, [UInt8], String)] = []
        func patch(_ name: String, _ expect: String, _ f: (inout [UInt8]) -> Void) {
            var b = base
            f(&b)
            out.append((name + ".qcow2", b, expect))
        }
        func put(_ b: inout [UInt8], _ at: Int, _ v: UInt64, _ width: Int) { FuzzHarness.put(v, width: width, at: at, in: &b) }
        let fileLength = UInt64(base.count)
        let l1Offset = Int(base.be64(at: 40))
        let rtOffset = Int(base.be64(at: 48))
        let ext = Q.headerLength + 8
        let tailOffset = Int(base.be64(at: ext + 8))
        let l2Offset = Int(base.be64(at: l1Offset) & Q.offsetMask)
        // Find a compressed and a raw entry in the first L2 table.
        var compressedSlot = -1, rawSlot = -1
        for j in 0..<6 {
            let e = base.be64(at: l2Offset + j * 8)
            if e & Q.oflagCompressed != 0 && compressedSlot < 0 { compressedSlot = j }
            if e & Q.oflagCopied != 0 && rawSlot < 0 { rawSlot = j }
        }

        patch("refuse-huge-l1-size", "l1_size") { put(&$0, 36, 0xFFFF_FFFF, 4) }
        patch("refuse-l1-too-small", "L1 table too small") { put(&$0, 36, 1, 4) }
        patch("refuse-l1-offset-past-eof", "past the end of the file") { put(&$0, 40, 1 << 40, 8) }
        patch("refuse-l1-offset-unaligned", "not aligned") { put(&$0, 40, UInt64(l1Offset + 8), 8) }
        patch("refuse-l1-in-header", "overlaps the header") { put(&$0, 40, 0, 8) }
        patch("refuse-refcount-table-overlaps-header", "overlaps the header") { put(&$0, 48, 0, 8) }
        patch("refuse-refcount-table-huge", "refcount_table_clusters") { put(&$0, 56, 0xFFFF_FFFF, 4) }
        patch("refuse-refcount-table-past-eof", "past the end of the file") { put(&$0, 56, 64, 4) }
        patch("refuse-cluster-bits-30", "cluster_bits 30") { put(&$0, 20, 30, 4) }
        patch("refuse-cluster-bits-8", "cluster_bits 8") { put(&$0, 20, 8, 4) }
        patch("refuse-header-length-ffffffff", "header_length") { put(&$0, 100, 0xFFFF_FFFF, 4) }
        patch("refuse-header-length-unaligned", "header_length") { put(&$0, 100, 105, 4) }
        patch("refuse-ext-length-overflow", "run past the end") { put(&$0, Q.headerLength + 4, 0xFFFF_FFF8, 4) }
        patch("refuse-ext-length-past-cluster", "run past the end") { put(&$0, Q.headerLength + 4, 512 - 120 + 1, 4) }
        patch("refuse-bad-magic", "magic") { $0[3] = 0xFA }
        patch("refuse-version-4", "version 4") { put(&$0, 4, 4, 4) }
        // Backing file names (accepted since incremental images) are
        // bounded: inside cluster 0, 1...1023 bytes, no NUL; the format
        // extension 1...16 bytes. The name at 0x180 is zero bytes.
        patch("refuse-backing-file", "backing file") { put(&$0, 8, 0x180, 8); put(&$0, 16, 8, 4) }
        patch("refuse-backing-name-past-cluster", "backing file name") {
            for (i, b) in "base".utf8.enumerated() { $0[0x1F0 + i] = b }
            put(&$0, 8, 0x1F0, 8); put(&$0, 16, 0x20, 4)
        }
        patch("refuse-backing-name-1024", "backing file name") { put(&$0, 8, 0x100, 8); put(&$0, 16, 1024, 4) }
        patch("refuse-backing-name-offset-huge", "backing file name") { put(&$0, 8, UInt64.max - 4, 8); put(&$0, 16, 8, 4) }
        patch("refuse-backing-name-in-header", "backing file name") { put(&$0, 8, 8, 8); put(&$0, 16, 8, 4) }
        patch("refuse-backing-format-long", "backing file format") {
            // A 40-byte format extension after HOTI (where the end marker was).
            let x = Q.headerLength + 8 + Q.hotiExtLength
            put(&$0, x, UInt64(Q.extBackingFormat), 4); put(&$0, x + 4, 40, 4)
            for i in 0..<40 { $0[x + 8 + i] = 0x71 }
            put(&$0, x + 48, 0, 8)
        }
        patch("refuse-encrypted", "encrypted") { put(&$0, 32, 2, 4) }
        patch("refuse-extended-l2", "extended L2") { $0[79] |= 0x10 }
        patch("refuse-external-data-file", "external data file") { $0[79] |= 0x04 }
        patch("refuse-unknown-incompat-bit", "unknown incompatible") { $0[78] |= 0x01 }
        patch("refuse-compression-bit-without-type", "compression_type") { $0[104] = 0 }
        patch("refuse-compression-type-without-bit", "compression_type") { $0[79] &= ~0x08 }
        patch("refuse-compression-type-7", "compression_type 7") { $0[104] = 7 }
        patch("refuse-virtual-size-2e63", "virtual size") { put(&$0, 24, 1 << 63, 8) }
        patch("refuse-virtual-size-huge", "L1 table too small") { put(&$0, 24, 1 << 40, 8) }
        patch("refuse-refcount-order-7", "refcount_order") { put(&$0, 96, 7, 4) }
        patch("refuse-snapshots-huge", "nb_snapshots") { put(&$0, 60, 0x7FFF_FFFF, 4) }
        patch("refuse-truncated-header", "too short") { $0.removeSubrange(60...) }
        patch("refuse-empty-file", "too short") { $0 = [] }
        patch("verify-compressed-descriptor-past-eof", "past the end of the file") {
            let e = $0.be64(at: l2Offset + compressedSlot * 8)
            let shift = UInt64(62 - (9 - 8))
            let newOff = fileLength + 0x1000
            put(&$0, l2Offset + compressedSlot * 8, (e & ~((UInt64(1) << shift) - 1)) | newOff, 8)
        }
        patch("verify-compressed-descriptor-in-header", "overlaps the header") {
            let e = $0.be64(at: l2Offset + compressedSlot * 8)
            let shift = UInt64(62 - (9 - 8))
            put(&$0, l2Offset + compressedSlot * 8, (e & ~((UInt64(1) << shift) - 1)) | 0x10, 8)
        }
        patch("verify-compressed-with-copied-flag", "COPIED") { $0[l2Offset + compressedSlot * 8] |= 0x80 }
        patch("verify-compressed-max-sectors", "") {
            // All sector-count bits set: the range runs past the end of the file.
            $0[l2Offset + compressedSlot * 8] |= 0x3F
        }
        patch("verify-raw-offset-past-eof", "past the end of the file") {
            put(&$0, l2Offset + rawSlot * 8, Q.oflagCopied | (fileLength + 0x10000) & ~511, 8)
        }
        // With 512-byte clusters an unaligned offset means reserved bits 1-8.
        patch("verify-raw-offset-unaligned", "reserved bits") {
            put(&$0, l2Offset + rawSlot * 8, $0.be64(at: l2Offset + rawSlot * 8) + 0x100, 8)
        }
        patch("verify-l2-reserved-bits", "reserved bits") { $0[l2Offset + rawSlot * 8] |= 0x01 }
        patch("verify-l2-table-past-eof", "past the end of the file") { put(&$0, l1Offset, Q.oflagCopied | (1 << 40), 8) }
        patch("verify-l1-entries-share-l2", "uses too") { put(&$0, l1Offset + 8, $0.be64(at: l1Offset), 8) }
        patch("verify-l1-reserved-bits", "reserved bits") { $0[l1Offset + 7] |= 0x01 }
        patch("verify-refcount-block-past-eof", "outside the image") { put(&$0, rtOffset, 1 << 40, 8) }
        patch("verify-refcount-block-unaligned", "reserved bits") { put(&$0, rtOffset, $0.be64(at: rtOffset) + 0x100, 8) }
        patch("verify-refcount-blocks-duplicate", "also refcount block") { put(&$0, rtOffset + 8, $0.be64(at: rtOffset), 8) }
        patch("verify-tail-offset-past-eof", "past the end of the file") { put(&$0, ext + 8, fileLength + 512, 8) }
        patch("verify-tail-length-huge", "past the end of the file") { put(&$0, ext + 16, UInt64.max - 100, 8) }
        patch("verify-tail-bad-magic", "bad magic") { $0[tailOffset] = 0x58 }
        patch("verify-metadata-length-huge", "metadata length") { put(&$0, tailOffset + 72, 1 << 60, 8) }
        patch("verify-group-count-huge", "cluster groups") { put(&$0, tailOffset + 104, 1 << 50, 8) }
        patch("verify-hoti-magic-damaged", "missing or damaged") { $0[Q.headerLength] ^= 0x01 }
        patch("verify-hoti-extension-short", "bytes long") { put(&$0, Q.headerLength + 4, 8, 4) }
        patch("verify-truncated-mid-tail", "past the end of the file") { $0.removeSubrange((tailOffset + 140)...) }
        patch("verify-dirty-bit", "dirty bit") { $0[79] |= 0x01 }
        patch("refuse-truncated-mid-l2", "past the end") { $0.removeSubrange((l2Offset + 100)...) }
        return out
    }
}
