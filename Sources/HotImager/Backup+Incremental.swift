// Backup+Incremental.swift — the steps an incremental adds to a backup
// (Incremental.swift says what is read, written and kept):
//
//   before the hooks   --base opened and checked (a wrong base: refused, exit 2)
//   the image          its qcow2 backing file is the base
//   after the cut      tracked or compared: HotCore's change map is used
//                      when it continues from the base's cut, else every
//                      used cluster is compared; zero clusters for what the
//                      base holds and the volume no longer uses; the base's
//                      digests for what is kept unread, and those ranges
//                      leave the protection at once
//   the end            the session is ended with the image's id (commit),
//                      so HotCore's next map continues from this image
import Foundation
import HotControl
import HotErrors
import HotOS
import QCow2

/// An incremental's state through the backup.
struct IncrementalState {
    let base: IncrementalBase
    var plan: DeltaPlan?
    var method: DeltaMethod?
    var record: ChainRecord?
}

extension BackupJob {
    /// --base, opened and checked before anything runs; nil for a full.
    func openBase(_ plan: Plan) throws(BackupStop) -> IncrementalBase? {
        guard let given = o.base else { return nil }
        if o.full {
            r.log("--full: a full image, whatever --base says")
            return nil
        }
        do {
            let uuid = (try? probeFilesystem(path: plan.readDevice))??.uuid
            let b = try IncrementalBase.open(given, output: o.output, size: plan.size, clusterSize: 1 << o.clusterBits,
                                             filesystemUUID: uuid)
            r.log("incremental: base \(b.path) (image \(b.id), cut \(b.meta.snapshotTime), \(b.depth) link(s), \(b.digests.count) clusters with data)")
            return b
        } catch {
            let f = error as? BackupFailure ?? BackupFailure(kind: .refused, description: "\(error)")
            r.log(f.description)
            r.event("error", ["message": .string(f.description), "exitCode": .int(Int64(o.exitCode(f.kind)))])
            throw BackupStop(kind: f.kind)
        }
    }

    /// After the cut: how the changes are known, and what to read, zero
    /// and keep. Writes the zero clusters and the kept digests into the
    /// image and releases the kept ranges from the protection. nil when
    /// the imager may run; else the outcome (nothing imaged).
    func prepareIncremental(_ inc: inout IncrementalState, _ plan: Plan, _ cut: BackupCut, writer: QCow2Writer) -> ImagingOutcome? {
        let method = deltaMethod(inc.base, plan, cut)
        let cs = 1 << o.clusterBits
        let baseHas = inc.base.digests.map(\.cluster)
        let baseLeftOut = (inc.base.meta.notImaged ?? []).compactMap { $0.count == 2 && $0[0] < $0[1] ? $0[0]..<$0[1] : nil }
        let d = DeltaPlan.make(used: cut.snap.protected, size: plan.size, clusterSize: cs, baseHas: baseHas,
                               hasDigest: { inc.base.digests[cluster: $0] != nil }, changed: method.changed,
                               reread: RangeSet.normalize(baseLeftOut + cut.snap.notImaged))
        do {
            for c in d.zero { try writer.write(EncodedCluster.zero(index: c, clusterSize: cs)) }
        } catch {
            return ImagingOutcome(kind: .failed, errorText: "writing the zero clusters of what the volume no longer uses: \(error)")
        }
        for c in d.kept { if let g = inc.base.digests[cluster: c] { writer.setDigest(cluster: c, g) } }
        // What is kept unread leaves the protection now: the imager never
        // reads it, so its copies would only fill the buffer and fail the
        // session under write load.
        if let s = cut.session {
            let keep = RangeSet.subtract(cut.snap.protected, d.read)
            var i = 0
            while i < keep.count {
                let batch = Array(keep[i..<min(keep.count, i + 20_000)])
                do { try s.archived(batch) } catch {
                    return ImagingOutcome(kind: .sessionFailed, errorText: "releasing the unchanged ranges from the protection: \(error)")
                }
                i += batch.count
            }
        }
        if method.tracked {
            r.log("incremental (tracked): \(d.readClusters) cluster(s) changed since the base's cut, \(d.kept.count) unchanged left unread, \(d.zero.count) no longer used (zeroed)")
        } else {
            r.log("incremental (compared: \(method.reason ?? "no change map")): reading all \(d.readClusters) used cluster(s), writing only those that differ from the base; \(d.zero.count) no longer used (zeroed)")
        }
        r.event("incremental", ["base": .string(inc.base.path), "baseId": .string(inc.base.id), "method": .string(method.tracked ? "tracked" : "compared"),
                                "reason": method.reason.map { .string($0) } ?? .null, "readClusters": .uint(d.readClusters),
                                "keptClusters": .uint(UInt64(d.kept.count)), "zeroedClusters": .uint(UInt64(d.zero.count))])
        inc.plan = d
        inc.method = method
        return nil
    }

    /// Tracked when HotCore's change map is trusted and continues from the
    /// base's cut; compared otherwise, with the reason.
    func deltaMethod(_ base: IncrementalBase, _ plan: Plan, _ cut: BackupCut) -> DeltaMethod {
        func compared(_ why: String) -> DeltaMethod { DeltaMethod(tracked: false, reason: why, changed: nil) }
        if o.compare { return compared("--compare") }
        guard plan.online, let s = cut.session else { return compared("an offline backup has no change map") }
        guard let ch = cut.snap.changes else {
            return compared(plan.volume?.via == .dm ? "the dm-snapshot backend tracks no changes" : "the session daemon tracks no changes")
        }
        guard ch.trusted, let since = ch.since else {
            return compared("HotCore's change map is not trusted: \(ch.reason ?? "no reason given")")
        }
        guard since == base.id else {
            return compared("HotCore's change map continues from image \(since), not from the base \(base.id)")
        }
        if base.meta.notImaged == nil && base.meta.excluded.contains(where: { $0.bytes > 0 }) {
            return compared("the base left files out without recording where")
        }
        guard ch.clusterBytes == 1 << o.clusterBits else {
            return compared("HotCore tracks \(ch.clusterBytes)-byte clusters, the image has \(1 << o.clusterBits)")
        }
        let cs = UInt64(ch.clusterBytes)
        do {
            let bits = try s.readChanges(ch, clusters: (plan.size + cs - 1) / cs)
            return DeltaMethod(tracked: true, reason: nil, changed: bits)
        } catch {
            return compared("reading HotCore's change map: \(error)")
        }
    }

    /// The chain record once imaging is done.
    func chainRecord(_ inc: IncrementalState, _ out: ImagingOutcome) -> ChainRecord? {
        guard let d = inc.plan, let mth = inc.method else { return nil }
        let unchangedRead = out.result?.unchangedClusters ?? 0
        let written = d.readClusters >= unchangedRead ? d.readClusters - unchangedRead : 0
        return ChainRecord(baseId: inc.base.id, baseCutTime: inc.base.meta.snapshotTime, baseFile: inc.base.backingName,
                           method: mth.tracked ? "tracked" : "compared", reason: mth.reason,
                           changedClusters: written, zeroedClusters: UInt64(d.zero.count),
                           unchangedClusters: UInt64(d.kept.count) + unchangedRead)
    }
}
