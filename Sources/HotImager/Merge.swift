// Merge.swift — `hotimage merge IMAGE [--into OUT]`: shortens a chain.
//
//   merge IMAGE             IMAGE and its base are folded into one image
//                           that replaces IMAGE (written beside it under a
//                           temporary name, renamed over it when complete);
//                           its backing file is the base's base, or none.
//                           The base itself is left alone: other links or a
//                           schedule may still use it.
//   merge IMAGE --into OUT  the whole chain folded into OUT, a full image.
//
// The result is IMAGE's point in time: it keeps IMAGE's id (an incremental
// made against IMAGE stays valid against the result), its metadata, and
// its digest table, and lists the folded ids under `merged`. The chain is
// verified first (a damaged base would be folded in); nothing is written
// over IMAGE until the result is complete.
import Foundation
import HotErrors
import HotOS
import QCow2

public struct MergeOptions: Sendable {
    public var image: String
    public var into: String?
    public var overwrite = false
    public var verifyFirst = true
    public var compression: QCow2Compression = .zstd(level: 1)
    public var access = DataFileAccess.ownerOnly
    public init(image: String) { self.image = image }
}

public struct MergeSummary: Codable, Sendable {
    public var image: String
    public var output: String
    /// The links folded (paths), IMAGE first.
    public var folded: [String]
    public var foldedIds: [String]
    /// The result's backing file (nil: a full image).
    public var backingFile: String?
    public var fileBytes: UInt64
    public var seconds: Double
}

public enum MergeJob {
    public static func run(_ o: MergeOptions, reporter r: Reporter) throws -> MergeSummary {
        let t0 = monotonicNanos()
        func refuse(_ s: String) -> ChainFailure { ChainFailure(kind: .refused, description: s) }
        if ImageSet.isDirectory(o.image) {
            throw refuse("\(o.image) is a directory: merge takes one image (for a set, merge each member's image, DIR/NAME.qcow2)")
        }
        let chain: ImageChain
        do { chain = try ImageChain.open(o.image) } catch { throw refuse("\(error)") }
        guard chain.links.count > 1 else { throw refuse("\(o.image) is a full image (no backing file): nothing to merge") }
        guard var meta = chain.top.meta, meta.id != nil else {
            throw refuse("\(o.image) was not made by hotimage (no metadata): merge it with qemu-img commit")
        }
        let k = o.into == nil ? 2 : chain.links.count
        // In place: the file itself, not a symbolic link to it (renaming over
        // the link would leave the image unmerged).
        let out = o.into ?? realPath(o.image) ?? o.image
        if let into = o.into {
            if !o.overwrite && FileManager.default.fileExists(atPath: into) { throw refuse("\(into) exists (use --force to overwrite it)") }
            if chain.links.contains(where: { fileIdentity($0.path) == fileIdentity(into) }) {
                throw refuse("\(into) is a link of the chain being merged")
            }
        }
        if !o.verifyFirst, let d = chain.damage.first {
            throw ChainFailure(kind: .failed, description: "\(o.image) cannot be merged: \(d)")
        }
        if o.verifyFirst {
            r.log("verifying \(o.image) and its \(chain.links.count - 1) base(s) first")
            let v = chain.verify()
            if let p = v.problems.first {
                throw ChainFailure(kind: .failed, description: "\(o.image) cannot be merged: \(p)\(v.problems.count > 1 ? " (and \(v.problems.count - 1) more)" : "")")
            }
        }
        // The result's backing: link k, named as a backup would name it.
        var backing: String?
        var baseMeta: ImageMetadata?
        if k < chain.links.count {
            let b = chain.links[k]
            baseMeta = b.meta
            backing = backingFileName(of: realPath(b.path) ?? b.path, for: out)
        }
        let folded = Array(chain.links[0..<k])
        let foldedIds = folded.dropFirst().compactMap { $0.meta?.id }
        r.log(backing.map { "folding \(o.image) into its base \(folded[1].path); the result's base is \($0)" }
              ?? "folding the chain of \(chain.links.count) images into the full image \(out)")

        let partial: PartialImage
        do { partial = try PartialImage(final: out) } catch { throw ChainFailure(kind: .failed, description: "cannot create the result beside \(out): \(error)") }
        defer { partial.release() }
        let writer: QCow2Writer
        do {
            writer = try QCow2Writer(path: partial.temp, virtualSize: chain.virtualSize, clusterBits: chain.clusterSize.trailingZeroBitCount,
                                     compression: o.compression, overwrite: true, access: o.access,
                                     backing: backing.map { QCow2Backing(fileName: $0) })
        } catch { throw ChainFailure(kind: .failed, description: "creating the result: \(error)") }
        let stats: QCow2Merge.FoldSummary
        do {
            stats = try QCow2Merge.fold(chain: chain.chain, links: k, into: writer)
        } catch {
            writer.abandon()
            throw ChainFailure(kind: .failed, description: "merging: \(error)")
        }
        meta.merged = (meta.merged ?? []) + foldedIds + folded.dropFirst().flatMap { $0.meta?.merged ?? [] }
        if let bm = baseMeta, let bid = bm.id, let top = meta.chain {
            meta.chain = ChainRecord(baseId: bid, baseCutTime: bm.snapshotTime, baseFile: backing!, method: top.method, reason: top.reason,
                                     changedClusters: stats.dataClusters, zeroedClusters: stats.zeroClusters,
                                     unchangedClusters: UInt64(chain.top.digests?.count ?? 0) > stats.dataClusters
                                         ? UInt64(chain.top.digests?.count ?? 0) - stats.dataClusters : 0)
        } else {
            meta.chain = nil
        }
        do {
            _ = try writer.finish(metadata: meta.encoded(), complete: true)
            try partial.commit()
        } catch {
            writer.abandon()
            throw ChainFailure(kind: .failed, description: "finishing the result: \(error); \(o.image) is unchanged")
        }
        var st = stat()
        _ = stat(out, &st)
        let s = MergeSummary(image: o.image, output: out, folded: folded.map(\.path), foldedIds: foldedIds, backingFile: backing,
                             fileBytes: UInt64(st.st_size), seconds: Double(monotonicNanos() - t0) / 1e9)
        r.log("merged \(folded.count) image(s) into \(out) (\(formatBytes(s.fileBytes))) in \(String(format: "%.1f", s.seconds)) s"
              + (backing.map { "; its base is now \($0)" } ?? "; it is a full image")
              + (o.into == nil ? "; \(folded[1].path) was left as it is" : ""))
        return s
    }
}
