// Device-mapper tables, snapshot status lines and hotimage's device names,
// as pure values: no ioctl here, so all of it is tested without a kernel.
//
// A table is lines of "START LENGTH TYPE PARAMS" in 512-byte sectors. The
// kernel names devices in tables by "MAJOR:MINOR". The targets hotimage
// builds:
//
//   linear           M:m OFFSET                 a window onto another device
//   snapshot-origin  M:m                        writes to M:m copy the old chunk
//                                               into every snapshot of M:m first
//   snapshot         ORIGIN COW P|N CHUNK       a read-only point-in-time view;
//                                               N: transient exception store
//   error                                       every I/O fails (a busy device
//                                               being removed)
//
// The snapshot's STATUS line is "USED/TOTAL METADATA" in sectors while
// valid, "Invalid" once the COW store overflowed or failed, "Overflow" for
// the PO variant, "Merge failed" for merges (not used here).
//
// Names and UUIDs (dm names ≤ 127 bytes, UUIDs ≤ 128): every device hotimage
// creates is called "hotimage-…" and carries a UUID starting "HOTIMAGE-"; a
// cleanup touches a device only when both say it is ours.
//
//   hotimage-NAME        UUID HOTIMAGE-attach-NAME              attach --via dm (linear)
//   hotimage-NAME-real   UUID HOTIMAGE-real-PID-START-NAME      the origin's old table
//   hotimage-NAME-cow    UUID HOTIMAGE-cow-PID-START-NAME       linear over the hb loops
//   hotimage-NAME-snap   UUID HOTIMAGE-snap-PID-START-NAME      the snapshot
//
// PID and START (the owner's start time in clock ticks, /proc/PID/stat field
// 22) name the session daemon that owns the device: when no process with
// that pid and start time lives, the device is a leftover.

public struct DMTarget: Equatable, Sendable, CustomStringConvertible {
    public var start: UInt64      // sectors
    public var length: UInt64     // sectors
    public var type: String
    public var params: String

    public init(start: UInt64, length: UInt64, type: String, params: String) {
        self.start = start
        self.length = length
        self.type = type
        self.params = params
    }

    public var description: String { "\(start) \(length) \(type)" + (params.isEmpty ? "" : " \(params)") }

    public static func linear(start: UInt64 = 0, length: UInt64, device: String, offset: UInt64 = 0) -> DMTarget {
        DMTarget(start: start, length: length, type: "linear", params: "\(device) \(offset)")
    }

    public static func snapshotOrigin(length: UInt64, origin: String) -> DMTarget {
        DMTarget(start: 0, length: length, type: "snapshot-origin", params: origin)
    }

    /// `persistent` false is the transient store (N): exceptions kept in
    /// memory only, no metadata chunks in the COW device.
    public static func snapshot(length: UInt64, origin: String, cow: String, persistent: Bool, chunkSectors: UInt64) -> DMTarget {
        DMTarget(start: 0, length: length, type: "snapshot",
                 params: "\(origin) \(cow) \(persistent ? "P" : "N") \(chunkSectors)")
    }

    public static func error(length: UInt64) -> DMTarget {
        DMTarget(start: 0, length: length, type: "error", params: "")
    }
}

public enum DMTableError: Error, Equatable, CustomStringConvertible {
    case malformed(line: String)
    case gap(expected: UInt64, found: UInt64)

    public var description: String {
        switch self {
        case .malformed(let l): return "malformed device-mapper table line '\(l)'"
        case .gap(let e, let f): return "device-mapper table has a gap: a target starts at sector \(f), expected \(e)"
        }
    }
}

public enum DMTable {
    /// A linear concatenation of `pieces` (device "M:m", length in sectors)
    /// in order: piece i starts where piece i-1 ends.
    public static func concatenation(_ pieces: [(device: String, sectors: UInt64)]) -> [DMTarget] {
        var at: UInt64 = 0
        var out: [DMTarget] = []
        for p in pieces where p.sectors > 0 {
            out.append(.linear(start: at, length: p.sectors, device: p.device))
            at += p.sectors
        }
        return out
    }

    /// Parses "START LENGTH TYPE [PARAMS]" lines (as `dmsetup table` prints).
    public static func parse(_ text: String) throws -> [DMTarget] {
        var out: [DMTarget] = []
        for raw in text.split(separator: "\n") {
            let line = trimmed(raw)
            if line.isEmpty { continue }
            let f = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: true)
            guard f.count >= 3, let s = UInt64(f[0]), let l = UInt64(f[1]), l > 0 else { throw DMTableError.malformed(line: line) }
            out.append(DMTarget(start: s, length: l, type: String(f[2]), params: f.count > 3 ? String(f[3]) : ""))
        }
        return out
    }

    /// The device size a table maps, checking that targets are contiguous from 0.
    public static func sectors(_ table: [DMTarget]) throws -> UInt64 {
        var at: UInt64 = 0
        for t in table {
            guard t.start == at else { throw DMTableError.gap(expected: at, found: t.start) }
            at += t.length
        }
        return at
    }

    /// The "M:m" devices a table refers to (linear, snapshot-origin, snapshot).
    public static func devices(_ table: [DMTarget]) -> [String] {
        var out: [String] = []
        for t in table {
            let p = t.params.split(separator: " ").map(String.init)
            switch t.type {
            case "linear", "snapshot-origin": if let d = p.first { out.append(d) }
            case "snapshot": out.append(contentsOf: p.prefix(2))
            default: break
            }
        }
        return out
    }
}

/// `s` without leading and trailing blanks (HotOS does not use Foundation).
private func trimmed<S: StringProtocol>(_ s: S) -> String {
    var t = Substring(s)
    while let c = t.first, c == " " || c == "\t" || c == "\n" { t = t.dropFirst() }
    while let c = t.last, c == " " || c == "\t" || c == "\n" { t = t.dropLast() }
    return String(t)
}

/// What a `snapshot` target's status line says.
public enum DMSnapshotState: Equatable, Sendable, CustomStringConvertible {
    /// Sectors of the COW device in use (data + metadata) and its size.
    case usage(usedSectors: UInt64, totalSectors: UInt64, metadataSectors: UInt64)
    /// The snapshot was dropped (its COW store overflowed or failed).
    case invalid
    /// Full, with overflow support (PO): the snapshot refuses new writes.
    case overflow
    case mergeFailed
    case unknown(String)

    public init(status: String) {
        let s = trimmed(status)
        switch s {
        case "Invalid": self = .invalid
        case "Overflow": self = .overflow
        case "Merge failed": self = .mergeFailed
        default:
            let f = s.split(separator: " ")
            let ut = f.first?.split(separator: "/") ?? []
            if ut.count == 2, let u = UInt64(ut[0]), let t = UInt64(ut[1]) {
                self = .usage(usedSectors: u, totalSectors: t, metadataSectors: f.count > 1 ? UInt64(f[1]) ?? 0 : 0)
            } else {
                self = .unknown(s)
            }
        }
    }

    /// Still a point-in-time view.
    public var isValid: Bool { if case .usage = self { return true } else { return false } }

    public var description: String {
        switch self {
        case .usage(let u, let t, let m): return "\(u)/\(t) \(m)"
        case .invalid: return "Invalid"
        case .overflow: return "Overflow"
        case .mergeFailed: return "Merge failed"
        case .unknown(let s): return s
        }
    }
}

/// The roles of the devices hotimage creates (see the table at the top).
public enum DMRole: String, Sendable, CaseIterable {
    case attach, real, cow, snap

    /// Session devices belong to one session daemon; attach devices outlive it.
    public var isSession: Bool { self != .attach }
}

/// Who owns a device, as encoded in its UUID.
public struct DMOwner: Equatable, Sendable {
    public var role: DMRole
    public var name: String
    public var pid: Int32?
    public var startTime: UInt64?

    public init(role: DMRole, name: String, pid: Int32? = nil, startTime: UInt64? = nil) {
        self.role = role
        self.name = name
        self.pid = pid
        self.startTime = startTime
    }

    public static let uuidPrefix = "HOTIMAGE-"
    public static let namePrefix = "hotimage-"

    /// The dm device name for `name` in `role`.
    public static func deviceName(_ name: String, _ role: DMRole) -> String {
        role == .attach ? namePrefix + name : namePrefix + name + "-" + role.rawValue
    }

    public var deviceName: String { DMOwner.deviceName(name, role) }

    public var uuid: String {
        if role.isSession, let pid, let startTime {
            return "\(DMOwner.uuidPrefix)\(role.rawValue)-\(pid)-\(startTime)-\(name)"
        }
        return "\(DMOwner.uuidPrefix)\(role.rawValue)-\(name)"
    }

    /// Reads a UUID written by `uuid`; nil for anything hotimage did not create.
    public init?(uuid: String) {
        guard uuid.hasPrefix(DMOwner.uuidPrefix) else { return nil }
        let rest = uuid.dropFirst(DMOwner.uuidPrefix.count)
        guard let dash = rest.firstIndex(of: "-"), let role = DMRole(rawValue: String(rest[..<dash])) else { return nil }
        let tail = rest[rest.index(after: dash)...]
        if role.isSession {
            let f = tail.split(separator: "-", maxSplits: 2, omittingEmptySubsequences: false)
            guard f.count == 3, let pid = Int32(f[0]), let st = UInt64(f[1]), !f[2].isEmpty else { return nil }
            self.init(role: role, name: String(f[2]), pid: pid, startTime: st)
        } else {
            guard !tail.isEmpty else { return nil }
            self.init(role: role, name: String(tail))
        }
    }

    /// Whether `deviceName` is the name this owner's device must have: a
    /// device is ours only when its name and its UUID agree.
    public func matches(deviceName dm: String) -> Bool { dm == deviceName }

    /// Longest attachment name whose session device names and UUIDs fit.
    public static let maxNameLength = 80
}
