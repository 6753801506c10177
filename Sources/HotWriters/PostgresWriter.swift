// The PostgreSQL writer: one component per running cluster (found from its
// postmaster, PostgresWriter+Discovery.swift), put in backup mode around
// the snapshot through a psql session as the data directory's owner
// (PostgresWriter+Psql.swift).
//
//   freeze  CHECKPOINT                        flush dirty buffers now, so the
//                                             checkpoint of the next call,
//                                             inside the snapshot window, is short
//           pg_backup_start('hotimage', true) an immediate checkpoint; full-page
//                                             writes forced on; the backup is
//                                             tied to this session (kept open)
//   -- hotimage freezes the filesystem and takes the snapshot --
//   thaw    pg_backup_stop(false)             ends backup mode; returns the label
//
// (pg_start_backup(label, true, false) and pg_stop_backup(false, false) before
// PostgreSQL 15.) wait_for_archive is false: we do not depend on a WAL
// archive; the WAL the snapshot needs is in the snapshot itself.
//
// What the restored cluster does, and why the label is NOT restored as
// `backup_label`. The snapshot is one atomic point of the whole volume set
// (data directory, pg_wal, tablespaces), so the restored cluster starts by
// crash recovery from the last checkpoint in pg_control — which is the
// backup's own checkpoint, taken a moment before the snapshot — and replays
// the short WAL tail to the snapshot point. That is exact. A `backup_label`
// would instead demand WAL up to pg_backup_stop's end-of-backup record,
// which is written after the snapshot and so is not in it: PostgreSQL 15
// refuses to start ("FATAL: WAL ends before end of online backup"; measured,
// and checked again by Tests/Machine/t_pg_writer.sh). So the label and
// tablespace map are artifacts named `backup_label.hotimage` and
// `tablespace_map.hotimage` in the data directory: a record of the backup
// (start LSN, checkpoint, time, timeline), and, for a site that does keep a
// WAL archive, the file to rename to `backup_label` (with recovery.signal
// and restore_command) to roll the image forward to a later point in time.
//
// Each component also names postmaster.pid and postmaster.opts as files
// `restore` removes (restoreOmit): the copy would otherwise name the live
// postmaster, and PostgreSQL refuses to start over a pid file whose process
// lives on the same host.
import Foundation
import HotOS

public final class PostgresWriter: BuiltinWriter {
    public static let name = "postgresql"
    public static let summary = "running PostgreSQL clusters (found from their postmaster; 'postgresql-cluster = DATADIR' to choose), CHECKPOINT and pg_backup_start/stop around the snapshot"

    /// Names of the artifacts, in the data directory.
    static let labelArtifact = "backup_label.hotimage"
    static let mapArtifact = "tablespace_map.hotimage"
    /// pg_backup_stop returns at once without waiting for an archive.
    static let thawTimeout = 60.0

    struct Frozen { var cluster: PostgresCluster; var session: PsqlSession; var calls: BackupCalls; var startLSN: String }

    /// `postgresql-cluster` settings: only these data directories (real paths).
    let chosen: [String]
    private var frozen: [String: Frozen] = [:]

    public required init(settings: WriterSettings) throws {
        chosen = settings.values("postgresql-cluster").map { realPath($0) ?? $0 }
    }

    func clusters() -> [PostgresCluster] {
        let all = PostgresDiscovery.clusters()
        guard !chosen.isEmpty else { return all }
        for d in chosen where !all.contains(where: { $0.dataDirectory == d }) {
            writeStderr("writer postgresql: postgresql-cluster \(d): no running cluster there (a stopped cluster needs no freeze)\n")
        }
        return all.filter { chosen.contains($0.dataDirectory) }
    }

    public func components(volumes: [String]) throws -> [WriterComponent] {
        clusters().map { c in
            var details = ["pid": String(c.pid), "port": String(c.pidFile.port)]
            details["version"] = c.version
            details["owner"] = c.ownerName ?? String(c.ownerUID)
            details["socket"] = c.pidFile.socketDirectory
            details["cluster"] = c.debianName
            let name = c.debianName.map { " cluster \($0)" } ?? ""
            return WriterComponent(
                id: c.id, description: "PostgreSQL \(c.version ?? "?")\(name) on port \(c.pidFile.port)",
                state: "\(c.pidFile.status ?? "running"), pid \(c.pid)",
                files: PostgresDiscovery.files(of: c), details: details,
                restoreOmit: Self.restoreOmit.map { c.dataDirectory + "/" + $0 })
        }
    }

    /// What restore removes from the data directory: the live postmaster's
    /// own files, as pg_basebackup leaves them out. postmaster.pid names the
    /// live postmaster, and a copy on the same host refuses to start over it
    /// while that process lives; postmaster.opts is its command line. The
    /// rest of pg_basebackup's exclusions (pg_stat_tmp, pg_dynshmem,
    /// pgsql_tmp, pg_internal.init, unlogged relations…) stay: the restored
    /// cluster starts by crash recovery, which clears or rebuilds them just
    /// as after a crash of the original, and backup_label / tablespace_map
    /// are never there (non-exclusive backups).
    static let restoreOmit = ["postmaster.pid", "postmaster.opts"]

    public func freeze(_ ids: [String], request: FreezeRequest) -> [ComponentResult] {
        let all = clusters()
        // Our own deadline comes a little before hotimage's, so that a slow
        // CHECKPOINT is reported by us rather than by a kill.
        let deadline = monotonicNanos() + UInt64(max(1, request.timeoutSeconds * 0.9) * 1e9)
        let outcomes = parallelMap(ids) { id -> (ComponentResult, Frozen?) in
            guard let c = all.first(where: { $0.id == id }) else {
                return (ComponentResult(id: id, ok: false, message: "no running PostgreSQL cluster with this id (stopped or restarted on another port?)"), nil)
            }
            return Self.startBackup(c, deadline: deadline)
        }
        for (id, o) in zip(ids, outcomes) { if let f = o.1 { frozen[id] = f } }
        return outcomes.map(\.0)
    }

    static func startBackup(_ c: PostgresCluster, deadline: UInt64) -> (ComponentResult, Frozen?) {
        let t0 = monotonicNanos()
        var session: PsqlSession?
        do {
            let s = try PsqlSession(try psqlCommand(c, euid: geteuid()))
            session = s
            let v = try s.run("SELECT current_setting('server_version_num');", what: "server_version_num", deadline: deadline)
            guard let num = v.first.flatMap({ Int($0) }) else { throw WriterError("unexpected server_version_num answer: \(v)") }
            guard let calls = backupCalls(serverVersion: num) else {
                throw WriterError("PostgreSQL \(num) is too old: non-exclusive backups without archive wait need 10 or later")
            }
            _ = try s.run(calls.setup, what: "SET", deadline: deadline)
            _ = try s.run("CHECKPOINT;", what: "CHECKPOINT", deadline: deadline)
            let t1 = monotonicNanos()
            let lsn = try s.run(calls.start, what: calls.startName, deadline: deadline).first ?? "?"
            let msg = String(format: "CHECKPOINT in %.0f ms, then %@ in %.0f ms: backup starts at LSN %@",
                             Double(t1 - t0) / 1e6, calls.startName, Double(monotonicNanos() - t1) / 1e6, lsn)
            return (ComponentResult(id: c.id, ok: true, method: "pg-backup", message: msg),
                    Frozen(cluster: c, session: s, calls: calls, startLSN: lsn))
        } catch {
            // Closing the session aborts a backup that may have started.
            session?.close()
            return (ComponentResult(id: c.id, ok: false, method: "pg-backup", message: "\(error)"), nil)
        }
    }

    public func thaw(_ ids: [String]) -> [ComponentResult] {
        let jobs = ids.map { ($0, frozen[$0]) }
        frozen = [:]
        return parallelMap(jobs) { id, f -> ComponentResult in
            guard let f else { return ComponentResult(id: id, ok: true, message: "not in backup mode by us; nothing to stop") }
            return Self.stopBackup(id, f)
        }
    }

    static func stopBackup(_ id: String, _ f: Frozen) -> ComponentResult {
        defer { f.session.close() }
        do {
            let rows = try f.session.run(f.calls.stop, what: f.calls.stopName, deadline: monotonicNanos() + UInt64(thawTimeout * 1e9))
            guard rows.count == 1 else { throw WriterError("unexpected \(f.calls.stopName) answer: \(rows.count) rows") }
            let r = try parseStop(rows[0])
            let dir = f.cluster.dataDirectory
            var artifacts = [Artifact(path: dir + "/" + labelArtifact, content: r.label)]
            if !r.map.isEmpty { artifacts.append(Artifact(path: dir + "/" + mapArtifact, content: r.map)) }
            return ComponentResult(id: id, ok: true, method: "pg-backup",
                                   message: "backup from LSN \(f.startLSN) to \(r.lsn); label kept as \(dir)/\(labelArtifact)",
                                   artifacts: artifacts)
        } catch {
            return ComponentResult(id: id, ok: false, method: "pg-backup",
                                   message: "could not stop the backup: \(error). If the session ended, the server aborted the backup itself; the snapshot is still crash-consistent for this cluster")
        }
    }

    // MARK: pure parts (unit-tested)

    struct BackupCalls: Equatable {
        /// A site's statement_timeout must not cut our CHECKPOINT, nor its
        /// idle_session_timeout (14+) end the session holding the backup
        /// while the snapshot is taken.
        var setup: String
        var start: String
        var stop: String
        var startName: String
        var stopName: String
    }

    /// The backup calls for a server_version_num; nil before 10 (no
    /// wait_for_archive argument). The label is returned hex-encoded: it
    /// has newlines, which would break psql's one-row-per-line output.
    static func backupCalls(serverVersion v: Int) -> BackupCalls? {
        guard v >= 100000 else { return nil }
        let (start, stop) = v >= 150000 ? ("pg_backup_start", "pg_backup_stop") : ("pg_start_backup", "pg_stop_backup")
        let startArgs = v >= 150000 ? "'hotimage', true" : "'hotimage', true, false"
        let stopArgs = v >= 150000 ? "false" : "false, false"
        return BackupCalls(
            setup: "SET statement_timeout = 0;" + (v >= 140000 ? " SET idle_session_timeout = 0;" : ""),
            start: "SELECT \(start)(\(startArgs));",
            stop: "SELECT encode(convert_to(labelfile, 'UTF8'), 'hex'), encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex'), lsn FROM \(stop)(\(stopArgs));",
            startName: start, stopName: stop)
    }

    /// One row of the stop call: hex label | hex tablespace map | stop LSN.
    static func parseStop(_ row: String) throws -> (label: String, map: String, lsn: String) {
        let f = row.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        guard f.count == 3, let label = hexText(f[0]), let map = hexText(f[1]), !label.isEmpty else {
            throw WriterError("unexpected stop answer: \(row.prefix(120))")
        }
        return (label, map, f[2])
    }

    static func hexText(_ s: String) -> String? {
        guard s.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(s.count / 2)
        var i = s.startIndex
        while i < s.endIndex {
            let j = s.index(i, offsetBy: 2)
            guard let b = UInt8(s[i..<j], radix: 16) else { return nil }
            bytes.append(b)
            i = j
        }
        return String(bytes: bytes, encoding: .utf8)
    }

    /// psql as the cluster's owner: through setpriv when we are root
    /// (setpriv execs psql: no PAM session, no extra process between us and
    /// psql; --reset-env drops hotimage's PG* variables and sets the owner's
    /// HOME for its .pgpass), directly when we are the owner.
    static func psqlCommand(_ c: PostgresCluster, euid: uid_t) throws -> [String] {
        let bin = c.binDirectory.map { $0 + "/psql" }
        let psql = bin.flatMap { access($0, X_OK) == 0 ? $0 : nil } ?? "psql"
        let args = [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", connectionString(c)]
        if euid == c.ownerUID { return args }
        guard euid == 0, let gid = c.ownerGID else {
            throw WriterError("cannot connect as the data directory's owner (uid \(c.ownerUID)): run as root or as that user")
        }
        return ["setpriv", "--reuid=\(c.ownerUID)", "--regid=\(gid)", "--init-groups", "--reset-env", "--"] + args
    }

    /// libpq's connection string: the socket directory of postmaster.pid
    /// (peer authentication as the owner), else its listen address over TCP.
    static func connectionString(_ c: PostgresCluster) -> String {
        let p = c.pidFile
        var host = "localhost"
        if let s = p.socketDirectory {
            host = s.hasPrefix("/") || s.hasPrefix("@") ? s : c.dataDirectory + "/" + s
        } else if let a = p.listenAddress, !["*", "0.0.0.0", "::"].contains(a) {
            host = a
        }
        var parts = ["host=\(quoted(host))", "port=\(p.port)", "dbname=postgres", "application_name=hotimage", "connect_timeout=10"]
        if let u = c.ownerName { parts.append("user=\(quoted(u))") }
        return parts.joined(separator: " ")
    }

    /// A conninfo value: single-quoted, with \ and ' escaped.
    static func quoted(_ s: String) -> String {
        "'" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "'", with: "\\'") + "'"
    }
}
