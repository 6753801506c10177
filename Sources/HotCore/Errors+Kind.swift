// The kinds of HotCore's errors (HotErrors/FailureKind.swift).
import HotErrors

extension EngineError: CodedError {
    /// A failed session is the session's failure (the live volume is
    /// unharmed); the rest are requests the engine cannot serve.
    public var kind: FailureKind {
        switch self {
        case .sessionFailed: return .sessionFailed
        case .wrongPhase, .noSession, .archived, .outOfRange, .timedOut, .changeMapMismatch: return .failed
        }
    }
}

extension SpillError: CodedError {
    public var kind: FailureKind { .failed }
}
