import Foundation
import XCTest
@testable import HotDaemon

/// The launcher's side of the ready line, against stand-in daemons (sh).
final class DaemonLauncherTests: XCTestCase {
    private var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "hotimage-launcher-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func launch(_ script: String, within: Double = 5) throws -> DaemonLauncher.Ready {
        try DaemonLauncher.launch(arguments: ["-c", script], dir: dir, within: within, executable: "/bin/sh")
    }

    private func failure(_ script: String, within: Double = 5) -> DaemonLauncher.Failure? {
        do { _ = try launch(script, within: within); return nil } catch { return error as? DaemonLauncher.Failure }
    }

    func testReadyLineGivesTheDeviceAndTheDaemonLivesOn() throws {
        let r = try launch("echo ready /dev/fake0; sleep 2")
        XCTAssertEqual(r.device, "/dev/fake0")
        XCTAssertEqual(r.logPath, dir + "/daemon.log")
        XCTAssertEqual(kill(r.pid, 0), 0, "the daemon must outlive the launcher's wait")
        kill(r.pid, SIGKILL)
    }

    func testTheDaemonKnowsItWasLaunchedAndLogsToItsLog() throws {
        let r = try launch("echo \"launched=$HOTIMAGE_LAUNCHED\" >&2; echo ready /dev/x")
        _ = ProcessControlWait.exit(r.pid)
        let log = try String(contentsOfFile: r.logPath, encoding: .utf8)
        XCTAssertEqual(log, "launched=1\n")
    }

    func testRefusedAndFailedLinesCarryTheMessage() {
        let refused = failure("echo 'refused --via nbd needs the kernel nbd driver'; exit 2")
        XCTAssertEqual(refused?.refused, true)
        XCTAssertEqual(refused?.description, "--via nbd needs the kernel nbd driver")
        let failed = failure("echo 'failed /dev/sdz: no such device'; exit 1")
        XCTAssertEqual(failed?.refused, false)
        XCTAssertEqual(failed?.description, "/dev/sdz: no such device")
    }

    func testADaemonThatDiesSilentlyIsSaidToHaveExitedWithItsStatus() {
        let f = failure("exit 9")
        XCTAssertEqual(f?.refused, false)
        XCTAssertTrue(f?.description.contains("exited (status 9) before the device was ready") ?? false, f?.description ?? "no failure")
    }

    func testADaemonThatNeverAnswersTimesOutAndIsStopped() {
        let t0 = Date()
        let f = failure("echo $$ > \(dir)/sh.pid; exec sleep 30", within: 0.5)
        XCTAssertTrue(f?.description.contains("did not become ready within") ?? false, f?.description ?? "no failure")
        XCTAssertLessThan(Date().timeIntervalSince(t0), 5)
        let pid = (try? String(contentsOfFile: dir + "/sh.pid", encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        XCTAssertNotNil(pid)
        if let pid {
            _ = ProcessControlWait.exit(pid)
            XCTAssertNotEqual(kill(pid, 0), 0, "the silent daemon was not stopped")
        }
    }

    func testALineWithoutANewlineBeforeExitStillCounts() {
        XCTAssertEqual(failure("printf 'refused no newline'; exit 2")?.description, "no newline")
    }
}

/// Reaps a child of this process (the launched stand-in) within 5 s.
enum ProcessControlWait {
    static func exit(_ pid: Int32) -> Int32? {
        for _ in 0..<500 {
            var st: Int32 = 0
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid || r < 0 { return st }
            usleep(10_000)
        }
        return nil
    }
}
