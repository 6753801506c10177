// The buffer directory must not live on the volume a session protects. For
// HotCore an hb file there is written through the protected device, i.e.
// through HotCore itself: the movers' writes need copy-on-write of the
// volume's metadata, which needs room in the memory tier, which only the
// movers can make (a wedge); on a device stacked *under* HotCore's back (a
// loop or dm over the real device) they would change the volume behind it.
// For dm-snapshot the hb files would be frozen with the volume and copy
// themselves on write.
//
// Checked at attach (the real device and what stands on it) and at every
// session start (also the protected device and what stands on it, since it
// may have been mounted since), by the device the directory's file system
// lives on. The directory is opened once at attach and hb files are made
// relative to that descriptor, so a mount over its path later cannot move
// them; the session-start check also looks at what the path names now.
import HotOS
#if canImport(Glibc)
import Glibc
#endif

extension SessionDaemon {
    /// Opens (creating 0700) the buffer directory; returns the descriptor.
    static func openBufferDirectory(_ path: String) throws -> Int32 {
        let created = mkdir(path, 0o700) == 0
        if !created && errno != EEXIST {
            throw DaemonError.failed("cannot create buffer directory \(path): \(String(cString: strerror(errno)))")
        }
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw DaemonError.failed("cannot open buffer directory \(path): \(String(cString: strerror(errno)))") }
        // 0700 whatever the umask, for a directory we made (hb files hold
        // volume data). A directory the user gave is left as it is.
        if created { _ = fchmod(fd, 0o700) }
        return fd
    }

    /// Opens the buffer directory of a daemon guarding `devices` and refuses
    /// it if it lies on them or on anything stacked on them (closed then).
    static func openCheckedBufferDirectory(_ c: SessionDaemonConfig, devices: [String]) throws -> Int32 {
        let fd = try openBufferDirectory(c.bufferDir)
        if let why = bufferDirectoryRefusal(path: c.bufferDir, fd: fd, name: c.name, devices: devices) {
            close(fd)
            throw DaemonError.usage(why)
        }
        return fd
    }

    /// Why `path` (held open as `fd`) may not be the buffer directory of
    /// attachment `name` over `devices` (block device paths; others ignored).
    static func bufferDirectoryRefusal(path: String, fd: Int32, name: String, devices: [String],
                                       sysClassBlock: String = "/sys/class/block") -> String? {
        if allowBufferOnVolumeForTests { return nil }
        let bases = Set(devices.compactMap { DevNum(blockDevice: $0) })
        guard !bases.isEmpty else { return nil }
        let stack = BlockStack.devices(over: bases, root: sysClassBlock)
        var candidates: [(what: String, dev: DevNum)] = []
        if let d = DevNum(filesystemOf: fd) { candidates.append(("", d)) }
        if let d = DevNum(filesystemOf: path) { candidates.append((" (as its path resolves now)", d)) }
        for c in candidates {
            guard let devName = stack.first(where: { $0.value == c.dev })?.key else { continue }
            let mp = Mounts.all().last { $0.major == c.dev.major && $0.minor == c.dev.minor }?.mountPoint
            let onto = bases.contains(c.dev) ? "a device of attachment '\(name)'" : "stacked on a device of attachment '\(name)'"
            return "the buffer directory \(path)\(c.what) is on /dev/\(devName)\(mp.map { " (mounted on \($0))" } ?? ""), "
                + "\(onto) (\(devices.joined(separator: ", "))): hb files there would be written through the volume they protect; "
                + "use a --buffer-dir on another volume (detach and attach again with it)"
        }
        return nil
    }

    /// The session-start check: the held directory and what its path names now.
    func bufferDirectoryRefusalNow() -> String? {
        var devices = backend.guardedDevices
        if let p = currentProtectedDevice, !devices.contains(p) { devices.append(p) }
        let path = config.bufferDir
        if let why = SessionDaemon.bufferDirectoryRefusal(path: path, fd: bufferDirFD, name: config.name, devices: devices) {
            return why
        }
        var held = stat(), now = stat()
        if fstat(bufferDirFD, &held) == 0, stat(path, &now) == 0, held.st_dev != now.st_dev || held.st_ino != now.st_ino {
            logger.warning("\(path) now names another directory (a mount over it since attach?); hb files stay in the one opened at attach")
        }
        return nil
    }
}

/// HOTIMAGE_TEST_BUFFER_ON_VOLUME=1 turns the check and the held descriptor
/// off, so a machine test can show what the write path does when hb files
/// do go through the volume (t_attach_faults part w).
let allowBufferOnVolumeForTests: Bool = getenv("HOTIMAGE_TEST_BUFFER_ON_VOLUME").map { String(cString: $0) == "1" } ?? false
