// A consistent picture of the engine for `hotimage status` and the control
// protocol.

public struct EngineStatus: Sendable, Codable, Equatable {
    public var phase: SessionPhase
    public var failure: String?
    public var consistency: Consistency?
    public var blockSize: Int
    public var deviceBytes: UInt64
    public var usedBlocks: UInt64
    public var protectedBlocks: UInt64
    public var bufferedBlocks: UInt64
    public var memoryBlocks: Int
    public var memoryBytes: UInt64
    public var memoryCapacityBytes: UInt64
    public var spillBytes: UInt64
    public var spillFiles: Int
    public var oldestMemoryAgeMs: UInt64?
    public var armedAtNanos: UInt64?
    public var secondsSinceBegin: Double?
    public var secondsSinceHeartbeat: Double?
    /// Engine clock (CLOCK_MONOTONIC in the daemon) when the last session
    /// stopped copying on write: ended, failed or dropped.
    public var passthroughSinceNanos: UInt64?
    /// Engine clock of the last `begin` (nil before the first session).
    public var lastBeginNanos: UInt64?
    public var mapMemoryBytes: Int
    public var writesInFlight: Int
    public var counters: EngineCounters
    public var deadlines: Deadlines

    public struct Deadlines: Sendable, Codable, Equatable {
        public var snapshotSeconds: Double
        public var memorySeconds: Double
        public var heartbeatSeconds: Double
        public var pauseMs: Double
    }
}

extension SnapshotEngine {
    public var currentPhase: SessionPhase { m.withLock { phase } }
    public var failureReason: String? { m.withLock { failure } }

    public func status() -> EngineStatus {
        m.withLock {
            let now = clock.now()
            let active = phase != .idle
            let memBlocks = slotCount - freeSlots.count - reservedSlots
            return EngineStatus(
                phase: phase,
                failure: failure,
                consistency: active ? consistency : nil,
                blockSize: bs,
                deviceBytes: device.size,
                usedBlocks: used.count,
                protectedBlocks: protected.count,
                bufferedBlocks: buffered.count,
                memoryBlocks: memBlocks,
                memoryBytes: UInt64(memBlocks) * UInt64(bs),
                memoryCapacityBytes: UInt64(slotCount) * UInt64(bs),
                spillBytes: spill.bytesAllocated,
                spillFiles: spill.fileCount,
                oldestMemoryAgeMs: oldestMemoryAgeLocked(now).map { $0 / 1_000_000 },
                armedAtNanos: phase.copiesOnWrite ? armedAt : nil,
                secondsSinceBegin: active ? Double(now &- beganAt) / 1e9 : nil,
                secondsSinceHeartbeat: active ? Double(now &- lastHeartbeat) / 1e9 : nil,
                passthroughSinceNanos: passthroughSince,
                lastBeginNanos: beganAt == 0 ? nil : beganAt,
                mapMemoryBytes: used.memoryBytes + protected.memoryBytes + buffered.memoryBytes,
                writesInFlight: writesInFlight,
                counters: stats,
                deadlines: .init(snapshotSeconds: Double(config.snapshotDeadlineNanos) / 1e9,
                                 memorySeconds: Double(config.memoryDeadlineNanos) / 1e9,
                                 heartbeatSeconds: Double(config.heartbeatTimeoutNanos) / 1e9,
                                 pauseMs: Double(config.pauseNanos) / 1e6))
        }
    }
}
