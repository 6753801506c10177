// `hotimage restore IMAGE TARGET`: the volume back from an image.
//
// An incremental is restored through its chain (Chain.swift): every link
// is opened and checked against the base it names (by id), and the
// verification covers every link and the content through the chain.
// Verifies the whole image first (every checksum; --no-verify skips it), so
// a damaged image is refused before the target is touched.
// Refuses: an incomplete image (a kept partial), a mounted or busy target
// (block devices are opened O_EXCL), a target smaller than the image's
// volume, and a target that already holds a filesystem unless --force.
// Writes every allocated cluster (decoded on all cores), then discards or
// zeroes the rest so the target reads exactly as the image (--no-discard
// leaves the rest as it was: faster on a target known to be zero), then
// flushes. A new regular file is created with the volume's size, mode 0600
// whatever the umask (it holds every file of the volume).
// Then the files that writers handed over at thaw time and the image keeps
// (a PostgreSQL backup_label) are written into the restored filesystem, and
// the files they mark to leave out (postmaster.pid) are removed from it
// (Restore+Artifacts.swift); --no-writer-files skips both.
import Foundation
import HotCore
import HotErrors
import HotOS
import HotSync
import QCow2

public struct RestoreOptions: Sendable {
    public var image: String
    public var target: String
    public var force = false
    public var discard = true
    public var workers = 4
    /// Verify the whole image (every checksum) before writing anything.
    public var verifyFirst = true
    /// Write the writers' thaw-time files into the restored filesystem.
    public var writerFiles = true
    public init(image: String, target: String) { self.image = image; self.target = target }
}

public struct RestoreFailure: CodedError {
    /// refused: nothing was written (the checks before writing); failed:
    /// reading the image or writing the target.
    public var kind: FailureKind
    public var description: String
}

public struct RestoreSummary: Codable, Sendable {
    public var target: String
    public var bytes: UInt64
    public var clusters: UInt64
    public var zeroedBytes: UInt64
    public var seconds: Double
    public var discarded: Bool
    /// Paths (inside the restored filesystem) of the writers' files written.
    public var writerFiles: [String] = []
    /// Paths (inside the restored filesystem) of the files the writers
    /// leave out (PostgreSQL's postmaster.pid), removed.
    public var removedFiles: [String] = []
}

public enum RestoreJob {
    public static func run(_ o: RestoreOptions, reporter r: Reporter) throws -> RestoreSummary {
        var s = try restoreBlocks(o, reporter: r)
        // Files the writers handed over at thaw time (PostgreSQL's backup_label).
        if o.writerFiles, let meta = try? QCow2Reader(path: o.image).hotimage.flatMap({ ImageMetadata.decode($0.metadata) }) {
            (s.writerFiles, s.removedFiles) = try placeArtifacts(meta, target: o.target, reporter: r)
        }
        return s
    }

    /// Verify the image, open the target, write the allocated clusters,
    /// zero the rest, flush.
    static func restoreBlocks(_ o: RestoreOptions, reporter r: Reporter) throws -> RestoreSummary {
        let t0 = monotonicNanos()
        let src = try openSource(o, reporter: r)
        let dev = try openTarget(o, size: src.virtualSize)
        let clusters = src.clusters
        let written = try writeClusters(clusters, from: src, to: dev, o, reporter: r, since: t0)
        // The rest reads as zeros (--no-discard leaves it as it was).
        var zeroed: UInt64 = 0
        if o.discard { zeroed = try zeroGaps(between: clusters, clusterSize: UInt64(src.clusterSize), size: src.virtualSize, of: dev, o) }
        do { try dev.flush() } catch { throw RestoreFailure(kind: .failed, description: "flushing \(o.target): \(error)") }
        return RestoreSummary(target: o.target, bytes: written, clusters: UInt64(clusters.count), zeroedBytes: zeroed,
                              seconds: Double(monotonicNanos() - t0) / 1e9, discarded: o.discard)
    }

    /// What a restore reads: one image, or a chain through its links.
    struct Source {
        let virtualSize: UInt64
        let clusterSize: Int
        /// The clusters holding data (the rest reads as zeros).
        let clusters: AllocatedClusters
        let read: (UInt64, UnsafeMutableRawBufferPointer, ClusterDecoder) throws -> Void
    }

    /// The image (or the chain of an incremental), refused when incomplete,
    /// damaged, or a link is not the base it was made against.
    static func openSource(_ o: RestoreOptions, reporter r: Reporter) throws -> Source {
        let probe: QCow2Reader
        do { probe = try QCow2Reader(path: o.image) } catch {
            throw RestoreFailure(kind: .refused, description: "\(o.image): \(error)")
        }
        guard probe.backingFileName != nil else {
            let img = try checkImage(probe, o, reporter: r)
            return Source(virtualSize: img.virtualSize, clusterSize: img.clusterSize, clusters: try img.allocatedClusters(),
                          read: { c, buf, dec in _ = try img.readCluster(c, into: buf, decoder: dec) })
        }
        let chain: ImageChain
        do { chain = try ImageChain.open(o.image) } catch {
            throw RestoreFailure(kind: .refused, description: "\(error); nothing was written")
        }
        if o.verifyFirst {
            r.log("verifying \(o.image) and its \(chain.links.count - 1) base(s) before writing anything (--no-verify skips this)")
            let v = chain.verify()
            if let p = v.problems.first {
                throw RestoreFailure(kind: .refused, description: "\(o.image) cannot be restored: \(p)\(v.problems.count > 1 ? " (and \(v.problems.count - 1) more; see 'hotimage verify')" : "")")
            }
        } else {
            if let d = chain.damage.first {
                throw RestoreFailure(kind: .refused, description: "\(o.image) cannot be restored: \(d); run 'hotimage verify' for the details")
            }
        }
        let clusters: AllocatedClusters
        do { clusters = try chain.chain.allocatedClusters() } catch {
            throw RestoreFailure(kind: .failed, description: "reading the chain of \(o.image): \(error)")
        }
        let qc = chain.chain
        return Source(virtualSize: chain.virtualSize, clusterSize: chain.clusterSize, clusters: clusters,
                      read: { c, buf, dec in _ = try qc.read(cluster: c, into: buf.baseAddress!, decoder: dec) })
    }

    /// The image, refused when incomplete or damaged (every checksum first,
    /// unless --no-verify).
    private static func checkImage(_ img: QCow2Reader, _ o: RestoreOptions, reporter r: Reporter) throws -> QCow2Reader {
        if let h = img.hotimage, !h.complete {
            throw RestoreFailure(kind: .refused, description: "\(o.image) is an incomplete image (a failed backup kept with --keep-partial); it cannot be restored")
        }
        if let p = img.hotimageProblems.first {
            throw RestoreFailure(kind: .refused, description: "\(o.image) is damaged (\(p)); run 'hotimage verify' for the details")
        }
        if o.verifyFirst {
            r.log("verifying \(o.image) before writing anything (--no-verify skips this)")
            let rep = img.verify()
            if let p = rep.problems.first {
                throw RestoreFailure(kind: .refused, description: "\(o.image) is damaged: \(p)\(rep.problemCount > 1 ? " (and \(rep.problemCount - 1) more; see 'hotimage verify')" : "")")
            }
        }
        if img.hotimage == nil { r.log("\(o.image) was not made by hotimage: restoring it without checksums") }
        return img
    }

    /// The target, opened exclusively: a block device or a regular file (a
    /// new one is created with `size`), not mounted, large enough, and
    /// without a filesystem unless --force.
    private static func openTarget(_ o: RestoreOptions, size: UInt64) throws -> BlockDevice {
        var st = stat()
        let exists = stat(o.target, &st) == 0
        if exists && (st.st_mode & S_IFMT) != S_IFBLK && (st.st_mode & S_IFMT) != S_IFREG {
            throw RestoreFailure(kind: .refused, description: "\(o.target) is not a block device or a regular file")
        }
        if exists && (st.st_mode & S_IFMT) == S_IFBLK, let mnt = Mounts.of(device: o.target).first {
            throw RestoreFailure(kind: .refused, description: "\(o.target) is mounted at \(mnt.mountPoint); unmount it first")
        }
        if !exists {
            // Mode 0600 whatever the umask: the file holds the whole volume.
            let fd = DataFileAccess.ownerOnly.open(o.target, flags: O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC)
            if fd < 0 { throw RestoreFailure(kind: .refused, description: "creating \(o.target): \(String(cString: strerror(errno)))") }
            let ok = ftruncate(fd, off_t(size)) == 0
            close(fd)
            if !ok { unlink(o.target); throw RestoreFailure(kind: .failed, description: "sizing \(o.target): \(String(cString: strerror(errno)))") }
        }
        let dev: BlockDevice
        do { dev = try BlockDevice(path: o.target, readOnly: false, exclusive: true) } catch {
            throw RestoreFailure(kind: .refused, description: "\(error) (is it in use?)")
        }
        if dev.size < size {
            throw RestoreFailure(kind: .refused, description: "\(o.target) holds \(dev.size) bytes, the image's volume \(size): too small")
        }
        if exists && !o.force, let fs = try? probeFilesystem(path: o.target) {
            throw RestoreFailure(kind: .refused, description: "\(o.target) already holds a filesystem (\(fs.type)\(fs.uuid.map { " \($0)" } ?? "")); use --force to overwrite it")
        }
        return dev
    }

    /// Decodes and writes the allocated clusters with `o.workers` threads,
    /// reporting progress; the bytes written.
    private static func writeClusters(_ clusters: AllocatedClusters, from img: Source, to dev: BlockDevice,
                                      _ o: RestoreOptions, reporter r: Reporter, since t0: UInt64) throws -> UInt64 {
        let size = img.virtualSize
        let cs = UInt64(img.clusterSize)
        let m = Monitor()
        var next = 0
        var failure: Error?
        var written: UInt64 = 0
        var active = o.workers
        let total = UInt64(clusters.count) * cs
        for _ in 0..<max(1, o.workers) {
            Threads.start(name: "restore") {
                let dec = ClusterDecoder()
                let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
                defer { buf.deallocate() }
                while true {
                    let i: Int? = m.withLock {
                        guard failure == nil, next < clusters.count else { return nil }
                        next += 1
                        return next - 1
                    }
                    guard let i else { break }
                    let c = clusters[i]
                    do {
                        try img.read(c, buf, dec)
                        let off = c * cs
                        let n = Int(min(cs, size - off))
                        try dev.write(from: buf.baseAddress!, count: n, offset: off)
                        m.withLock { written += UInt64(n) }
                    } catch {
                        m.withLock { if failure == nil { failure = error } }
                    }
                }
                m.withLock { active -= 1; m.broadcast() }
            }
        }
        while true {
            let (left, w) = m.withLock { () -> (Int, UInt64) in
                if active > 0 { _ = m.wait(timeoutNanos: 200_000_000) }
                return (active, written)
            }
            r.progress(ImagerProgress(doneBytes: w, totalBytes: total, imageBytes: 0,
                                      elapsed: Double(monotonicNanos() - t0) / 1e9, emergency: false,
                                      bufferBytes: 0, bufferLimit: 0), phase: "restoring")
            if left == 0 { break }
        }
        r.finishProgress()
        if let f = failure { throw RestoreFailure(kind: .failed, description: "restoring \(o.target): \(f)") }
        return m.withLock { written }
    }

    /// Discards (or zeroes) what no cluster covers, so the target reads as
    /// the image; the bytes zeroed.
    private static func zeroGaps(between clusters: AllocatedClusters, clusterSize cs: UInt64, size: UInt64,
                                 of dev: BlockDevice, _ o: RestoreOptions) throws -> UInt64 {
        var zeroed: UInt64 = 0
        var pos: UInt64 = 0
        var gaps: [Range<UInt64>] = []
        for c in clusters {
            let s = c * cs
            if s > pos { gaps.append(pos..<s) }
            pos = s + cs
        }
        if pos < size { gaps.append(pos..<size) }
        for g in gaps {
            do { try dev.zero(offset: g.lowerBound, length: UInt64(g.count), unmap: true) } catch {
                throw RestoreFailure(kind: .failed, description: "zeroing unused space of \(o.target): \(error)")
            }
            zeroed += UInt64(g.count)
        }
        return zeroed
    }
}
