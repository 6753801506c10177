import Foundation
import Testing
import HotOS

// ProcessControl.capture: how the writers run virsh and qemu-img.
@Suite("ProcessControl.capture")
struct CaptureTests {
    @Test("stdout and stderr stay apart; the exit code and the environment come through")
    func outputs() {
        let r = ProcessControl.capture(["/bin/sh", "-c", "echo out; echo err >&2; echo $HIT_X; exit 3"],
                                       environment: ["HIT_X": "x1"], timeout: 10)
        #expect(r.status == 3 && !r.timedOut && !r.ok)
        #expect(r.stdout == "out\nx1\n" && r.stderr == "err\n")
        #expect(r.message == "err")
    }

    @Test("A command that does not exist exits 127, like a shell")
    func missing() {
        let r = ProcessControl.capture(["/nonexistent/hit-tool"], timeout: 10)
        #expect(r.status == 127 && !r.ok)
        #expect(ProcessControl.which("hit-no-such-tool-\(getpid())") == nil)
        #expect(ProcessControl.which("sh") != nil)
    }

    @Test("At the timeout the process group is killed, helpers included")
    func timeout() {
        let t0 = Date()
        // The sleeping child keeps stdout open: only a group kill ends the read.
        let r = ProcessControl.capture(["/bin/sh", "-c", "sleep 30 & echo started; wait"], timeout: 0.5)
        #expect(r.timedOut && !r.ok && r.stdout == "started\n")
        #expect(Date().timeIntervalSince(t0) < 5)
    }

    @Test("interruptGrace: SIGINT first, and the command may clean up and answer")
    func interrupt() {
        let r = ProcessControl.capture(["/bin/sh", "-c", "trap 'echo aborted; exit 4' INT; echo go; while :; do sleep 0.05; done"],
                                       timeout: 0.5, interruptGrace: 5)
        #expect(r.timedOut && r.status == 4)
        #expect(r.stdout == "go\naborted\n")
    }
}
