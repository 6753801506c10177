// Chain.swift — an incremental's chain of images, checked link by link.
//
// QCow2Chain follows the qcow2 backing files (as qemu does: a relative name
// against the directory of the image naming it). On top of that every
// hotimage link says which image it was made against (ChainRecord: the
// base's id and cut time), so a base that was replaced, renamed over or
// restored from another backup is found and named — a file name proves
// nothing. `verify` adds the content: every cluster the top's digest table
// lists is read through the chain and its digest compared, and every
// cluster without one must read as zeros.
import Foundation
import HotErrors
import QCow2

public struct ChainFailure: CodedError {
    public var kind: FailureKind = .refused
    public var description: String
}

public struct ImageChain {
    public struct Link {
        public let path: String
        public let reader: QCow2Reader
        public let meta: ImageMetadata?
        public let complete: Bool
        /// Loaded for the top link only (a base's table is its own business).
        public let digests: ClusterDigestTable?
    }
    public let chain: QCow2Chain
    /// Top first.
    public let links: [Link]
    public var virtualSize: UInt64 { chain.virtualSize }
    public var clusterSize: Int { chain.clusterSize }
    public var top: Link { links[0] }

    /// Problems that leave the chain readable but not trustworthy: an
    /// incomplete link, a damaged one, one another program wrote into, an
    /// unreadable digest table. `verify` reports them (exit 1); restore,
    /// merge and `backup --base` refuse them.
    public let damage: [String]

    /// The most links a chain may have (QCow2Chain's limit).
    public static let maxLinks = 64

    /// Opens `path` and its bases, and checks each link against the base it
    /// names. Throws ChainFailure (refused) naming the link when a base is
    /// missing or is not the image its link was made against.
    public static func open(_ path: String) throws -> ImageChain {
        let qc: QCow2Chain
        do { qc = try QCow2Chain(path: path, maxDepth: maxLinks) } catch { throw ChainFailure(description: "\(error)") }
        var links: [Link] = []
        var damage: [String] = []
        for (i, r) in qc.links.enumerated() {
            let meta = r.hotimage.flatMap { ImageMetadata.decode($0.metadata) }
            var digests: ClusterDigestTable?
            if i == 0 {
                do { digests = try r.digests() } catch {
                    damage.append("\(qc.paths[i]): its digest table is unreadable: \(error)")
                }
            }
            let complete = r.hotimage?.complete ?? true
            if !complete { damage.append("\(qc.paths[i]) is an incomplete image (a failed backup kept with --keep-partial)") }
            if let p = r.hotimageProblems.first { damage.append("\(qc.paths[i]) is damaged: \(p)") }
            else if let h = r.hotimage, !h.checksumsValid {
                damage.append("\(qc.paths[i]) was opened for writing by another program (qemu clears hotimage's mark): its checksums and digests no longer describe it")
            } else if r.hotimage != nil && meta == nil {
                damage.append("\(qc.paths[i]): its hotimage metadata is unreadable")
            }
            links.append(Link(path: qc.paths[i], reader: r, meta: meta, complete: complete, digests: digests))
        }
        let c = ImageChain(chain: qc, links: links, damage: damage)
        if let p = c.linkProblems().first { throw ChainFailure(description: p) }
        return c
    }

    /// Each link against its base: made against it (id and cut time).
    func linkProblems() -> [String] {
        var out: [String] = []
        for i in 0..<links.count {
            let l = links[i]
            guard i + 1 < links.count else { continue }
            let b = links[i + 1]
            // A link whose metadata is unreadable is damage (reported above),
            // not a replaced base.
            guard l.meta != nil || l.reader.hotimage == nil else { continue }
            guard let rec = l.meta?.chain else {
                out.append("\(l.path) has a backing file (\(b.path)) but records no base: it was not made by 'hotimage backup --base'; its chain cannot be checked")
                continue
            }
            if b.meta == nil && b.reader.hotimage != nil { continue }   // damaged base: damage
            let bid = b.meta?.id
            if bid != rec.baseId {
                out.append("\(l.path) was made against image \(rec.baseId) (cut \(rec.baseCutTime)), but its base \(b.path) is "
                    + (bid.map { "image \($0) (cut \(b.meta?.snapshotTime ?? "?"))" } ?? "not a hotimage image with an id")
                    + ": the base was replaced; put the image it was made against back at \(b.path)")
            } else if b.meta?.snapshotTime != rec.baseCutTime {
                out.append("\(l.path) was made against image \(rec.baseId) cut at \(rec.baseCutTime), but \(b.path) says its cut was \(b.meta?.snapshotTime ?? "?"): the base was edited")
            }
        }
        return out
    }

    /// A line per link for `info`.
    public var describeLinks: [String] {
        links.enumerated().map { i, l in
            let m = l.meta
            var s = "\(i == 0 ? "this" : "base \(i)"): \(l.path)"
            if let m {
                s += ", cut \(m.snapshotTime)"
                if let id = m.id { s += ", id \(id)" }
                if let c = m.chain {
                    s += ", incremental (\(c.method)\(c.reason.map { ": \($0)" } ?? "")): \(c.changedClusters) changed, \(c.zeroedClusters) zeroed, \(c.unchangedClusters) unchanged clusters"
                } else {
                    s += ", full"
                }
            }
            return s
        }
    }
}

extension ImageChain {
    /// Verifies every link (structure, checksums, digests of what it holds),
    /// their ids, and the content through the chain against the top's
    /// digest table.
    public func verify(progress: ((UInt64, UInt64) -> Void)? = nil) -> (problems: [String], notes: [String], clusters: UInt64) {
        var problems: [String] = []
        var notes: [String] = []
        var clusters: UInt64 = 0
        for l in links {
            let rep = l.reader.verify()
            problems += rep.problems.map { links.count > 1 ? "\(l.path): \($0)" : "\($0)" }
            notes += rep.notes.map { links.count > 1 ? "\(l.path): \($0)" : $0 }
            clusters += rep.clustersChecked
        }
        // What the links' own checks did not already name.
        if problems.isEmpty { problems += damage }
        if links.count > 1 {
            if top.digests == nil {
                problems.append("\(top.path) is an incremental without a digest table: its content through the chain cannot be checked")
            } else if problems.isEmpty {
                do {
                    let rep = try verifyChainContent(chain, progress: progress)
                    problems += rep.problems.map { "through the chain: \($0)" }
                } catch {
                    problems.append("reading through the chain: \(error)")
                }
            }
        }
        return (problems, notes, clusters)
    }
}

