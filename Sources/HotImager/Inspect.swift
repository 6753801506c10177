// `hotimage info` and `hotimage verify`.
import Foundation
import HotOS
import QCow2

public struct ImageInfo: Codable, Sendable {
    public var path: String
    public var fileBytes: UInt64
    public var virtualSize: UInt64
    public var clusterSize: Int
    public var compressionType: String
    public var madeByHotimage: Bool
    public var complete: Bool?
    public var allocatedClusters: UInt64
    public var metadata: ImageMetadata?
    /// The qcow2 backing file named in the header (an incremental's base).
    public var backingFile: String?
    /// An incremental: a line per link, top first; or why the chain
    /// cannot be read.
    public var chain: [String]?
    public var chainProblem: String?

    public static func read(_ path: String) throws -> ImageInfo {
        let r = try QCow2Reader(path: path)
        var st = stat()
        _ = stat(path, &st)
        let meta = r.hotimage.flatMap { ImageMetadata.decode($0.metadata) }
        var info = ImageInfo(path: path, fileBytes: UInt64(st.st_size), virtualSize: r.virtualSize, clusterSize: r.clusterSize,
                             compressionType: r.compressionType, madeByHotimage: r.hotimage != nil, complete: r.hotimage?.complete,
                             allocatedClusters: UInt64(try r.allocatedClusters().count), metadata: meta)
        info.backingFile = r.backingFileName
        if r.backingFileName != nil {
            do { info.chain = try ImageChain.open(path).describeLinks } catch { info.chainProblem = "\(error)" }
        }
        return info
    }

    public var text: String {
        var s = ""
        func line(_ k: String, _ v: String) { s += k.padding(toLength: 18, withPad: " ", startingAt: 0) + v + "\n" }
        line("image:", path)
        line("file size:", "\(formatBytes(fileBytes)) (\(fileBytes) bytes)")
        line("virtual size:", "\(formatBytes(virtualSize)) (\(virtualSize) bytes)")
        line("cluster size:", "\(clusterSize)")
        line("compression type:", compressionType)
        line("data clusters:", "\(allocatedClusters) (\(formatBytes(allocatedClusters * UInt64(clusterSize))))")
        guard madeByHotimage else { line("made by:", "not hotimage (no metadata, no checksums)"); return s }
        line("complete:", complete == true ? "yes" : "NO (a partial image kept after a failed backup; restore refuses it)")
        guard let m = metadata else { line("metadata:", "unreadable"); return s }
        line("made by:", "\(m.tool) \(m.toolVersion) on \(m.host)")
        line("source device:", m.source.device + (m.source.realDevice.map { " (behind HotCore: \($0))" } ?? ""))
        if let a = m.source.attachName { line("attachment:", a) }
        if let mp = m.source.mountPoint { line("mount point:", mp) }
        line("filesystem:", [m.filesystem.type, m.filesystem.uuid.map { "UUID \($0)" }, m.filesystem.label.map { "label '\($0)'" }]
            .compactMap { $0 }.joined(separator: ", ").ifEmpty("unknown"))
        line("snapshot time:", m.snapshotTime)
        if let id = m.id { line("image id:", id) }
        if let c = m.chain {
            line("incremental:", "of image \(c.baseId) (cut \(c.baseCutTime)), backing file \(c.baseFile)")
            line("changes:", "\(c.method)\(c.reason.map { " (\($0))" } ?? ""): \(c.changedClusters) cluster(s) written, \(c.zeroedClusters) zeroed, \(c.unchangedClusters) left to the base")
        } else if backingFile == nil {
            line("incremental:", "no (a full image)")
        }
        if let mg = m.merged, !mg.isEmpty { line("merged:", "folded in: " + mg.joined(separator: ", ")) }
        for l in chain ?? [] { line("chain:", l) }
        if let p = chainProblem { line("chain:", "BROKEN: \(p)") }
        if let set = m.set {
            line("set:", "\(set.id), cut \(set.cutTime)")
            line("set member:", "'\(set.member)' of \(set.members.map { "'\($0.name)'" }.joined(separator: ", ")) (its image is \(SetRecord.imageName(set.member)))")
        }
        line("mode:", "\(m.mode), consistency \(m.consistency), map \(m.mapMethod)")
        line("compression:", m.compression)
        line("block size:", "\(m.blockSize)")
        line("used bytes:", "\(formatBytes(m.usedBytes)) (\(m.usedBytes))")
        line("imaged bytes:", "\(formatBytes(m.imagedBytes)) (\(m.imagedBytes))")
        if m.excluded.isEmpty { line("excluded:", "nothing") }
        for e in m.excluded { line("excluded:", "\(e.path) (\(e.reason), \(e.files) file(s), \(formatBytes(e.bytes)))") }
        for h in m.hooks {
            line("hook:", "\(h.phase.rawValue) '\(h.command)' → \(h.timedOut ? "timed out" : "exit \(h.exitCode)")")
        }
        for e in m.emergencyEpisodes {
            line("emergency:", String(format: "at %.1f s for %.1f s, %llu clusters (%@)", e.startSeconds, e.seconds, e.clusters, e.reason))
        }
        for c in m.components ?? [] where c.action != "not-covered" {
            var what = "\(c.writer) '\(c.id)', \(c.coverage.rawValue) covered: \(c.action)"
            if let meth = c.method { what += " (\(meth))" }
            if let f = c.freezeMessage, !c.frozen { what += ": \(f)" }
            if let t = c.thawed { what += t ? ", thawed" : ", THAW FAILED: \(c.thawMessage ?? "no reason given")" }
            if let a = c.artifacts, !a.isEmpty { what += "; keeps " + a.map(\.path).joined(separator: ", ") }
            if let o = c.restoreOmit, !o.isEmpty { what += "; restore leaves out " + o.joined(separator: ", ") }
            line("component:", what)
        }
        for e in m.writerErrors ?? [] { line("writer error:", e) }
        return s
    }
}

extension String {
    func ifEmpty(_ d: String) -> String { isEmpty ? d : self }
}

public struct VerifyOutcome: Codable, Sendable {
    public var image: String
    public var problems: [String]
    public var notes: [String]
    public var clustersChecked: UInt64
    public var seconds: Double

    public static func run(_ path: String) throws -> VerifyOutcome {
        let t0 = monotonicNanos()
        let r = try QCow2Reader(path: path)
        if r.backingFileName != nil {
            // An incremental: every link, their ids, the content through the chain.
            // A missing or wrong base is refused (thrown: exit 2), naming the link.
            let c = try ImageChain.open(path)
            let v = c.verify()
            return VerifyOutcome(image: path, problems: v.problems, notes: v.notes + ["a chain of \(c.links.count) images: " + c.links.map(\.path).joined(separator: " <- ")],
                                 clustersChecked: v.clusters, seconds: Double(monotonicNanos() - t0) / 1e9)
        }
        let rep = r.verify()
        let problems = rep.problems.map { "\($0)" }
        var notes: [String] = rep.notes
        if r.hotimage == nil { notes.append("not made by hotimage: the structure was checked, the data has no checksums to check") }
        return VerifyOutcome(image: path, problems: problems, notes: notes, clustersChecked: rep.clustersChecked,
                             seconds: Double(monotonicNanos() - t0) / 1e9)
    }
}
