// The host side of the writer protocol against small shell-script writers:
// the conversation, and every way a writer can misbehave.
import Foundation
import Testing
@testable import HotWriters

@Suite(.serialized) struct HostTests {
    final class Lab {
        let dir: String
        let vol: String
        init() throws {
            dir = NSTemporaryDirectory() + "hw-host-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            vol = dir + "/vol"
            try FileManager.default.createDirectory(atPath: dir + "/writers.d", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: vol + "/app", withIntermediateDirectories: true)
        }
        deinit { try? FileManager.default.removeItem(atPath: dir) }

        /// A writer script. FREEZE and THAW are shell fragments run at those points.
        func writer(_ name: String, components: String? = nil, freeze: String = "", thaw: String = "",
                    frozen: String = #"{"frozen":[{"id":"main","ok":true,"method":"pause"}]}"#,
                    thawed: String = #"{"thawed":[{"id":"main","ok":true}]}"#) throws {
            let comps = components ?? #"{"writer":"\#(name)","components":[{"id":"main","files":[{"path":"\#(vol)/app"}]}]}"#
            let script = """
            #!/bin/sh
            M=\(dir)/\(name)
            case "$1" in
            components) echo '\(comps)' ;;
            freeze) read -r req; echo "$req" > $M.request; \(freeze)
                    touch $M.frozen; echo '\(frozen)'
                    if read -r t; then echo "$t" > $M.thawline; else echo eof > $M.thawline; fi
                    \(thaw)
                    touch $M.thawed; echo '\(thawed)' ;;
            *) exit 2 ;;
            esac
            """
            let p = dir + "/writers.d/" + name
            try script.write(toFile: p, atomically: true, encoding: .utf8)
            chmod(p, 0o755)
        }
        func config(_ names: [String], timeout: Double = 5) -> WriterConfig {
            var c = WriterConfig()
            c.selection = .only(names)
            c.directory = dir + "/writers.d"
            c.timeout = timeout
            c.listTimeout = timeout
            return c
        }
        func exists(_ f: String) -> Bool { FileManager.default.fileExists(atPath: dir + "/" + f) }
        func read(_ f: String) -> String { (try? String(contentsOfFile: dir + "/" + f, encoding: .utf8)) ?? "" }
    }

    @Test func freezeAndThawConversation() throws {
        let lab = try Lab()
        try lab.writer("a")
        try lab.writer("b")
        var log: [String] = []
        let s = FreezeSession(config: lab.config(["a", "b"]), volumes: [lab.vol], log: { log.append($0) })
        #expect(s.records.map(\.coverage) == [.full, .full])
        #expect(s.freeze(log: { log.append($0) }).isEmpty)
        #expect(lab.exists("a.frozen") && lab.exists("b.frozen"))
        #expect(!lab.exists("a.thawed"))
        let req = try decodeLine(FreezeRequest.self, lab.read("a.request").trimmingCharacters(in: .newlines))
        #expect(req.components == ["main"] && req.volumes == [lab.vol] && req.timeoutSeconds == 5)
        #expect(s.thaw(log: { log.append($0) }).isEmpty)
        #expect(lab.read("a.thawline").contains("\"thaw\":true"))
        #expect(s.records.allSatisfy { $0.action == "frozen" && $0.method == "pause" && $0.thawed == true })
    }

    /// An external writer's restoreOmit reaches the record the image keeps.
    @Test func filesToLeaveOutAreRecorded() throws {
        let lab = try Lab()
        try lab.writer("pidful", components: #"{"writer":"pidful","components":[{"id":"main","files":[{"path":"\#(lab.vol)/app"}],"restoreOmit":["\#(lab.vol)/app/app.pid"]}]}"#)
        try lab.writer("plain")
        let s = FreezeSession(config: lab.config(["pidful", "plain"]), volumes: [lab.vol], log: { _ in })
        #expect(s.records.first { $0.writer == "pidful" }?.restoreOmit == [lab.vol + "/app/app.pid"])
        #expect(s.records.first { $0.writer == "plain" }?.restoreOmit == nil)
        #expect(s.freeze(log: { _ in }).isEmpty)
        s.thaw(log: { _ in })
        #expect(jsonLine(s.records.first { $0.writer == "pidful" }!).contains(#""restoreOmit":[""#))
    }

    @Test func componentsNotOnTheVolumeAreNotFrozen() throws {
        let lab = try Lab()
        try lab.writer("away", components: #"{"writer":"away","components":[{"id":"main","files":[{"path":"/proc/self/status"}]}]}"#)
        let s = FreezeSession(config: lab.config(["away"]), volumes: [lab.vol], log: { _ in })
        #expect(s.records.first?.action == "not-covered")
        #expect(s.freeze(log: { _ in }).isEmpty)
        #expect(!lab.exists("away.request"))
    }

    @Test func aHangingFreezeIsKilledAtTheTimeout() throws {
        let lab = try Lab()
        let marker = "sleep 3\(Int.random(in: 100...999))"
        try lab.writer("hang", freeze: marker)
        try lab.writer("ok")
        let t0 = Date()
        let s = FreezeSession(config: lab.config(["hang", "ok"], timeout: 1), volumes: [lab.vol], log: { _ in })
        let failures = s.freeze(log: { _ in })
        #expect(Date().timeIntervalSince(t0) < 4)
        #expect(failures.count == 1 && failures[0].contains("hang") && failures[0].contains("within 1 s"))
        #expect(s.records.first { $0.writer == "hang" }?.action == "freeze-failed")
        // The other writer froze and is thawed.
        s.thaw(log: { _ in })
        #expect(lab.exists("ok.thawed"))
        #expect(!lab.exists("hang.thawed"))
        // Its whole process group is gone, the sleep it started included.
        let ps = try String(decoding: Data(contentsOf: URL(fileURLWithPath: "/proc/self/status")), as: UTF8.self)
        _ = ps
        var alive = false
        for p in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] where Int(p) != nil {
            let cmd = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(p)/cmdline"))) ?? Data()
            if String(decoding: cmd, as: UTF8.self).replacingOccurrences(of: "\0", with: " ").hasPrefix(marker) { alive = true }
        }
        #expect(!alive)
    }

    @Test func aRefusedFreezeAndAFailedThawAreRecorded() throws {
        let lab = try Lab()
        try lab.writer("no", frozen: #"{"frozen":[{"id":"main","ok":false,"message":"app busy"}]}"#)
        try lab.writer("stuck", thawed: #"{"thawed":[{"id":"main","ok":false,"message":"resume failed"}]}"#)
        let s = FreezeSession(config: lab.config(["no", "stuck"]), volumes: [lab.vol], log: { _ in })
        let f = s.freeze(log: { _ in })
        #expect(f.count == 1 && f[0].contains("app busy"))
        let t = s.thaw(log: { _ in })
        #expect(t.count == 1 && t[0].contains("resume failed"))
        let stuck = s.records.first { $0.writer == "stuck" }!
        #expect(stuck.frozen && stuck.thawed == false && stuck.thawMessage == "resume failed")
        // A writer whose freeze was refused still gets its thaw line (it may have done half).
        #expect(lab.exists("no.thawed"))
    }

    @Test func badAnswersFailClearly() throws {
        let lab = try Lab()
        try lab.writer("garbage", frozen: "this is not json")
        try lab.writer("silent", frozen: #"{"frozen":[]}"#)
        try lab.writer("dies", freeze: "exit 3")
        let s = FreezeSession(config: lab.config(["garbage", "silent", "dies"]), volumes: [lab.vol], log: { _ in })
        let f = s.freeze(log: { _ in })
        #expect(f.count == 3)
        let byName = Dictionary(uniqueKeysWithValues: s.records.map { ($0.writer, $0.freezeMessage ?? "") })
        #expect(byName["garbage"]!.contains("not a valid FreezeReply"))
        #expect(byName["silent"]!.contains("does not name it"))
        #expect(byName["dies"]!.contains("exit 3"))
        s.thaw(log: { _ in })
    }

    @Test func aWriterThatCannotListIsAnErrorAndAMissingOneToo() throws {
        let lab = try Lab()
        try lab.writer("broken", components: "{\"writer\":")
        let s = FreezeSession(config: lab.config(["broken", "ghost"]), volumes: [lab.vol], log: { _ in })
        #expect(s.writerErrors.count == 2)
        #expect(s.writerErrors.contains { $0.contains("'ghost': no such writer") })
        #expect(s.writerErrors.contains { $0.contains("'broken'") && $0.contains("not a valid ComponentsReply") })
    }

    @Test func endOfFileThawsAWriterWhoseHostIsGone() throws {
        let lab = try Lab()
        try lab.writer("orphan")
        var s: FreezeSession? = FreezeSession(config: lab.config(["orphan"]), volumes: [lab.vol], log: { _ in })
        #expect(s!.freeze(log: { _ in }).isEmpty)
        s = nil   // the host goes away without a thaw line: the writer's stdin closes
        _ = s
        let deadline = Date().addingTimeInterval(5)
        while !lab.exists("orphan.thawed") && Date() < deadline { usleep(20_000) }
        #expect(lab.read("orphan.thawline") == "eof\n" || lab.exists("orphan.thawed"))
    }

    @Test func hiddenAndBackupFilesAreNotWriters() throws {
        let lab = try Lab()
        for n in ["real", ".hidden", "real~", "real.dpkg-old", "real.disabled"] { try lab.writer(n) }
        FileManager.default.createFile(atPath: lab.dir + "/writers.d/notexec", contents: Data("#!/bin/sh\n".utf8))
        var c = lab.config([])
        c.selection = .all
        let names = WriterDiscovery.find(c).writers.filter { $0.kind == "external" }.map(\.name)
        #expect(names == ["real"])
    }
}
