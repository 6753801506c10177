// SetCut.take, the cut of a coherent set (issue 16), over fake sessions and
// a fake block-stat sampler: the order of begin/read/map, all-or-nothing
// failures, the whole-set wip retry, the common write-inactivity pause and
// its deadlines. And BlockIOStat.parse on the kernel's stat lines.
// Every option is in milliseconds, so each test runs well under a second.
import Foundation
import Testing
import HotCore
import HotOS
@testable import HotImager

/// What happened, in order, across every fake member (threads included).
final class CutLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [(what: String, at: UInt64)] = []
    func add(_ s: String) { lock.lock(); items.append((s, monotonicNanos())); lock.unlock() }
    var events: [String] { lock.lock(); defer { lock.unlock() }; return items.map(\.what) }
    var timed: [(what: String, at: UInt64)] { lock.lock(); defer { lock.unlock() }; return items }
    func index(_ s: String) -> Int? { events.firstIndex(of: s) }
    func count(_ s: String) -> Int { events.filter { $0 == s }.count }
}

struct FakeCutError: Error, CustomStringConvertible {
    var description: String
}

/// A member's session as SetCut sees it.
final class FakeCutSession: CutSession, @unchecked Sendable {
    let name: String
    let log: CutLog
    private let lock = NSLock()
    var beginFails = false
    var mapFails = false
    /// Answers to map, in turn; .protecting once they run out.
    var answers: [SessionClient.MapAnswer] = []
    private(set) var begins: [(hold: Bool, pauseMs: Double?, consistency: Consistency)] = []

    init(_ name: String, _ log: CutLog) { self.name = name; self.log = log }

    func begin(consistency: Consistency, mountPoint: String?, pauseMs: Double?, hold: Bool) throws -> SessionClient.Armed {
        lock.lock(); begins.append((hold, pauseMs, consistency)); lock.unlock()
        log.add("begin \(name)")
        if beginFails { throw FakeCutError(description: "begin refused by \(name)") }
        usleep(2000)   // arms are not instantaneous; lets a wrong order show
        return SessionClient.Armed(atNanos: monotonicNanos(), wallTime: Date(), frozen: consistency == .freeze, snapshotDevice: nil)
    }

    func sendMap(used: [Range<UInt64>], excluded: [Range<UInt64>]) throws -> SessionClient.MapAnswer {
        log.add("map \(name)")
        if mapFails { throw FakeCutError(description: "map refused by \(name)") }
        lock.lock(); defer { lock.unlock() }
        return answers.isEmpty ? .protecting : answers.removeFirst()
    }

    func endForAnotherTry() { log.add("again \(name)") }
    func end() { log.add("end \(name)") }
}

/// A sampler of fake block counters: `script(device, call)` gives the stat
/// for the n-th sample of that device. Records when a counter last changed.
final class FakeSampler: @unchecked Sendable {
    private let lock = NSLock()
    private var calls: [String: Int] = [:]
    private var last: [String: BlockIOStat] = [:]
    private(set) var lastChangeNanos: UInt64 = 0
    private(set) var total = 0
    let script: @Sendable (String, Int) -> BlockIOStat

    init(_ script: @escaping @Sendable (String, Int) -> BlockIOStat) { self.script = script }
    static func quiet() -> FakeSampler { FakeSampler { _, _ in BlockIOStat(writes: 5, discards: 1, inFlight: 0) } }
    static func busy() -> FakeSampler { FakeSampler { _, n in BlockIOStat(writes: UInt64(n), discards: 0, inFlight: 0) } }

    func sample(_ dev: String) -> BlockIOStat? {
        lock.lock(); defer { lock.unlock() }
        let n = calls[dev, default: 0]
        calls[dev] = n + 1
        total += 1
        let s = script(dev, n)
        if let p = last[dev], s.active(since: p) { lastChangeNanos = monotonicNanos() }
        last[dev] = s
        return s
    }
    var sampled: Int { lock.lock(); defer { lock.unlock() }; return total }
    var lastChange: UInt64 { lock.lock(); defer { lock.unlock() }; return lastChangeNanos }
}

struct SetCutFixture {
    let log = CutLog()
    var sessions: [FakeCutSession] = []
    var members: [SetCutMember] = []

    /// Members named by `spec`: (name, consistency or nil for an offline member).
    init(_ spec: [(String, Consistency?)]) {
        let shared = log
        for (name, c) in spec {
            let s = c.map { _ in FakeCutSession(name, shared) }
            if let s { sessions.append(s) }
            members.append(SetCutMember(name: name, session: s, consistency: c ?? .raw,
                                        mountPoint: c == .raw ? nil : "/mnt/\(name)", device: "/dev/\(name)",
                                        readMap: { shared.add("read \(name)"); return (used: [0..<4096], excluded: []) }))
        }
    }

    func session(_ name: String) -> FakeCutSession { sessions.first { $0.name == name }! }

    static func fast() -> SetCutOptions {
        var o = SetCutOptions()
        o.pauseNanos = 20_000_000
        o.pollNanos = 1_000_000
        o.deadlineNanos = 2_000_000_000
        o.freezePauseWaitNanos = 100_000_000
        o.retries = 5
        return o
    }

    func take(_ o: SetCutOptions = fast(), sampler: FakeSampler = .quiet(),
              logged: CutLog? = nil) throws(SetCutError) -> SetCutResult {
        try SetCut.take(members, o, sample: { sampler.sample($0) }, log: { logged?.add($0) })
    }
}

func seconds(since t0: UInt64) -> Double { Double(monotonicNanos() - t0) / 1e9 }

@Suite("SetCut")
struct SetCutTests {

    @Test("Order: frozen members begin first, all with pause 0, only raw ones with hold; no map before every member began and read its map")
    func order() throws {
        let f = SetCutFixture([("a", .wip), ("b", .freeze), ("c", .raw), ("d", .freeze), ("q", nil)])
        let r = try f.take()
        let ev = f.log.events
        #expect(r.attempts == 1)
        #expect(r.snapshots.count == 5)
        #expect(r.pauseFound)
        // Frozen members (b, d) begin before any unfrozen one (a, c).
        let lastFrozen = max(f.log.index("begin b")!, f.log.index("begin d")!)
        let firstUnfrozen = min(f.log.index("begin a")!, f.log.index("begin c")!)
        #expect(lastFrozen < firstUnfrozen, "\(ev)")
        // Each frozen member read its map before the unfrozen began.
        #expect(max(f.log.index("read b")!, f.log.index("read d")!) < firstUnfrozen, "\(ev)")
        // Every begin asks for pause 0 and the member's own consistency;
        // hold only for the raw member (no map read from the device).
        for s in f.sessions {
            #expect(s.begins.count == 1)
            #expect(s.begins.allSatisfy { $0.hold == ($0.consistency == .raw) && $0.pauseMs == 0 }, "\(s.name): \(s.begins)")
        }
        #expect(f.session("c").begins.first?.hold == true)
        #expect(f.session("b").begins.first?.consistency == .freeze)
        #expect(f.session("a").begins.first?.consistency == .wip)
        // No map before every begin and every read (the offline member's too).
        let firstMap = ev.firstIndex { $0.hasPrefix("map ") }!
        for n in ["a", "b", "c", "d"] {
            #expect(f.log.index("begin \(n)")! < firstMap, "\(ev)")
            #expect(f.log.index("map \(n)") != nil)
        }
        for n in ["a", "b", "c", "d", "q"] { #expect(f.log.index("read \(n)")! < firstMap, "\(ev)") }
        #expect(f.log.index("map q") == nil)
        #expect(!ev.contains { $0.hasPrefix("end ") || $0.hasPrefix("again ") }, "\(ev)")
        // The cut follows the last arm; frozen members say so.
        #expect(r.snapshots.allSatisfy { $0.armedAtNanos <= r.cutNanos })
        #expect(r.snapshots.map(\.frozen) == [false, true, false, true, false])
        #expect(r.armSpreadSeconds >= 0 && r.armSpreadSeconds < 1)
    }

    @Test("A member whose begin fails: every member is ended, no map is sent, the error names it",
          arguments: ["frozen", "wip"])
    func beginFails(_ which: String) throws {
        let f = SetCutFixture([("fz", .freeze), ("w1", .wip), ("w2", .wip)])
        let bad = which == "frozen" ? "fz" : "w2"
        f.session(bad).beginFails = true
        do {
            _ = try f.take()
            Issue.record("the cut succeeded with a failing member")
        } catch {
            #expect(error.member == bad)
            #expect(error.description.contains(bad))
            #expect(error.description.contains("begin refused by \(bad)"))
            #expect(error.kind == .sessionFailed)
        }
        let ev = f.log.events
        for n in ["fz", "w1", "w2"] { #expect(f.log.count("end \(n)") == 1, "\(ev)") }
        #expect(!ev.contains { $0.hasPrefix("map ") }, "\(ev)")
        // A frozen member failing stops the set before the unfrozen begin (nothing held for nothing).
        if which == "frozen" { #expect(f.log.index("begin w1") == nil, "\(ev)") }
    }

    @Test("A failing map read or map: every member is ended, the error names the member")
    func mapFails() throws {
        var f = SetCutFixture([("a", .freeze), ("b", .wip)])
        f.members[0].readMap = { throw FakeCutError(description: "fsmap broke") }
        do { _ = try f.take(); Issue.record("the cut succeeded") } catch {
            #expect(error.member == "a")
            #expect(error.description.contains("fsmap broke"))
        }
        #expect(f.log.count("end a") == 1 && f.log.count("end b") == 1)
        #expect(!f.log.events.contains { $0.hasPrefix("map ") })

        let g = SetCutFixture([("a", .freeze), ("b", .wip)])
        g.session("b").mapFails = true
        do { _ = try g.take(); Issue.record("the cut succeeded") } catch {
            #expect(error.member == "b")
            #expect(error.description.contains("map refused by b"))
        }
        #expect(g.log.count("end a") == 1 && g.log.count("end b") == 1)
    }

    @Test("A wip member answering retry: every member ends for another try and the whole set begins again")
    func wipRetry() throws {
        let f = SetCutFixture([("a", .freeze), ("b", .wip), ("c", .wip)])
        f.session("b").answers = [.retry("2 writes during the map read")]
        let logged = CutLog()
        let r = try f.take(logged: logged)
        #expect(r.attempts == 2)
        #expect(r.snapshots.allSatisfy { $0.attempts == 2 })
        let ev = f.log.events
        for n in ["a", "b", "c"] {
            #expect(f.session(n).begins.count == 2, "\(n)")
            #expect(f.log.count("again \(n)") == 1, "\(ev)")
            #expect(f.log.count("end \(n)") == 0, "\(ev)")
            #expect(f.log.count("map \(n)") == 2, "\(ev)")
        }
        // Every member ended its first try before any began the second.
        let lastAgain = ev.lastIndex { $0.hasPrefix("again ") }!
        let secondBegins = ev.indices.filter { ev[$0].hasPrefix("begin ") }.dropFirst(3)
        #expect(secondBegins.allSatisfy { $0 > lastAgain }, "\(ev)")
        #expect(logged.events.contains { $0.contains("b: 2 writes during the map read") }, "\(logged.events)")
    }

    @Test("Retries exhausted: every member ended, the error says how many attempts")
    func retriesExhausted() throws {
        let f = SetCutFixture([("a", .freeze), ("b", .wip)])
        f.session("b").answers = Array(repeating: .retry("writes"), count: 10)
        var o = SetCutFixture.fast()
        o.retries = 3
        do { _ = try f.take(o); Issue.record("the cut succeeded") } catch {
            #expect(error.member == nil)
            #expect(error.description.contains("after 3 attempts"), "\(error.description)")
            #expect(error.description.contains("b: writes"))
        }
        for n in ["a", "b"] {
            #expect(f.session(n).begins.count == 3)
            #expect(f.log.count("again \(n)") == 3)
            #expect(f.log.count("end \(n)") == 1)
        }
    }

    enum Activity: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case writesOnFirst, writesOnSecond, discardsOnSecond, inFlightOnSecond
        var testDescription: String { rawValue }
    }

    @Test("The common pause: activity on any member's device restarts the wait", arguments: Activity.allCases)
    func activityRestartsPause(_ a: Activity) throws {
        let f = SetCutFixture([("a", .wip), ("b", .wip)])
        let busyCalls = 40   // ≥ 40 ms of activity at a 1 ms poll
        let active = a == .writesOnFirst ? "/dev/a" : "/dev/b"
        let sampler = FakeSampler { dev, n in
            guard dev == active else { return BlockIOStat(writes: 100, discards: 0, inFlight: 0) }
            let k = UInt64(min(n, busyCalls))
            switch a {
            case .writesOnFirst, .writesOnSecond: return BlockIOStat(writes: k, discards: 0, inFlight: 0)
            case .discardsOnSecond: return BlockIOStat(writes: 0, discards: k, inFlight: 0)
            case .inFlightOnSecond: return BlockIOStat(writes: 0, discards: 0, inFlight: n < busyCalls ? 1 : 0)
            }
        }
        let o = SetCutFixture.fast()
        let t0 = monotonicNanos()
        let r = try f.take(o, sampler: sampler)
        #expect(r.pauseFound)
        #expect(r.pauseWaitSeconds >= 0.04 + 0.02 - 0.005, "\(r.pauseWaitSeconds)")
        #expect(seconds(since: t0) < 1)
        // No member began until a whole pause after the last activity.
        let firstBegin = f.log.timed.first { $0.what.hasPrefix("begin ") }!.at
        if a != .inFlightOnSecond {
            #expect(sampler.lastChange > t0)
            #expect(firstBegin >= sampler.lastChange + o.pauseNanos, "began \(Double(firstBegin - sampler.lastChange) / 1e6) ms after the last write")
        }
    }

    @Test("skipPause: no wait and no sampling, even with a device that is always busy")
    func skipPause() throws {
        let f = SetCutFixture([("a", .freeze), ("b", .freeze)])
        let sampler = FakeSampler.busy()
        var o = SetCutFixture.fast()
        o.skipPause = true
        o.freezePauseWaitNanos = 5_000_000_000
        let t0 = monotonicNanos()
        let r = try f.take(o, sampler: sampler)
        #expect(seconds(since: t0) < 0.5)
        #expect(!r.pauseFound)
        #expect(r.pauseWaitSeconds == 0)
        #expect(sampler.sampled == 0)
        #expect(r.attempts == 1)
    }

    @Test("Every member frozen, no common pause within freezePauseWait: the cut goes ahead")
    func allFrozenNoPause() throws {
        let f = SetCutFixture([("a", .freeze), ("b", .freeze), ("q", nil)])
        let logged = CutLog()
        let o = SetCutFixture.fast()   // freezePauseWait 100 ms, deadline 2 s
        let t0 = monotonicNanos()
        let r = try f.take(o, sampler: .busy(), logged: logged)
        let took = seconds(since: t0)
        #expect(!r.pauseFound)
        #expect(r.pauseWaitSeconds >= 0.1 && r.pauseWaitSeconds < 0.5, "\(r.pauseWaitSeconds)")
        #expect(took < 0.8, "\(took)")
        #expect(f.session("a").begins.count == 1 && f.session("b").begins.count == 1)
        #expect(logged.events.contains { $0.contains("freezing every member anyway") }, "\(logged.events)")
    }

    @Test("An unfrozen member and no common pause: the set fails at the deadline, nothing begun")
    func unfrozenNoPause() throws {
        let f = SetCutFixture([("a", .freeze), ("b", .wip)])
        var o = SetCutFixture.fast()
        o.deadlineNanos = 150_000_000
        let t0 = monotonicNanos()
        do { _ = try f.take(o, sampler: .busy()); Issue.record("the cut succeeded without a pause") } catch {
            #expect(error.member == nil)
            #expect(error.kind == .sessionFailed)
            #expect(error.description.contains("no write-inactivity pause"), "\(error.description)")
        }
        let took = seconds(since: t0)
        #expect(took >= 0.15 && took < 0.8, "\(took)")
        #expect(f.sessions.allSatisfy { $0.begins.isEmpty })
    }

    @Test("Interrupted before the cut: nothing begun")
    func interrupted() throws {
        let f = SetCutFixture([("a", .wip)])
        do {
            _ = try SetCut.take(f.members, SetCutFixture.fast(), sample: { _ in nil }, interrupted: { true })
            Issue.record("the cut succeeded")
        } catch {
            #expect(error.kind == .interrupted)
        }
        #expect(f.sessions[0].begins.isEmpty)
    }
}

@Suite("BlockIOStat")
struct BlockIOStatTests {
    // /sys/block/*/stat as the kernel writes it (Documentation/block/stat.rst):
    // 11 fields before 4.18, 15 with the discard fields, 17 with flush (5.5+).
    static let modern = "  247768       44 318104468   215448  6450431 45003920 565005066  3029075        2   432708  3427449       76        0 50987174        5   562438   182919\n"
    static let withDiscards = "    4613     1245   310598     2157    17745    13360  1048570    43016        0    27388    49560      120        0   245760       23\n"
    static let old = "    4613     1245   310598     2157    17745    13360  1048570    43016        1    27388    49560\n"

    @Test("parse: writes completed (5th), in flight (9th), discards completed (12th)")
    func parse() {
        #expect(BlockIOStat.parse(Self.modern) == BlockIOStat(writes: 6450431, discards: 76, inFlight: 2))
        #expect(BlockIOStat.parse(Self.withDiscards) == BlockIOStat(writes: 17745, discards: 120, inFlight: 0))
        // No discard fields: discards read 0.
        #expect(BlockIOStat.parse(Self.old) == BlockIOStat(writes: 17745, discards: 0, inFlight: 1))
        #expect(BlockIOStat.parse("1 2 3 4 5 6 7 8 9 10") == nil)
        #expect(BlockIOStat.parse("") == nil)
    }

    @Test("active(since:): a write, a discard or a request in flight")
    func active() {
        let a = BlockIOStat(writes: 10, discards: 3, inFlight: 0)
        #expect(!a.active(since: a))
        #expect(BlockIOStat(writes: 11, discards: 3, inFlight: 0).active(since: a))
        #expect(BlockIOStat(writes: 10, discards: 4, inFlight: 0).active(since: a))
        #expect(BlockIOStat(writes: 10, discards: 3, inFlight: 1).active(since: a))
    }

    @Test("read(device:) on a real block device, if there is one")
    func readReal() throws {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        guard let n = names.sorted().first(where: { FileManager.default.fileExists(atPath: "/dev/\($0)") }) else { return }
        #expect(BlockIOStat.read(device: "/dev/\(n)") != nil, "/dev/\(n)")
        #expect(BlockIOStat.read(device: "/dev/null") == nil)
    }
}
