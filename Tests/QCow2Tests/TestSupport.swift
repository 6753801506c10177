// TestSupport.swift — deterministic data, image building and qemu-img helpers
// shared by the QCow2 tests.

import Foundation
import Testing
@testable import QCow2

/// SplitMix64: small, fast, seedable.
struct SeededRNG: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A scratch directory removed when the value is deinitialised.
final class TempDir {
    let path: String
    init(_ tag: String = "qcow2") {
        let base = ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp"
        var template = Array("\(base)/hotimage-\(tag)-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(p != nil, "mkdtemp failed")
        path = String(cString: p!)
    }
    func file(_ name: String) -> String { "\(path)/\(name)" }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

enum Fixture {
    static let words = ["backup", "cluster", "qcow2", "inode", "journal", "extent", "block", "snapshot",
                        "filesystem", "metadata", "superblock", "bitmap", "the", "of", "and", "zstd"]

    /// Fills `count` bytes with a mix of compressible text, zeros, random
    /// bytes and sparse patterns, changing kind every 1–8 KiB.
    static func mixedData(count: Int, seed: UInt64) -> [UInt8] {
        var rng = SeededRNG(seed: seed)
        var out = [UInt8](repeating: 0, count: count)
        var i = 0
        while i < count {
            let run = min(count - i, Int.random(in: 1...8, using: &rng) * 1024)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0...3:       // text
                var k = i
                while k < i + run {
                    let w = Array((words.randomElement(using: &rng)! + (Bool.random(using: &rng) ? " " : "\n")).utf8)
                    for b in w where k < i + run { out[k] = b; k += 1 }
                }
            case 4...5:       // zeros (already zero)
                break
            case 6...7:       // random
                for k in i..<(i + run) { out[k] = UInt8.random(in: 0...255, using: &rng) }
            case 8:           // a few scattered bytes
                for _ in 0..<4 { out[i + Int.random(in: 0..<run, using: &rng)] = UInt8.random(in: 1...255, using: &rng) }
            default:          // repeating pattern
                let period = Int.random(in: 1...64, using: &rng)
                for k in i..<(i + run) { out[k] = UInt8(truncatingIfNeeded: (k % period) &* 37 &+ 1) }
            }
            i += run
        }
        return out
    }

    /// A whole-cluster kind for each cluster so every payload type appears:
    /// zero clusters, random (raw) clusters and compressible ones.
    static func clusteredDisk(size: Int, clusterSize: Int, seed: UInt64) -> [UInt8] {
        var data = mixedData(count: size, seed: seed)
        var rng = SeededRNG(seed: seed ^ 0xABCD)
        var c = 0
        while c * clusterSize < size {
            let lo = c * clusterSize, hi = min(size, lo + clusterSize)
            switch Int.random(in: 0..<8, using: &rng) {
            case 0: for k in lo..<hi { data[k] = 0 }
            case 1: for k in lo..<hi { data[k] = UInt8.random(in: 0...255, using: &rng) }
            case 2: for k in lo..<hi { data[k] = UInt8(truncatingIfNeeded: k / 512) }
            default: break
            }
            c += 1
        }
        return data
    }

    struct Built {
        let path: String
        let expected: [UInt8]            // what the guest should read (unwritten clusters zero)
        let written: Set<UInt64>         // clusters written (data or zero)
        let summary: QCow2WriteSummary
        let metadata: [UInt8]
    }

    /// Encodes `disk` with `compression`, writes the clusters whose index
    /// passes `keep` in a shuffled order, and finishes.
    @discardableResult
    static func build(path: String, disk: [UInt8], clusterBits: Int, compression: QCow2Compression,
                      seed: UInt64 = 1, keep: (UInt64) -> Bool = { _ in true }, complete: Bool = true,
                      metadata: [UInt8]? = nil) throws -> Built {
        let cs = 1 << clusterBits
        let writer = try QCow2Writer(path: path, virtualSize: UInt64(disk.count), clusterBits: clusterBits,
                                     compression: compression)
        let encoder = ClusterEncoder(compression: compression, clusterSize: cs)
        let n = (disk.count + cs - 1) / cs
        var order = (0..<UInt64(n)).filter(keep)
        var rng = SeededRNG(seed: seed)
        order.shuffle(using: &rng)
        var expected = [UInt8](repeating: 0, count: disk.count)
        for index in order {
            let lo = Int(index) * cs, hi = min(disk.count, lo + cs)
            let enc = disk.withUnsafeBytes { encoder.encode(index: index, data: UnsafeRawBufferPointer(rebasing: $0[lo..<hi])) }
            try writer.write(enc)
            expected.replaceSubrange(lo..<hi, with: disk[lo..<hi])
        }
        let meta = metadata ?? Array("{\"tool\":\"hotimage-test\",\"seed\":\(seed)}".utf8)
        let summary = try writer.finish(metadata: meta, complete: complete)
        return Built(path: path, expected: expected, written: Set(order), summary: summary, metadata: meta)
    }

    /// The guest contents through our reader (virtual size bytes).
    static func readAll(_ path: String) throws -> [UInt8] {
        let r = try QCow2Reader(path: path)
        let cs = r.clusterSize
        var out = [UInt8](repeating: 0, count: Int(r.virtualSize))
        var buf = [UInt8](repeating: 0, count: cs)
        let dec = ClusterDecoder()
        for c in 0..<r.guestClusters {
            _ = try buf.withUnsafeMutableBytes { try r.readCluster(c, into: $0, decoder: dec) }
            let lo = Int(c) * cs, hi = min(out.count, lo + cs)
            out.replaceSubrange(lo..<hi, with: buf[0..<(hi - lo)])
        }
        return out
    }

    static func bytes(_ path: String) -> [UInt8] {
        [UInt8](FileManager.default.contents(atPath: path) ?? Data())
    }

    static func store(_ bytes: [UInt8], _ path: String) {
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
    }
}

/// Locating qemu-img and running tools.
enum Tools {
    static func which(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    static let qemuImg: String? = which("qemu-img")
    static let qemuIO: String? = which("qemu-io")

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    static func run(_ exe: String, _ args: [String]) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Read both pipes before waiting so a full pipe cannot block the child.
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(status: p.terminationStatus,
                      stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData, as: UTF8.self))
    }

    /// Runs `qemu-img check` and returns (clean, output).
    static func qemuCheck(_ path: String) throws -> (Bool, String) {
        let r = try run(qemuImg!, ["check", path])
        let text = r.stdout + r.stderr
        let clean = r.status == 0 && text.contains("No errors were found on the image.")
            && !text.contains("leaked") && !text.contains("ERROR")
        return (clean, text)
    }
}
