// Group names for `backup --group`.
import Foundation
import Testing
@testable import HotOS

@Suite struct GroupsTests {
    @Test func names() {
        // root is group 0 on every Linux system.
        #expect(groupID(named: "root") == 0)
        // An unknown name is nil (the CLI makes it a usage error).
        #expect(groupID(named: "hit-no-such-group") == nil)
        #expect(groupID(named: "") == nil)
        // A number is taken as a gid, as chgrp does.
        #expect(groupID(named: "4242") == 4242)
        #expect(groupID(named: "-1") == nil)
    }
}
