// Finding the running PostgreSQL clusters, without configuration.
//
// A postmaster is a process named `postgres` (or `postmaster`) whose parent
// is not: every backend, checkpointer and walwriter is a child of its
// postmaster with the same name. The postmaster chdirs into its data
// directory at start, so /proc/PID/cwd is the data directory however it was
// given (-D relative, through a symlink, PGDATA). The directory's
// postmaster.pid confirms it (its first line is that pid) and says where to
// connect (PostgreSQL 10 and later):
//
//   line 1  pid                  line 5  first Unix socket directory ("" if none)
//   line 2  data directory       line 6  first listen address ("*", an address, "")
//   line 3  start time (epoch)   line 7  shared memory key
//   line 4  port                 line 8  status: starting|stopping|ready|standby (padded)
//
// A postmaster in another mount namespace (a container) has a cwd that does
// not name its directory here: its postmaster.pid does not confirm it and
// it is skipped (the container writer covers it).
import Foundation
import HotOS

/// The fields of a postmaster.pid file that matter here.
public struct PostmasterPID: Equatable, Sendable {
    public var pid: Int32
    public var dataDirectory: String
    public var port: Int
    public var socketDirectory: String?
    public var listenAddress: String?
    public var status: String?

    public static func parse(_ text: String) -> PostmasterPID? {
        let l = text.split(separator: "\n", omittingEmptySubsequences: false)
            .map { $0.trimmingCharacters(in: .whitespaces) }
        guard l.count >= 4, let pid = Int32(l[0]), pid > 0, let port = Int(l[3]), port > 0, port < 65536 else { return nil }
        func field(_ i: Int) -> String? { l.count > i && !l[i].isEmpty ? l[i] : nil }
        return PostmasterPID(pid: pid, dataDirectory: l[1], port: port, socketDirectory: field(4),
                             listenAddress: field(5), status: field(7))
    }
}

/// One running cluster.
public struct PostgresCluster: Sendable, Equatable {
    public var pid: Int32
    public var dataDirectory: String
    public var pidFile: PostmasterPID
    /// PG_VERSION: "15", "9.6".
    public var version: String?
    public var ownerUID: uid_t
    public var ownerName: String?
    /// The owner's primary group (psql runs as owner and group).
    public var ownerGID: gid_t?
    /// The directory of the postmaster's executable (its psql is there on Debian).
    public var binDirectory: String?
    /// config_file from the command line (Debian: /etc/postgresql/15/main/postgresql.conf).
    public var configFile: String?

    /// Stable across the `components` and `freeze` processes.
    public var id: String { "\(pidFile.port):\(dataDirectory)" }

    public var debianName: String? { configFile.flatMap(PostgresDiscovery.debianClusterName(configFile:)) }
}

public enum PostgresDiscovery {
    static let names: Set<String> = ["postgres", "postmaster"]

    /// (command name, parent pid) from a /proc/PID/stat line. The name is
    /// in parentheses and may hold spaces and ')': fields count from the last ')'.
    public static func parseStat(_ stat: String) -> (comm: String, ppid: Int32)? {
        guard let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")"), open < close else { return nil }
        let rest = stat[stat.index(after: close)...].split(separator: " ")
        guard rest.count > 1, let ppid = Int32(rest[1]) else { return nil }
        return (String(stat[stat.index(after: open)..<close]), ppid)
    }

    /// The postmasters in a process table: named postgres, parent not.
    public static func postmasters(_ procs: [Int32: (comm: String, ppid: Int32)]) -> [Int32] {
        procs.filter { pid, p in
            names.contains(p.comm) && !(procs[p.ppid].map { names.contains($0.comm) } ?? false)
        }.keys.sorted()
    }

    /// config_file given on a postmaster's command line (`-c config_file=F`,
    /// `-cconfig_file=F`, `--config-file=F`, `--config_file=F`).
    public static func configFile(arguments a: [String]) -> String? {
        for (i, arg) in a.enumerated() {
            var s = arg
            if s == "-c", i + 1 < a.count { s = a[i + 1] } else if s.hasPrefix("-c") { s = String(s.dropFirst(2)) } else if s.hasPrefix("--") {
                s = String(s.dropFirst(2)).replacingOccurrences(of: "-", with: "_")
            } else { continue }
            if s.hasPrefix("config_file=") { return String(s.dropFirst("config_file=".count)) }
        }
        return nil
    }

    /// Debian's name of a cluster, "15/main", from /etc/postgresql/15/main/postgresql.conf.
    public static func debianClusterName(configFile: String) -> String? {
        let p = configFile.split(separator: "/")
        guard p.count == 5, p[0] == "etc", p[1] == "postgresql", p[4] == "postgresql.conf" else { return nil }
        return "\(p[2])/\(p[3])"
    }

    /// Every running cluster this process can see.
    public static func clusters() -> [PostgresCluster] {
        var procs: [Int32: (comm: String, ppid: Int32)] = [:]
        for n in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(n), let s = readSmallFile("/proc/\(n)/stat"), let p = parseStat(s) else { continue }
            procs[pid] = p
        }
        return postmasters(procs).compactMap(cluster(pid:))
    }

    static func cluster(pid: Int32) -> PostgresCluster? {
        let fm = FileManager.default
        guard let dir = try? fm.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd"),
              let text = readSmallFile(dir + "/postmaster.pid"), let pf = PostmasterPID.parse(text), pf.pid == pid else { return nil }
        var st = stat()
        guard stat(dir, &st) == 0 else { return nil }
        let args = (readSmallFile("/proc/\(pid)/cmdline") ?? "").split(separator: "\0").map(String.init)
        let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")
        let owner = user(st.st_uid)
        return PostgresCluster(
            pid: pid, dataDirectory: dir, pidFile: pf,
            version: readSmallFile(dir + "/PG_VERSION")?.trimmingCharacters(in: .whitespacesAndNewlines),
            ownerUID: st.st_uid, ownerName: owner?.name, ownerGID: owner?.gid,
            binDirectory: exe.map { ($0 as NSString).deletingLastPathComponent },
            configFile: configFile(arguments: args).map { $0.hasPrefix("/") ? $0 : dir + "/" + $0 })
    }

    static func user(_ uid: uid_t) -> (name: String, gid: gid_t)? {
        var pw = passwd(), result: UnsafeMutablePointer<passwd>?
        var buf = [CChar](repeating: 0, count: 4096)
        guard getpwuid_r(uid, &pw, &buf, buf.count, &result) == 0, result != nil else { return nil }
        return (String(cString: pw.pw_name), pw.pw_gid)
    }

    /// The files of a cluster: the data directory; pg_wal and each
    /// tablespace when they live elsewhere (symlinks); the configuration
    /// file when outside (listed, not counted: it changes seldom and is not
    /// part of the cluster's consistent state).
    public static func files(of c: PostgresCluster) -> [ComponentFile] {
        let d = c.dataDirectory
        var out = [ComponentFile(path: d, role: "data")]
        if isSymlink(d + "/pg_wal"), let t = realPath(d + "/pg_wal") { out.append(ComponentFile(path: t, role: "wal")) }
        for n in ((try? FileManager.default.contentsOfDirectory(atPath: d + "/pg_tblspc")) ?? []).sorted() {
            if let t = realPath(d + "/pg_tblspc/" + n) { out.append(ComponentFile(path: t, role: "tablespace")) }
        }
        if let cf = c.configFile, !cf.hasPrefix(d + "/") { out.append(ComponentFile(path: cf, role: "config", counts: false)) }
        return out
    }

    static func isSymlink(_ p: String) -> Bool {
        var st = stat()
        return lstat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK
    }
}
