// One message per line: JSON with sorted keys, then a newline. The same
// codec on both ends, so a reply is byte for byte what the daemon encoded.
import Foundation

public enum ControlProtocolError: Error, Equatable, CustomStringConvertible {
    /// A request whose op this side does not know (named as sent).
    case unknownOp(String)

    public var description: String {
        switch self {
        case .unknownOp(let op): return "unknown op '\(op)'"
        }
    }
}

public enum ControlCodec {
    /// The encoded line, newline included.
    public static func encode<T: Encodable>(_ v: T) -> [UInt8] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        var data = (try? enc.encode(v)).map { Array($0) } ?? Array("{\"ok\":false,\"error\":\"encoding failed\"}".utf8)
        data.append(0x0a)
        return data
    }

    /// Decodes one line (without its newline).
    public static func decode<T: Decodable>(_ t: T.Type, _ line: [UInt8]) throws -> T {
        try JSONDecoder().decode(t, from: Data(line))
    }

    /// The reply a server sends for a line it could not decode as a request.
    public static func replyToUndecodable(_ error: Error) -> ControlReply {
        if let e = error as? ControlProtocolError { return .failure(e.description) }
        return .failure("malformed request: expected one JSON object with an \"op\" per line")
    }
}
