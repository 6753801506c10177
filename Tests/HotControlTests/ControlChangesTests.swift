import Foundation
import Testing
@testable import HotControl

// Changed-block tracking on the wire (ControlChanges.swift): the new fields
// round-trip with these exact names, and lines without them still decode.

private func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

@Suite("Control protocol: change tracking fields")
struct ControlChangesTests {
    @Test("end with commit: the wire line and its round trip")
    func endCommit() throws {
        var req = ControlRequest(op: .end)
        req.commit = "3f2a-image"
        let bytes = ControlCodec.encode(req)
        #expect(text(bytes) == #"{"commit":"3f2a-image","op":"end"}"# + "\n")
        let back = try ControlCodec.decode(ControlRequest.self, Array(bytes.dropLast()))
        #expect(back == req)
        #expect(back.commit == "3f2a-image")
        // An old client's end has none.
        #expect(try ControlCodec.decode(ControlRequest.self, Array(#"{"op":"end"}"#.utf8)).commit == nil)
    }

    @Test("map reply changes and end reply committed round-trip with their names")
    func mapReply() throws {
        var r = ControlReply(ok: true)
        r.result = "protecting"
        r.changes = ChangeInfo(trusted: true, since: "img-1", reason: nil, clusterBytes: 65536,
                               changedClusters: 12, path: "/run/hotimage/x/changes.bin")
        r.committed = true
        let bytes = ControlCodec.encode(r)
        let json = try JSONSerialization.jsonObject(with: Data(bytes.dropLast())) as! [String: Any]
        let c = json["changes"] as! [String: Any]
        #expect(Set(c.keys) == ["trusted", "since", "clusterBytes", "changedClusters", "path"])
        #expect(c["since"] as? String == "img-1")
        #expect(json["committed"] as? Bool == true)
        let back = try ControlCodec.decode(ControlReply.self, Array(bytes.dropLast()))
        #expect(back.changes == r.changes)
        #expect(back.committed == true)
        // Untrusted: since null (left out), reason given.
        var u = ControlReply(ok: true)
        u.changes = ChangeInfo(trusted: false, since: nil, reason: "another boot", clusterBytes: 65536,
                               changedClusters: 0, path: nil)
        let ub = ControlCodec.encode(u)
        #expect(text(ub).contains(#""changes":{"changedClusters":0,"clusterBytes":65536,"reason":"another boot","trusted":false}"#))
        #expect(try ControlCodec.decode(ControlReply.self, Array(ub.dropLast())).changes == u.changes)
        // A dm or older daemon's reply has no changes.
        let old = try ControlCodec.decode(ControlReply.self, Array(#"{"ok":true,"result":"protecting","usedBlocks":3}"#.utf8))
        #expect(old.changes == nil && old.committed == nil)
    }

    @Test("status tracking round-trips; a status without it decodes")
    func status() throws {
        let t = TrackingStatus(trusted: false, since: nil, sinceTime: nil,
                               reason: "the daemon stopped without a clean detach", changedClusters: 3,
                               changedBytes: 196608, clusterBytes: 65536, stateFile: "/var/tmp/hotimage-x.cbt")
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        let data = try enc.encode(t)
        #expect(String(decoding: data, as: UTF8.self) ==
                #"{"changedBytes":196608,"changedClusters":3,"clusterBytes":65536,"reason":"the daemon stopped without a clean detach","stateFile":"\/var\/tmp\/hotimage-x.cbt","trusted":false}"#)
        #expect(try JSONDecoder().decode(TrackingStatus.self, from: data) == t)
        let trusted = TrackingStatus(trusted: true, since: "img", sinceTime: "2026-12-06T08:00:00Z", reason: nil,
                                     changedClusters: 0, changedBytes: 0, clusterBytes: 65536, stateFile: nil)
        #expect(try JSONDecoder().decode(TrackingStatus.self, from: enc.encode(trusted)) == trusted)
    }
}
