/// A kind and a message, for places that need no type of their own.
public struct Failure: CodedError, Equatable, Sendable {
    public var kind: FailureKind
    public var message: String
    public var context: [String: String]

    public init(_ kind: FailureKind, _ message: String, context: [String: String] = [:]) {
        self.kind = kind
        self.message = message
        self.context = context
    }

    public var description: String { message }
}
