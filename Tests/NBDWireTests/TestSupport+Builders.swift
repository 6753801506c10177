// TestSupport+Builders.swift — shared helpers for the NBDWire tests.
//
// Design note: expected wire bytes in the tests are written out by hand as
// hex strings (`hex("67446698 ...")`) straight from the spec's layouts, so an
// encoder is never checked against itself. Client-side messages (options,
// request headers) are built here with a deliberately independent, naive
// big-endian writer. `SplitMix64` is a tiny deterministic PRNG so every
// "random" test replays identically; `Chunking` describes how a byte stream
// is cut into feeds; `runHandshake` feeds a script and normalises the
// resulting actions (adjacent sends merged) so one-shot, byte-by-byte and
// random-chunk feeding can be compared for equality.

import Testing
@testable import NBDWire

/// Bytes from a hex string; spaces, newlines and underscores are ignored.
func hex(_ text: String) -> [UInt8] {
    let digits = text.filter { $0.isHexDigit }
    precondition(digits.count % 2 == 0, "odd number of hex digits")
    var out: [UInt8] = []
    var index = digits.startIndex
    while index < digits.endIndex {
        let next = digits.index(index, offsetBy: 2)
        out.append(UInt8(digits[index..<next], radix: 16)!)
        index = next
    }
    return out
}

/// Naive big-endian byte builder for client messages.
func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (24 - 8 * UInt32($0))) & 0xff) } }
func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (56 - 8 * UInt64($0))) & 0xff) } }

/// A client request header (+ payload) built without the module's encoder.
func requestBytes(flags: UInt16 = 0, command: UInt16, cookie: UInt64, offset: UInt64, length: UInt32,
                  payload: [UInt8] = []) -> [UInt8] {
    be32(0x2560_9513) + be16(flags) + be16(command) + be64(cookie) + be64(offset) + be32(length) + payload
}

/// Client flags word.
func clientFlags(_ flags: UInt32) -> [UInt8] { be32(flags) }

/// One option: "IHAVEOPT" | option | length | data.
func option(_ number: UInt32, _ data: [UInt8] = []) -> [UInt8] {
    Array("IHAVEOPT".utf8) + be32(number) + be32(UInt32(data.count)) + data
}

/// NBD_OPT_INFO / NBD_OPT_GO data.
func goData(_ name: String, infos: [UInt16] = []) -> [UInt8] {
    let n = Array(name.utf8)
    return be32(UInt32(n.count)) + n + be16(UInt16(infos.count)) + infos.flatMap(be16)
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data.
func metaData(_ name: String, queries: [String]) -> [UInt8] {
    let n = Array(name.utf8)
    var out = be32(UInt32(n.count)) + n + be32(UInt32(queries.count))
    for q in queries { out += be32(UInt32(q.utf8.count)) + Array(q.utf8) }
    return out
}

/// Option reply header + data, written naively for expectations.
func optReply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = []) -> [UInt8] {
    hex("0003e889045565a9") + be32(option) + be32(type) + be32(UInt32(data.count)) + data
}

/// Deterministic PRNG (SplitMix64).
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// How a byte stream is split into feeds.
enum Chunking: Sendable, CustomTestStringConvertible {
    case whole
    case bytewise
    case random(seed: UInt64, maxChunk: Int)

    func split(_ bytes: [UInt8]) -> [[UInt8]] {
        switch self {
        case .whole:
            return [bytes]
        case .bytewise:
            return bytes.map { [$0] }
        case .random(let seed, let maxChunk):
            var rng = SplitMix64(seed: seed)
            var out: [[UInt8]] = []
            var i = 0
            while i < bytes.count {
                let n = min(Int.random(in: 1...maxChunk, using: &rng), bytes.count - i)
                out.append(Array(bytes[i..<(i + n)]))
                i += n
            }
            return out
        }
    }

    var testDescription: String {
        switch self {
        case .whole: return "whole"
        case .bytewise: return "byte-by-byte"
        case .random(let seed, let maxChunk): return "random(seed \(seed), ≤\(maxChunk))"
        }
    }

    static let standard: [Chunking] = [
        .whole, .bytewise, .random(seed: 1, maxChunk: 7), .random(seed: 2, maxChunk: 40),
        .random(seed: 99, maxChunk: 300),
    ]
}

/// Merges adjacent `.send`s so differently-chunked runs compare equal.
func normalize(_ actions: [NBDHandshakeAction]) -> [NBDHandshakeAction] {
    var out: [NBDHandshakeAction] = []
    for action in actions {
        if case .send(let more) = action, case .send(let have)? = out.last {
            out[out.count - 1] = .send(have + more)
        } else if case .send(let bytes) = action, bytes.isEmpty {
            continue
        } else {
            out.append(action)
        }
    }
    return out
}

/// Result of feeding a script to a handshake.
struct HandshakeRun {
    var actions: [NBDHandshakeAction]
    var leftover: [UInt8]
    var phase: NBDHandshakePhase
}

/// Feeds `input` in the given chunking; stops feeding after a close (further
/// feeds would throw), keeps feeding after transmission (bytes go to leftover).
func runHandshake(_ hs: inout NBDHandshake, _ input: [UInt8], _ chunking: Chunking = .whole) throws -> HandshakeRun {
    var actions: [NBDHandshakeAction] = []
    for chunk in chunking.split(input) {
        if hs.phase == .closed { break }
        actions += try hs.feed(chunk)
    }
    return HandshakeRun(actions: normalize(actions), leftover: hs.takeLeftover(), phase: hs.phase)
}

/// The export set used by handshake tests.
enum Exports {
    /// hasFlags | sendFlush | sendFUA | sendTrim | sendDF = 0x00ad.
    static let disk = NBDExportInfo(name: "disk", size: 0x10_0000, transmissionFlags: 0x00ad,
                                    description: "test disk", minBlock: 512, preferredBlock: 4096,
                                    maxBlock: 0x0200_0000)
    static let ro = NBDExportInfo(name: "ro", size: 4096, transmissionFlags: 0x0003)

    static func lookup(_ name: String) -> NBDExportInfo? {
        switch name {
        case "disk": return disk
        case "ro": return ro
        default: return nil
        }
    }

    static func handshake(defaultExport: String = "") -> NBDHandshake {
        NBDHandshake(lookup: lookup, listNames: { ["disk", "ro"] }, defaultExport: defaultExport)
    }
}
