// `hotimage backup SRC SRC… -o DIR`: a coherent set, one point in time for
// several volumes (SetCut.swift takes the cut).
//
//   resolve every member (as for one volume; a clash of names made unique,
//   the same volume twice refused); DIR created if missing, refused if it
//   holds images
//   before-snapshot hooks, once, HOTIMAGE_VOLUMES listing every member
//   the member images, DIR/NAME.qcow2 under locked temporary names
//   writers, once, with every member's mount point: a component spread
//   over the set is covered whole and frozen once
//   the set cut (SetCut); writers thaw at once; after-snapshot hooks once
//   the imagers side by side, the --workers shared among them; each member
//   keeps its own session (heartbeat, emergency mode)
//   all or nothing: a member that fails fails the set (the others are
//   cancelled, every image removed), unless --keep-partial: then every
//   image is kept, the failed ones marked incomplete
//   every image records the set (ImageMetadata.set); sessions end;
//   after-backup hooks once; a summary per member and for the set
import Foundation
import HotControl
import HotCore
import HotErrors
import HotOS
import HotSync
import HotWriters
import QCow2

public struct SetBackupSummary: Codable, Sendable {
    public var directory: String
    public var setId: String
    public var cutTime: String?
    public var exitCode: Int32
    public var error: String?
    public var seconds: Double
    /// From the writers' freeze (or the common pause) to the cut and thaw.
    public var snapshotSeconds: Double
    /// The longest time any member's filesystem stayed frozen.
    public var longestFreezeSeconds: Double?
    public var pauseWaitSeconds: Double
    public var attempts: Int
    public var usedBytes: UInt64
    public var imagedBytes: UInt64
    public var imageBytes: UInt64
    public var megabytesPerSecond: Double
    public var members: [BackupSummary]
}

/// A member while the set is taken.
final class SetMember {
    let name: String
    let source: String
    let job: BackupJob
    let plan: BackupJob.Plan
    var image: BackupImage?
    var probe: FSProbe?
    var session: SessionClient?
    var cut: BackupCut?
    var mapMethod = "raw"
    var excluded: [ImageMetadata.Excluded] = []
    var out = ImagingOutcome()
    var summary: BackupSummary?
    /// --base DIR: this member's base, DIR/NAME.qcow2.
    var inc: IncrementalState?
    init(name: String, source: String, job: BackupJob, plan: BackupJob.Plan) {
        self.name = name; self.source = source; self.job = job; self.plan = plan
    }
    var consistency: Consistency { plan.mount == nil ? .raw : (job.o.consistency ?? .freeze) }
    var consistencyName: String { plan.online ? consistency.rawValue : "offline" }
}

public final class SetBackupJob: @unchecked Sendable {
    let o: BackupOptions
    let sources: [String]
    let r: Reporter
    /// Runs the set-wide steps (hooks, writers) with the set's options.
    let lead: BackupJob
    var members: [SetMember] = []
    let m = Monitor()
    var interrupted = false
    var isInterrupted: Bool { m.withLock { interrupted } }
    let setId = UUID().uuidString.lowercased()

    /// `options.output` is the set's directory; `options.source` is ignored.
    public init(sources: [String], options: BackupOptions, reporter: Reporter) {
        self.sources = sources
        o = options
        r = reporter
        lead = BackupJob(options: options, reporter: reporter)
    }

    public func interrupt(_ why: String) {
        m.withLock { interrupted = true }
        lead.interrupt(why)
        for mb in m.withLock({ members }) {
            mb.job.interrupt(why)
            mb.session?.abort()
        }
    }

    var dir: String { o.output.hasSuffix("/") && o.output.count > 1 ? String(o.output.dropLast()) : o.output }

    public func run() -> (FailureKind?, SetBackupSummary?) {
        let t0 = monotonicNanos()
        do throws(BackupStop) {
            try prepare()
            let ctx = announce()
            try lead.runBeforeSnapshotHooks(ctx)
            try createImages(ctx)
            defer { for mb in members { mb.image?.partial.release() } }
            try freezeWriters(ctx)
            let tSnap = monotonicNanos()
            let cut = try takeCut(ctx)
            let thawFailures = lead.thawWriters()
            let snapSeconds = Double(monotonicNanos() - tSnap) / 1e9
            recordCut(cut, seconds: snapSeconds)
            let after = HookRunner.run(o.hooks, .afterSnapshot, error: 0, context: ctx, stopOnFailure: false, log: { self.r.log($0) })
            lead.hookResults += after
            runImagers()
            var out = finish(cut, since: t0)
            lead.runAfterBackupHooks(&out, ctx: ctx, afterSnapshot: after, thawFailures: thawFailures)
            let s = summarize(cut, out, snapshotSeconds: snapSeconds, since: t0)
            return (out.kind, s)
        } catch {
            releaseTransients()
            return (error.kind, nil)
        }
    }

    // MARK: members

    /// Resolves every member, names them, checks DIR.
    func prepare() throws(BackupStop) {
        func refuse(_ kind: FailureKind, _ msg: String) -> BackupStop {
            r.log(msg)
            r.event("error", ["message": .string(msg), "exitCode": .int(Int64(o.exitCode(kind)))])
            return BackupStop(kind: kind)
        }
        var st = stat()
        if stat(dir, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFDIR else { throw refuse(.refused, "\(dir) exists and is not a directory: a set is written into a directory (-o DIR)") }
            let held = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".qcow2") }
            if !held.isEmpty {
                throw refuse(.refused, "\(dir) already holds images (\(held.sorted().joined(separator: ", "))): a set goes into a new or empty directory")
            }
        } else {
            do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) } catch {
                throw refuse(.refused, "cannot create the set directory \(dir): \(error)")
            }
        }
        var used = Set<String>()
        var excludeTaken = Set<String>()
        var devices: [DevNum: String] = [:]
        for src in sources {
            var mo = o
            mo.source = src
            mo.output = dir + "/.resolving.qcow2"
            mo.hooks = HookSet()
            mo.writers.selection = .none
            mo.excludes = []
            let probeJob = BackupJob(options: mo, reporter: MemberReporter(name: src, parent: r))
            let plan: BackupJob.Plan
            do { plan = try probeJob.resolve() } catch let f as BackupFailure {
                throw refuse(f.kind, "\(src): \(f.description)")
            } catch {
                throw refuse(.failed, "\(src): \(error)")
            }
            let name = uniqueName(memberName(src, plan), &used)
            mo.output = dir + "/" + SetRecord.imageName(name)
            // --exclude: each absolute path goes to the member mounted where it lies.
            mo.excludes = o.excludes.filter { p in
                guard let mp = plan.mount?.mountPoint else { return false }
                return p == mp || p.hasPrefix(mp.hasSuffix("/") ? mp : mp + "/")
            }
            excludeTaken.formUnion(mo.excludes)
            let job = BackupJob(options: mo, reporter: MemberReporter(name: name, parent: r))
            let mb = SetMember(name: name, source: src, job: job, plan: plan)
            m.withLock { members.append(mb) }
            if let k = DevNum(blockDevice: plan.realDevice ?? plan.readDevice) ?? DevNum(blockDevice: plan.readDevice) {
                if let other = devices[k] { throw refuse(.refused, "\(src) and \(other) are the same volume: each volume once in a set") }
                devices[k] = src
            }
            if plan.online, plan.volume?.via == .dm, plan.mount == nil {
                throw refuse(.refused, "\(src): a dm-snapshot volume in a set must hold a mounted filesystem (its freeze holds the cut; dm-snapshot cannot hold writes otherwise). Mount it, attach it through HotCore (attach --via fuse|nbd), or back it up on its own")
            }
        }
        if let stray = o.excludes.first(where: { !excludeTaken.contains($0) }) {
            throw refuse(.refused, "--exclude \(stray) is on none of the set's mounted volumes")
        }
        try openBases(refuse)
    }

    /// --base DIR: the previous set, whole, with an image for every member
    /// of this one; each member's base is its image there.
    func openBases(_ refuse: (FailureKind, String) -> BackupStop) throws(BackupStop) {
        guard let baseDir = o.base, !o.full else {
            if o.base != nil { r.log("--full: full images, whatever --base says") }
            return
        }
        guard ImageSet.isDirectory(baseDir) else {
            throw refuse(.refused, "--base \(baseDir): a set's base is the previous set's directory")
        }
        let set: ImageSet
        do { set = try ImageSet.open(baseDir) } catch { throw refuse(.refused, "--base \(baseDir): \(error)") }
        if let p = set.problems.first {
            throw refuse(.refused, "--base \(baseDir) is not a whole set (\(p)); 'hotimage verify \(baseDir)' says more")
        }
        for mb in members {
            guard set.member(mb.name) != nil else {
                throw refuse(.refused, "--base \(baseDir): the set there has no member '\(mb.name)' (it has \(set.members.map { "'\($0.name)'" }.joined(separator: ", "))); make a full backup of this set")
            }
            var mo = mb.job.o
            mo.base = (baseDir as NSString).appendingPathComponent(SetRecord.imageName(mb.name))
            let job = BackupJob(options: mo, reporter: mb.job.r)
            mb.inc = try job.openBase(mb.plan).map { IncrementalState(base: $0) }
        }
    }

    /// The attachment name, else the LV or dm name, else the device's name.
    func memberName(_ src: String, _ plan: BackupJob.Plan) -> String {
        let n = plan.volume?.name ?? (plan.readDevice as NSString).lastPathComponent
        let safe = n.map { $0.isLetter || $0.isNumber || "-_.".contains($0) ? $0 : "_" }
        let s = String(safe).trimmingCharacters(in: CharacterSet(charactersIn: "."))
        return s.isEmpty ? "volume" : s
    }

    func uniqueName(_ base: String, _ used: inout Set<String>) -> String {
        var n = base
        var k = 2
        while used.contains(n) { n = "\(base)-\(k)"; k += 1 }
        used.insert(n)
        return n
    }

    /// Stops the transient dm daemons started while resolving (a set that
    /// ended before imaging: run()'s one cleanup).
    func releaseTransients() {
        for mb in m.withLock({ members }) where mb.plan.transient {
            mb.session?.end(); mb.session?.close(); mb.session = nil
            if let d = mb.plan.daemon, let c = try? ControlClient(path: d + "/control.sock") {
                var req = ControlRequest(op: .detach)
                req.force = true
                _ = try? c.call(req)
                c.close()
            }
        }
    }

    func announce() -> HookContext {
        let vols = members.map { $0.plan.mount?.mountPoint ?? $0.plan.readDevice }
        let anyFreeze = members.contains { $0.plan.online && $0.consistency == .freeze }
        r.event("start", ["set": .string(setId), "directory": .string(dir), "members": .array(members.map { mb in
            .object(["name": .string(mb.name), "source": .string(mb.source), "device": .string(mb.plan.readDevice),
                     "deviceBytes": .uint(mb.plan.size), "mode": .string(mb.plan.online ? "online" : "offline"),
                     "image": .string(mb.job.o.output)])
        })])
        r.log("backing up a set of \(members.count) volumes to \(dir) (set \(setId)):")
        for mb in members {
            let how = mb.plan.online ? "online, " + (mb.plan.volume?.via == .dm ? "dm-snapshot" : "HotCore \(mb.plan.volume?.via.rawValue ?? "")") : "offline"
            r.log("  \(mb.name): \(mb.plan.readDevice)\(mb.plan.mount.map { " (mounted at \($0.mountPoint))" } ?? "") \(how) → \(SetRecord.imageName(mb.name))")
        }
        return HookContext(volumes: vols, freeze: anyFreeze, image: dir)
    }

    func createImages(_ ctx: HookContext) throws(BackupStop) {
        for mb in members {
            mb.probe = (try? probeFilesystem(path: mb.plan.readDevice)) ?? nil
            do { mb.image = try mb.job.createImage(mb.plan, ctx: ctx, backing: mb.inc?.base.backingName) } catch {
                for x in members { x.image?.writer.abandon(); x.image?.partial.release(); x.image = nil }
                throw BackupStop(kind: error.kind)
            }
        }
    }

    func abandonAll() {
        for mb in members { mb.image?.writer.abandon() }
    }

    func freezeWriters(_ ctx: HookContext) throws(BackupStop) {
        guard members.contains(where: \.plan.online) else { return }
        let volumes = members.compactMap { $0.plan.online ? $0.plan.mount?.mountPoint : nil }
        guard let fail = lead.freezeComponents(volumes: volumes) else { return }
        abandonAll()
        throw lead.afterFailedSnapshot(.writerFreezeFailed, fail, ctx: ctx)
    }

    // MARK: the cut

    func takeCut(_ ctx: HookContext) throws(BackupStop) -> SetCutResult {
        var cm: [SetCutMember] = []
        do {
            for mb in members {
                if mb.plan.online, let vol = mb.plan.volume {
                    let s = try SessionClient(volume: vol)
                    m.withLock { mb.session = s }
                    if mb.plan.mount == nil { r.log("\(mb.name): \(vol.protectedDevice) is not mounted: every block is imaged (raw map), its writes held for the cut") }
                }
                let job = mb.job, plan = mb.plan
                cm.append(SetCutMember(name: mb.name, session: mb.session, consistency: mb.consistency, mountPoint: plan.mount?.mountPoint,
                                       device: plan.readDevice, readMap: {
                    TestStall.at("frozen", interrupted: { self.isInterrupted })
                    let (used, method) = try job.usedMap(plan)
                    let (ex, list) = try job.exclusions(plan)
                    mb.mapMethod = method
                    mb.excluded = list
                    return (used, ex)
                }))
            }
        } catch {
            for mb in members { mb.session?.close() }
            abandonAll()
            throw lead.afterFailedSnapshot(.sessionFailed, "snapshot failed: \(error)", ctx: ctx)
        }
        var so = SetCutOptions()
        if let p = o.pauseMs { so.pauseNanos = UInt64(max(0, p) * 1e6) }
        let frozenComponents = lead.writers?.records.contains(where: \.frozen) ?? false
        let allFreeze = members.allSatisfy { !$0.plan.online || $0.consistency == .freeze }
        so.skipPause = o.pauseMs == nil && frozenComponents && allFreeze
        if so.skipPause { r.log("the writers froze their components and every member is frozen: no write-inactivity pause is waited for") }
        do {
            let c = try SetCut.take(cm, so, log: { self.r.log($0) }, interrupted: { self.isInterrupted })
            for (mb, taken) in zip(members, c.snapshots) {
                var snap = taken
                snap.changes = mb.session?.lastChanges      // HotCore's change map at this cut
                mb.cut = BackupCut(session: mb.session, snap: snap, mapMethod: mb.mapMethod, excluded: mb.excluded)
                mb.session?.startHeartbeat()
            }
            return c
        } catch {
            for mb in members { mb.session?.close() }
            abandonAll()
            let kind: FailureKind = isInterrupted ? .interrupted : error.kind
            throw lead.afterFailedSnapshot(kind, isInterrupted ? "interrupted during the snapshot; nothing was imaged"
                                                               : "the set's snapshot failed: \(error.description); every member was released", ctx: ctx)
        }
    }

    func recordCut(_ c: SetCutResult, seconds: Double) {
        for mb in members {
            guard var cut = mb.cut else { continue }
            cut.seconds = seconds
            cut.freezeSeconds = cut.snap.frozen ? (try? mb.session?.status())?.lastFreezeSeconds : nil
            mb.cut = cut
        }
        let freezes = members.compactMap { $0.cut?.freezeSeconds }
        let pause = c.pauseFound ? String(format: "found after %.2f s", c.pauseWaitSeconds) : (c.pauseWaitSeconds > 0 ? "not found" : "skipped")
        r.log(String(format: "set cut at %@ in %.2f s (%d attempt(s), common pause %@, members armed within %.3f s%@)",
                     iso8601(c.cutWall), seconds, c.attempts, pause, c.armSpreadSeconds,
                     freezes.isEmpty ? "" : String(format: ", longest freeze %.3f s", freezes.max()!)))
        for mb in members {
            guard let cut = mb.cut else { continue }
            mb.job.r.log(String(format: "%@, map %@: %@ used, %@ excluded%@", mb.consistencyName, cut.mapMethod,
                                formatBytes(cut.snap.usedBytes), formatBytes(cut.snap.excludedBytes),
                                cut.freezeSeconds.map { String(format: ", frozen %.3f s", $0) } ?? ""))
        }
        r.event("snapshot", ["set": .string(setId), "seconds": .double(seconds), "time": .string(iso8601(c.cutWall)),
                             "cutMonotonicNs": .uint(c.cutNanos), "attempts": .int(Int64(c.attempts)),
                             "pauseWaitSeconds": .double(c.pauseWaitSeconds), "armSpreadSeconds": .double(c.armSpreadSeconds),
                             "members": .array(members.map { mb in
                                 .object(["name": .string(mb.name), "consistency": .string(mb.consistencyName),
                                          "mapMethod": .string(mb.cut?.mapMethod ?? "raw"), "usedBytes": .uint(mb.cut?.snap.usedBytes ?? 0),
                                          "excludedBytes": .uint(mb.cut?.snap.excludedBytes ?? 0),
                                          "armedMonotonicNs": .uint(mb.cut?.snap.armedAtNanos ?? 0),
                                          "freezeSeconds": mb.cut?.freezeSeconds.map { .double($0) } ?? .null])
                             })])
    }

    // MARK: imaging

    /// Every member's imager at once, the workers shared (each member's
    /// session has its own buffer, so each enters emergency mode at
    /// --emergency-at of its own); a failure cancels the others unless
    /// --keep-partial.
    func runImagers() {
        let share = max(1, o.imager.workers / max(1, members.count))
        let progress = SetProgress(reporter: r, names: members.map(\.name))
        _ = SetCut.parallel(members.map { mb in { () -> Void in
            var cfg = mb.job.o.imager
            cfg.workers = share
            mb.job.imagerConfigOverride = cfg
            (mb.job.r as? MemberReporter)?.progressSink = { p in progress.update(mb.name, p) }
            let refused = mb.inc == nil ? nil : mb.job.prepareIncremental(&mb.inc!, mb.plan, mb.cut!, writer: mb.image!.writer)
            mb.out = refused ?? mb.job.runImager(mb.plan, mb.cut!, into: mb.image!.writer, incremental: mb.inc)
            // A member stopped for another's failure passes nothing on (the
            // failure that started it keeps its name as the set's cause).
            if mb.out.kind != nil && !mb.job.wasCancelled && !self.o.keepPartial {
                let why = "another member of the set failed (\(mb.name))"
                for other in self.members where other !== mb { other.job.cancelImager(why) }
            }
        } })
        r.finishProgress()
    }

    // MARK: finishing

    /// Finishes every image with the set record (or removes them all); ends
    /// the sessions. The set's outcome: the first member that failed of
    /// itself (not cancelled for another's failure, not interrupted).
    func finish(_ c: SetCutResult, since t0: UInt64) -> ImagingOutcome {
        let failed = members.filter { $0.out.kind != nil }
        let first = failed.first(where: { $0.out.kind != .interrupted && !$0.job.wasCancelled }) ?? failed.first
        let record = SetRecord(id: setId, cutTime: iso8601(c.cutWall), members: members.map {
            SetRecord.Member(name: $0.name, source: $0.source, device: $0.plan.readDevice, deviceBytes: $0.plan.size,
                             filesystemUUID: $0.probe?.uuid)
        }, member: "")
        let kind: FailureKind? = first?.out.kind
        for mb in members {
            guard let image = mb.image, let cut = mb.cut else { continue }
            var meta = mb.job.imageMetadata(mb.plan, cut, probe: mb.probe, consistency: mb.consistencyName, episodes: mb.out.episodes)
            meta.snapshotTime = record.cutTime
            meta.hooks = lead.hookResults
            meta.components = componentsOn(mb)
            meta.writerErrors = lead.writers.map { $0.writerErrors }
            var rec = record
            rec.member = mb.name
            meta.set = rec
            meta.id = UUID().uuidString.lowercased()
            meta.chain = mb.inc.flatMap { mb.job.chainRecord($0, mb.out) }
            if kind != nil && mb.out.kind == nil && !o.keepPartial {
                // A sound member of a failed set is not kept on its own.
                mb.out.kind = kind
                mb.out.errorText = "the set failed (\(first?.name ?? "?")): this member's image is not kept on its own"
            }
            let kept = mb.job.finishImage(image, &mb.out, metadata: meta)
            let daemon = mb.job.endSession(cut, mb.out, partialKept: kept, commit: mb.out.kind == nil ? meta.id : nil)
            mb.summary = mb.job.summarize(mb.plan, cut, mb.out, consistency: mb.consistencyName, partialKept: kept, daemon: daemon, since: t0,
                                          chain: meta.chain, imageId: mb.out.kind == nil ? meta.id : nil)
        }
        if kind != nil && o.keepPartial { r.log("the set failed; every image is kept (--keep-partial), the failed members' marked incomplete") }
        return ImagingOutcome(kind: kind, errorText: first.flatMap { f in f.out.errorText.map { "\(f.name): \($0)" } })
    }

    /// The components with a file on this member's volume (all when unknown).
    func componentsOn(_ mb: SetMember) -> [ComponentRecord]? {
        guard let recs = lead.writers?.records else { return nil }
        guard let mp = mb.plan.mount?.mountPoint else { return [] }
        let prefix = mp.hasSuffix("/") ? mp : mp + "/"
        return recs.filter { c in c.files.isEmpty || c.files.contains { $0.path == mp || $0.path.hasPrefix(prefix) } }
    }

    func summarize(_ c: SetCutResult, _ out: ImagingOutcome, snapshotSeconds: Double, since t0: UInt64) -> SetBackupSummary {
        let ms = members.compactMap(\.summary)
        let seconds = Double(monotonicNanos() - t0) / 1e9
        let imaged = ms.reduce(0) { $0 + $1.imagedBytes }
        let imagingSeconds = members.compactMap { $0.out.result?.seconds }.max() ?? 0
        let s = SetBackupSummary(directory: dir, setId: setId, cutTime: iso8601(c.cutWall), exitCode: o.exitCode(out.kind),
                                 error: out.errorText, seconds: seconds, snapshotSeconds: snapshotSeconds,
                                 longestFreezeSeconds: ms.compactMap(\.freezeSeconds).max(), pauseWaitSeconds: c.pauseWaitSeconds,
                                 attempts: c.attempts, usedBytes: ms.reduce(0) { $0 + $1.usedBytes }, imagedBytes: imaged,
                                 imageBytes: ms.reduce(0) { $0 + $1.imageBytes },
                                 megabytesPerSecond: imagingSeconds > 0 ? Double(imaged) / imagingSeconds / 1e6 : 0, members: ms)
        r.event("setSummary", ["summary": .value(s)])
        let ok = out.kind == nil || out.kind == .completeWithWarnings
        r.log(String(format: "set summary: %@ in %.1f s (snapshot %.2f s%@), %d members, %@ used, %@ imaged at %.0f MB/s, images %@ in all",
                     ok ? "set complete" : "set FAILED", seconds, snapshotSeconds,
                     s.longestFreezeSeconds.map { String(format: ", longest freeze %.3f s", $0) } ?? "",
                     ms.count, formatBytes(s.usedBytes), formatBytes(imaged), s.megabytesPerSecond, formatBytes(s.imageBytes)))
        return s
    }
}

/// A member's reporter: its lines prefixed with its name, its events
/// tagged with it; its progress goes to the set's bar.
final class MemberReporter: Reporter, @unchecked Sendable {
    let name: String
    let parent: Reporter
    var progressSink: ((ImagerProgress) -> Void)?
    init(name: String, parent: Reporter) { self.name = name; self.parent = parent }
    func log(_ line: String) { parent.log("\(name): \(line)") }
    func event(_ n: String, _ fields: [String: JSONValue]) {
        var f = fields
        f["member"] = .string(name)
        parent.event(n, f)
    }
    func progress(_ p: ImagerProgress, phase: String) { progressSink?(p) }
    func finishProgress() {}
}

/// The set's progress: every member's summed into one bar (and, in JSON,
/// one event a second with each member's figures).
final class SetProgress: @unchecked Sendable {
    let r: Reporter
    let names: [String]
    let m = Monitor()
    var last: [String: ImagerProgress] = [:]
    var lastEvent: Double = -10
    init(reporter: Reporter, names: [String]) { r = reporter; self.names = names }
    func update(_ name: String, _ p: ImagerProgress) {
        m.withLock {
            last[name] = p
            var sum = ImagerProgress(doneBytes: 0, totalBytes: 0, imageBytes: 0, elapsed: 0, emergency: false, bufferBytes: 0, bufferLimit: 0)
            for x in last.values {
                sum.doneBytes += x.doneBytes; sum.totalBytes += x.totalBytes; sum.imageBytes += x.imageBytes
                sum.elapsed = max(sum.elapsed, x.elapsed); sum.emergency = sum.emergency || x.emergency
                sum.bufferBytes += x.bufferBytes; sum.bufferLimit += x.bufferLimit
            }
            r.progress(sum, phase: "imaging \(names.count) volumes")
            if sum.elapsed - lastEvent >= 1 {
                lastEvent = sum.elapsed
                r.event("memberProgress", ["members": .array(names.compactMap { n in
                    last[n].map { x in .object(["name": .string(n), "doneBytes": .uint(x.doneBytes), "totalBytes": .uint(x.totalBytes),
                                                "mode": .string(x.emergency ? "emergency" : "streamlined"),
                                                "bufferBytes": .uint(x.bufferBytes)]) }
                })])
            }
        }
    }
}
