// HotErrors: what kind of failure an error is, apart from what it says.
//
// Every module's errors carry a FailureKind and, where useful, context
// (named values such as the device or the path). The kinds are the outcomes
// a caller acts on differently; the message says which operation and why.
// Only the command line turns kinds into exit codes, in one table
// (Sources/hotimage/ExitCodes.swift); the modules never name a number.
//
//   usage                 the command line is wrong; nothing was done
//   refused               understood, but not done as asked: unsafe (a volume
//                         in use, an image that exists) or impossible (a
//                         backend the source does not have); nothing was done
//   failed                an operation was tried and did not succeed
//                         (reading, writing, a system call, a peer's error)
//   sessionFailed         the backup session (the snapshot, its copy-on-write)
//                         failed; the live volume is unharmed
//   hookAborted           a hook that guards the start (before-snapshot)
//                         failed; nothing was done
//   writerFreezeFailed    a writer could not freeze one of its components;
//                         nothing was imaged
//   completeWithWarnings  the result is complete, but a step after it (an
//                         after-* hook, a writer's thaw) failed
//   unreachable           a service the command needs does not answer or is
//                         not installed (libvirt)
//   interrupted           a signal stopped the operation

public enum FailureKind: String, CaseIterable, Sendable, Codable {
    case usage
    case refused
    case failed
    case sessionFailed
    case hookAborted
    case writerFreezeFailed
    case completeWithWarnings
    case unreachable
    case interrupted
}
