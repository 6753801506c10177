// QCow2Merge.swift — folding the top links of a backing chain into one
// image.
//
// fold(chain, links: k, into: writer) writes one image that reads, through
// its own backing file (links k... of the old chain; none when k is the
// whole chain), exactly as the old top reads: every cluster allocated (data
// or zero flag) in any of links 0..<k is taken from the first link that
// allocates it and written (data re-encoded with the writer's compression;
// the zero flag as a zero cluster, or left unwritten when the result has no
// backing file). The result's digest table is the top's (the content at
// the top's point in time, which the result keeps).

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import HotSync

public enum QCow2Merge {
    /// What fold wrote.
    public struct FoldSummary: Sendable {
        public let dataClusters: UInt64
        public let zeroClusters: UInt64
        /// Digests copied from the top's table (nil: the top had none).
        public let digestsCopied: Int?
    }

    /// Folds links 0..<k of `chain` into `writer` (not finished: the caller
    /// finishes it with its metadata). The writer must have the chain's
    /// virtual size and cluster size, and a backing file exactly when
    /// k < chain.links.count; that backing file, resolved against the
    /// writer's directory, must be the file of link k. `threads` workers
    /// encode in parallel (default: the online CPUs, at most 8).
    @discardableResult
    public static func fold(chain: QCow2Chain, links k: Int, into writer: QCow2Writer,
                            threads: Int? = nil) throws -> FoldSummary {
        guard k >= 1, k <= chain.links.count else {
            throw QCow2Error("fold of \(k) links: the chain has \(chain.links.count)", path: writer.path)
        }
        guard writer.virtualSize == chain.virtualSize, writer.clusterSize == chain.clusterSize else {
            throw QCow2Error("fold target has virtual size \(writer.virtualSize) and \(writer.clusterSize)-byte clusters; the chain has \(chain.virtualSize) and \(chain.clusterSize)", path: writer.path)
        }
        let hasBacking = k < chain.links.count
        if hasBacking {
            guard let b = writer.backing else {
                throw QCow2Error("fold of \(k) of \(chain.links.count) links needs a backing file (\(chain.paths[k])) in the target", path: writer.path)
            }
            let resolved = QCow2Chain.resolve(b.fileName, relativeTo: writer.path)
            guard let want = QCow2Chain.FileID(chain.paths[k]), QCow2Chain.FileID(resolved) == want else {
                throw QCow2Error("fold target's backing file \"\(b.fileName)\" (resolved to \(resolved)) is not link \(k) of the chain (\(chain.paths[k]))", path: writer.path)
            }
        } else if let b = writer.backing {
            throw QCow2Error("fold of the whole chain makes a standalone image, but the target names backing file \"\(b.fileName)\"", path: writer.path)
        }
        let table = try chain.top.digests()
        let work = AllocatedClusters(ranges: try chain.unionOfAllocated(links: 0..<k))
        let cs = chain.clusterSize
        struct Worker {
            let encoder: ClusterEncoder
            let decoder = ClusterDecoder()
            let buf: UnsafeMutableRawPointer
            var data: UInt64 = 0
            var zero: UInt64 = 0
        }
        let lock = Lock()                     // the totals of the workers
        var data: UInt64 = 0, zero: UInt64 = 0
        try parallelBatches(count: work.count, batch: 64, threads: threads ?? onlineCPUs(),
                            makeState: { Worker(encoder: ClusterEncoder(compression: writer.compression, clusterSize: cs),
                                                buf: .allocate(byteCount: cs, alignment: 64)) },
                            body: { w, batch in
            for p in batch {
                let c = work[p]
                if try chain.read(cluster: c, into: w.buf, decoder: w.decoder) {
                    // Only the last cluster of the disk is short.
                    let n = Int(min(UInt64(cs), chain.virtualSize - c * UInt64(cs)))
                    let enc = w.encoder.encode(index: c, data: UnsafeRawBufferPointer(start: w.buf, count: n))
                    try writer.write(enc)
                    if enc.isZero { w.zero += 1 } else { w.data += 1 }
                } else if hasBacking {
                    try writer.write(w.encoder.zeroCluster(index: c))
                    w.zero += 1
                }
            }
        }, finish: { w in
            w.buf.deallocate()
            lock.withLock { data += w.data; zero += w.zero }
        })
        // The result's table is the top's: drop what write() recorded, then
        // copy. Without a top table, what write() recorded stays (complete
        // only for a standalone result).
        if let table {
            for c in work { writer.digests.set(c, nil) }
            for (c, d) in table { writer.setDigest(cluster: c, d) }
        }
        return FoldSummary(dataClusters: data, zeroClusters: zero, digestsCopied: table?.count)
    }
}
