import Testing
import HotOS

// Device-mapper tables, snapshot status lines, owner UUIDs and /proc/PID/stat
// start times: the pure parts of the dm-snapshot backend (no kernel needed).

@Suite("DeviceMapper tables")
struct DeviceMapperTableTests {
    @Test("Target lines print as dmsetup writes them")
    func targetLines() {
        #expect(DMTarget.linear(length: 131072, device: "7:0").description == "0 131072 linear 7:0 0")
        #expect(DMTarget.snapshotOrigin(length: 8, origin: "253:1").description == "0 8 snapshot-origin 253:1")
        #expect(DMTarget.snapshot(length: 8, origin: "253:1", cow: "253:2", persistent: false, chunkSectors: 8).description
                == "0 8 snapshot 253:1 253:2 N 8")
        #expect(DMTarget.snapshot(length: 8, origin: "253:1", cow: "253:2", persistent: true, chunkSectors: 16).description
                == "0 8 snapshot 253:1 253:2 P 16")
        // An error target has no parameters and no trailing blank.
        #expect(DMTarget.error(length: 8).description == "0 8 error")
    }

    @Test("A concatenation puts each piece after the previous one; empty pieces are skipped")
    func concatenation() throws {
        let t = DMTable.concatenation([("7:1", 8192), ("7:2", 0), ("7:3", 16384)])
        #expect(t.map(\.description) == ["0 8192 linear 7:1 0", "8192 16384 linear 7:3 0"])
        #expect(try DMTable.sectors(t) == 24576)
        #expect(DMTable.concatenation([]).isEmpty)
    }

    @Test("Parsing a multi-segment table (an LVM LV) round-trips")
    func parseTable() throws {
        let text = "0 204800 linear 8:2 2048\n204800 409600 linear 8:3 384\n"
        let t = try DMTable.parse(text)
        #expect(t.count == 2)
        #expect(t[1] == DMTarget(start: 204800, length: 409600, type: "linear", params: "8:3 384"))
        #expect(try DMTable.sectors(t) == 614400)
        #expect(t.map(\.description).joined(separator: "\n") + "\n" == text)
    }

    @Test("Malformed lines and gaps are refused", arguments: ["0 x linear 7:0 0", "0 8", "0 0 linear 7:0 0"])
    func malformed(_ line: String) {
        #expect(throws: DMTableError.self) { try DMTable.parse(line) }
    }

    @Test("A table must be contiguous from sector 0")
    func gaps() throws {
        let t = try DMTable.parse("0 8 linear 7:0 0\n16 8 linear 7:1 0")
        #expect(throws: DMTableError.gap(expected: 8, found: 16)) { try DMTable.sectors(t) }
    }

    @Test("Devices a table refers to")
    func devices() throws {
        let t = try DMTable.parse("0 8 snapshot 253:1 253:2 N 8")
        #expect(DMTable.devices(t) == ["253:1", "253:2"])
        #expect(DMTable.devices(try DMTable.parse("0 8 linear 7:0 0\n8 8 linear 7:1 0")) == ["7:0", "7:1"])
        #expect(DMTable.devices([.error(length: 8)]).isEmpty)
    }
}

@Suite("Snapshot status")
struct DMSnapshotStateTests {
    // One case per status line the kernel's snapshot target prints.
    @Test("Status lines", arguments: [
        ("16/32768 0", DMSnapshotState.usage(usedSectors: 16, totalSectors: 32768, metadataSectors: 0)),
        ("2048/262144 16\n", .usage(usedSectors: 2048, totalSectors: 262144, metadataSectors: 16)),   // persistent store
        ("Invalid", .invalid),
        ("Overflow", .overflow),
        ("Merge failed", .mergeFailed),
        ("", .unknown("")),
        ("12/abc 0", .unknown("12/abc 0")),
    ])
    func parse(_ line: String, _ want: DMSnapshotState) {
        #expect(DMSnapshotState(status: line) == want)
    }

    @Test("Only a usage line is a valid snapshot")
    func validity() {
        #expect(DMSnapshotState(status: "0/8 0").isValid)
        #expect(!DMSnapshotState(status: "Invalid").isValid)
        #expect(!DMSnapshotState(status: "Overflow").isValid)
    }
}

@Suite("Owner UUIDs")
struct DMOwnerTests {
    @Test("Session devices carry pid and start time; names with dashes survive")
    func sessionRoundTrip() {
        let o = DMOwner(role: .snap, name: "vg-home-lv", pid: 4242, startTime: 987654)
        #expect(o.uuid == "HOTIMAGE-snap-4242-987654-vg-home-lv")
        #expect(o.deviceName == "hotimage-vg-home-lv-snap")
        #expect(DMOwner(uuid: o.uuid) == o)
        #expect(o.matches(deviceName: "hotimage-vg-home-lv-snap"))
        #expect(!o.matches(deviceName: "hotimage-vg-home-lv-cow"))
    }

    @Test("Attach devices have no owner process")
    func attachRoundTrip() {
        let o = DMOwner(role: .attach, name: "data")
        #expect(o.uuid == "HOTIMAGE-attach-data")
        #expect(o.deviceName == "hotimage-data")
        #expect(DMOwner(uuid: o.uuid) == o)
        #expect(!DMRole.attach.isSession)
    }

    // Anything hotimage did not write is not ours: LVM's UUIDs, other roles,
    // a session UUID without its pid.
    @Test("Foreign UUIDs are refused", arguments: [
        "LVM-abcdefABCDEF0123456789", "", "HOTIMAGE-", "HOTIMAGE-other-data", "HOTIMAGE-snap-data",
        "HOTIMAGE-snap-12-x-data", "HOTIMAGE-cow-12-34-", "hotimage-attach-data", "HOTIMAGE-attach-",
    ])
    func foreign(_ uuid: String) {
        #expect(DMOwner(uuid: uuid) == nil)
    }
}

@Suite("ProcStat and hb file names")
struct ProcStatTests {
    @Test("Start time is field 22, counted after the command name, which may hold ') '")
    func startTime() {
        let line = "1234 (we ird) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 5555 1000000 100 18446744073709551615"
        #expect(ProcStat.parseStartTime(line) == 5555)
        #expect(ProcStat.parseStartTime("1234 (x) S 1") == nil)
        #expect(ProcStat.parseStartTime("garbage") == nil)
    }

    @Test("This process is alive under its own start time, not under another")
    func alive() {
        let me = ProcStat.current()
        #expect(me.startTime > 0)
        #expect(ProcStat.isAlive(pid: me.pid, startTime: me.startTime))
        #expect(!ProcStat.isAlive(pid: me.pid, startTime: me.startTime + 1))
    }

    @Test("hb file names", arguments: [("/a/hb_00.tmp", true), ("hb_123.tmp", true), ("/a/hb_.tmp", false),
                                       ("/a/hb_0x.tmp", false), ("/a/xhb_00.tmp", false), ("/a/hb_00.tmp.bak", false)])
    func hbNames(_ path: String, _ ok: Bool) {
        #expect(Loop.isHBFileName(path) == ok)
    }
}
