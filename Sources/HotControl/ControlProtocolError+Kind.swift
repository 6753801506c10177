// ControlProtocolError's kind (HotErrors/FailureKind.swift).
import HotErrors

extension ControlProtocolError: CodedError {
    public var kind: FailureKind { .failed }
    public var context: [String: String] {
        switch self {
        case .unknownOp(let op): return ["op": op]
        }
    }
}
