// QCow2Chain.swift — an image and its backing files, read as one disk.
//
// The chain is opened top first, following each link's backing file name;
// a relative name is resolved against the directory of the image that names
// it (as qemu does). Every link must be qcow2 (a missing backing format
// extension is probed: the file must open as qcow2), have the top's virtual
// size and cluster size, and appear once (no loops); at most `maxDepth`
// links. A guest cluster reads from the first link that allocates it: data,
// or the zero flag (zeros: the search stops); where no link allocates it,
// it reads as zeros.
//
// verifyChainContent (below) compares what the chain reads with the top
// link's digest table; this finds a swapped or edited base even when the
// names and ids match.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import HotSync

/// Why a backing chain cannot be opened. `link` is the index (top = 0) of
/// the image whose backing file is at fault, `file` the resolved path of
/// that backing file.
public enum QCow2ChainFailure: Equatable, Sendable {
    /// The backing file does not exist (or cannot be opened).
    case missingBackingFile(link: Int, name: String, file: String)
    /// The backing format extension names a format other than qcow2.
    case unsupportedBackingFormat(link: Int, format: String, file: String)
    /// The backing file is not a readable qcow2 image.
    case notQCow2(link: Int, file: String, reason: String)
    /// The backing file is already a link of the chain.
    case loop(link: Int, file: String)
    /// More than maxDepth links.
    case tooDeep(link: Int, maxDepth: Int)
    /// The backing file's virtual size differs from the top's.
    case virtualSizeMismatch(link: Int, file: String, size: UInt64, topSize: UInt64)
    /// The backing file's cluster size differs from the top's.
    case clusterSizeMismatch(link: Int, file: String, clusterSize: Int, topClusterSize: Int)
}

/// A qcow2 image and its backing files. Thread-safe for concurrent reads
/// (each link's reader is; decoders come from an internal pool).
public final class QCow2Chain: @unchecked Sendable {
    /// The links, top first.
    public let links: [QCow2Reader]
    /// The resolved path of each link (the top's as given).
    public let paths: [String]
    public let virtualSize: UInt64
    /// The top's cluster size (every link has it).
    public let clusterSize: Int
    public let guestClusters: UInt64

    private let poolLock = Lock()
    private var decoders: [ClusterDecoder] = []

    public var top: QCow2Reader { links[0] }

    /// Opens `path` and its backing files recursively (at most `maxDepth`
    /// links in all). Throws a QCow2Error whose `chain` says which link and
    /// file failed.
    public init(path: String, maxDepth: Int = 64) throws {
        let top = try QCow2Reader(path: path)
        var links = [top]
        var paths = [path]
        var seen: [FileID] = []
        if let id = FileID(path) { seen.append(id) }
        while let name = links.last!.backingFileName {
            let k = links.count - 1
            let namer = paths[k]
            let file = Self.resolve(name, relativeTo: namer)
            func fail(_ f: QCow2ChainFailure, _ msg: String) -> QCow2Error {
                QCow2Error("backing chain link \(k) (\(namer)): \(msg)", path: path, chain: f)
            }
            if let fmt = links.last!.backingFormat, fmt != "qcow2" {
                throw fail(.unsupportedBackingFormat(link: k, format: fmt, file: file),
                           "backing file \(file) has format \"\(fmt)\"; only qcow2 backing files are supported")
            }
            guard links.count < maxDepth else {
                throw fail(.tooDeep(link: k, maxDepth: maxDepth), "the chain is deeper than \(maxDepth) links (next: \(file))")
            }
            guard let id = FileID(file) else {
                throw fail(.missingBackingFile(link: k, name: name, file: file),
                           "backing file \"\(name)\" (resolved to \(file)) cannot be found: \(errnoText(errno))")
            }
            if seen.contains(id) {
                throw fail(.loop(link: k, file: file), "backing file \(file) is already in the chain (a loop)")
            }
            seen.append(id)
            let r: QCow2Reader
            do {
                r = try QCow2Reader(path: file)
            } catch let e as QCow2Error {
                throw fail(.notQCow2(link: k, file: file, reason: e.message),
                           "backing file \(file) is not a readable qcow2 image: \(e.message)")
            }
            guard r.virtualSize == top.virtualSize else {
                throw fail(.virtualSizeMismatch(link: k, file: file, size: r.virtualSize, topSize: top.virtualSize),
                           "backing file \(file) has virtual size \(r.virtualSize), the top image \(top.virtualSize)")
            }
            guard r.clusterSize == top.clusterSize else {
                throw fail(.clusterSizeMismatch(link: k, file: file, clusterSize: r.clusterSize, topClusterSize: top.clusterSize),
                           "backing file \(file) has \(r.clusterSize)-byte clusters, the top image \(top.clusterSize)-byte ones; chains need one cluster size")
            }
            links.append(r)
            paths.append(file)
        }
        self.links = links
        self.paths = paths
        self.virtualSize = top.virtualSize
        self.clusterSize = top.clusterSize
        self.guestClusters = top.guestClusters
    }

    /// qemu's rule: an absolute name as is; a relative one against the
    /// directory of the image naming it.
    static func resolve(_ name: String, relativeTo image: String) -> String {
        if name.hasPrefix("/") { return name }
        guard let slash = image.lastIndex(of: "/") else { return name }
        return String(image[...slash]) + name
    }

    /// Device and inode: one file under any name.
    struct FileID: Equatable {
        let dev: UInt64
        let ino: UInt64
        init?(_ path: String) {
            var st = stat()
            guard stat(path, &st) == 0 else { return nil }
            dev = UInt64(st.st_dev)
            ino = UInt64(st.st_ino)
        }
    }

    // MARK: Reading

    private func takeDecoder() -> ClusterDecoder {
        poolLock.withLock { decoders.popLast() } ?? ClusterDecoder()
    }

    private func giveBack(_ d: ClusterDecoder) {
        poolLock.withLock { decoders.append(d) }
    }

    /// The first link that allocates guest cluster `cluster` (data or the
    /// zero flag) and its state there; nil when no link does (zeros).
    public func allocated(cluster: UInt64) throws -> (link: Int, state: ClusterState)? {
        for (k, r) in links.enumerated() {
            let s = try r.clusterState(cluster)
            if s != .unallocated { return (k, s) }
        }
        return nil
    }

    /// Reads guest cluster `cluster` through the chain into the first
    /// `clusterSize` bytes of `into`; false (having zero-filled) where it
    /// reads as zeros (no link allocates it, or the first one that does has
    /// the zero flag).
    public func read(cluster: UInt64, into: UnsafeMutableRawPointer) throws -> Bool {
        let d = takeDecoder()
        defer { giveBack(d) }
        return try read(cluster: cluster, into: into, decoder: d)
    }

    /// As `read(cluster:into:)` with the caller's per-thread decoder.
    public func read(cluster: UInt64, into: UnsafeMutableRawPointer, decoder: ClusterDecoder) throws -> Bool {
        guard let (k, s) = try allocated(cluster: cluster) else {
            into.initializeMemory(as: UInt8.self, repeating: 0, count: clusterSize)
            return false
        }
        let r = links[k]
        if let why = try r.readState(s, index: cluster, into: into, decoder: decoder, strict: false) {
            throw QCow2Error("\(r.describeGuest(cluster)), read from backing chain link \(k): \(why)", path: r.path)
        }
        if case .zero = s { return false }
        return true
    }

    /// Reads `count` guest bytes at `offset` (within the virtual size).
    public func read(offset: UInt64, count: Int, into: UnsafeMutableRawPointer) throws {
        guard count >= 0, let end = checkedAdd(offset, UInt64(count)), end <= virtualSize else {
            throw QCow2Error("read of \(count) bytes at guest offset \(hex(offset)) lies beyond the virtual size \(virtualSize)", path: paths[0])
        }
        if count == 0 { return }
        let cs = UInt64(clusterSize)
        let d = takeDecoder()
        defer { giveBack(d) }
        var tmp: UnsafeMutableRawPointer? = nil
        defer { tmp?.deallocate() }
        var pos = offset
        var out = into
        while pos < end {
            let c = pos / cs
            let inCluster = Int(pos % cs)
            let n = Int(min(end - pos, cs - UInt64(inCluster)))
            if inCluster == 0 && n == clusterSize {
                _ = try read(cluster: c, into: out, decoder: d)
            } else {
                if tmp == nil { tmp = .allocate(byteCount: clusterSize, alignment: 64) }
                _ = try read(cluster: c, into: tmp!, decoder: d)
                out.copyMemory(from: tmp! + inCluster, byteCount: n)
            }
            out += n
            pos += UInt64(n)
        }
    }

    /// The guest clusters some link allocates (data or the zero flag),
    /// ascending, as runs: the union over the links. Every other cluster
    /// reads as zeros. (Restore reads these through `read(cluster:into:)`,
    /// which says which of them read as zeros.)
    public func allocatedClusters() throws -> AllocatedClusters {
        AllocatedClusters(ranges: try unionOfAllocated(links: 0..<links.count))
    }

    /// The union of the allocated (data or zero-flag) clusters of `which`.
    func unionOfAllocated(links which: Range<Int>) throws -> [Range<UInt64>] {
        var all: [Range<UInt64>] = []
        for k in which { all += try links[k].allocatedRanges(includeZero: true) }
        all.sort { $0.lowerBound < $1.lowerBound }
        var out: [Range<UInt64>] = []
        for r in all {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }
}

// MARK: - Content verification through a chain

/// Reads, through `chain`, every cluster that has a digest in the TOP
/// link's digest table or is allocated in some link, and checks that it has
/// that digest, or reads as zeros where the table has none. This is how a
/// swapped or edited base is found even when names and ids match. Problems
/// (kind `.digest`, naming guest byte ranges) are in the report; throws
/// when the top has no digest table, or it is damaged. `progress(done,
/// total)` counts clusters; it may be called from several threads (never
/// concurrently).
public func verifyChainContent(_ chain: QCow2Chain,
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> VerifyReport {
    guard let table = try chain.top.digests() else {
        throw QCow2Error("the image has no digest table (written before digest tables, or not by hotimage); its content cannot be checked through the chain", path: chain.paths[0])
    }
    var ranges = try chain.unionOfAllocated(links: 0..<chain.links.count)
    // Clusters with a digest that no link allocates read as zeros: check
    // them too (they are mismatches unless their digest is of zeros).
    var extra: [Range<UInt64>] = []
    var ri = 0
    for (c, _) in table {
        while ri < ranges.count && ranges[ri].upperBound <= c { ri += 1 }
        if ri < ranges.count && ranges[ri].contains(c) { continue }
        if let last = extra.last, last.upperBound == c { extra[extra.count - 1] = last.lowerBound..<(c + 1) } else { extra.append(c..<(c + 1)) }
    }
    if !extra.isEmpty {
        ranges = (ranges + extra).sorted { $0.lowerBound < $1.lowerBound }
    }
    let work = AllocatedClusters(ranges: ranges)
    let total = UInt64(work.count)
    let cs = chain.clusterSize
    let zeros = ClusterDigest.zeros(clusterSize: cs)
    struct Worker {
        let buf: UnsafeMutableRawPointer
        let decoder = ClusterDecoder()
        var problems: [VerifyProblem] = []
        var count: UInt64 = 0
    }
    let lock = Lock()                     // the results of the workers
    var problems: [VerifyProblem] = []
    var count: UInt64 = 0
    var done: UInt64 = 0
    try parallelBatches(count: work.count, batch: 256, threads: onlineCPUs(),
                        makeState: { Worker(buf: .allocate(byteCount: cs, alignment: 64)) },
                        body: { w, batch in
        for p in batch {
            let c = work[p]
            _ = try chain.read(cluster: c, into: w.buf, decoder: w.decoder)
            let got = ClusterDigest.of(UnsafeRawBufferPointer(start: w.buf, count: cs), clusterSize: cs)
            let want = table[cluster: c]
            var msg: String? = nil
            if let want, want != got {
                let from = (try? chain.allocated(cluster: c)).flatMap { $0 }
                let src = from.map { "backing chain link \($0.link) (\(chain.paths[$0.link]))" } ?? "no link (zeros)"
                msg = "reads through the chain with digest \(got) (from \(src)), but the top's digest table records \(want)"
            } else if want == nil && got != zeros {
                let from = (try? chain.allocated(cluster: c)).flatMap { $0 }
                let src = from.map { "backing chain link \($0.link) (\(chain.paths[$0.link]))" } ?? "no link"
                msg = "should read as zeros (no digest in the top's table) but reads data from \(src)"
            }
            if let msg {
                w.count += 1
                if w.problems.count < VerifyReport.storedProblemLimit {
                    let start = c * UInt64(cs)
                    let len = min(UInt64(cs), chain.virtualSize - start)
                    w.problems.append(VerifyProblem(kind: .digest, guestOffset: start, guestLength: len, cluster: c,
                                                    clusterCount: 1, message: msg))
                }
            }
        }
    }, finish: { w in
        w.buf.deallocate()
        lock.withLock { problems += w.problems; count += w.count }
    }, afterBatch: progress.map { p in { n in
        let d = lock.withLock { () -> UInt64 in done += UInt64(n); return done }
        p(d, total)
    } })
    var report = VerifyReport()
    report.clustersChecked = total
    report.checkedChecksums = true
    for p in problems.sorted(by: { ($0.cluster ?? 0) < ($1.cluster ?? 0) }) { report.add(p) }
    // Problems beyond the stored limit still count.
    if count > UInt64(problems.count) {
        report.problemCount += count - UInt64(problems.count)
    }
    return report
}
