// What the libvirt writer knows about one domain, and the pure parts of
// learning it: libvirt's states and what each means for a backup, the files
// in a domain definition, `virsh dominfo` and `qemu-img info --backing-chain`.
// No process is run here (LibvirtWriter+Virsh.swift does that), so all of it
// is unit-tested on captured output.
//
// States (virsh's words) and what a backup must do with them:
//   shut off, crashed          may be backed up as is: no process writes the
//                              files (a managed-saved domain is shut off, its
//                              memory in the save file)
//   running, idle (blocked),   must be stopped: qemu writes the disks and
//   paused, in shutdown,       holds guest memory (a paused guest's dirty page
//   pmsuspended, no state      cache is not on its disk either)
import Foundation

public enum LibvirtState: String, Codable, Sendable, CaseIterable {
    case running, idle, paused, inShutdown = "in shutdown", shutOff = "shut off", crashed, pmsuspended
    case noState = "no state"

    /// From the first words of `virsh domstate` / `dominfo` ("shut off (saved)").
    public init?(virsh s: String) {
        var t = s.trimmingCharacters(in: .whitespacesAndNewlines).lowercased()
        if let p = t.firstIndex(of: "(") { t = t[..<p].trimmingCharacters(in: .whitespaces) }
        if t == "blocked" { t = "idle" }  // older virsh
        guard let v = LibvirtState(rawValue: t) else { return nil }
        self = v
    }

    public var mayBackUpAsIs: Bool { self == .shutOff || self == .crashed }
    public var disposition: String { mayBackUpAsIs ? "may be backed up as is" : "must be stopped" }
}

/// One disk-like device of a domain definition.
public struct LibvirtDisk: Equatable, Sendable {
    public var device: String     // disk, cdrom, floppy, lun
    public var target: String     // vda, hdc
    public var type: String       // file, block, dir, network, volume
    /// A path for file/block/dir; "pool/volume" or "protocol:name" otherwise; nil if empty (a CD drive with no medium).
    public var source: String?
    public var format: String?
    /// Backing files libvirt shows in a live definition (<backingStore>), top first.
    public var backing: [String]
    public var readOnly: Bool

    public var role: String {
        switch device { case "cdrom": return "cdrom"; case "floppy": return "floppy"; default: return "disk" }
    }
    /// A local path (qemu-img can read it, a volume can hold it).
    public var isLocalPath: Bool { (type == "file" || type == "block" || type == "dir") && source != nil }
}

/// The facts of a domain definition that decide its files.
public struct LibvirtDefinition: Equatable, Sendable {
    public var name: String
    public var uuid: String?
    public var disks: [LibvirtDisk] = []
    public var nvram: String?
    /// Direct-boot kernel, initrd, dtb and the firmware loader: host files
    /// the domain starts from, not its own state.
    public var bootFiles: [String] = []
    public var hasAgentChannel = false
    /// The agent channel's state in a live definition ("connected"), if shown.
    public var agentChannelState: String?

    public init(name: String) { self.name = name }

    public init(xml: String) throws {
        let root = try MiniXML.parse(xml)
        guard root.name == "domain" else { throw WriterError("not a domain definition (root <\(root.name)>)") }
        self.init(name: root.child("name")?.trimmedText ?? "")
        uuid = root.child("uuid")?.trimmedText
        if let os = root.child("os") {
            // <nvram>/path</nvram>, or (libvirt ≥ 8.5) <nvram type='file'><source file='…'/></nvram>.
            if let nv = os.child("nvram") {
                let p = nv.child("source")?["file"] ?? nv.trimmedText
                nvram = p.isEmpty ? nil : p
            }
            for n in ["loader", "kernel", "initrd", "dtb"] {
                if let t = os.child(n)?.trimmedText, !t.isEmpty { bootFiles.append(t) }
            }
        }
        for d in root.child("devices")?.all("disk") ?? [] {
            disks.append(Self.disk(d))
        }
        for c in root.child("devices")?.all("channel") ?? [] {
            if let t = c.child("target"), t["name"] == "org.qemu.guest_agent.0" {
                hasAgentChannel = true
                agentChannelState = t["state"]
            }
        }
    }

    static func source(of n: XMLNode, type: String) -> String? {
        guard let s = n.child("source") else { return nil }
        switch type {
        case "file": return s["file"]
        case "block": return s["dev"]
        case "dir": return s["dir"]
        case "volume": return s["pool"].flatMap { p in s["volume"].map { "\(p)/\($0)" } }
        case "network": return "\(s["protocol"] ?? "network"):\(s["name"] ?? "?")"
        default: return s["file"] ?? s["dev"]
        }
    }

    static func disk(_ d: XMLNode) -> LibvirtDisk {
        let type = d["type"] ?? "file"
        var backing: [String] = []
        var b = d.child("backingStore")
        while let node = b, let t = node["type"] {
            if let s = source(of: node, type: t) { backing.append(s) }
            b = node.child("backingStore")
        }
        return LibvirtDisk(device: d["device"] ?? "disk", target: d.child("target")?["dev"] ?? "?", type: type,
                           source: source(of: d, type: type), format: d.child("driver")?["type"],
                           backing: backing, readOnly: d.child("readonly") != nil)
    }
}

/// `virsh dominfo` as key → value ("Managed save" → "yes").
public func parseVirshInfo(_ out: String) -> [String: String] {
    var r: [String: String] = [:]
    for line in out.split(separator: "\n") {
        guard let c = line.firstIndex(of: ":") else { continue }
        r[line[..<c].trimmingCharacters(in: .whitespaces)] = line[line.index(after: c)...].trimmingCharacters(in: .whitespaces)
    }
    return r
}

/// The files of `qemu-img info --backing-chain --output=json`, top first.
/// Backing files named by a json: pseudo-protocol or a network URL are not
/// local files and are left out.
public func parseBackingChain(_ json: String) throws -> [String] {
    struct Image: Decodable { var filename: String }
    let images: [Image]
    do { images = try JSONDecoder().decode([Image].self, from: Data(json.utf8)) } catch {
        throw WriterError("qemu-img info: not a backing chain: \(json.prefix(120))")
    }
    return images.map(\.filename).filter { $0.hasPrefix("/") }
}

/// Where libvirt's QEMU driver keeps persistent definitions (NAME.xml) and
/// managed-save files (NAME.save) for a connection URI: the system
/// instance's under /etc and /var/lib, a session's under the user's
/// configuration directory. libvirt has no API that names these files.
public struct LibvirtPaths: Equatable, Sendable {
    public var configDir: String
    public var saveDir: String

    public init(uri: String, home: String?, xdgConfig: String?) {
        let path = uri.split(separator: "?").first.map(String.init) ?? uri
        if path.hasSuffix("/session") {
            let base = xdgConfig ?? "\(home ?? "/root")/.config"
            configDir = "\(base)/libvirt/qemu"
            saveDir = "\(base)/libvirt/qemu/save"
        } else {
            configDir = "/etc/libvirt/qemu"
            saveDir = "/var/lib/libvirt/qemu/save"
        }
    }

    public func config(_ name: String) -> String { "\(configDir)/\(name).xml" }
    public func save(_ name: String) -> String { "\(saveDir)/\(name).save" }
}
