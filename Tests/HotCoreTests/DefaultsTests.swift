import Testing
import HotCore

// Tests of Defaults: the CLI shows its size defaults as Defaults.sizeText
// renders them, so the help texts (Tests/Machine/golden) depend on it.
@Suite("Defaults")
struct DefaultsTests {
    @Test(arguments: [
        (UInt64(256) << 20, "256M"),     // the hb file size, as --hb-file-size shows it
        (UInt64(16) << 30, "16G"),       // the buffer limit
        (UInt64(64) << 20, "64M"),       // the memory buffer
        (UInt64(1) << 40, "1T"),         // the largest suffix
        (UInt64(1536) << 20, "1536M"),   // not a whole number of GiB: MiB
        (UInt64(4097), "4097"),          // no suffix divides it: bytes
        (UInt64(0), "0"),                // zero has no suffix
    ])
    func sizeText(_ bytes: UInt64, _ text: String) {
        #expect(Defaults.sizeText(bytes) == text)
    }

    // The buffer directory is named after the session.
    @Test func bufferDir() {
        #expect(Defaults.bufferDir(name: "vol1") == "/var/tmp/hotimage-vol1")
        #expect(Defaults.bufferDirHelp == "/var/tmp/hotimage-NAME")
    }
}
