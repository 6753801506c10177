/// An error that says what kind of failure it is (FailureKind.swift) and
/// the named values it concerns; `description` is the one-line message.
public protocol CodedError: Error, CustomStringConvertible {
    var kind: FailureKind { get }
    /// Named values the failure concerns ("device", "path", ...); the
    /// message already names them, this is for programs that read them.
    var context: [String: String] { get }
}

extension CodedError {
    public var context: [String: String] { [:] }
}

extension FailureKind {
    /// The kind of any error: its own if it has one, else `failed`.
    public static func of(_ error: Error) -> FailureKind {
        (error as? CodedError)?.kind ?? .failed
    }
}
