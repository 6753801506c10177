import Foundation
import Testing
@testable import HotControl

// The control protocol's codec: the op names on the wire, round trips, and
// byte-for-byte agreement with the lines clients sent before ops were an enum.

/// The request as the protocol had it with `op` a String (the shape every
/// existing client and script encodes).
private struct LegacyRequest: Codable {
    var op: String
    var consistency: String?
    var mountPoint: String?
    var pauseMs: Double?
    var used: [[UInt64]]?
    var excluded: [[UInt64]]?
    var ranges: [[UInt64]]?
    var limit: Int?
    var force: Bool?
}

private func line(_ s: String) -> [UInt8] { Array(s.utf8) }
private func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

@Suite("Control protocol codec")
struct ControlCodecTests {
    @Test("The wire strings of the ops are the protocol's (golden list)")
    func wireStrings() {
        #expect(ControlOp.allCases.map(\.rawValue) ==
                ["hello", "begin", "map", "archived", "buffered", "heartbeat", "status", "end", "detach"])
        #expect(SessionVia.allCases.map(\.rawValue) == ["fuse", "nbd", "dm"])
    }

    @Test("Every op round-trips through a request line", arguments: ControlOp.allCases)
    func roundTrip(op: ControlOp) throws {
        let bytes = ControlCodec.encode(ControlRequest(op: op))
        // One line: the newline ends it and is not part of the JSON.
        #expect(bytes.last == 0x0a)
        #expect(text(bytes) == "{\"op\":\"\(op.rawValue)\"}\n")
        let back = try ControlCodec.decode(ControlRequest.self, Array(bytes.dropLast()))
        #expect(back == ControlRequest(op: op))
    }

    /// Lines as the String-op code encoded them (sorted keys, "/" escaped).
    static let oldLines: [String] = [
        // SessionClient.locate, status, heartbeat, end
        #"{"op":"hello"}"#,
        #"{"op":"status"}"#,
        #"{"op":"heartbeat"}"#,
        #"{"op":"end"}"#,
        // take: begin under freeze with a pause, and under raw
        #"{"consistency":"freeze","mountPoint":"\/mnt\/data","op":"begin","pauseMs":0.5}"#,
        #"{"consistency":"raw","op":"begin"}"#,
        // take: the map with used and excluded ranges
        #"{"excluded":[[8192,12288]],"op":"map","used":[[0,4096],[8192,1048576]]}"#,
        // archived and buffered
        #"{"op":"archived","ranges":[[0,65536]]}"#,
        #"{"limit":4096,"op":"buffered"}"#,
        // detach, forced and not
        #"{"force":true,"op":"detach"}"#,
        #"{"force":false,"op":"detach"}"#,
    ]

    @Test("A line the old code sent decodes, and encodes back to the same bytes", arguments: oldLines)
    func oldLinesDecode(old: String) throws {
        let req = try ControlCodec.decode(ControlRequest.self, line(old))
        #expect(text(ControlCodec.encode(req)) == old + "\n")
        // And the String-op struct reads it as the same request.
        let legacy = try ControlCodec.decode(LegacyRequest.self, line(old))
        #expect(legacy.op == req.op.rawValue)
        #expect(text(ControlCodec.encode(legacy)) == old + "\n")
    }

    @Test("The lines scripts write by hand (spaces, any key order) decode")
    func handWritten() throws {
        let r = try ControlCodec.decode(ControlRequest.self, line(#"{"op": "begin", "consistency": "raw", "pauseMs": 0}"#))
        #expect(r.op == .begin)
        #expect(r.consistency == "raw")
        #expect(r.pauseMs == 0)
        let m = try ControlCodec.decode(ControlRequest.self, line(#"{"used": [[4096, 0]], "op": "map"}"#))
        #expect(m.op == .map)
        #expect(m.used == [[4096, 0]])
    }

    @Test("An unknown op is a decode error that names it, answered with an error reply")
    func unknownOp() throws {
        #expect(throws: ControlProtocolError.unknownOp("explode")) {
            try ControlCodec.decode(ControlRequest.self, line(#"{"op": "explode"}"#))
        }
        do {
            _ = try ControlCodec.decode(ControlRequest.self, line(#"{"op":"Hello"}"#))
            Issue.record("an op in the wrong case decoded")
        } catch {
            let reply = ControlCodec.replyToUndecodable(error)
            #expect(text(ControlCodec.encode(reply)) == #"{"error":"unknown op 'Hello'","ok":false}"# + "\n")
        }
    }

    @Test("A line without an op, or not JSON, is a malformed request",
          arguments: [#"{"consistency":"raw"}"#, "not json", #"{"op": 7}"#, "[]"])
    func malformed(bad: String) {
        do {
            _ = try ControlCodec.decode(ControlRequest.self, line(bad))
            Issue.record("decoded \(bad)")
        } catch {
            #expect(!(error is ControlProtocolError))
            #expect(ControlCodec.replyToUndecodable(error).error ==
                    #"malformed request: expected one JSON object with an "op" per line"#)
        }
    }

    @Test("Replies: failure with retry, and the dm begin reply, as the daemons encode them")
    func replies() throws {
        #expect(text(ControlCodec.encode(ControlReply.failure("3 writes", retry: true))) ==
                #"{"error":"3 writes","ok":false,"retry":true}"# + "\n")
        var b = ControlReply(ok: true)
        b.armedAtNanos = 42
        b.frozen = true
        b.snapshotDevice = "/dev/mapper/hotimage-x-snap"
        let wire = #"{"armedAtNanos":42,"frozen":true,"ok":true,"snapshotDevice":"\/dev\/mapper\/hotimage-x-snap"}"#
        #expect(text(ControlCodec.encode(b)) == wire + "\n")
        let back = try ControlCodec.decode(ControlReply.self, line(wire))
        #expect(back.armedAtNanos == 42 && back.frozen == true && back.snapshotDevice == "/dev/mapper/hotimage-x-snap")
    }

    @Test("The read counters of a status encode as before")
    func readCounters() throws {
        let c = ReadCounters(spliced: 3, copied: 4, spliceEnabled: true)
        let wire = #"{"copied":4,"spliceEnabled":true,"spliced":3}"#
        #expect(text(ControlCodec.encode(c)) == wire + "\n")
        #expect(try ControlCodec.decode(ReadCounters.self, line(wire)) == c)
    }
}
