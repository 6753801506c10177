// The kinds of HotOS's errors (HotErrors/FailureKind.swift).
import HotErrors

extension OSError: CodedError {
    public var kind: FailureKind { .failed }
    public var context: [String: String] {
        var c = ["call": call, "errno": "\(errno)"]
        if !object.isEmpty { c["object"] = object }
        return c
    }
}

extension Ext2Error: CodedError {
    public var kind: FailureKind { .failed }
    public var context: [String: String] { ["call": call, "object": object, "code": "\(code)"] }
}

extension DMError: CodedError {
    public var kind: FailureKind { .failed }
    public var context: [String: String] { ["op": op, "device": device, "errno": "\(errno)"] }
}

extension DMTableError: CodedError {
    public var kind: FailureKind { .failed }
}

extension BlockDevice.OpenError: CodedError {
    /// Busy or not a device: nothing was opened, the caller asked for what
    /// cannot be done; the system refusing otherwise: failed.
    public var kind: FailureKind {
        switch self {
        case .busy, .notADevice: return .refused
        case .os: return .failed
        }
    }
    public var context: [String: String] {
        switch self {
        case .busy(let p), .notADevice(let p): return ["path": p]
        case .os(let e): return e.context
        }
    }
}

extension FSProbeError: CodedError {
    public var kind: FailureKind { .refused }
    public var context: [String: String] {
        switch self {
        case .notADeviceOrFile(let p): return ["path": p]
        }
    }
}

extension HBFileStore.StoreError: CodedError {
    public var kind: FailureKind { .failed }
}
