// The container writer: one component per cgroup-v2 container, frozen with
// cgroup.freeze. Containers are the cgroups under machine.slice (systemd
// machines: nspawn, libvirt-lxc, podman's machine scopes) that hold
// processes, and every cgroup named by a `container = CGROUP [ROOT]`
// setting (a path below the cgroup2 mount, or absolute). A container's
// files are its root directory: ROOT if given, else the root directory of
// one of its processes (/proc/PID/root). A container whose root is the
// host's / is listed with that root, so it is seldom fully covered.
//
// Freezing stops every task of the cgroup at its next return to user space;
// the kernel says it is done by "frozen 1" in cgroup.events. hotimage never
// freezes a cgroup that holds itself or its writer process (that would
// deadlock the backup), and thaws by writing 0 even when the freeze did not
// complete in time.
import Foundation
import HotOS

public final class ContainerWriter: BuiltinWriter {
    public static let name = "containers"
    public static let summary = "cgroup-v2 containers (machine.slice, or 'container = CGROUP [ROOT]'), frozen with cgroup.freeze"

    struct Container { var id: String; var path: String; var root: String? }

    let settings: WriterSettings
    let cgroupRoot: String?
    let freezeWait: Double
    private var frozen: [String: String] = [:]     // id -> cgroup directory

    public required init(settings: WriterSettings) throws {
        self.settings = settings
        // container-cgroup-root: where to look for machine.slice instead of
        // the cgroup2 mount (a test's own subtree, or a nested hierarchy).
        cgroupRoot = settings.value("container-cgroup-root") ?? Self.cgroup2Mount()
        freezeWait = try settings.seconds("container-freeze-wait", default: 30)
    }

    /// Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid system.
    static func cgroup2Mount() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return nil }
        for l in text.split(separator: "\n") {
            let f = l.split(separator: " ")
            if f.count > 2, f[2] == "cgroup2" { return String(f[1]).replacingOccurrences(of: "\\040", with: " ") }
        }
        return nil
    }

    func containers() throws -> [Container] {
        guard let root = cgroupRoot else {
            if !settings.values("container").isEmpty { throw WriterError("containers are configured but cgroup v2 is not mounted") }
            unavailableNote("containers", "cgroup v2 is not mounted: no containers")
            return []
        }
        var out: [Container] = []
        for spec in settings.values("container") {
            let parts = spec.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            guard let cg = parts.first, parts.count <= 2 else { throw WriterError("container = '\(spec)': want CGROUP [ROOT]") }
            let dir = cg.hasPrefix(root + "/") ? cg : root + "/" + cg.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
            guard FileManager.default.fileExists(atPath: dir + "/cgroup.freeze") else {
                throw WriterError("container = '\(spec)': \(dir) is not a cgroup-v2 cgroup with cgroup.freeze")
            }
            out.append(Container(id: String(dir.dropFirst(root.count + 1)), path: dir, root: parts.count == 2 ? parts[1] : nil))
        }
        let slice = root + "/machine.slice"
        for n in ((try? FileManager.default.contentsOfDirectory(atPath: slice)) ?? []).sorted() {
            let dir = slice + "/" + n
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: dir + "/cgroup.freeze", isDirectory: &isDir),
                  !out.contains(where: { $0.path == dir }), !Self.pids(dir).isEmpty else { continue }
            out.append(Container(id: "machine.slice/" + n, path: dir, root: nil))
        }
        return out
    }

    /// Every process in the cgroup and below.
    static func pids(_ dir: String) -> [Int32] {
        var out = ((try? String(contentsOfFile: dir + "/cgroup.procs", encoding: .utf8)) ?? "")
            .split(separator: "\n").compactMap { Int32($0) }
        for n in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: dir + "/" + n, isDirectory: &isDir), isDir.boolValue { out += pids(dir + "/" + n) }
        }
        return out
    }

    func rootDirectory(_ c: Container) -> String? {
        if let r = c.root { return r }
        for pid in Self.pids(c.path) {
            if let r = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/root") { return r }
        }
        return nil
    }

    public func components(volumes: [String]) throws -> [WriterComponent] {
        try containers().map { c in
            let pids = Self.pids(c.path)
            let root = rootDirectory(c)
            return WriterComponent(
                id: c.id, state: (Self.isFrozen(c.path) ? "frozen" : "running") + ", \(pids.count) process(es)",
                files: root.map { [ComponentFile(path: $0, role: "root")] } ?? [],
                details: ["cgroup": c.path])
        }
    }

    static func isFrozen(_ dir: String) -> Bool {
        ((try? String(contentsOfFile: dir + "/cgroup.events", encoding: .utf8)) ?? "").contains("frozen 1")
    }

    /// Writes cgroup.freeze and waits for cgroup.events to agree.
    static func setFrozen(_ dir: String, _ on: Bool, timeout: Double) throws {
        let fd = open(dir + "/cgroup.freeze", O_WRONLY)
        guard fd >= 0 else { throw WriterError("cannot open \(dir)/cgroup.freeze: \(String(cString: strerror(errno)))") }
        let v: [UInt8] = on ? [49] : [48]
        let n = write(fd, v, 1)
        let e = errno
        close(fd)
        guard n == 1 else { throw WriterError("writing \(dir)/cgroup.freeze: \(String(cString: strerror(e)))") }
        let deadline = monotonicNanos() + UInt64(timeout * 1e9)
        while isFrozen(dir) != on {
            if monotonicNanos() >= deadline {
                throw WriterError(String(format: "the kernel did not report it %@ within %.0f s", on ? "frozen" : "thawed", timeout))
            }
            usleep(2_000)
        }
    }

    /// True when the cgroup (or one below it) holds this process or its parent.
    static func holdsUs(_ dir: String) -> Bool {
        let ours = Set([getpid(), getppid()])
        return pids(dir).contains { ours.contains($0) }
    }

    public func freeze(_ ids: [String], request: FreezeRequest) -> [ComponentResult] {
        let all = (try? containers()) ?? []
        let timeout = min(freezeWait, request.timeoutSeconds)
        return ids.map { id in
            guard let c = all.first(where: { $0.id == id }) else { return ComponentResult(id: id, ok: false, message: "no such container (gone?)") }
            if Self.holdsUs(c.path) { return ComponentResult(id: id, ok: false, message: "the cgroup holds hotimage itself; freezing it would stop the backup") }
            if Self.isFrozen(c.path) {
                // Someone else froze it: it stays as it is, and we must not thaw it.
                return ComponentResult(id: id, ok: true, method: "already-frozen", message: "was frozen already; left frozen")
            }
            let t0 = monotonicNanos()
            do {
                try Self.setFrozen(c.path, true, timeout: timeout)
                frozen[id] = c.path
                return ComponentResult(id: id, ok: true, method: "cgroup-freeze",
                                       message: String(format: "%d process(es) frozen in %.0f ms", Self.pids(c.path).count, Double(monotonicNanos() - t0) / 1e6))
            } catch {
                try? Self.setFrozen(c.path, false, timeout: 5)
                return ComponentResult(id: id, ok: false, method: "cgroup-freeze", message: "\(error)")
            }
        }
    }

    public func thaw(_ ids: [String]) -> [ComponentResult] {
        ids.map { id in
            guard let dir = frozen[id] else { return ComponentResult(id: id, ok: true, message: "not frozen by us; left as it was") }
            do {
                try Self.setFrozen(dir, false, timeout: 10)
                frozen[id] = nil
                return ComponentResult(id: id, ok: true, method: "cgroup-freeze")
            } catch {
                return ComponentResult(id: id, ok: false, method: "cgroup-freeze", message: "\(error)")
            }
        }
    }
}
