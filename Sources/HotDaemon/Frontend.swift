// How HotCore's live export becomes the protected block device. Two
// frontends: FuseFrontend (nbdfuse + loop with direct I/O, any kernel with
// FUSE) and KernelNBDFrontend (the kernel's NBD client over socketpairs,
// with reconnect). What each leaves behind when the daemon is killed, and
// how that is removed, is in HotCoreLeftovers.swift.

protocol Frontend: AnyObject {
    /// Presents `server`'s live export; returns the device path once the
    /// kernel shows `size` bytes.
    func start(server: NBDServer, size: UInt64, sectorSize: Int) throws -> String
    /// Removes the device; safe to call after a failed or no start.
    func stop()
}
