// Which filesystems are mounted from which device, from /proc/self/mountinfo.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public struct MountEntry: Equatable, Sendable {
    public var major: UInt32
    public var minor: UInt32
    public var mountPoint: String
    public var fsType: String
    public var source: String
    public var readOnly: Bool
}

public enum Mounts {
    public static func all() -> [MountEntry] {
        guard let f = fopen("/proc/self/mountinfo", "r") else { return [] }
        defer { fclose(f) }
        var out: [MountEntry] = []
        var line: UnsafeMutablePointer<CChar>?
        var cap = 0
        while getline(&line, &cap, f) > 0 {
            let s = String(cString: line!)
            // id parent major:minor root mountpoint options ... - fstype source superopts
            let halves = s.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2 else { continue }
            let a = halves[0].split(separator: " ")
            let b = halves[1].split(separator: " ")
            guard a.count >= 6, b.count >= 2 else { continue }
            let mm = a[2].split(separator: ":")
            guard mm.count == 2, let ma = UInt32(mm[0]), let mi = UInt32(mm[1]) else { continue }
            let opts = a[5].split(separator: ",")
            out.append(MountEntry(major: ma, minor: mi, mountPoint: unescape(String(a[4])),
                                  fsType: String(b[0]), source: unescape(String(b[1])),
                                  readOnly: opts.contains("ro")))
        }
        free(line)
        return out
    }

    /// Mounts whose device is `path`'s block device.
    public static func of(device path: String) -> [MountEntry] {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return [] }
        let ma = UInt32(hs_major(UInt64(st.st_rdev))), mi = UInt32(hs_minor(UInt64(st.st_rdev)))
        return all().filter { $0.major == ma && $0.minor == mi }
    }

    /// The mount whose mount point is exactly `path`.
    /// The mount whose filesystem holds `path` (by st_dev), if any.
    public static func holding(path: String) -> MountEntry? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        let ma = UInt32(hs_major(UInt64(st.st_dev))), mi = UInt32(hs_minor(UInt64(st.st_dev)))
        return all().last { $0.major == ma && $0.minor == mi }
    }

    public static func at(mountPoint path: String) -> MountEntry? {
        var resolved = [CChar](repeating: 0, count: Int(PATH_MAX))
        let p = realpath(path, &resolved) != nil ? String(cString: resolved) : path
        return all().last { $0.mountPoint == p }
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out: [UInt8] = []
        let u = Array(s.utf8)
        var i = 0
        while i < u.count {
            if u[i] == 0x5c, i + 3 < u.count,
               let v = UInt8(String(decoding: u[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v); i += 4
            } else { out.append(u[i]); i += 1 }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
