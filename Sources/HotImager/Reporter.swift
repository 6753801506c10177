// How long-running commands talk to people and scripts.
//   Terminal: log lines on stderr, and a one-line progress bar redrawn in
//   place when stderr is a terminal (bytes, rate, ETA, COW buffer, mode).
//   JSON (--json): one object per line on stdout, each with "event":
//   start, snapshot, hook, log, progress (every second), emergency, summary,
//   error. Logs still go to stderr as plain lines.
import Foundation
import HotOS

public protocol Reporter: AnyObject {
    func log(_ line: String)
    func event(_ name: String, _ fields: [String: JSONValue])
    func progress(_ p: ImagerProgress, phase: String)
    func finishProgress()
}

public enum JSONValue: Encodable, Sendable {
    case string(String), int(Int64), uint(UInt64), double(Double), bool(Bool), array([JSONValue]), object([String: JSONValue]), null
    /// Any Codable value, encoded as itself.
    case value(any Encodable & Sendable)
    public func encode(to encoder: Encoder) throws {
        if case .value(let v) = self { try v.encode(to: encoder); return }
        var c = encoder.singleValueContainer()
        switch self {
        case .string(let s): try c.encode(s)
        case .int(let i): try c.encode(i)
        case .uint(let u): try c.encode(u)
        case .double(let d): try c.encode(d.isFinite ? d : 0)
        case .bool(let b): try c.encode(b)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        case .null: try c.encodeNil()
        case .value: break
        }
    }
}

public func formatBytes(_ b: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(b)
    var i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(b) B" : String(format: "%.1f %@", v, units[i])
}

public final class TerminalReporter: Reporter {
    let tty: Bool
    let quiet: Bool
    private var barShown = false
    private var lastDraw: Double = -1

    public init(quiet: Bool = false) {
        tty = isatty(2) == 1
        self.quiet = quiet
    }

    public func log(_ line: String) {
        if barShown { writeStderr("\r\u{1B}[K"); barShown = false }
        writeStderr("hotimage: \(line)\n")
    }

    public func event(_ name: String, _ fields: [String: JSONValue]) {}

    public func progress(_ p: ImagerProgress, phase: String) {
        guard tty, !quiet else { return }
        let frac = p.totalBytes == 0 ? 1 : Double(p.doneBytes) / Double(p.totalBytes)
        let rate = p.elapsed > 0 ? Double(p.doneBytes) / p.elapsed : 0
        let eta = rate > 0 ? Double(p.totalBytes - min(p.totalBytes, p.doneBytes)) / rate : 0
        let width = 24
        let filled = Int(frac * Double(width))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        var line = String(format: "%@ [%@] %5.1f%% %@/%@ %.0f MB/s ETA %@", phase, bar, frac * 100,
                          formatBytes(p.doneBytes), formatBytes(p.totalBytes), rate / 1e6, clock(eta))
        if p.bufferLimit > 0 {
            line += String(format: " COW %@ (%.0f%%)", formatBytes(p.bufferBytes), 100 * Double(p.bufferBytes) / Double(p.bufferLimit))
        }
        if p.emergency { line += " EMERGENCY" }
        writeStderr("\r\u{1B}[K" + line)
        barShown = true
    }

    public func finishProgress() {
        if barShown { writeStderr("\n"); barShown = false }
    }

    func clock(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 3600 ? String(format: "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60) : String(format: "%d:%02d", t / 60, t % 60)
    }
}

public final class JSONReporter: Reporter {
    private var lastProgress: Double = -10
    public init() {}

    public func log(_ line: String) {
        writeStderr("hotimage: \(line)\n")
        event("log", ["message": .string(line)])
    }

    public func event(_ name: String, _ fields: [String: JSONValue]) {
        var f = fields
        f["event"] = .string(name)
        f["time"] = .string(iso8601(Date()))
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        guard let d = try? e.encode(JSONValue.object(f)) else { return }
        writeAll(1, Array(d) + [0x0a])
    }

    public func progress(_ p: ImagerProgress, phase: String) {
        guard p.elapsed - lastProgress >= 1 || p.doneBytes == p.totalBytes else { return }
        lastProgress = p.elapsed
        event("progress", [
            "phase": .string(phase), "doneBytes": .uint(p.doneBytes), "totalBytes": .uint(p.totalBytes),
            "imageBytes": .uint(p.imageBytes), "seconds": .double(p.elapsed),
            "bufferBytes": .uint(p.bufferBytes), "bufferLimitBytes": .uint(p.bufferLimit),
            "mode": .string(p.emergency ? "emergency" : "streamlined"),
        ])
    }

    public func finishProgress() {}
}
