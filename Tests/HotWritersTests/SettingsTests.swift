import Testing
@testable import HotWriters

@Suite struct SettingsTests {
    @Test func lastValueWinsAndRepeatsAreKept() throws {
        let s = try WriterSettings.parse(arguments: ["vm-wait=10", "container=/a", "container=/b x", "vm-wait=20"])
        #expect(s.value("vm-wait") == "20")
        #expect(s.values("container") == ["/a", "/b x"])
        #expect(try s.seconds("vm-wait", default: 1) == 20)
        #expect(try WriterSettings.parse(arguments: s.arguments.enumerated().filter { $0.offset % 2 == 1 }.map(\.element)) == s)
    }

    @Test func badValuesAreRefused() throws {
        #expect(throws: WriterError.self) { try WriterSettings.parse(arguments: ["novalue"]) }
        #expect(throws: WriterError.self) { try WriterSettings.parse(arguments: ["=x"]) }
        let s = try WriterSettings.parse(arguments: ["a=maybe", "t=-3"])
        #expect(throws: WriterError.self) { try s.bool("a", default: true) }
        #expect(throws: WriterError.self) { try s.seconds("t", default: 1) }
        #expect(try s.bool("missing", default: true) == true)
    }
}
