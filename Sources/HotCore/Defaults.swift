// Defaults.swift — option defaults that several layers share, written once.
//
// The daemons' option structs (HotDaemon), the backup options and the
// imager (HotImager) and the CLI's @Option defaults and help texts
// (hotimage) read them here; HotCore is the lowest module all of them
// depend on.

/// Shared option defaults.
public enum Defaults {
    /// Where daemons keep their run directories (RUN/NAME).
    public static let runDir = "/run/hotimage"
    /// Size of each hb_NN.tmp buffer file (the COW store grows by this much).
    public static let hbFileBytes: UInt64 = 256 << 20
    /// All hb files together; beyond it the session fails.
    public static let bufferLimitBytes: UInt64 = 16 << 30
    /// Memory tier of HotCore's copy-on-write buffer.
    public static let memoryBufferBytes = 64 << 20
    /// The snapshot must be complete (the used map received) within this of begin.
    public static let snapshotDeadlineNanos: UInt64 = 60_000_000_000
    /// No block may stay in HotCore's memory tier longer than this.
    public static let memoryDeadlineNanos: UInt64 = 10_000_000_000
    /// A session whose client is silent this long is dropped.
    public static let heartbeatTimeoutNanos: UInt64 = 10_000_000_000
    /// The write-inactivity pause that marks a consistent point.
    public static let pauseNanos: UInt64 = 200_000_000
    /// Longest a set cut may hold a member's writes (arm to map).
    public static let holdDeadlineNanos: UInt64 = 5_000_000_000
    /// The imager enters emergency mode when the hb files hold this much.
    public static let emergencyBytes: UInt64 = 256 << 20

    /// Directory of a session's hb_NN.tmp files when none is given.
    public static func bufferDir(name: String) -> String { bufferDirPrefix + name }
    /// The same, as help texts show it.
    public static let bufferDirHelp = bufferDirPrefix + "NAME"
    private static let bufferDirPrefix = "/var/tmp/hotimage-"

    /// A size as the CLI writes it: the largest binary suffix (K, M, G, T)
    /// that divides it exactly, e.g. 268435456 → "256M".
    public static func sizeText(_ bytes: UInt64) -> String {
        for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes > 0 && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(suffix)"
        }
        return "\(bytes)"
    }
}
