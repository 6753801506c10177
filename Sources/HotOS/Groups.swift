// Group names, for options that hand a file to a group (backup --group).
import Foundation

/// The group id of `name` (a group name, or a number as chgrp takes it);
/// nil if there is no such group.
public func groupID(named name: String) -> gid_t? {
    guard !name.isEmpty else { return nil }
    var g = group()
    var result: UnsafeMutablePointer<group>?
    var buf = [CChar](repeating: 0, count: 16384)
    if getgrnam_r(name, &g, &buf, buf.count, &result) == 0, result != nil { return g.gr_gid }
    if name.allSatisfy(\.isASCII), name.allSatisfy(\.isNumber), let n = UInt32(name), n != UInt32.max { return gid_t(n) }
    return nil
}
