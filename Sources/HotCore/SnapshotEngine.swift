// SnapshotEngine: the copy-on-write core of HotCore.
//
// Per block (blockSize bytes, 4 KiB by default) the engine keeps:
//
//   used       the block belongs to the snapshot (the filesystem's map at the
//              cut, minus exclusions); fixed once the map is received.
//   protected  the device still holds the snapshot's content for the block
//              and a live write must save it first. Set for every block at
//              arming, narrowed to `used` by the map, cleared by a copy or
//              when the imager reports the block archived.
//   buffered   the original is held in the COW buffer (memory slot or hb
//              file slot), found through `index`.
//
//   snapshot read of a block:  buffered → buffer;  protected → device;
//                              used, neither → archived (error);  else zeros.
//   live write to a block:     protected → copy original into the buffer,
//                              clear protected, then write;  else write.
//   archived report:           clear protected, free the buffered copy.
//
// Concurrency: one Monitor guards all of the above. A block whose storage is
// being changed or read outside the lock carries a `busy` mark: exclusive
// (-1: a copy in progress, a move to hb files) or shared (>0: snapshot reads).
// Marks are taken all-or-nothing for a request, so there is no hold-and-wait
// and no deadlock. Device and file I/O always runs without the lock.
//
// Which live writes wait, and for how long (everything else passes through):
// - a write to a protected block whose copy or snapshot read is in progress
//   waits for that one I/O;
// - a write that needs memory slots while the memory buffer is full waits
//   for the mover at most `maxWriteWaitNanos` (1 s); then the session fails
//   and the write proceeds. The wait lets a short burst ride out a busy
//   buffer instead of losing the backup; the bound keeps the volume alive.

import DequeModule
import HotSync

public final class SnapshotEngine: @unchecked Sendable {
    public let config: EngineConfig
    public let device: BlockIO
    public let clock: SessionClock
    public let spill: SpillStore
    public let blockCount: UInt64

    let m = Monitor()
    let blockShift: UInt64

    // Session state (guarded by m).
    var phase: SessionPhase = .idle
    var failure: String?
    var consistency: Consistency = .freeze
    var generation: UInt64 = 0
    var beganAt: UInt64 = 0
    var armedAt: UInt64 = 0
    var lastHeartbeat: UInt64 = 0
    /// Clock time at which a session last stopped copying on write (ended,
    /// failed or dropped); nil before the first session.
    var passthroughSince: UInt64?
    var writesSinceArm: UInt64 = 0
    /// A wip map answered retry: the session waits for its client's next
    /// begin (accepted in `waiting` only then).
    var awaitingRetry = false
    /// Armed for a set cut: new writes wait until the map narrows the
    /// protection (every member of the set is armed by then), so no write
    /// that follows the cut on this volume can complete before another
    /// member's cut. Cleared by narrow, end, failure and the hold deadline.
    var holding = false

    // Write activity (guarded by m).
    var writesInFlight = 0
    var lastWriteEnd: UInt64 = 0
    var waitersForPause = 0

    // Block state (guarded by m).
    var used: BlockBitmap
    var protected: BlockBitmap
    var buffered: BlockBitmap
    var index: BufferIndex
    var busy = BusyMarks()

    // Change tracking (guarded by m; SnapshotEngine+Changes.swift). nil when
    // `config.trackChanges` is off.
    /// Clusters written since the last cut (or since tracking began).
    var changes: BlockBitmap?
    /// Clusters written before the current session's cut and since the last
    /// committed cut; empty outside a session.
    var pendingChanges: BlockBitmap?
    let clusterShift: UInt64
    /// Clusters of `changeClusterBytes` over the device (the last may be partial).
    public let clusterCount: UInt64

    // Memory tier.
    let arena: UnsafeMutableRawPointer
    let slotCount: Int
    var freeSlots: [Int32]
    var reservedSlots = 0
    var fifo: Deque<FifoItem> = []

    // Counters for status.
    var stats = EngineCounters()

    public init(device: BlockIO, spill: SpillStore, config: EngineConfig = EngineConfig(),
                clock: SessionClock = MonotonicClock()) {
        precondition(config.blockSize >= 512 && config.blockSize.nonzeroBitCount == 1)
        self.config = config
        self.device = device
        self.spill = spill
        self.clock = clock
        blockShift = UInt64(config.blockSize.trailingZeroBitCount)
        blockCount = (device.size + UInt64(config.blockSize) - 1) >> UInt64(config.blockSize.trailingZeroBitCount)
        used = BlockBitmap(blockCount: blockCount)
        protected = BlockBitmap(blockCount: blockCount)
        buffered = BlockBitmap(blockCount: blockCount)
        precondition(config.changeClusterBytes >= config.blockSize && config.changeClusterBytes.nonzeroBitCount == 1)
        clusterShift = UInt64(config.changeClusterBytes.trailingZeroBitCount)
        clusterCount = (device.size + UInt64(config.changeClusterBytes) - 1) >> clusterShift
        if config.trackChanges {
            changes = BlockBitmap(blockCount: clusterCount)
            pendingChanges = BlockBitmap(blockCount: clusterCount)
        }
        slotCount = max(1, config.memoryBufferBytes / config.blockSize)
        arena = UnsafeMutableRawPointer.allocate(byteCount: slotCount * config.blockSize, alignment: 4096)
        // Touch every page now so the buffer is resident (and locked, under
        // mlockall) before the first write needs it.
        arena.initializeMemory(as: UInt8.self, repeating: 0, count: slotCount * config.blockSize)
        freeSlots = (0..<Int32(slotCount)).reversed().map { $0 }
        index = BufferIndex(minimumCapacity: slotCount)
        lastWriteEnd = clock.now()
    }

    deinit { arena.deallocate() }

    struct BufferEntry {
        var inMemory: Bool
        var location: UInt64     // memory slot, or spill location
    }

    struct FifoItem {
        var block: UInt64
        var slot: Int32
        var storedAt: UInt64
    }

    @inline(__always) var bs: Int { config.blockSize }

    @inline(__always) func slotPointer(_ slot: Int32) -> UnsafeMutableRawPointer {
        arena + Int(slot) * config.blockSize
    }

    /// Blocks touched by the byte range (partial blocks included).
    @inline(__always) func blocks(offset: UInt64, length: UInt64) -> Range<UInt64> {
        guard length > 0 else { return 0..<0 }
        let first = offset >> blockShift
        let last = (offset + length - 1) >> blockShift
        return first..<min(last + 1, blockCount)
    }

    /// Blocks wholly inside the byte range.
    @inline(__always) func innerBlocks(offset: UInt64, length: UInt64) -> Range<UInt64> {
        let first = (offset + UInt64(bs) - 1) >> blockShift
        let end = min(offset + length, device.size)
        var last = end >> blockShift
        if end == device.size { last = blockCount }   // a partial last block counts as whole
        return first < last ? first..<last : first..<first
    }

    /// Bytes of block `b` that exist on the device.
    @inline(__always) func blockLength(_ b: UInt64) -> Int {
        let start = b << blockShift
        return Int(min(UInt64(bs), device.size - start))
    }

    /// Throws `outOfRange` unless offset..<offset+length lies on the device.
    public func checkRange(_ offset: UInt64, _ length: UInt64) throws {
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > device.size {
            throw EngineError.outOfRange(offset: offset, length: length, size: device.size)
        }
    }

    // MARK: busy marks (lock held)

    func anyBusy(_ runs: [Range<UInt64>]) -> Bool {
        if busy.isEmpty { return false }
        for r in runs { for b in r where busy[b] != nil { return true } }
        return false
    }

    func anyExclusive(_ blocks: Range<UInt64>) -> Bool {
        if busy.isEmpty { return false }
        for b in blocks { if let v = busy[b], v < 0 { return true } }
        return false
    }

    func markExclusive(_ runs: [Range<UInt64>]) {
        for r in runs { for b in r { busy[b] = -1 } }
    }

    func markShared(_ b: UInt64) { busy[b] = (busy[b] ?? 0) + 1 }

    func unmark(_ b: UInt64) {
        guard let v = busy[b] else { return }
        if v <= 1 { busy.removeValue(forKey: b) } else { busy[b] = v - 1 }
    }
}

/// Running counters, reported by `status`.
public struct EngineCounters: Sendable, Codable, Equatable {
    public var copies: UInt64 = 0            // blocks copied on write this session
    public var archivedBlocks: UInt64 = 0    // blocks released by the imager
    public var spilledBlocks: UInt64 = 0     // blocks moved memory → hb files
    public var writesDuringSession: UInt64 = 0
    public var peakMemoryBytes: UInt64 = 0
    public var peakSpillBytes: UInt64 = 0
    public var writeWaits: UInt64 = 0        // writes that waited for buffer room
    public var sessionsFailed: UInt64 = 0
    public var heldWrites: UInt64 = 0        // writes held by a set cut (arm to map)
    public init() {}
}
