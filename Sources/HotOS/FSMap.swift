// The used-space map of a mounted filesystem from FS_IOC_GETFSMAP: every
// record whose owner is not "free space" is in use (metadata, journal, file
// data). Works on a frozen ext4 or XFS, so it is read inside the freeze.
#if canImport(Glibc)
import Glibc
#endif
import CHotShim

public struct FSExtent: Equatable, Sendable {
    public var offset: UInt64   // bytes from the start of the device
    public var length: UInt64   // bytes
    public init(offset: UInt64, length: UInt64) { self.offset = offset; self.length = length }
}

public enum FSMap {
    /// Used extents of the filesystem mounted at `mountPoint`, over a data
    /// device of `deviceBytes`: everything that is not reported as free
    /// space. (ext4 reports metadata and free space but leaves file data as
    /// gaps between records, so "not free" is the only safe reading.)
    public static func usedExtents(mountPoint: String, deviceBytes: UInt64) throws -> [FSExtent] {
        let free = try freeExtents(mountPoint: mountPoint)
        var out: [FSExtent] = []
        var pos: UInt64 = 0
        for f in free {
            let s = min(f.offset, deviceBytes)
            if s > pos { out.append(FSExtent(offset: pos, length: s - pos)) }
            pos = max(pos, min(f.offset + f.length, deviceBytes))
        }
        if pos < deviceBytes { out.append(FSExtent(offset: pos, length: deviceBytes - pos)) }
        return out
    }

    /// Free-space extents on the data device, merged and sorted.
    public static func freeExtents(mountPoint: String) throws -> [FSExtent] {
        let fd = try syscall("open", mountPoint) { open(mountPoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { close(fd) }
        guard let it = hs_fsmap_begin(fd, 4096) else {
            throw OSError("FS_IOC_GETFSMAP", errno: errno, object: mountPoint)
        }
        defer { hs_fsmap_end(it) }
        var out: [FSExtent] = []
        var rec = hs_fsmap_rec()
        var device: UInt32?
        while true {
            let r = hs_fsmap_next(it, &rec)
            if r < 0 { throw OSError("FS_IOC_GETFSMAP", errno: errno, object: mountPoint) }
            if r == 0 { break }
            if device == nil { device = rec.device }
            // Only the data device; an external log or realtime device is not ours.
            guard rec.device == device, rec.owner == HS_FMR_OWN_FREE, rec.length > 0 else { continue }
            if let last = out.last, last.offset + last.length >= rec.physical {
                let end = max(last.offset + last.length, rec.physical + rec.length)
                out[out.count - 1].length = end - last.offset
            } else {
                out.append(FSExtent(offset: rec.physical, length: rec.length))
            }
        }
        return out.sorted { $0.offset < $1.offset }
    }
}
