// Backup+Snapshot.swift — the steps of `hotimage backup` up to the
// consistent point (the routine is in Backup.swift's header):
//
//   before-snapshot hooks   a failure aborts (hookAborted), nothing else runs
//   the image file          a locked temporary name (Backup+PartialImage.swift)
//   writers: freeze         a failure: thaw, after-* hooks, writerFreezeFailed
//   the snapshot            online: HotCore's cut with the used map minus
//                           exclusions; offline: the map of the quiet volume
//   writers: thaw           at once; a failure is recorded (completeWithWarnings
//                           at the end)
//
// A step that ends the backup throws BackupStop with the outcome, after
// running what must still run (after-* hooks, thaw, the error event).
import Foundation
import HotCore
import HotErrors
import HotOS
import HotWriters
import QCow2

/// The backup ends early with this outcome; what had to run has run.
struct BackupStop: Error {
    var kind: FailureKind
}

/// The image being written: under a locked temporary name until complete.
struct BackupImage {
    let writer: QCow2Writer
    let partial: PartialImage
}

/// The consistent point: the protected map, and the session holding it
/// (online).
struct BackupCut {
    var session: SessionClient?
    var snap: TakenSnapshot
    var mapMethod: String
    var excluded: [ImageMetadata.Excluded]
    /// From before the writers froze to after they thawed.
    var seconds: Double = 0
    /// How long the filesystem stayed frozen (HotCore's status).
    var freezeSeconds: Double?
}

extension BackupJob {
    /// resolve(), its refusal reported as an error event.
    func resolveReporting() throws(BackupStop) -> Plan {
        do { return try resolve() } catch let f as BackupFailure {
            r.log(f.description); r.event("error", ["message": .string(f.description), "exitCode": .int(Int64(o.exitCode(f.kind)))])
            throw BackupStop(kind: f.kind)
        } catch {
            r.log("\(error)"); throw BackupStop(kind: .failed)
        }
    }

    /// "raw", "freeze", "wip" (online) or "offline".
    func consistencyName(_ plan: Plan) -> String {
        plan.online ? (plan.mount == nil ? "raw" : (o.consistency ?? .freeze).rawValue) : "offline"
    }

    /// The hooks' context; logs the start and sends the start event.
    func announce(_ plan: Plan, consistency: String) -> HookContext {
        let volumes = [plan.mount?.mountPoint ?? plan.readDevice]
        let ctx = HookContext(volumes: volumes, freeze: plan.online && consistency == "freeze", image: o.output)
        r.event("start", ["source": .string(o.source), "image": .string(o.output), "mode": .string(plan.online ? "online" : "offline"),
                          "device": .string(plan.readDevice), "deviceBytes": .uint(plan.size)])
        r.log("backing up \(plan.readDevice)\(plan.mount.map { " (mounted at \($0.mountPoint))" } ?? "") \(plan.online ? "online" : "offline") to \(o.output)")
        return ctx
    }

    /// before-snapshot: a failure aborts at once (no after-* hooks).
    func runBeforeSnapshotHooks(_ ctx: HookContext) throws(BackupStop) {
        let before = HookRunner.run(o.hooks, .beforeSnapshot, error: 0, context: ctx, stopOnFailure: true, log: hookLog,
                                    cancelled: { self.isInterrupted })
        hookResults += before
        if isInterrupted { throw afterFailedSnapshot(.interrupted, "interrupted before the snapshot; nothing was done", ctx: ctx) }
        if let bad = before.first(where: { !$0.ok }) {
            let msg = "before-snapshot hook '\(bad.command)' failed (\(bad.timedOut ? "timed out" : "exit \(bad.exitCode)")); backup aborted"
            r.log(msg)
            r.event("error", ["message": .string(msg), "exitCode": .int(Int64(o.exitCode(.hookAborted)))])
            throw BackupStop(kind: .hookAborted)
        }
    }

    /// The image file, written under a locked temporary name and renamed
    /// when complete (Backup+PartialImage.swift). The caller releases it.
    func createImage(_ plan: Plan, ctx: HookContext, backing: String? = nil) throws(BackupStop) -> BackupImage {
        PartialImage.sweep(dir: (o.output as NSString).deletingLastPathComponent, log: { self.r.log($0) })
        do {
            let partial = try PartialImage(final: o.output)
            do {
                let writer = try QCow2Writer(path: partial.temp, virtualSize: plan.size, clusterBits: o.clusterBits,
                                             compression: o.compression, overwrite: true, access: o.imageAccess,
                                             backing: backing.map { QCow2Backing(fileName: $0) })
                return BackupImage(writer: writer, partial: partial)
            } catch { partial.release(); throw error }
        } catch {
            throw afterFailedSnapshot(.refused, "cannot create the image \(o.output): \(error)", ctx: ctx)
        }
    }

    /// Writers: freeze the components whose files are on the volume
    /// (online only).
    func freezeWriters(_ plan: Plan, image: BackupImage, ctx: HookContext) throws(BackupStop) {
        guard plan.online, let fail = freezeComponents(volumes: plan.mount.map { [$0.mountPoint] } ?? []) else { return }
        image.writer.abandon()
        throw afterFailedSnapshot(.writerFreezeFailed, fail, ctx: ctx)
    }

    /// Lists the writers' components and freezes those on the volume. Nil
    /// when the backup may go on (everything frozen, or --allow-unfrozen);
    /// otherwise the reason, with everything already thawed.
    func freezeComponents(volumes: [String]) -> String? {
        guard o.writers.selection != .none else { return nil }
        let t0 = monotonicNanos()
        let w = FreezeSession(config: o.writers, volumes: volumes, log: { self.r.log($0) })
        writers = w
        var failures = w.writerErrors
        if failures.isEmpty || o.allowUnfrozen { failures += w.freeze(log: { self.r.log($0) }) } else {
            w.markNotFrozen("not asked: another writer failed first")
        }
        r.event("writers", ["phase": .string("frozen"), "seconds": .double(Double(monotonicNanos() - t0) / 1e9),
                            "components": .value(w.records), "errors": .value(failures)])
        if failures.isEmpty { return nil }
        if o.allowUnfrozen {
            r.log("going on crash-consistent for what is not frozen (--allow-unfrozen); recorded in the image")
            return nil
        }
        w.thaw(log: { self.r.log($0) })
        return "a writer could not freeze its components (\(failures.count) problem(s)); nothing was imaged. Use --allow-unfrozen to go on crash-consistent, or --writers to choose writers"
    }

    /// The snapshot (or, offline, the map). A failure abandons the image
    /// and ends the session.
    func takeSnapshot(_ plan: Plan, image: BackupImage, ctx: HookContext) throws(BackupStop) -> BackupCut {
        var session: SessionClient?
        do {
            if plan.online, let vol = plan.volume {
                let s = try SessionClient(volume: vol)
                session = s
                return try takeOnline(plan, vol, s)
            }
            return try mapOffline(plan)
        } catch {
            image.writer.abandon()
            session?.end(); session?.close()
            if isInterrupted { throw afterFailedSnapshot(.interrupted, "interrupted during the snapshot; nothing was imaged", ctx: ctx) }
            let kind = (error as? BackupFailure)?.kind ?? .sessionFailed
            let text = "\(error)"
            throw afterFailedSnapshot(kind, "snapshot failed: \(text)", ctx: ctx)
        }
    }

    /// HotCore's cut: pause, freeze, the used map minus exclusions read
    /// while frozen, thaw; then the heartbeat keeps the session.
    private func takeOnline(_ plan: Plan, _ vol: AttachedVolume, _ s: SessionClient) throws -> BackupCut {
        m.withLock { taking = s }
        defer { m.withLock { taking = nil } }
        if isInterrupted { throw SessionError("interrupted") }
        let mode: Consistency = plan.mount == nil ? .raw : (o.consistency ?? .freeze)
        if plan.mount == nil { r.log("\(vol.protectedDevice) is not mounted: every block is imaged (raw map)") }
        var mapMethod = "raw"
        var excludedList: [ImageMetadata.Excluded] = []
        // Writers froze their components on the volume and the filesystem
        // is about to be frozen: a write-inactivity pause gains nothing, and
        // under steady load none comes (the daemon waits up to 5 s while a
        // database's WAL grows past its backup checkpoint). --pause-ms wins.
        var pauseMs = o.pauseMs
        let frozenComponents = writers?.records.filter(\.frozen).count ?? 0
        if pauseMs == nil, mode == .freeze, frozenComponents > 0 {
            pauseMs = 0
            r.log("no write-inactivity pause before the freeze: the writers froze \(frozenComponents) component(s) on the volume (--pause-ms to wait for one)")
        }
        let snap = try s.take(consistency: mode, mountPoint: plan.mount?.mountPoint, pauseMs: pauseMs, readMap: {
            TestStall.at("frozen", interrupted: { self.isInterrupted })
            let (used, method) = try usedMap(plan)
            mapMethod = method
            let (ex, list) = try exclusions(plan)
            excludedList = list
            return (used, ex)
        }, onRetry: { self.r.log("\($0); waiting for the next pause") })
        if isInterrupted { throw SessionError("interrupted") }
        s.startHeartbeat()
        return BackupCut(session: s, snap: snap, mapMethod: mapMethod, excluded: excludedList)
    }

    /// Offline: the used map of the quiet volume minus exclusions.
    private func mapOffline(_ plan: Plan) throws -> BackupCut {
        let (used, method) = try usedMap(plan)
        let (ex, list) = try exclusions(plan)
        let u = RangeSet.normalize(used)
        let p = RangeSet.subtract(u, RangeSet.normalize(ex))
        var snap = TakenSnapshot(armedAtNanos: monotonicNanos(), wallTime: Date(), frozen: false, attempts: 1,
                                 protected: p, usedBytes: RangeSet.total(u), excludedBytes: RangeSet.total(u) - RangeSet.total(p))
        snap.notImaged = RangeSet.subtract(u, p)
        return BackupCut(session: nil, snap: snap, mapMethod: method, excluded: list)
    }

    /// Thaws the writers at once (the consistent point is taken); the
    /// failures, recorded for completeWithWarnings.
    func thawWriters() -> [String] {
        let thawFailures = writers?.thaw(log: { self.r.log($0) }) ?? []
        if let w = writers { r.event("writers", ["phase": .string("thawed"), "components": .value(w.records)]) }
        return thawFailures
    }

    /// Times the snapshot (from `since`), logs it and sends its event.
    func recordSnapshot(_ cut: inout BackupCut, since tSnap: UInt64, consistency: String) {
        cut.seconds = Double(monotonicNanos() - tSnap) / 1e9
        cut.freezeSeconds = cut.snap.frozen ? (try? cut.session?.status())?.lastFreezeSeconds : nil
        let snap = cut.snap
        if cut.mapMethod == "raw" { r.log("no used-block map for this volume: imaging every block (raw)") }
        r.log(String(format: "snapshot taken in %.2f s (%@, map %@): %@ used, %@ excluded, %d attempt(s)", cut.seconds, consistency,
                     cut.mapMethod, formatBytes(snap.usedBytes), formatBytes(snap.excludedBytes), snap.attempts))
        r.event("snapshot", ["seconds": .double(cut.seconds), "consistency": .string(consistency), "mapMethod": .string(cut.mapMethod),
                             "usedBytes": .uint(snap.usedBytes), "excludedBytes": .uint(snap.excludedBytes),
                             "attempts": .int(Int64(snap.attempts)), "time": .string(iso8601(snap.wallTime)),
                             "cutMonotonicNs": .uint(snap.armedAtNanos)])
    }

    /// The snapshot failed (or never started): no data; after-snapshot and
    /// after-backup still run, with the error code.
    func afterFailedSnapshot(_ kind: FailureKind, _ msg: String, ctx: HookContext) -> BackupStop {
        let code = o.exitCode(kind)
        writers?.thaw(log: { self.r.log($0) })
        r.log(msg)
        r.event("error", ["message": .string(msg), "exitCode": .int(Int64(code))])
        hookResults += HookRunner.run(o.hooks, .afterSnapshot, error: code, context: ctx, stopOnFailure: false, log: hookLog)
        hookResults += HookRunner.run(o.hooks, .afterBackup, error: code, context: ctx, stopOnFailure: false, log: hookLog)
        return BackupStop(kind: kind)
    }
}
