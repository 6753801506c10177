// What the daemons share beyond HotControl's types: byte ranges from
// the wire, facts from /proc for `status`, the backend a run directory records.
import Foundation
import HotControl
import HotCore
import HotOS

/// A field of /proc/self/status in bytes ("VmHWM", "RssFile"), nil where /proc does not say.
public func procStatusBytes(_ field: String) -> UInt64? {
    guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = s.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }) else { return nil }
    let kb = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { UInt64($0) }
    return kb.map { $0 * 1024 }
}

/// [[start, end]] pairs of a request as byte ranges; a pair that is not two
/// ordered numbers is an error.
func toRanges(_ pairs: [[UInt64]]?) throws -> [Range<UInt64>] {
    guard let pairs else { return [] }
    return try pairs.map { p in
        guard p.count == 2, p[0] <= p[1] else {
            throw EngineError.outOfRange(offset: p.first ?? 0, length: 0, size: 0)
        }
        return p[0]..<p[1]
    }
}

/// The backend a run directory's `via` file names (every daemon writes it
/// at start), nil if none or unreadable.
func recordedVia(dir: String) -> SessionVia? {
    readSmallFile(dir + "/via").flatMap { SessionVia(rawValue: $0.trimmingCharacters(in: .whitespacesAndNewlines)) }
}
