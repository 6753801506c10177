// Which volume a file is on, and how much of a component a volume set
// covers. A path is on a volume (a mount point) when its real path lies
// under the mount point and it has the mount's st_dev: a nested mount inside
// the volume is a different volume. A path that does not exist is on no
// volume (a writer listing a disk image that is gone).
import Foundation

public enum Coverage: String, Codable, Sendable {
    case full = "fully"
    case partial = "partially"
    case none = "not"
}

public func realPath(_ p: String) -> String? {
    guard let r = realpath(p, nil) else { return nil }
    defer { free(r) }
    return String(cString: r)
}

public func deviceOf(_ path: String) -> UInt64? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return UInt64(st.st_dev)
}

/// The volume (one of `volumes`, mount points) that holds `path`, or nil.
public func volume(of path: String, volumes: [String]) -> String? {
    guard let rp = realPath(path), let dev = deviceOf(rp) else { return nil }
    // The longest mount point first: /srv and /srv/data both given.
    let candidates = volumes.compactMap { v -> (String, String)? in realPath(v).map { (v, $0) } }
        .sorted { $0.1.count > $1.1.count }
    for (given, mp) in candidates {
        let under = mp == "/" || rp == mp || rp.hasPrefix(mp.hasSuffix("/") ? mp : mp + "/")
        if under && deviceOf(mp) == dev { return given }
    }
    return nil
}

/// Coverage of a component's files (those that count) by a volume set.
/// A component with no counting files is not covered.
public func coverage(of files: [ComponentFile], volumes: [String]) -> Coverage {
    let counted = files.filter(\.countsForCoverage)
    guard !counted.isEmpty else { return .none }
    let on = counted.filter { volume(of: $0.path, volumes: volumes) != nil }.count
    return on == 0 ? .none : (on == counted.count ? .full : .partial)
}
