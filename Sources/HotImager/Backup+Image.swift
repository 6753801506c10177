// Backup+Image.swift — the steps of `hotimage backup` after the consistent
// point (the routine is in Backup.swift's header):
//
//   the imager           streams the protected ranges into the image
//   finish the image     metadata and checksums, renamed to its final name;
//                        or kept marked incomplete (--keep-partial); or removed
//   end the session      its last status (the daemon's peak RSS) first
//   after-backup hooks   with the exit code so far (a failure:
//                        completeWithWarnings)
//   the summary          event and log lines
import Foundation
import HotCore
import HotErrors
import HotOS
import HotWriters
import QCow2

/// How imaging went (kind nil: well); finishing the image and the hooks
/// may still change it.
struct ImagingOutcome {
    var kind: FailureKind?
    var errorText: String?
    var result: ImagerResult?
    var episodes: [EmergencyEpisode] = []
}

extension BackupJob {
    /// The imager: reads the snapshot (online) or the device (offline) and
    /// writes the protected ranges into the image.
    func runImager(_ plan: Plan, _ cut: BackupCut, into writer: QCow2Writer, incremental inc: IncrementalState? = nil) -> ImagingOutcome {
        var out = ImagingOutcome()
        do {
            let source: BlockSource = plan.online ? try snapshotSource(plan, cut.snap, cut.session)
                                                  : try DeviceSource(path: plan.readDevice, exclusive: plan.mount == nil)
            let im = Imager(source: source, ranges: inc?.plan?.read ?? cut.snap.protected, writer: writer, compression: o.compression,
                            clusterSize: 1 << o.clusterBits, config: imagerConfigOverride ?? o.imager, session: cut.session,
                            delta: inc.map { ImagerDelta(base: $0.base.digests) }, log: { self.r.log($0) })
            let pending = m.withLock { () -> String? in imager = im; return cancelled }
            defer { out.episodes = im.recordedEpisodes }
            if m.withLock({ interrupted }) { im.cancel("interrupted") }
            if let why = pending { im.cancel(why) }
            out.result = try im.run { p in
                TestStall.at("imaging", interrupted: { self.isInterrupted })
                if p.emergency { TestStall.at("emergency", interrupted: { self.isInterrupted }) }
                self.r.progress(p, phase: "imaging")
            }
            r.finishProgress()
            if let u = usersAppeared(plan) {
                throw ImagerError(description: "the volume was put to use while it was read offline (\(u)): the image may not be one point in time; back up online through 'hotimage attach'", kind: .failed)
            }
        } catch {
            r.finishProgress()
            out.kind = m.withLock({ interrupted }) ? .interrupted : ((error as? ImagerError)?.kind == .sessionFailed ? .sessionFailed : .failed)
            out.errorText = "\(error)"
        }
        // The imager (and the source it reads) is done: let go of it, so a
        // dm snapshot device is closed before the session removes it.
        m.withLock { imager = nil }
        return out
    }

    /// Finishes the image and gives it its final name, keeps it marked
    /// incomplete (--keep-partial), or removes it. Whether a partial image
    /// was kept.
    func finishImage(_ image: BackupImage, _ out: inout ImagingOutcome, metadata meta: ImageMetadata) -> Bool {
        if out.kind == nil {
            TestStall.at("finish", interrupted: { self.isInterrupted })
            if isInterrupted { out.kind = .interrupted; out.errorText = "interrupted before the image was finished" }
        }
        let writer = image.writer
        if out.kind == nil {
            do { _ = try writer.finish(metadata: meta.encoded(), complete: true); try image.partial.commit() } catch {
                out.kind = .failed
                out.errorText = "finishing the image: \(error)"
                writer.abandon()
            }
        } else if o.keepPartial {
            do { _ = try writer.finish(metadata: meta.encoded(), complete: false); try image.partial.commit(); return true } catch { writer.abandon() }
        } else {
            writer.abandon()
        }
        return false
    }

    /// What the image records about the backup (ImageMetadata.swift).
    func imageMetadata(_ plan: Plan, _ cut: BackupCut, probe: FSProbe?, consistency: String,
                       episodes: [EmergencyEpisode]) -> ImageMetadata {
        ImageMetadata(
            toolVersion: o.toolVersion, host: ProcessInfo.processInfo.hostName,
            source: .init(device: plan.readDevice, realDevice: plan.realDevice, attachName: plan.volume?.name,
                          mountPoint: plan.mount?.mountPoint, deviceBytes: plan.size),
            filesystem: .init(type: probe?.type ?? plan.mount?.fsType, uuid: probe?.uuid, label: probe?.label, blockSize: probe?.blockSize),
            snapshotTime: iso8601(cut.snap.wallTime), consistency: consistency, mode: plan.online ? "online" : "offline",
            mapMethod: cut.mapMethod, blockSize: plan.volume?.blockSize ?? 4096, clusterSize: 1 << o.clusterBits,
            compression: o.compression.description, usedBytes: cut.snap.usedBytes, imagedBytes: RangeSet.total(cut.snap.protected),
            excluded: cut.excluded, hooks: hookResults, emergencyEpisodes: episodes,
            components: writers?.records, writerErrors: writers.map { $0.writerErrors },
            notImaged: cut.snap.notImaged.map { [$0.lowerBound, $0.upperBound] })
    }

    /// Ends the session (online) after reading its last status; logs the
    /// failure, if any. The daemon's peak and file-backed resident set.
    func endSession(_ cut: BackupCut, _ out: ImagingOutcome, partialKept: Bool, commit: String? = nil) -> (peakRSS: UInt64?, fileRSS: UInt64?) {
        let endStatus = try? cut.session?.status()
        cut.session?.end(commit: commit)
        cut.session?.close()
        if let e = out.errorText {
            r.log("backup failed: \(e)" + (partialKept ? "; the partial image is kept, marked incomplete" : "; the partial image was removed"))
        }
        return (endStatus?.peakRSSBytes, endStatus?.fileRSSBytes)
    }

    /// after-backup, with the error code; a failed hook (after-snapshot or
    /// after-backup) or writer thaw turns a success into completeWithWarnings.
    func runAfterBackupHooks(_ out: inout ImagingOutcome, ctx: HookContext, afterSnapshot: [HookResult], thawFailures: [String]) {
        let afterBackup = HookRunner.run(o.hooks, .afterBackup, error: o.exitCode(out.kind), context: ctx, stopOnFailure: false, log: hookLog)
        hookResults += afterBackup
        if out.kind == nil && ((afterSnapshot + afterBackup).contains(where: { !$0.ok }) || !thawFailures.isEmpty) { out.kind = .completeWithWarnings }
    }

    /// The summary: sent as an event and logged.
    func summarize(_ plan: Plan, _ cut: BackupCut, _ out: ImagingOutcome, consistency: String, partialKept: Bool,
                   daemon: (peakRSS: UInt64?, fileRSS: UInt64?), since t0: UInt64,
                   chain: ChainRecord? = nil, imageId: String? = nil) -> BackupSummary {
        let seconds = Double(monotonicNanos() - t0) / 1e9
        let imageBytes = (try? FileManager.default.attributesOfItem(atPath: o.output)[.size] as? UInt64) ?? 0
        let result = out.result
        let imaged = result?.bytesRead ?? 0
        var summary = BackupSummary(
            image: o.output, exitCode: o.exitCode(out.kind), error: out.errorText, mode: plan.online ? "online" : "offline",
            consistency: consistency, mapMethod: cut.mapMethod, seconds: seconds, snapshotSeconds: cut.seconds,
            usedBytes: cut.snap.usedBytes, imagedBytes: imaged, imageBytes: imageBytes,
            ratio: imaged > 0 ? Double(imageBytes) / Double(imaged) : 0,
            megabytesPerSecond: (result?.seconds ?? 0) > 0 ? Double(imaged) / result!.seconds / 1e6 : 0,
            cowPeakBytes: result?.peakBufferBytes ?? 0, spillPeakBytes: result?.peakSpillBytes ?? 0,
            emergencyEpisodes: out.episodes, hooks: hookResults,
            components: writers?.records ?? [], writerErrors: writers?.writerErrors ?? [], partialKept: partialKept,
            freezeSeconds: cut.freezeSeconds, daemonPeakRSSBytes: daemon.peakRSS, daemonFileRSSBytes: daemon.fileRSS)
        summary.chain = chain
        summary.imageId = imageId
        r.event("summary", ["summary": .value(summary)])
        printSummary(summary, out.kind)
        return summary
    }
}
