// `--via fuse`: the protected device is a loop device over the file that
// libnbd's nbdfuse presents from HotCore's NBD socket.
//
//   /dev/loopN  (LOOP_CONFIGURE with direct I/O: no page cache in the loop)
//     └─ RUN/NAME/fuse/disk   (nbdfuse, FUSE; loop's O_DIRECT opens bypass
//          │                   the FUSE page cache, flushes become NBD FLUSH)
//          └─ NBD over RUN/NAME/nbd.sock → HotCore
//
// With direct I/O end to end, a write that completed on /dev/loopN has been
// answered by HotCore, so a snapshot armed after it cannot miss it. The
// loop is refused if the kernel would not give it direct I/O.
import HotOS
import Logging
#if canImport(Glibc)
import Glibc
#endif

final class FuseFrontend: Frontend, @unchecked Sendable {
    let runDir: String
    let mountDir: String
    let file: String
    let logger: Logger
    private(set) var pid: pid_t = -1
    private(set) var loopDevice: String?

    enum FrontendError: Error, CustomStringConvertible {
        case missingTool(String)
        case failed(String)
        var description: String {
            switch self {
            case .missingTool(let t): return "\(t) is not installed (apt-get install libnbd-bin fuse3)"
            case .failed(let s): return s
            }
        }
    }

    init(runDir: String, logger: Logger) {
        self.runDir = runDir
        mountDir = runDir + "/fuse"
        file = mountDir + "/disk"
        self.logger = logger
    }

    static func which(_ tool: String) -> String? {
        for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
            let p = dir + "/" + tool
            if access(p, X_OK) == 0 { return p }
        }
        return nil
    }

    /// Starts nbdfuse against the server's socket (its log: RUN/NAME/nbdfuse.log),
    /// waits for its file, attaches the loop.
    func start(server: NBDServer, size: UInt64, sectorSize: Int) throws -> String {
        let logFD = open(runDir + "/nbdfuse.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        defer { if logFD >= 0 { close(logFD) } }
        let socket = server.socketPath
        guard let nbdfuse = FuseFrontend.which("nbdfuse") else { throw FrontendError.missingTool("nbdfuse") }
        mkdir(mountDir, 0o700)
        pid = try ProcessControl.spawn([nbdfuse, "-C", "4", file, "--unix", socket], ioFlusher: true, logFD: logFD)
        // nbdfuse serves once the file shows the device's size.
        let deadline = monotonicNanos() + 15_000_000_000
        while true {
            var st = stat()
            if stat(file, &st) == 0 && UInt64(st.st_size) == size { break }
            if let status = ProcessControl.reap(pid) {
                pid = -1
                throw FrontendError.failed("nbdfuse exited (status \(status)) before serving; see the daemon log")
            }
            if monotonicNanos() > deadline { throw FrontendError.failed("nbdfuse did not present \(file) within 15 s") }
            usleep(20_000)
        }
        let loop = try Loop.attach(file: file, directIO: true)
        loopDevice = loop
        guard (try? Loop.isDirectIO(loop)) == true else {
            throw FrontendError.failed("the kernel refused direct I/O for \(loop) over \(file): without it a snapshot could miss writes held in the page cache")
        }
        logger.info("fuse: \(loop) over \(file) (nbdfuse pid \(pid), direct I/O)")
        return loop
    }

    /// Detaches the loop and unmounts nbdfuse; waits for it to exit.
    func stop() {
        if let loop = loopDevice {
            do { try Loop.detach(loop) } catch { logger.warning("fuse: detaching \(loop): \(error)") }
            // Autoclear finishes once the last opener is gone; wait for it.
            let name = String(loop.split(separator: "/").last ?? "")
            for _ in 0..<200 {
                if access("/sys/block/\(name)/loop/backing_file", F_OK) != 0 { break }
                usleep(10_000)
            }
            loopDevice = nil
        }
        if pid > 0 {
            if let fm = FuseFrontend.which("fusermount3") ?? FuseFrontend.which("fusermount") {
                for _ in 0..<50 {
                    if let r = try? ProcessControl.run([fm, "-u", mountDir]), r.status == 0 { break }
                    usleep(100_000)
                }
            }
            var waited = 0
            while ProcessControl.reap(pid) == nil && waited < 100 { usleep(50_000); waited += 1 }
            if waited >= 100 { kill(pid, SIGKILL); _ = ProcessControl.reap(pid, block: true) }
            pid = -1
        }
        rmdir(mountDir)
    }
}
