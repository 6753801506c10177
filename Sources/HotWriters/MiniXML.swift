// Just enough XML for libvirt's domain definitions: elements, attributes,
// text, comments and the five predefined entities plus character
// references. libvirt writes plain, well-formed XML without DTDs, CDATA or
// namespaces in the parts we read, so a small scanner does; Foundation's
// XMLDocument would drag libxml2 and FoundationXML into every hotimage
// binary for the sake of one writer.
import Foundation
import HotErrors

public struct XMLNode: Sendable, Equatable {
    public var name: String
    public var attributes: [String: String] = [:]
    public var children: [XMLNode] = []
    /// The element's own text (its children's text excluded), entities decoded.
    public var text: String = ""

    public subscript(attr: String) -> String? { attributes[attr] }
    public func child(_ n: String) -> XMLNode? { children.first { $0.name == n } }
    public func all(_ n: String) -> [XMLNode] { children.filter { $0.name == n } }
    /// The first element at a slash separated path below this one ("os/nvram").
    public func at(_ path: String) -> XMLNode? {
        var node = self
        for part in path.split(separator: "/") {
            guard let c = node.child(String(part)) else { return nil }
            node = c
        }
        return node
    }
    public var trimmedText: String { text.trimmingCharacters(in: .whitespacesAndNewlines) }
}

public struct XMLParseError: CodedError, Sendable {
    public var description: String
    public var kind: FailureKind { .failed }
}

public enum MiniXML {
    /// Parses a document and returns its root element.
    public static func parse(_ s: String) throws -> XMLNode {
        var p = Scanner(Array(s.utf8))
        return try p.document()
    }

    private struct Scanner {
        let b: [UInt8]
        var i = 0
        init(_ b: [UInt8]) { self.b = b }

        func fail(_ what: String) -> XMLParseError { XMLParseError(description: "XML: \(what) at byte \(i)") }

        mutating func document() throws -> XMLNode {
            var root: XMLNode?
            while i < b.count {
                if b[i] == UInt8(ascii: "<") {
                    if try skipMarkup() { continue }
                    guard root == nil else { throw fail("a second root element") }
                    root = try element()
                } else { i += 1 }
            }
            guard let r = root else { throw fail("no root element") }
            return r
        }

        /// Skips <?…?>, <!--…-->, <!…>; true if it did.
        mutating func skipMarkup() throws -> Bool {
            if starts("<?") { try skip(past: "?>"); return true }
            if starts("<!--") { try skip(past: "-->"); return true }
            if starts("<!") { try skip(past: ">"); return true }
            return false
        }

        func starts(_ s: String) -> Bool {
            let u = Array(s.utf8)
            return i + u.count <= b.count && Array(b[i..<(i + u.count)]) == u
        }

        mutating func skip(past s: String) throws {
            while i < b.count { if starts(s) { i += s.utf8.count; return }; i += 1 }
            throw fail("unterminated '\(s)'")
        }

        static func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d }

        mutating func name() throws -> String {
            let start = i
            while i < b.count, !Self.isSpace(b[i]), ![UInt8(ascii: ">"), UInt8(ascii: "/"), UInt8(ascii: "=")].contains(b[i]) { i += 1 }
            guard i > start else { throw fail("a name expected") }
            return String(decoding: b[start..<i], as: UTF8.self)
        }

        mutating func spaces() { while i < b.count, Self.isSpace(b[i]) { i += 1 } }

        /// At '<' of a start tag: the element and everything in it.
        mutating func element() throws -> XMLNode {
            i += 1
            var node = XMLNode(name: try name())
            while true {
                spaces()
                guard i < b.count else { throw fail("unterminated tag <\(node.name)>") }
                if b[i] == UInt8(ascii: "/") {
                    guard i + 1 < b.count, b[i + 1] == UInt8(ascii: ">") else { throw fail("'/' in a tag") }
                    i += 2; return node
                }
                if b[i] == UInt8(ascii: ">") { i += 1; break }
                let key = try name()
                spaces()
                guard i < b.count, b[i] == UInt8(ascii: "=") else { throw fail("'=' expected after \(key)") }
                i += 1; spaces()
                guard i < b.count, b[i] == UInt8(ascii: "\"") || b[i] == UInt8(ascii: "'") else { throw fail("a quoted value expected") }
                let q = b[i]; i += 1
                let start = i
                while i < b.count, b[i] != q { i += 1 }
                guard i < b.count else { throw fail("unterminated value of \(key)") }
                node.attributes[key] = try Self.decode(b[start..<i])
                i += 1
            }
            // Content: text, children, until the matching end tag.
            var text: [UInt8] = []
            while i < b.count {
                if b[i] != UInt8(ascii: "<") { text.append(b[i]); i += 1; continue }
                if starts("<![CDATA[") {
                    i += 9
                    let start = i
                    try skip(past: "]]>")
                    text.append(contentsOf: b[start..<(i - 3)])
                    continue
                }
                if try skipMarkup() { continue }
                if starts("</") {
                    i += 2
                    let end = try name()
                    guard end == node.name else { throw fail("</\(end)> closes <\(node.name)>") }
                    spaces()
                    guard i < b.count, b[i] == UInt8(ascii: ">") else { throw fail("'>' expected") }
                    i += 1
                    node.text = try Self.decode(text[...])
                    return node
                }
                node.children.append(try element())
            }
            throw fail("<\(node.name)> is not closed")
        }

        static func decode(_ s: ArraySlice<UInt8>) throws -> String {
            guard s.contains(UInt8(ascii: "&")) else { return String(decoding: s, as: UTF8.self) }
            var out = ""
            var rest = Substring(String(decoding: s, as: UTF8.self))
            while let amp = rest.firstIndex(of: "&") {
                out += rest[..<amp]
                guard let semi = rest[amp...].firstIndex(of: ";") else {
                    throw XMLParseError(description: "XML: unterminated entity in '\(String(decoding: s, as: UTF8.self))'")
                }
                let ent = rest[rest.index(after: amp)..<semi]
                switch ent {
                case "lt": out += "<"
                case "gt": out += ">"
                case "amp": out += "&"
                case "quot": out += "\""
                case "apos": out += "'"
                default:
                    let v: UInt32? = ent.hasPrefix("#x") ? UInt32(ent.dropFirst(2), radix: 16)
                        : ent.hasPrefix("#") ? UInt32(ent.dropFirst()) : nil
                    guard let code = v, let scalar = Unicode.Scalar(code) else {
                        throw XMLParseError(description: "XML: unknown entity &\(ent);")
                    }
                    out.unicodeScalars.append(scalar)
                }
                rest = rest[rest.index(after: semi)...]
            }
            return out + rest
        }
    }
}
