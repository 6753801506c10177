// DaemonError's kind (HotErrors/FailureKind.swift): a bad request is a
// usage error; an attachment or mount in the way, and the rest, failed.
import HotErrors

extension DaemonError: CodedError {
    public var kind: FailureKind {
        switch self {
        case .usage: return .usage
        case .alreadyAttached, .mounted, .failed: return .failed
        }
    }
    public var context: [String: String] {
        switch self {
        case .alreadyAttached(let name): return ["name": name]
        case .mounted(let device, let mountPoint): return ["device": device, "mountPoint": mountPoint]
        case .usage, .failed: return [:]
        }
    }
}
