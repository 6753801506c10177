// The one entry point for what a dead daemon left behind, whatever its
// frontend: `status` lists it (find/all only read), `detach NAME` removes it
// (clean). Each frontend's part knows its own leftovers:
//
//   fuse, nbd  HotCoreLeftovers (HotCoreLeftovers.swift): run directory,
//              loop over the nbdfuse file, FUSE mount, nbdfuse (fuse),
//              /dev/nbdN (nbd), /dev/hotimage/NAME
//   dm         DMLeftovers (DMLeftovers.swift): snapshot, COW and REAL
//              devices, loops over hb files and the files, the origin's
//              table, the run directory, `attach --via dm`'s linear device
//
// The CLI only prints what these return and maps it to exit codes.
import Foundation
import HotControl
import HotOS

public enum Leftovers: Sendable, Equatable {
    /// A HotCore daemon's (--via fuse or --via nbd).
    case hotCore(HotCoreLeftovers)
    /// A dm-snapshot daemon's (attach --via dm, or a transient one of `backup`).
    case dm(DMLeftovers)

    /// What the dead daemon named `name` left in `runDir` (and the kernel);
    /// nil if its daemon lives or nothing is left. Reads only.
    public static func find(name: String, runDir: String) -> Leftovers? {
        let dir = runDir + "/" + name
        if let l = HotCoreLeftovers.inspect(dir: dir) { return .hotCore(l) }
        if let l = DMLeftovers.find(name: name, runDir: runDir) { return .dm(l) }
        return nil
    }

    /// Every dead daemon's leftovers, sorted by name. Reads only.
    public static func all(runDir: String) -> [Leftovers] {
        let core = HotCoreLeftovers.all(runDir: runDir).map { Leftovers.hotCore($0) }
        let dm = DMLeftovers.all(runDir: runDir).map { Leftovers.dm($0) }
        return (core + dm).sorted { $0.name < $1.name }
    }

    /// Whether a daemon holds RUN/NAME/lock (it takes it for its lifetime).
    public static func daemonAlive(dir: String) -> Bool { HotCoreLeftovers.daemonAlive(dir: dir) }

    public var name: String {
        switch self {
        case .hotCore(let l): return l.name
        case .dm(let l): return l.name
        }
    }

    public var frontend: SessionVia {
        switch self {
        case .hotCore(let l): return l.frontend
        case .dm: return .dm
        }
    }

    /// The dead daemon's pid, if its records or devices say.
    public var pid: Int32? {
        switch self {
        case .hotCore(let l): return l.pid
        case .dm(let l): return l.pid
        }
    }

    /// Where the protected device is mounted: `detach` cannot remove it
    /// before these are unmounted.
    public var mountedOn: [String] {
        switch self {
        case .hotCore(let l): return l.mountedOn
        case .dm(let l): return l.mountedOn
        }
    }

    /// One line per leftover.
    public var lines: [String] {
        switch self {
        case .hotCore(let l): return l.lines
        case .dm(let l): return l.lines
        }
    }

    /// The command that removes them.
    public var hint: String { "hotimage detach \(name)" }

    /// Removes everything; returns what is left (empty: all gone), each
    /// with what to do about it. `say` reports each action.
    public func clean(say: (String) -> Void) -> [String] {
        switch self {
        case .hotCore(let l): return l.clean(say: say)
        case .dm(let l): return l.clean(say: say)
        }
    }
}

extension Leftovers: Encodable {
    /// A HotCore daemon's leftovers encode as HotCoreLeftovers (as `status
    /// --json` always printed them); a dm daemon's as DMLeftovers plus "via".
    public func encode(to encoder: Encoder) throws {
        switch self {
        case .hotCore(let l): try l.encode(to: encoder)
        case .dm(let l):
            try l.encode(to: encoder)
            var c = encoder.container(keyedBy: ViaKey.self)
            try c.encode(SessionVia.dm, forKey: .via)
        }
    }

    enum ViaKey: String, CodingKey { case via }
}
