import Foundation
import HotOS
import Testing
@testable import HotWriters

@Suite struct PostgresDiscoveryTests {
    // A PostgreSQL 15 postmaster.pid as written (status padded to 8).
    @Test func postmasterPIDOfPostgreSQL15() {
        let text = "11727\n/tmp/pgx/data\n1795308322\n5499\n/tmp/pgx\n\n 16254035     32805\nready   \n"
        #expect(PostmasterPID.parse(text) == PostmasterPID(pid: 11727, dataDirectory: "/tmp/pgx/data", port: 5499,
                                                           socketDirectory: "/tmp/pgx", listenAddress: nil, status: "ready"))
    }

    @Test(arguments: [
        // Sockets off, TCP on every address; 9.6 has no status line.
        ("42\n/d\n1\n5433\n\n*\n 1 2\n", PostmasterPID(pid: 42, dataDirectory: "/d", port: 5433, socketDirectory: nil, listenAddress: "*", status: nil)),
        // A server still starting writes the first four lines only.
        ("42\n/d\n1\n5433\n", PostmasterPID(pid: 42, dataDirectory: "/d", port: 5433, socketDirectory: nil, listenAddress: nil, status: nil)),
    ])
    func postmasterPIDVariants(_ text: String, _ want: PostmasterPID) {
        #expect(PostmasterPID.parse(text) == want)
    }

    @Test(arguments: ["", "x\n/d\n1\n5432\n", "42\n/d\n1\n", "42\n/d\n1\n99999\n", "-3\n/d\n1\n5432\n"])
    func badPostmasterPID(_ text: String) {
        #expect(PostmasterPID.parse(text) == nil)
    }

    @Test func statLines() {
        #expect(PostgresDiscovery.parseStat("11727 (postgres) S 1 11727 11727 0 -1")! == ("postgres", 1))
        // A name with spaces and ')' (a process may name itself anything).
        #expect(PostgresDiscovery.parseStat("9 (a) b) c) R 7 9 9")! == ("a) b) c", 7))
        #expect(PostgresDiscovery.parseStat("garbage") == nil)
    }

    @Test func postmastersAreThePostgresWhoseParentIsNot() {
        let procs: [Int32: (comm: String, ppid: Int32)] = [
            1: ("systemd", 0),
            100: ("postgres", 1), 101: ("postgres", 100), 102: ("postgres", 100),   // a cluster and two children
            200: ("pg_ctl", 1), 201: ("postmaster", 200), 202: ("postgres", 201),   // started as postmaster by pg_ctl
            300: ("postgres", 999),                                                 // parent gone from the table
            400: ("bash", 1), 401: ("psql", 400),
        ]
        #expect(PostgresDiscovery.postmasters(procs) == [100, 201, 300])
    }

    @Test func configFileAndDebianName() {
        let debian = ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main", "-c", "config_file=/etc/postgresql/15/main/postgresql.conf"]
        #expect(PostgresDiscovery.configFile(arguments: debian) == "/etc/postgresql/15/main/postgresql.conf")
        #expect(PostgresDiscovery.configFile(arguments: ["postgres", "-cconfig_file=/x.conf"]) == "/x.conf")
        #expect(PostgresDiscovery.configFile(arguments: ["postgres", "--config-file=/y.conf"]) == "/y.conf")
        #expect(PostgresDiscovery.configFile(arguments: ["postgres", "-D", "/d", "-c", "port=5"]) == nil)
        #expect(PostgresDiscovery.debianClusterName(configFile: "/etc/postgresql/15/main/postgresql.conf") == "15/main")
        #expect(PostgresDiscovery.debianClusterName(configFile: "/srv/pg/postgresql.conf") == nil)
    }

    // Files: the data directory, pg_wal and a tablespace elsewhere
    // (symlinks, as initdb -X and CREATE TABLESPACE make them), a config file
    // outside (listed, not counted).
    @Test func filesFollowSymlinks() throws {
        let t = FileManager.default.temporaryDirectory.appendingPathComponent("pgfiles-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: t) }
        let fm = FileManager.default
        for d in ["data/pg_tblspc", "wal", "ts1"] { try fm.createDirectory(atPath: "\(t)/\(d)", withIntermediateDirectories: true) }
        try fm.createSymbolicLink(atPath: "\(t)/data/pg_wal", withDestinationPath: "\(t)/wal")
        try fm.createSymbolicLink(atPath: "\(t)/data/pg_tblspc/16384", withDestinationPath: "\(t)/ts1")
        let r = realPath(t)!
        let c = PostgresCluster(pid: 1, dataDirectory: "\(r)/data", pidFile: PostmasterPID(pid: 1, dataDirectory: "\(r)/data", port: 5432),
                                ownerUID: 0, configFile: "/etc/postgresql/15/main/postgresql.conf")
        #expect(PostgresDiscovery.files(of: c) == [
            ComponentFile(path: "\(r)/data", role: "data"), ComponentFile(path: "\(r)/wal", role: "wal"),
            ComponentFile(path: "\(r)/ts1", role: "tablespace"),
            ComponentFile(path: "/etc/postgresql/15/main/postgresql.conf", role: "config", counts: false),
        ])
        // pg_wal as a plain directory is part of the data directory.
        try fm.removeItem(atPath: "\(t)/data/pg_wal")
        try fm.createDirectory(atPath: "\(t)/data/pg_wal", withIntermediateDirectories: false)
        #expect(!PostgresDiscovery.files(of: c).contains { $0.role == "wal" })
    }
}

@Suite struct PostgresWriterTests {
    @Test func backupCallsByVersion() throws {
        let v15 = try #require(PostgresWriter.backupCalls(serverVersion: 150018))
        #expect(v15.start == "SELECT pg_backup_start('hotimage', true);")
        #expect(v15.stop.hasSuffix("FROM pg_backup_stop(false);"))
        let v14 = try #require(PostgresWriter.backupCalls(serverVersion: 140011))
        #expect(v14.start == "SELECT pg_start_backup('hotimage', true, false);")
        #expect(v14.stop.hasSuffix("FROM pg_stop_backup(false, false);"))
        #expect(v14.setup == "SET statement_timeout = 0; SET idle_session_timeout = 0;")
        // idle_session_timeout is new in 14: SET on 13 would be an error (and end the session).
        #expect(PostgresWriter.backupCalls(serverVersion: 130015)?.setup == "SET statement_timeout = 0;")
        #expect(PostgresWriter.backupCalls(serverVersion: 100000)?.startName == "pg_start_backup")
        #expect(PostgresWriter.backupCalls(serverVersion: 90624) == nil)
    }

    // The stop row: the label and map hex-encoded (they hold newlines), then the LSN.
    @Test func stopRow() throws {
        let label = "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nLABEL: hotimage — é\n"
        let hex = Array(label.utf8).map { String(format: "%02x", $0) }.joined()
        let r = try PostgresWriter.parseStop("\(hex)||0/4000100")
        #expect(r.label == label && r.map.isEmpty && r.lsn == "0/4000100")
        let map = "16384 /srv/ts1\n"
        #expect(try PostgresWriter.parseStop("\(hex)|\(Array(map.utf8).map { String(format: "%02x", $0) }.joined())|0/5").map == map)
        for bad in ["", "\(hex)|0/5", "|\(hex)|0/5", "zz|00|0/5", "abc||0/5", "\(hex)|||0/5"] {
            #expect(throws: WriterError.self, "\(bad)") { try PostgresWriter.parseStop(bad) }
        }
    }

    static func cluster(socket: String?, listen: String? = nil, owner: uid_t = 101, gid: gid_t? = 104) -> PostgresCluster {
        PostgresCluster(pid: 7, dataDirectory: "/srv/pg data",
                        pidFile: PostmasterPID(pid: 7, dataDirectory: "/srv/pg data", port: 5499, socketDirectory: socket, listenAddress: listen),
                        ownerUID: owner, ownerName: "postgres", ownerGID: gid, binDirectory: "/nonexistent/bin")
    }

    @Test func psqlRunsAsTheOwner() throws {
        let c = Self.cluster(socket: "/run/pg")
        let root = try PostgresWriter.psqlCommand(c, euid: 0)
        #expect(Array(root.prefix(7)) == ["setpriv", "--reuid=101", "--regid=104", "--init-groups", "--reset-env", "--", "psql"])
        #expect(root.last == "host='/run/pg' port=5499 dbname=postgres application_name=hotimage connect_timeout=10 user='postgres'")
        #expect(try PostgresWriter.psqlCommand(c, euid: 101).first == "psql")
        #expect(throws: WriterError.self) { try PostgresWriter.psqlCommand(c, euid: 1000) }
        #expect(throws: WriterError.self) { try PostgresWriter.psqlCommand(Self.cluster(socket: "/s", gid: nil), euid: 0) }
    }

    @Test(arguments: [
        ("sock", nil, "host='/srv/pg data/sock'"),   // relative to the data directory
        (nil, "*", "host='localhost'"),
        (nil, "10.0.0.5", "host='10.0.0.5'"),
    ] as [(String?, String?, String)])
    func connectionHost(_ socket: String?, _ listen: String?, _ want: String) {
        #expect(PostgresWriter.connectionString(Self.cluster(socket: socket, listen: listen)).hasPrefix(want + " "))
        #expect(PostgresWriter.quoted(#"a'b\c"#) == #"'a\'b\\c'"#)
    }
}

@Suite struct PsqlSessionTests {
    // psql's framing, fed one byte at a time: no answer before the marker
    // line is complete; then exactly the lines before it.
    @Test func framingDripFed() {
        var f = PsqlFraming()
        let text = "150018\n__m1__x\nrow2\n__m1__\nnext"
        for (i, b) in text.utf8.enumerated() {
            f.feed([b])
            let a = f.answer(marker: "__m1__")
            if i < text.utf8.count - 5 { #expect(a == nil, "at byte \(i)") } else {
                #expect(a == ["150018", "__m1__x", "row2"]); break
            }
        }
    }

    @Test func framingManyAnswersAtOnce() {
        var f = PsqlFraming()
        f.feed(Array("__a__\n1|2\n__b__\npartial".utf8))
        #expect(f.answer(marker: "__b__") == ["__a__", "1|2"])   // the order is the caller's
        f.feed(Array(" line\n__c__\n".utf8))
        #expect(f.answer(marker: "__c__") == ["partial line"])
        #expect(f.answer(marker: "__c__") == nil)
    }

    // A stand-in for psql (sh): echoes `\echo` arguments, answers other
    // lines with "row:LINE", fails like ON_ERROR_STOP on FAIL, hangs on SLEEP.
    static let fakePsql = ["sh", "-c", #"""
        while IFS= read -r l; do
          case "$l" in
            '\echo '*) printf '%s\n' "${l#\\echo }" ;;
            FAIL*) echo 'ERROR:  relation "x" does not exist' >&2; exit 3 ;;
            SLEEP*) sleep 30 ;;
            *) printf 'row:%s\n' "$l" ;;
          esac
        done
        """#]

    static func soon(_ s: Double = 5) -> UInt64 { monotonicNanos() + UInt64(s * 1e9) }

    @Test func answersInOrder() throws {
        let s = try PsqlSession(Self.fakePsql)
        #expect(try s.run("SELECT 1;", what: "one", deadline: Self.soon()) == ["row:SELECT 1;"])
        #expect(try s.run("SELECT 2;", what: "two", deadline: Self.soon()) == ["row:SELECT 2;"])
        s.close()
        #expect(throws: WriterError.self) { try s.run("SELECT 3;", what: "three", deadline: Self.soon()) }
    }

    @Test func anErrorEndsTheSessionWithItsMessage() throws {
        let s = try PsqlSession(Self.fakePsql)
        let e = #expect(throws: WriterError.self) { try s.run("FAIL", what: "pg_backup_stop", deadline: Self.soon()) }
        #expect(e?.description == #"psql ended (exit 3) before answering pg_backup_stop: ERROR:  relation "x" does not exist"#)
    }

    @Test func aHangIsKilledAtTheDeadline() throws {
        let s = try PsqlSession(Self.fakePsql)
        let t0 = monotonicNanos()
        let e = #expect(throws: WriterError.self) { try s.run("SLEEP", what: "CHECKPOINT", deadline: Self.soon(0.5)) }
        let secs = Double(monotonicNanos() - t0) / 1e9
        #expect(e?.description == "psql gave no answer to CHECKPOINT in time: killed")
        #expect(secs >= 0.5 && secs < 3)
        s.close()
    }
}
