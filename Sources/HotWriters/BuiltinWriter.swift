// The built-in writers (libvirt, containers, postgresql) are Swift types
// behind one small protocol, served as a separate process by
// `hotimage writer-exec NAME VERB` through the same JSON protocol as the
// external writers (WriterProtocol.swift). A separate process means a writer
// that hangs in libvirt or psql is killed without touching the backup, and
// end of file on its stdin (hotimage died) thaws what it froze.
import Foundation
import HotOS

/// Settings of the writers, from hotimage.conf (`key = value`, repeatable
/// keys keep every value) and the command line, passed to the writer
/// processes as `--setting key=value`.
public struct WriterSettings: Sendable, Equatable {
    public var pairs: [(String, String)] = []
    public init() {}
    public init(pairs: [(String, String)]) { self.pairs = pairs }

    public static func == (a: WriterSettings, b: WriterSettings) -> Bool {
        a.pairs.count == b.pairs.count && zip(a.pairs, b.pairs).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    }

    /// The last value of `key`.
    public func value(_ key: String) -> String? { pairs.last { $0.0 == key }?.1 }
    /// Every value of `key`, in order.
    public func values(_ key: String) -> [String] { pairs.filter { $0.0 == key }.map(\.1) }
    public mutating func set(_ key: String, _ value: String) { pairs.append((key, value)) }

    public func bool(_ key: String, default d: Bool) throws -> Bool {
        guard let v = value(key) else { return d }
        switch v.lowercased() {
        case "yes", "true", "1", "on": return true
        case "no", "false", "0", "off": return false
        default: throw WriterError("\(key) must be yes or no, not '\(v)'")
        }
    }

    public func seconds(_ key: String, default d: Double) throws -> Double {
        guard let v = value(key) else { return d }
        guard let s = Double(v), s > 0 else { throw WriterError("\(key) must be seconds > 0, not '\(v)'") }
        return s
    }

    /// `--setting k=v` arguments.
    public var arguments: [String] { pairs.flatMap { ["--setting", "\($0.0)=\($0.1)"] } }

    public static func parse(arguments: [String]) throws -> WriterSettings {
        var s = WriterSettings()
        for a in arguments {
            guard let eq = a.firstIndex(of: "="), eq != a.startIndex else { throw WriterError("--setting wants key=value, not '\(a)'") }
            s.set(String(a[..<eq]), String(a[a.index(after: eq)...]))
        }
        return s
    }
}

/// What a built-in writer does. `freeze` keeps whatever it needs to thaw in
/// the instance (one instance serves one freeze/thaw conversation).
public protocol BuiltinWriter: AnyObject {
    static var name: String { get }
    /// One line for `hotimage writers`.
    static var summary: String { get }
    init(settings: WriterSettings) throws
    func components(volumes: [String]) throws -> [WriterComponent]
    func freeze(_ ids: [String], request: FreezeRequest) -> [ComponentResult]
    func thaw(_ ids: [String]) -> [ComponentResult]
}

/// The writer process side of the protocol, for a built-in writer.
public enum WriterExec {
    /// Serves one verb on stdin/stdout. Returns the process exit code.
    public static func serve(_ type: any BuiltinWriter.Type, verb: String, settings: WriterSettings) -> Int32 {
        // If hotimage dies before reading an answer, writing it must not kill
        // this process: it still has to thaw what it froze.
        signal(SIGPIPE, SIG_IGN)
        let w: any BuiltinWriter
        do { w = try type.init(settings: settings) } catch {
            writeStderr("writer \(type.name): \(error)\n"); return 1
        }
        switch verb {
        case "components":
            let volumes = (try? readLine(timeout: 5)).flatMap { try? decodeLine(ComponentsRequest.self, $0) }?.volumes
                ?? envVolumes()
            do {
                let c = try w.components(volumes: volumes)
                emit(ComponentsReply(writer: type.name, components: c))
                return 0
            } catch {
                writeStderr("writer \(type.name): \(error)\n"); return 1
            }
        case "freeze":
            let req: FreezeRequest
            do {
                guard let line = try readLine(timeout: 30) else { throw WriterError("no freeze request on stdin") }
                req = try decodeLine(FreezeRequest.self, line)
            } catch {
                writeStderr("writer \(type.name): \(error)\n"); return 1
            }
            let frozen = w.freeze(req.components, request: req)
            emit(FreezeReply(frozen: frozen))
            // Wait for the thaw request, or end of file: thaw either way.
            _ = try? readLine(timeout: nil)
            let ids = frozen.filter(\.ok).map(\.id)
            let thawed = w.thaw(ids)
            emit(ThawReply(thawed: thawed))
            return 0
        default:
            writeStderr("writer \(type.name): unknown verb '\(verb)' (components or freeze)\n")
            return 2
        }
    }

    static func envVolumes() -> [String] {
        (ProcessInfo.processInfo.environment["HOTIMAGE_VOLUMES"] ?? "").split(separator: " ").map(String.init)
    }

    static func emit<T: Encodable>(_ v: T) {
        let line = jsonLine(v) + "\n"
        writeAll(1, Array(line.utf8))
    }

    /// One line from stdin, nil at end of file. `timeout` nil: wait for ever.
    static func readLine(timeout: Double?) throws -> String? {
        var bytes: [UInt8] = []
        let deadline = timeout.map { monotonicNanos() + UInt64($0 * 1e9) }
        while true {
            if let d = deadline {
                let now = monotonicNanos()
                if now >= d { throw WriterError("timed out waiting for a line on stdin") }
                var p = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
                let r = poll(&p, 1, Int32(min(1000, (d - now) / 1_000_000 + 1)))
                if r == 0 { continue }
            }
            var c: UInt8 = 0
            let n = read(0, &c, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self) }
            if c == 10 { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(c)
        }
    }
}

