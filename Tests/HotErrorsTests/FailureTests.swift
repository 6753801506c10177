import Testing
import HotErrors

/// An error that states only its kind: its context is the protocol's default.
private struct Bare: CodedError {
    var kind: FailureKind { .refused }
    var description: String { "bare" }
}

struct FailureTests {
    @Test("Failure carries its kind, message and context, and says the message alone")
    func failureCarriesKindMessageContext() {
        let f = Failure(.unreachable, "libvirt at qemu:///system does not answer", context: ["uri": "qemu:///system"])
        #expect(f.kind == .unreachable)
        #expect(f.description == "libvirt at qemu:///system does not answer")
        #expect("\(f)" == f.description)
        #expect(f.context == ["uri": "qemu:///system"])
        #expect(Failure(.failed, "x").context.isEmpty)
    }

    @Test("a CodedError without context has an empty one")
    func contextDefaultsToEmpty() {
        let e: any CodedError = Bare()
        #expect(e.context.isEmpty)
        #expect(e.kind == .refused)
    }

    @Test("FailureKind.of: an error's own kind, and failed for an error without one")
    func kindOfAnyError() {
        struct Plain: Error {}
        #expect(FailureKind.of(Failure(.sessionFailed, "s")) == .sessionFailed)
        #expect(FailureKind.of(Bare()) == .refused)
        #expect(FailureKind.of(Plain()) == .failed)
    }

    @Test("kinds are named by their raw values, stable for JSON")
    func rawValues() {
        #expect(FailureKind.allCases.map(\.rawValue) == [
            "usage", "refused", "failed", "sessionFailed", "hookAborted",
            "writerFreezeFailed", "completeWithWarnings", "unreachable", "interrupted",
        ])
    }
}
