// Device-mapper through libdevmapper (no dmsetup at run time): create a
// device with a table, reload, suspend, resume, remove, and read info,
// tables, status and the device list. Every call runs under one process-wide
// lock (libdevmapper keeps global state: node operations, udev cookies).
//
// Device nodes: create, resume and remove carry a udev cookie and wait for
// it (dm_udev_wait), which waits for udev where it runs and otherwise lets
// libdevmapper create /dev/mapper/NAME itself (without udev set
// DM_DISABLE_UDEV=1, as the test VM does).
//
// libdevmapper's log reaches `DeviceMapper.setLogHandler` through the C
// trampoline in hs_dm.h; the last error-level message of a failed call is
// part of the thrown `DMError`.
#if canImport(Glibc)
import Glibc
#endif
import CDevMapper
import CHotShim
import HotSync

public struct DMError: Error, CustomStringConvertible, Sendable {
    public var op: String
    public var device: String
    public var errno: Int32
    public var detail: String?

    public var description: String {
        var s = "device-mapper \(op) \(device) failed"
        if errno != 0 { s += ": \(String(cString: strerror(errno)))" }
        if let d = detail, !d.isEmpty { s += " (\(d))" }
        return s
    }
}

public struct DMInfo: Equatable, Sendable {
    public var name: String
    public var uuid: String
    public var suspended: Bool
    public var liveTable: Bool
    public var inactiveTable: Bool
    public var openCount: Int32
    public var major: UInt32
    public var minor: UInt32
    public var readOnly: Bool
    public var targetCount: Int32
    public var deferredRemove: Bool

    /// "MAJOR:MINOR", as tables name devices.
    public var devNumber: String { "\(major):\(minor)" }
}

/// One libdevmapper log message.
public struct DMLogMessage: Sendable {
    /// syslog-style: 2 fatal, 3 error, 4 warning, 5 notice, 6 info, 7 debug.
    public var level: Int
    public var file: String
    public var line: Int
    public var message: String
}

public enum DeviceMapper {
    /// Whether this kernel has device-mapper (its control node exists).
    public static var available: Bool { access("/dev/mapper/control", F_OK) == 0 }

    public static func nodePath(_ name: String) -> String { "/dev/mapper/" + name }

    /// A path that opens device `name`: /dev/mapper/NAME once its node
    /// exists (pending node operations are run first), else devtmpfs's
    /// /dev/dm-MINOR.
    public static func path(name: String) -> String {
        let node = nodePath(name)
        if access(node, F_OK) == 0 { return node }
        DMState.shared.withLock { dm_task_update_nodes() }
        if access(node, F_OK) == 0 { return node }
        if let i = try? info(name: name), access("/dev/dm-\(i.minor)", F_OK) == 0 { return "/dev/dm-\(i.minor)" }
        return node
    }

    /// Routes libdevmapper's log to `handler` (nil: libdevmapper's own stderr output).
    public static func setLogHandler(_ handler: (@Sendable (DMLogMessage) -> Void)?) {
        DMState.shared.withLock {
            DMState.shared.handler = handler
            hs_dm_set_log_sink(handler == nil ? nil : dmLogSink)
        }
    }

    // MARK: changing devices

    /// Creates device `name` with `table` (libdevmapper loads and resumes it).
    public static func create(name: String, uuid: String?, table: [DMTarget], readOnly: Bool = false) throws {
        try run(DM_DEVICE_CREATE, "create", name, cookie: true) { t in
            if let uuid, dm_task_set_uuid(t, uuid) == 0 { return false }
            if readOnly, dm_task_set_ro(t) == 0 { return false }
            if dm_task_set_add_node(t, DM_ADD_NODE_ON_CREATE) == 0 { return false }
            return addTargets(t, table)
        }
    }

    /// Loads `table` as the inactive table of `name`; `resume` makes it live.
    public static func reload(name: String, table: [DMTarget]) throws {
        try run(DM_DEVICE_RELOAD, "reload", name) { addTargets($0, table) }
    }

    /// Suspends `name`. `lockfs` freezes a filesystem on it first (leave it
    /// off when the caller froze it already: freezing twice fails);
    /// `flush` false (noflush) keeps in-flight I/O queued instead of
    /// completing it.
    public static func suspend(name: String, lockfs: Bool, flush: Bool = true) throws {
        try run(DM_DEVICE_SUSPEND, "suspend", name) { t in
            if !lockfs, dm_task_skip_lockfs(t) == 0 { return false }
            if !flush, dm_task_no_flush(t) == 0 { return false }
            return true
        }
    }

    /// Resumes `name` (switching to its inactive table if one was loaded).
    public static func resume(name: String) throws {
        try run(DM_DEVICE_RESUME, "resume", name, cookie: true) { _ in true }
    }

    /// Removes `name`. `deferred`: if it is still open, the kernel removes
    /// it when the last opener closes it.
    public static func remove(name: String, deferred: Bool = false) throws {
        // No dm_task_retry_remove: it retries a busy device for seconds; the
        // callers handle EBUSY themselves (an error table, a deferred remove).
        try run(DM_DEVICE_REMOVE, "remove", name, cookie: true) { t in
            if deferred, dm_task_deferred_remove(t) == 0 { return false }
            return true
        }
    }

    // MARK: queries

    /// The device's facts, or nil when no device of that name exists.
    public static func info(name: String) throws -> DMInfo? {
        try query(DM_DEVICE_INFO, "info", name) { t in readInfo(t) }
    }

    /// The dm device with this device number, or nil if it is not one.
    public static func info(major: UInt32, minor: UInt32) throws -> DMInfo? {
        guard access("/sys/dev/block/\(major):\(minor)/dm", F_OK) == 0 else { return nil }
        return try query(DM_DEVICE_INFO, "info", "\(major):\(minor)", byNumber: (major, minor)) { t in readInfo(t) }
    }

    /// The dm device at a block device path (/dev/mapper/X, /dev/dm-N, a
    /// symlink to either), or nil if the path is not a dm device.
    public static func info(path: String) throws -> DMInfo? {
        let (ma, mi) = try deviceNumber(path)
        return try info(major: ma, minor: mi)
    }

    /// The live table of `name`.
    public static func table(name: String) throws -> [DMTarget] {
        try query(DM_DEVICE_TABLE, "table", name) { targets($0) } ?? []
    }

    /// The status of each target of `name` (params hold the status text).
    public static func status(name: String) throws -> [DMTarget] {
        try query(DM_DEVICE_STATUS, "status", name) { targets($0) } ?? []
    }

    /// Every dm device: name and device number.
    public static func list() throws -> [(name: String, major: UInt32, minor: UInt32)] {
        try query(DM_DEVICE_LIST, "list", "") { t in
            var out: [(String, UInt32, UInt32)] = []
            guard let first = dm_task_get_names(t) else { return out }
            var p: UnsafeRawPointer? = UnsafeRawPointer(first)
            if hs_dm_names_dev(p) == 0 { return out }
            while let n = p {
                let dev = hs_dm_names_dev(n)
                out.append((String(cString: hs_dm_names_name(n)), UInt32(hs_major(dev)), UInt32(hs_minor(dev))))
                p = hs_dm_names_next(n)
            }
            return out
        } ?? []
    }

    /// Major and minor number of the block device at `path`.
    public static func deviceNumber(_ path: String) throws -> (UInt32, UInt32) {
        var st = stat()
        try syscall("stat", path) { stat(path, &st) }
        guard (st.st_mode & S_IFMT) == S_IFBLK else { throw OSError("stat", errno: ENOTBLK, object: path) }
        return (UInt32(hs_major(UInt64(st.st_rdev))), UInt32(hs_minor(UInt64(st.st_rdev))))
    }

    // MARK: plumbing

    private static func addTargets(_ t: OpaquePointer, _ table: [DMTarget]) -> Bool {
        for x in table where dm_task_add_target(t, x.start, x.length, x.type, x.params) == 0 { return false }
        return true
    }

    private static func readInfo(_ t: OpaquePointer) -> DMInfo? {
        var i = dm_info()
        guard dm_task_get_info(t, &i) != 0, i.exists != 0 else { return nil }
        let name = dm_task_get_name(t).map { String(cString: $0) } ?? ""
        let uuid = dm_task_get_uuid(t).map { String(cString: $0) } ?? ""
        return DMInfo(name: name, uuid: uuid, suspended: i.suspended != 0, liveTable: i.live_table != 0,
                      inactiveTable: i.inactive_table != 0, openCount: i.open_count, major: i.major, minor: i.minor,
                      readOnly: i.read_only != 0, targetCount: i.target_count, deferredRemove: i.deferred_remove != 0)
    }

    private static func targets(_ t: OpaquePointer) -> [DMTarget] {
        var out: [DMTarget] = []
        var next: UnsafeMutableRawPointer?
        repeat {
            var start: UInt64 = 0, length: UInt64 = 0
            var type: UnsafeMutablePointer<CChar>?, params: UnsafeMutablePointer<CChar>?
            next = dm_get_next_target(t, next, &start, &length, &type, &params)
            if let type {
                out.append(DMTarget(start: start, length: length, type: String(cString: type),
                                    params: params.map { String(cString: $0) } ?? ""))
            }
        } while next != nil
        return out
    }

    /// Runs a changing task; `configure` returns false when libdevmapper
    /// refused a setting (out of memory, a name too long).
    private static func run(_ type: Int, _ op: String, _ name: String, cookie: Bool = false,
                            configure: (OpaquePointer) -> Bool) throws {
        try DMState.shared.withLock {
            DMState.shared.lastError = nil
            guard let t = dm_task_create(Int32(type)) else { throw DMError(op: op, device: name, errno: ENOMEM, detail: nil) }
            defer { dm_task_destroy(t) }
            guard dm_task_set_name(t, name) != 0, configure(t) else {
                throw DMError(op: op, device: name, errno: EINVAL, detail: DMState.shared.lastError)
            }
            var c: UInt32 = 0
            if cookie { _ = dm_task_set_cookie(t, &c, 0) }
            let ok = dm_task_run(t) != 0
            let e = ok ? 0 : dm_task_get_errno(t)
            if cookie { _ = dm_udev_wait(c) }
            if !ok { throw DMError(op: op, device: name, errno: e, detail: DMState.shared.lastError) }
        }
    }

    /// Runs a query; nil when the device does not exist (ENXIO).
    private static func query<T>(_ type: Int, _ op: String, _ name: String, byNumber: (UInt32, UInt32)? = nil,
                                 read: (OpaquePointer) -> T?) throws -> T? {
        try DMState.shared.withLock {
            DMState.shared.lastError = nil
            guard let t = dm_task_create(Int32(type)) else { throw DMError(op: op, device: name, errno: ENOMEM, detail: nil) }
            defer { dm_task_destroy(t) }
            if let (ma, mi) = byNumber {
                _ = dm_task_set_major(t, Int32(ma))
                _ = dm_task_set_minor(t, Int32(mi))
            } else if !name.isEmpty {
                guard dm_task_set_name(t, name) != 0 else { throw DMError(op: op, device: name, errno: EINVAL, detail: DMState.shared.lastError) }
            }
            if dm_task_run(t) == 0 {
                let e = dm_task_get_errno(t)
                if e == ENXIO || e == ENODEV { return nil }
                throw DMError(op: op, device: name, errno: e, detail: DMState.shared.lastError)
            }
            if type != DM_DEVICE_LIST && type != DM_DEVICE_INFO {
                var i = dm_info()
                if dm_task_get_info(t, &i) != 0 && i.exists == 0 { return nil }
            }
            return read(t)
        }
    }
}

/// The process-wide lock, the log handler and the last error message.
final class DMState: @unchecked Sendable {
    static let shared = DMState()
    /// Recursive: libdevmapper's log callback runs inside a locked task
    /// and takes the lock again.
    private let mutex = Lock(recursive: true)
    var handler: (@Sendable (DMLogMessage) -> Void)?
    var lastError: String?

    private init() {}

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        try mutex.withLock(body)
    }
}

/// libdevmapper → the trampoline → here (always inside a DMState lock, on
/// the thread that runs the task).
private func dmLogSink(_ level: Int32, _ file: UnsafePointer<CChar>?, _ line: Int32, _ errnoOrClass: Int32,
                       _ message: UnsafePointer<CChar>?) {
    let lvl = Int(level & 0xf)
    let text = message.map { String(cString: $0) } ?? ""
    let st = DMState.shared
    st.withLock {
        if lvl <= 3 { st.lastError = text }
        st.handler?(DMLogMessage(level: lvl, file: file.map { String(cString: $0) } ?? "", line: Int(line), message: text))
    }
}
