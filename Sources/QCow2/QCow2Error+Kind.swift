// QCow2Error's kind (HotErrors/FailureKind.swift).
import HotErrors

extension QCow2Error: CodedError {
    public var kind: FailureKind { .failed }
    public var context: [String: String] { path.map { ["path": $0] } ?? [:] }
}
