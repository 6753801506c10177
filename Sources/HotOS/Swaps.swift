// Active swap areas, from /proc/swaps. A swap file inside a filesystem
// that is being backed up holds nothing worth copying (and changes all the
// time), so the backup can leave its blocks out (see `fileExtents`).
#if canImport(Glibc)
import Glibc
#endif

public struct SwapEntry: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        case file
        case partition
        case other(String)
    }

    /// The swap file or device, unescaped. A swap file that was deleted
    /// while in use ends in " (deleted)" (the kernel's d_path), and no
    /// longer has a name to stat.
    public var path: String
    public var type: Kind
    public var sizeBytes: UInt64
    public var usedBytes: UInt64
    public var priority: Int

    public init(path: String, type: Kind, sizeBytes: UInt64, usedBytes: UInt64, priority: Int) {
        self.path = path
        self.type = type
        self.sizeBytes = sizeBytes
        self.usedBytes = usedBytes
        self.priority = priority
    }
}

/// Parses the text of /proc/swaps: a header line, then one line per swap
/// area, "path type size used priority", sizes in KiB, separated by spaces
/// or tabs; the path escapes space, tab, newline and backslash as \ooo.
/// Lines that do not have that shape (the header among them) are ignored.
public func parseSwaps(_ text: String) -> [SwapEntry] {
    var out: [SwapEntry] = []
    for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
        let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard f.count >= 5,
              let size = UInt64(f[2]), let used = UInt64(f[3]), let prio = Int(f[4]) else { continue }
        let kind: SwapEntry.Kind
        switch f[1] {
        case "file": kind = .file
        case "partition": kind = .partition
        default: kind = .other(String(f[1]))
        }
        let (sizeBytes, o1) = size.multipliedReportingOverflow(by: 1024)
        let (usedBytes, o2) = used.multipliedReportingOverflow(by: 1024)
        guard !o1, !o2 else { continue }
        out.append(SwapEntry(path: Mounts.unescape(String(f[0])), type: kind,
                             sizeBytes: sizeBytes, usedBytes: usedBytes, priority: prio))
    }
    return out
}

/// The swap areas in use now (empty if /proc/swaps cannot be read).
public func activeSwaps(procSwaps: String = "/proc/swaps") -> [SwapEntry] {
    guard let f = fopen(procSwaps, "r") else { return [] }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&chunk, 1, chunk.count, f)
        if n <= 0 { break }
        bytes += chunk[0 ..< n]
    }
    return parseSwaps(String(decoding: bytes, as: UTF8.self))
}

/// Paths of the active swap files that live on the filesystem whose
/// device number is `dev` (`stat().st_dev` of any file in it). A swap file
/// that cannot be stat'ed (deleted, or in another mount namespace) is not
/// listed.
public func swapFiles(onDevice dev: dev_t) -> [String] {
    activeSwaps().compactMap { e in
        guard e.type == .file else { return nil }
        var st = stat()
        guard stat(e.path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_dev == dev else { return nil }
        return e.path
    }
}
