// Which file a loop device stands over (sysfs), so cleanups can find the
// loops over hotimage's own hb files by name and touch nothing else.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

extension Loop {
    /// The backing file of the loop device `M:m`, without the kernel's
    /// " (deleted)" suffix; nil if it is not a bound loop device.
    public static func backingFile(major: UInt32, minor: UInt32) -> String? {
        guard let s = readSmallFile("/sys/dev/block/\(major):\(minor)/loop/backing_file") else { return nil }
        var t = s
        while t.hasSuffix("\n") { t.removeLast() }
        if t.hasSuffix(" (deleted)") { t.removeLast(" (deleted)".count) }
        return t.isEmpty ? nil : t
    }

    /// The /dev path of the block device `M:m` (from sysfs's uevent DEVNAME).
    public static func devicePath(major: UInt32, minor: UInt32) -> String? {
        guard let s = readSmallFile("/sys/dev/block/\(major):\(minor)/uevent") else { return nil }
        for line in s.split(separator: "\n") where line.hasPrefix("DEVNAME=") {
            return "/dev/" + line.dropFirst("DEVNAME=".count)
        }
        return nil
    }

    /// Every bound loop device with its backing file.
    public static func all() -> [(device: String, major: UInt32, minor: UInt32, file: String)] {
        guard let d = opendir("/sys/block") else { return [] }
        defer { closedir(d) }
        var out: [(String, UInt32, UInt32, String)] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            guard name.hasPrefix("loop"),
                  let dev = readSmallFile("/sys/block/\(name)/dev") else { continue }
            let mm = dev.split(whereSeparator: { $0 == ":" || $0 == "\n" })
            guard mm.count == 2, let ma = UInt32(mm[0]), let mi = UInt32(mm[1]),
                  let f = backingFile(major: ma, minor: mi) else { continue }
            out.append(("/dev/" + name, ma, mi, f))
        }
        return out
    }

    /// Whether `path` names an hb file ("hb_NN.tmp").
    public static func isHBFileName(_ path: String) -> Bool {
        let base = path.split(separator: "/").last.map(String.init) ?? path
        guard base.hasPrefix("hb_"), base.hasSuffix(".tmp") else { return false }
        let mid = base.dropFirst(3).dropLast(4)
        return !mid.isEmpty && mid.allSatisfy { $0.isASCII && $0.isNumber }
    }
}
