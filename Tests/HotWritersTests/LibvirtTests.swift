import Foundation
import Testing
@testable import HotWriters

@Suite struct LibvirtTests {
    // A live definition as libvirt 9.0 prints it (trimmed): a qcow2 disk over
    // a raw base, a CD-ROM, an empty floppy drive, a block disk, a network
    // disk, NVRAM, a guest agent channel, direct kernel boot.
    static let live = """
    <domain type='qemu' id='2'>
      <name>web &amp; db</name>
      <uuid>f4d5a5ea-599b-496f-bbf1-c2c6aea34ba0</uuid>
      <os>
        <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
        <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
        <kernel>/boot/vmlinuz</kernel>
      </os>
      <!-- a comment with <tags> -->
      <devices>
        <disk type='file' device='disk'>
          <driver name='qemu' type='qcow2'/>
          <source file='/srv/vm/disk.qcow2' index='2'/>
          <backingStore type='file' index='3'>
            <format type='raw'/>
            <source file='/srv/vm/base.raw'/>
            <backingStore/>
          </backingStore>
          <target dev='vda' bus='virtio'/>
        </disk>
        <disk type='file' device='cdrom'>
          <source file='/iso/debian&apos;s.iso'/>
          <target dev='hdc' bus='ide'/>
          <readonly/>
        </disk>
        <disk type='file' device='floppy'>
          <target dev='fda' bus='fdc'/>
        </disk>
        <disk type='block' device='disk'>
          <source dev='/dev/vg0/data'/>
          <target dev='vdb' bus='virtio'/>
        </disk>
        <disk type='network' device='disk'>
          <source protocol='nbd' name='exp'><host name='h'/></source>
          <target dev='vdc' bus='virtio'/>
        </disk>
        <channel type='unix'>
          <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
        </channel>
      </devices>
    </domain>
    """

    @Test func definitionFiles() throws {
        let d = try LibvirtDefinition(xml: Self.live)
        #expect(d.name == "web & db")
        #expect(d.uuid == "f4d5a5ea-599b-496f-bbf1-c2c6aea34ba0")
        #expect(d.nvram == "/var/lib/libvirt/qemu/nvram/web_VARS.fd")
        #expect(d.bootFiles == ["/usr/share/OVMF/OVMF_CODE.fd", "/boot/vmlinuz"])
        #expect(d.hasAgentChannel && d.agentChannelState == "connected")
        #expect(d.disks.map(\.target) == ["vda", "hdc", "fda", "vdb", "vdc"])
        #expect(d.disks.map(\.role) == ["disk", "cdrom", "floppy", "disk", "disk"])
        #expect(d.disks[0].source == "/srv/vm/disk.qcow2" && d.disks[0].format == "qcow2")
        #expect(d.disks[0].backing == ["/srv/vm/base.raw"])
        #expect(d.disks[1].source == "/iso/debian's.iso" && d.disks[1].readOnly)
        // An empty drive has no source; a block device is a local path; a network disk is not.
        #expect(d.disks[2].source == nil && !d.disks[2].isLocalPath)
        #expect(d.disks[3].source == "/dev/vg0/data" && d.disks[3].isLocalPath)
        #expect(d.disks[4].source == "nbd:exp" && !d.disks[4].isLocalPath)
    }

    @Test func newStyleNvramAndNoAgent() throws {
        let d = try LibvirtDefinition(xml: """
            <?xml version="1.0"?>
            <domain type='kvm'><name>a</name><os><nvram type='file'><source file='/v/a.fd'/></nvram></os>
            <devices><channel type='unix'><target type='virtio' name='org.qemu.spice'/></channel></devices></domain>
            """)
        #expect(d.nvram == "/v/a.fd")
        #expect(!d.hasAgentChannel)
        #expect(d.disks.isEmpty && d.bootFiles.isEmpty)
    }

    @Test func brokenXMLIsRefused() {
        // Each one is a mistake the scanner must name instead of guessing.
        for bad in ["", "<domain><name>a</domain>", "<domain a=1/>", "<domain>&bogus;</domain>",
                    "<pool/>", "<domain/><domain/>", "<domain"] {
            #expect(throws: (any Error).self, "\(bad)") { try LibvirtDefinition(xml: bad) }
        }
        #expect(throws: WriterError.self) { try LibvirtDefinition(xml: "<pool><name>x</name></pool>") }
    }

    @Test func entitiesAndCharacterReferences() throws {
        let n = try MiniXML.parse("<a x='&lt;&#65;&#x42;&gt;'>t&amp;u<b/>v<![CDATA[<w>]]></a>")
        #expect(n["x"] == "<AB>")
        #expect(n.text == "t&uv<w>")
        #expect(n.children.map(\.name) == ["b"])
    }

    @Test(arguments: [
        ("running", LibvirtState.running, false),
        ("idle", .idle, false),
        ("blocked", .idle, false),                // older virsh
        ("paused (user)", .paused, false),
        ("in shutdown", .inShutdown, false),
        ("pmsuspended", .pmsuspended, false),
        ("shut off (saved)", .shutOff, true),     // a managed save: its memory is in the file
        ("shut off", .shutOff, true),
        ("crashed (panicked)", .crashed, true),
        ("no state", .noState, false),
    ])
    func states(text: String, state: LibvirtState, asIs: Bool) {
        #expect(LibvirtState(virsh: text + "\n") == state)
        #expect(state.mayBackUpAsIs == asIs)
        #expect(state.disposition == (asIs ? "may be backed up as is" : "must be stopped"))
    }

    @Test func unknownStateIsNil() { #expect(LibvirtState(virsh: "levitating") == nil) }

    @Test func dominfo() {
        let i = parseVirshInfo("Id:             -\nName:           a: b\nState:          shut off\nPersistent:     yes\nManaged save:   yes\n")
        #expect(i["State"] == "shut off" && i["Managed save"] == "yes" && i["Persistent"] == "yes")
        #expect(i["Name"] == "a: b")
    }

    @Test func backingChain() throws {
        let json = """
        [{"filename": "/srv/vm/top.qcow2", "format": "qcow2", "backing-filename": "mid.qcow2"},
         {"filename": "/srv/vm/mid.qcow2", "format": "qcow2"},
         {"filename": "json:{\\"driver\\":\\"nbd\\"}", "format": "raw"}]
        """
        #expect(try parseBackingChain(json) == ["/srv/vm/top.qcow2", "/srv/vm/mid.qcow2"])
        #expect(throws: WriterError.self) { try parseBackingChain("qemu-img: Could not open") }
    }

    @Test func pathsBySystemOrSession() {
        let sys = LibvirtPaths(uri: "qemu:///system", home: "/home/u", xdgConfig: nil)
        #expect(sys.save("g") == "/var/lib/libvirt/qemu/save/g.save")
        #expect(sys.config("g") == "/etc/libvirt/qemu/g.xml")
        let ses = LibvirtPaths(uri: "qemu:///session?socket=/x", home: "/home/u", xdgConfig: nil)
        #expect(ses.save("g") == "/home/u/.config/libvirt/qemu/save/g.save")
        let xdg = LibvirtPaths(uri: "qemu:///session", home: "/home/u", xdgConfig: "/cfg")
        #expect(xdg.config("g") == "/cfg/libvirt/qemu/g.xml")
    }

    @Test func settings() throws {
        let d = try LibvirtSettings(WriterSettings())
        #expect(d.uri == "qemu:///system" && !d.cdromCounts && d.wait == 300 && d.resumeWait && d.useAgent)
        let s = try LibvirtSettings(WriterSettings.parse(arguments: [
            "libvirt-uri=qemu:///session", "vm-cdrom-counts=yes", "vm-wait=20", "vm-resume-wait=no",
            "vm-agent=no", "vm-save-dir=/srv/save"]))
        #expect(s.uri == "qemu:///session" && s.cdromCounts && s.wait == 20 && !s.resumeWait && !s.useAgent)
        #expect(s.paths.save("g") == "/srv/save/g.save")
        #expect(throws: WriterError.self) { try LibvirtSettings(WriterSettings.parse(arguments: ["vm-wait=soon"])) }
    }

    @Test func limitsFitTheRequest() {
        // Save, abort and settle within the request's 60 s, with time left to answer.
        let v = Virsh(uri: "qemu:///system", executable: "/usr/bin/virsh")
        let (c, wait) = LibvirtControl.within(60, virsh: v, wait: 300)
        #expect(wait + c.interruptGrace + c.settleSeconds <= 57.0001)
        #expect(wait > 30)
        // A short vm-wait is kept; a tiny request still leaves something.
        #expect(LibvirtControl.within(60, virsh: v, wait: 10).1 == 10)
        let (t, tw) = LibvirtControl.within(2, virsh: v, wait: 300)
        #expect(tw > 0 && t.interruptGrace > 0 && t.settleSeconds > 0)
    }

    @Test func recordSaysWhatNeedsResuming() {
        #expect(StoppedDomain(name: "a", priorState: "running", method: "managed-save").needsResume)
        #expect(StoppedDomain(name: "a", priorState: "running", method: "agent-fsfreeze").needsResume)
        #expect(!StoppedDomain(name: "a", priorState: "shut off", method: "none (shut off)").needsResume)
    }

    @Test func stopRecordRoundTripAndEmptying() throws {
        let dir = NSTemporaryDirectory() + "hw-rec-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/sub/stopped.json"
        #expect(try StopRecord.load(path) == nil)
        var r = StopRecord(uri: "qemu:///system")
        r.add([StoppedDomain(name: "a", priorState: "running", method: "managed-save")])
        // Stopped again (say, after a manual start): the first prior state stays.
        r.add([StoppedDomain(name: "a", priorState: "paused", method: "managed-save"),
               StoppedDomain(name: "b", priorState: "paused", method: "managed-save")])
        try r.save(path)
        let back = try #require(try StopRecord.load(path))
        #expect(back == r && back.stopped.map(\.priorState) == ["running", "paused"])
        // Nothing left stopped: the file goes.
        try StopRecord(uri: "qemu:///system").save(path)
        #expect(!FileManager.default.fileExists(atPath: path))
        FileManager.default.createFile(atPath: path, contents: Data("not json".utf8))
        #expect(throws: WriterError.self) { try StopRecord.load(path) }
    }

    @Test func parallelKeepsOrderAndRunsAtOnce() {
        // Eight sleepers of 0.2 s finish in well under 8 × 0.2 s only if they overlap.
        let t0 = Date()
        let r = inParallel(Array(0..<8)) { i -> Int in usleep(200_000); return i * i }
        #expect(r == (0..<8).map { $0 * $0 })
        #expect(Date().timeIntervalSince(t0) < 1.0)
    }
}
