// NBDFuzzTests+Corpus.swift — hostile input must never crash or hang.
//
// Design note: two seeded sources of input — uniformly random byte strings,
// and mutations (bit flips, interesting integers, inserts, deletes,
// truncation, duplicated ranges) of known-valid streams — are fed, in random
// chunk sizes, to both the request decoder and the handshake. Throwing is
// allowed; what is checked is that every call returns, that the decoder
// yields at most one message per 28 input bytes (so `next()` loops end), that
// the handshake emits at most one terminal action and nothing after it, and
// that output stays proportional to input. A crash (trap) fails the run
// outright. The replayed corpus in Corpus/ holds hand-picked edge cases; its
// file-name prefix states the expected outcome (see Corpus/README.txt).

import Foundation
import Testing
@testable import NBDWire

@Suite("Fuzz and corpus")
struct NBDFuzzTests {
    // MARK: Drivers

    enum DecoderOutcome: Equatable { case clean(messages: Int, buffered: Int), threw(NBDWireError) }
    enum HandshakeOutcome: Equatable { case negotiating, transmission(leftover: Int), closed }

    /// Feeds `input` to a decoder in the given chunks, draining after each
    /// feed; the header-first path (as the server reads) must agree.
    static func exerciseDecoder(_ input: [UInt8], _ chunking: Chunking, maxPayload: Int = 4096) -> DecoderOutcome {
        let outcome = exerciseNext(input, chunking, maxPayload: maxPayload)
        let (viaNext, nextError) = collect(input, chunking, maxPayload: maxPayload, headerFirst: false)
        let (viaHeaders, headerError) = collect(input, chunking, maxPayload: maxPayload, headerFirst: true)
        #expect(viaHeaders == viaNext && headerError == nextError, "header-first decoding disagrees with next()")
        return outcome
    }

    /// The complete messages and the framing error, by `next()` or by
    /// `nextHeader` + `takeBuffered` + reads of the remaining chunks (a
    /// payload cut off by the end of input is dropped, as `next()` holds it back).
    static func collect(_ input: [UInt8], _ chunking: Chunking, maxPayload: Int, headerFirst: Bool) -> ([NBDIncoming], NBDWireError?) {
        var chunks = chunking.split(input)[...]
        var pending: [UInt8] = []
        var decoder = NBDRequestDecoder(maxPayload: maxPayload)
        var out: [NBDIncoming] = []
        do {
            while true {
                if headerFirst {
                    while let r = try decoder.nextHeader() {
                        guard r.hasPayload else { out.append(.request(r, payload: [])); continue }
                        var payload = [UInt8](repeating: 0, count: Int(r.length))
                        var got = payload.withUnsafeMutableBytes { decoder.takeBuffered(into: $0.baseAddress!, max: $0.count) }
                        while got < payload.count {
                            if pending.isEmpty {
                                guard let c = chunks.popFirst() else { return (out, nil) }
                                pending = c
                            }
                            let n = min(pending.count, payload.count - got)
                            payload.replaceSubrange(got..<(got + n), with: pending[0..<n])
                            pending.removeFirst(n)
                            got += n
                        }
                        out.append(.request(r, payload: payload))
                    }
                } else {
                    while let m = try decoder.next() { out.append(m) }
                }
                if pending.isEmpty {
                    guard let c = chunks.popFirst() else { return (out, nil) }
                    pending = c
                }
                decoder.feed(pending)
                pending = []
            }
        } catch {
            return (out, error as? NBDWireError)
        }
    }

    static func exerciseNext(_ input: [UInt8], _ chunking: Chunking, maxPayload: Int) -> DecoderOutcome {
        var decoder = NBDRequestDecoder(maxPayload: maxPayload)
        var messages = 0
        let bound = input.count / NBDConst.requestHeaderSize + 1
        for chunk in chunking.split(input) {
            decoder.feed(chunk)
            do {
                while let message = try decoder.next() {
                    messages += 1
                    if case .request(let r, let payload) = message {
                        #expect(payload.count == (r.hasPayload ? Int(r.length) : 0))
                    }
                    if messages > bound {
                        Issue.record("decoder produced more messages than the input can hold")
                        return .clean(messages: messages, buffered: decoder.bufferedBytes)
                    }
                }
            } catch let error as NBDWireError {
                #expect(throws: error) { try decoder.next() }
                return .threw(error)
            } catch {
                Issue.record("unexpected error type \(error)")
                return .clean(messages: messages, buffered: -1)
            }
        }
        #expect(decoder.bufferedBytes <= input.count)
        return .clean(messages: messages, buffered: decoder.bufferedBytes)
    }

    /// Feeds `input` to a handshake in the given chunks and checks action invariants.
    static func exerciseHandshake(_ input: [UInt8], _ chunking: Chunking) -> HandshakeOutcome {
        var hs = Exports.handshake(defaultExport: "disk")
        var terminal = false
        var sent = 0
        for chunk in chunking.split(input) {
            if hs.phase == .closed {
                #expect(throws: NBDWireError.handshakeClosed) { try hs.feed(chunk) }
                break
            }
            guard let actions = try? hs.feed(chunk) else {
                Issue.record("handshake threw before closing")
                break
            }
            for action in actions {
                #expect(!terminal, "action after a terminal action")
                switch action {
                case .send(let bytes): sent += bytes.count
                case .close, .enterTransmission: terminal = true
                }
            }
        }
        #expect(sent <= 32 * input.count + 1024, "output out of proportion to input")
        switch hs.phase {
        case .transmission: return .transmission(leftover: hs.takeLeftover().count)
        case .closed: return .closed
        default: return .negotiating
        }
    }

    // MARK: Input generation

    static let interesting32: [UInt32] = [0, 1, 6, 28, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x0001_0001, 4097]

    static func mutate(_ bytes: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var b = bytes
        for _ in 0..<Int.random(in: 1...4, using: &rng) {
            let at = b.isEmpty ? 0 : Int.random(in: 0..<b.count, using: &rng)
            switch Int.random(in: 0..<7, using: &rng) {
            case 0 where !b.isEmpty:
                b[at] ^= UInt8(1) << UInt8.random(in: 0..<8, using: &rng)
            case 1 where !b.isEmpty:
                b[at] = [0, 0xff, 0x7f, 0x80, 1].randomElement(using: &rng)!
            case 2:
                b.insert(contentsOf: (0..<Int.random(in: 1...16, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }, at: at)
            case 3 where !b.isEmpty:
                b.removeSubrange(at..<min(b.count, at + Int.random(in: 1...32, using: &rng)))
            case 4:
                b.removeSubrange(min(at, b.count)...)
            case 5 where !b.isEmpty:
                let end = min(b.count, at + Int.random(in: 1...64, using: &rng))
                b.insert(contentsOf: b[at..<end], at: Int.random(in: 0...b.count, using: &rng))
            case 6 where b.count >= 4:
                let start = min(at, b.count - 4)
                b.replaceSubrange(start..<(start + 4), with: be32(interesting32.randomElement(using: &rng)!))
            default:
                break
            }
        }
        return b
    }

    static let validHandshakes: [[UInt8]] = [
        NBDHandshakeTests.goScript,
        clientFlags(1) + option(3) + option(6, goData("nope")) + option(8) + option(9, metaData("disk", queries: []))
            + option(1, Array("ro".utf8)),
        clientFlags(3) + option(4242, [1, 2, 3]) + option(5) + option(11) + option(7, goData("", infos: [0, 1, 2, 3])),
        clientFlags(3) + option(6, [UInt8](repeating: 7, count: 70_000)) + option(2),
    ]

    /// 2000 seeded random strings and mutations through the decoder and the handshake.
    @Test(.timeLimit(.minutes(2)), arguments: 0..<4)
    func randomAndMutatedInputs(_ shard: Int) {
        var rng = SplitMix64(seed: 0x5eed_0000 + UInt64(shard))
        var decoderThrew = 0, decoderDecoded = 0, entered = 0, closed = 0, open = 0
        for i in 0..<500 {
            let input: [UInt8]
            switch i % 4 {
            case 0:
                input = (0..<Int.random(in: 0...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            case 1:
                input = Self.mutate(NBDRequestDecoderTests.stream, &rng)
            case 2:
                input = Self.mutate(Self.validHandshakes.randomElement(using: &rng)!, &rng)
            default:
                // Valid flags and option magic, random option numbers, lengths and data.
                var b = clientFlags(UInt32.random(in: 0...3, using: &rng))
                for _ in 0..<Int.random(in: 1...6, using: &rng) {
                    let data = (0..<Int.random(in: 0...40, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    b += option(UInt32.random(in: 0...12, using: &rng), data)
                }
                input = Self.mutate(b, &rng)
            }
            let chunking = Chunking.random(seed: rng.next(), maxChunk: Int.random(in: 1...64, using: &rng))
            switch Self.exerciseDecoder(input, chunking) {
            case .threw: decoderThrew += 1
            case .clean(let n, _): decoderDecoded += n > 0 ? 1 : 0
            }
            switch Self.exerciseHandshake(input, chunking) {
            case .transmission: entered += 1
            case .closed: closed += 1
            case .negotiating: open += 1
            }
        }
        // The generators must reach every outcome, or the fuzzing is shallow.
        #expect(decoderThrew > 0 && decoderDecoded > 0, "decoder: \(decoderThrew) threw, \(decoderDecoded) decoded")
        #expect(entered > 0 && closed > 0 && open > 0, "handshake: \(entered) go, \(closed) closed, \(open) open")
    }

    // MARK: Corpus

    static let corpusDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("Corpus")

    static func corpusFiles() -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: corpusDirectory.path)) ?? []
        return names.filter { $0.hasSuffix(".bin") }.sorted()
    }

    static func load(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: corpusDirectory.appendingPathComponent(name)))
    }

    /// The corpus is present and non-trivial.
    @Test func corpusIsPresent() {
        #expect(Self.corpusFiles().count >= 24)
    }

    /// Every corpus file survives both machines (whole and byte-by-byte), and
    /// files whose prefix names an outcome produce it.
    @Test(arguments: corpusFiles())
    func corpusReplay(_ name: String) throws {
        let input = try Self.load(name)
        for chunking in [Chunking.whole, .bytewise, .random(seed: 7, maxChunk: 13)] {
            let decoded = Self.exerciseDecoder(input, chunking, maxPayload: 32 << 20)
            let negotiated = Self.exerciseHandshake(input, chunking)
            if name.hasPrefix("req-ok-") {
                guard case .clean(let messages, 0) = decoded, messages > 0 else {
                    Issue.record("\(name): expected complete requests only, got \(decoded)")
                    return
                }
            } else if name.hasPrefix("req-bad-") {
                guard case .threw = decoded else { Issue.record("\(name): expected a framing error"); return }
            } else if name.hasPrefix("req-partial-") {
                guard case .clean(_, let buffered) = decoded, buffered > 0 else {
                    Issue.record("\(name): expected an incomplete message, got \(decoded)")
                    return
                }
            } else if name.hasPrefix("hs-go-") {
                guard case .transmission = negotiated else { Issue.record("\(name): expected transmission"); return }
            } else if name.hasPrefix("hs-close-") {
                #expect(negotiated == .closed, "\(name)")
            } else if name.hasPrefix("hs-open-") {
                #expect(negotiated == .negotiating, "\(name)")
            }
        }
    }
}
