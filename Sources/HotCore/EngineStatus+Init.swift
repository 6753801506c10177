// A public factory, so that another backend (the dm-snapshot daemon) can
// report its session in the same shape as the engine does (the synthesized
// memberwise initializers are internal to HotCore).
extension EngineStatus {
    public static func reported(phase: SessionPhase, failure: String?, consistency: Consistency?, blockSize: Int,
                                deviceBytes: UInt64, usedBlocks: UInt64, protectedBlocks: UInt64, bufferedBlocks: UInt64,
                                memoryBlocks: Int, memoryBytes: UInt64, memoryCapacityBytes: UInt64, spillBytes: UInt64,
                                spillFiles: Int, oldestMemoryAgeMs: UInt64?, armedAtNanos: UInt64?,
                                secondsSinceBegin: Double?, secondsSinceHeartbeat: Double?, mapMemoryBytes: Int,
                                writesInFlight: Int, counters: EngineCounters, deadlines: Deadlines) -> EngineStatus {
        EngineStatus(phase: phase, failure: failure, consistency: consistency, blockSize: blockSize, deviceBytes: deviceBytes,
                     usedBlocks: usedBlocks, protectedBlocks: protectedBlocks, bufferedBlocks: bufferedBlocks,
                     memoryBlocks: memoryBlocks, memoryBytes: memoryBytes, memoryCapacityBytes: memoryCapacityBytes,
                     spillBytes: spillBytes, spillFiles: spillFiles, oldestMemoryAgeMs: oldestMemoryAgeMs,
                     armedAtNanos: armedAtNanos, secondsSinceBegin: secondsSinceBegin,
                     secondsSinceHeartbeat: secondsSinceHeartbeat, mapMemoryBytes: mapMemoryBytes,
                     writesInFlight: writesInFlight, counters: counters, deadlines: deadlines)
    }
}

extension EngineStatus.Deadlines {
    public static func reported(snapshotSeconds: Double, memorySeconds: Double, heartbeatSeconds: Double,
                                pauseMs: Double) -> EngineStatus.Deadlines {
        EngineStatus.Deadlines(snapshotSeconds: snapshotSeconds, memorySeconds: memorySeconds,
                               heartbeatSeconds: heartbeatSeconds, pauseMs: pauseMs)
    }
}
