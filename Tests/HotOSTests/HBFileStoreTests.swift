import Testing
@testable import HotOS
