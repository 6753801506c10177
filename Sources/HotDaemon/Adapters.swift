// The engine's storage protocols, fulfilled by HotOS types.
import HotCore
import HotOS

extension BlockDevice: BlockIO {}

extension HBFileStore: SpillStore {}
