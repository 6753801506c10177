// The cut of a coherent set: one point in time across several volumes,
// whatever backend stands behind each (HotCore fuse or nbd, dm-snapshot),
// taken by the client over the members' ordinary session connections.
//
//   1. a write-inactivity pause common to all members: the client watches
//      every member's block I/O counters (BlockIOStat); a write to any of
//      them restarts the wait. Skipped when the writers froze components
//      and every member is frozen (waiting gains nothing then). With every
//      member frozen, no pause within the freeze-pause wait (5 s) means
//      freezing anyway, as for one volume; otherwise the set waits up to the
//      snapshot deadline.
//   2. begin on every member, the frozen ones first: a frozen member is
//      frozen, then armed; a raw member (no filesystem) is armed with its
//      new writes held (`hold`); a wip member writes on, but any write
//      between its arm and its map makes it answer retry (3). So no write
//      that follows a member's cut completes before every member is armed:
//      the cut is the moment the last member is armed, with nothing in
//      flight on any. Each member reads its used-block map in the window.
//      (A wip member is not held: its map read may need the device, and a
//      held write can stall the NBD connection that read would use.)
//   3. map on every member: protection narrowed, filesystems thawed, held
//      writes released. A wip member whose filesystem wrote during the map
//      read answers retry: every member ends (the transient daemons stay)
//      and the set starts again at 1.
// An offline member (a quiet volume) has no session: its map is read once,
// before the window. Any member that fails before the cut releases every member (ended,
// thawed, nothing held) and fails the set: all or nothing. The snapshot
// deadline (60 s) covers the whole set.
import Foundation
import HotControl
import HotCore
import HotErrors
import HotOS
import HotSync

/// What a set cut needs from a member's session (SessionClient; fakes in tests).
public protocol CutSession: AnyObject, Sendable {
    func begin(consistency: Consistency, mountPoint: String?, pauseMs: Double?, hold: Bool) throws -> SessionClient.Armed
    func sendMap(used: [Range<UInt64>], excluded: [Range<UInt64>]) throws -> SessionClient.MapAnswer
    /// Ends the session to begin again on the same connection.
    func endForAnotherTry()
    /// Ends the session for good.
    func end()
}

extension SessionClient: CutSession {}

public struct SetCutMember {
    public var name: String
    /// nil: an offline member (a quiet volume, read without a session).
    public var session: CutSession?
    public var consistency: Consistency
    public var mountPoint: String?
    /// The device whose I/O counters tell a write (the protected device).
    public var device: String
    /// Reads the used and excluded byte ranges inside the window.
    public var readMap: () throws -> (used: [Range<UInt64>], excluded: [Range<UInt64>])
    public init(name: String, session: CutSession?, consistency: Consistency, mountPoint: String?, device: String,
                readMap: @escaping () throws -> (used: [Range<UInt64>], excluded: [Range<UInt64>])) {
        self.name = name; self.session = session; self.consistency = consistency; self.mountPoint = mountPoint
        self.device = device; self.readMap = readMap
    }
}

public struct SetCutOptions: Sendable {
    public var pauseNanos: UInt64 = Defaults.pauseNanos
    /// The writers froze what needs it: no pause is waited for.
    public var skipPause = false
    public var deadlineNanos: UInt64 = Defaults.snapshotDeadlineNanos
    /// Every member frozen: how long to wait for a common pause before freezing anyway.
    public var freezePauseWaitNanos: UInt64 = 5_000_000_000
    public var retries = 20
    public var pollNanos: UInt64 = 5_000_000
    public init() {}
}

public struct SetCutResult: Sendable {
    /// Per member, in the members' order.
    public var snapshots: [TakenSnapshot]
    /// The cut: when the last member was armed (CLOCK_MONOTONIC), and the wall clock then.
    public var cutNanos: UInt64
    public var cutWall: Date
    public var attempts: Int
    /// Seconds spent waiting for the common pause (all attempts), and
    /// whether one was found (false: skipped, or frozen anyway).
    public var pauseWaitSeconds: Double
    public var pauseFound: Bool
    /// First arm to last arm, last attempt.
    public var armSpreadSeconds: Double
}

public struct SetCutError: CodedError {
    /// The member that failed (nil: the set as a whole, e.g. the deadline).
    public var member: String?
    public var description: String
    public var kind: FailureKind
}

public enum SetCut {
    /// Takes the set's cut (this file's header). On failure every member has
    /// been ended (nothing frozen, armed or held).
    public static func take(_ members: [SetCutMember], _ o: SetCutOptions = SetCutOptions(),
                            sample: @escaping (String) -> BlockIOStat? = { BlockIOStat.read(device: $0) },
                            log: (String) -> Void = { _ in },
                            interrupted: @escaping () -> Bool = { false }) throws(SetCutError) -> SetCutResult {
        let t0 = monotonicNanos()
        let online = members.filter { $0.session != nil }
        let allFrozen = online.allSatisfy { $0.consistency == .freeze }
        var waited: Double = 0
        var found = false
        var attempt = 0
        // An offline member is quiet: its map is read once, before the
        // window, so it never lengthens the others' freeze.
        var offlineMaps = [Int: (used: [Range<UInt64>], excluded: [Range<UInt64>])]()
        for i in members.indices where members[i].session == nil {
            do { offlineMaps[i] = try members[i].readMap() } catch {
                throw SetCutError(member: members[i].name, description: "\(members[i].name): reading the used-block map: \(error)",
                                  kind: (error as? CodedError)?.kind ?? .failed)
            }
        }
        while true {
            attempt += 1
            if interrupted() { throw SetCutError(member: nil, description: "interrupted", kind: .interrupted) }
            let elapsed = monotonicNanos() - t0
            if elapsed >= o.deadlineNanos {
                throw SetCutError(member: nil, description: "the set's snapshot was not complete within \(o.deadlineNanos / 1_000_000_000) s", kind: .sessionFailed)
            }
            // 1. The common pause.
            if !o.skipPause && !online.isEmpty {
                let maxWait = allFrozen ? min(o.freezePauseWaitNanos, o.deadlineNanos - elapsed) : o.deadlineNanos - elapsed
                let w0 = monotonicNanos()
                let ok = waitForCommonPause(online.map(\.device), pauseNanos: o.pauseNanos, maxWaitNanos: maxWait,
                                            pollNanos: o.pollNanos, sample: sample, interrupted: interrupted)
                waited += Double(monotonicNanos() - w0) / 1e9
                found = ok
                if interrupted() { throw SetCutError(member: nil, description: "interrupted", kind: .interrupted) }
                if !ok && !allFrozen {
                    throw SetCutError(member: nil, description: "the set's snapshot was not complete within \(o.deadlineNanos / 1_000_000_000) s: no write-inactivity pause of \(o.pauseNanos / 1_000_000) ms common to all members (a member that is not frozen needs one)", kind: .sessionFailed)
                }
                if !ok { log("no common pause of \(o.pauseNanos / 1_000_000) ms within \(maxWait / 1_000_000_000) s; freezing every member anyway") }
            }
            // 2. Arm every member (the frozen first), each reading its map in the window.
            let frozenFirst = members.indices.filter { members[$0].session != nil && members[$0].consistency == .freeze }
            let then = members.indices.filter { members[$0].session != nil && !frozenFirst.contains($0) }
            var armed = [SessionClient.Armed?](repeating: nil, count: members.count)
            var maps = [(used: [Range<UInt64>], excluded: [Range<UInt64>])?](repeating: nil, count: members.count)
            for (i, m) in offlineMaps { maps[i] = m }
            var failure: SetCutError?
            for group in [frozenFirst, then] where failure == nil && !group.isEmpty {
                let results = parallel(group.map { i in { () -> Result<(SessionClient.Armed?, ([Range<UInt64>], [Range<UInt64>])), SetCutError> in
                    let mb = members[i]
                    var a: SessionClient.Armed?
                    if let s = mb.session {
                        do { a = try s.begin(consistency: mb.consistency, mountPoint: mb.mountPoint, pauseMs: 0, hold: mb.consistency == .raw) } catch {
                            return .failure(SetCutError(member: mb.name, description: "\(mb.name): the snapshot failed: \(error)", kind: .sessionFailed))
                        }
                    }
                    do { return .success((a, try mb.readMap())) } catch {
                        return .failure(SetCutError(member: mb.name, description: "\(mb.name): reading the used-block map: \(error)", kind: (error as? CodedError)?.kind ?? .sessionFailed))
                    }
                } })
                for (k, r) in results.enumerated() {
                    switch r {
                    case .success(let (a, m)): armed[group[k]] = a; maps[group[k]] = m
                    case .failure(let e): if failure == nil { failure = e }
                    }
                }
            }
            if let f = failure {
                for mb in members { mb.session?.end() }
                throw f
            }
            let cutNanos = monotonicNanos()
            let cutWall = Date()
            let arms = armed.compactMap { $0?.atNanos }
            let spread = Double((arms.max() ?? 0) - (arms.min() ?? 0)) / 1e9
            // 3. Narrow, thaw, release.
            let answers = parallel(members.indices.map { i in { () -> Result<SessionClient.MapAnswer, SetCutError> in
                guard let s = members[i].session, let m = maps[i] else { return .success(.protecting) }
                do { return .success(try s.sendMap(used: m.used, excluded: m.excluded)) } catch {
                    return .failure(SetCutError(member: members[i].name, description: "\(members[i].name): \(error)", kind: .sessionFailed))
                }
            } })
            if let f = answers.compactMap({ if case .failure(let e) = $0 { return e } else { return nil } }).first {
                for mb in members { mb.session?.end() }
                throw f
            }
            let retry = answers.indices.compactMap { i -> String? in
                if case .success(.retry(let why)) = answers[i] { return "\(members[i].name): \(why)" }
                return nil
            }
            if !retry.isEmpty {
                for mb in members { mb.session?.endForAnotherTry() }
                if attempt >= o.retries {
                    for mb in members { mb.session?.end() }
                    throw SetCutError(member: nil, description: "no set cut after \(attempt) attempts: \(retry.joined(separator: "; "))", kind: .sessionFailed)
                }
                log("\(retry.joined(separator: "; ")); the whole set waits for the next common pause")
                continue
            }
            let snaps = members.indices.map { i -> TakenSnapshot in
                let m = maps[i]!
                if let a = armed[i] { return SessionClient.taken(a, attempts: attempt, used: m.used, excluded: m.excluded) }
                let quiet = SessionClient.Armed(atNanos: cutNanos, wallTime: cutWall, frozen: false, snapshotDevice: nil)
                return SessionClient.taken(quiet, attempts: attempt, used: m.used, excluded: m.excluded)
            }
            return SetCutResult(snapshots: snaps, cutNanos: cutNanos, cutWall: cutWall, attempts: attempt,
                                pauseWaitSeconds: waited, pauseFound: found, armSpreadSeconds: spread)
        }
    }

    /// Waits until none of `devices` wrote or had a request in flight for
    /// `pauseNanos`; false when `maxWaitNanos` passed first.
    static func waitForCommonPause(_ devices: [String], pauseNanos: UInt64, maxWaitNanos: UInt64, pollNanos: UInt64,
                                   sample: (String) -> BlockIOStat?, interrupted: () -> Bool) -> Bool {
        let start = monotonicNanos()
        var last = devices.map(sample)
        var quietSince = start
        if last.contains(where: { ($0?.inFlight ?? 0) > 0 }) { quietSince = monotonicNanos() }
        while true {
            let now = monotonicNanos()
            if now - quietSince >= pauseNanos { return true }
            if now - start >= maxWaitNanos || interrupted() { return false }
            usleep(UInt32(max(1000, min(pollNanos, 1_000_000_000)) / 1000))
            let cur = devices.map(sample)
            for (a, b) in zip(cur, last) {
                if let a, let b, a.active(since: b) { quietSince = monotonicNanos(); break }
                if let a, b == nil, a.inFlight > 0 { quietSince = monotonicNanos(); break }
            }
            last = cur
        }
    }

    /// Runs every closure on its own thread; the results in order.
    static func parallel<T>(_ jobs: [() -> T]) -> [T] {
        if jobs.count == 1 { return [jobs[0]()] }
        let box = ResultsBox<T>(count: jobs.count)
        for (i, job) in jobs.enumerated() {
            Threads.start(name: "set-cut") { box.put(i, job()) }
        }
        return box.waitAll()
    }
}

/// Results of threads, collected under a monitor.
final class ResultsBox<T>: @unchecked Sendable {
    private let m = Monitor()
    private var slots: [T?]
    private var left: Int
    init(count: Int) { slots = Array(repeating: nil, count: count); left = count }
    func put(_ i: Int, _ v: T) { m.withLock { slots[i] = v; left -= 1; m.broadcast() } }
    func waitAll() -> [T] {
        m.withLock {
            while left > 0 { _ = m.wait(timeoutNanos: 100_000_000) }
            return slots.map { $0! }
        }
    }
}
