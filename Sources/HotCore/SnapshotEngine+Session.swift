// Session transitions: begin → (pause) → armed → protecting → end, and the
// deadlines that fail a session. See SessionPhase.swift for the diagram.

public enum ArmResult: Equatable, Sendable {
    case armed(at: UInt64)
    /// `maxWaitNanos` passed without a pause (the session goes on waiting).
    case noPause
    case timedOut
    case notWaiting(SessionPhase)
}

public enum NarrowResult: Equatable, Sendable {
    /// Protection narrowed to the map; the snapshot is complete.
    case protecting(usedBlocks: UInt64)
    /// Writes landed while the map was read without a freeze: back to
    /// waiting; the client begins the pause/arm/map cycle again.
    case retry(writes: UInt64)
}

/// What `tick` found.
public enum EngineEvent: Equatable, Sendable {
    case failed(String)
    case dropped(String)
}

extension SnapshotEngine {
    /// idle (or failed) → waiting. Returns the session generation. Also
    /// from waiting right after a wip map answered retry: the client's next
    /// try begins again (the daemon lets only the session's owner do so).
    @discardableResult
    public func begin(consistency: Consistency) throws -> UInt64 {
        try m.withLock {
            guard phase == .idle || phase == .failed || (phase == .waiting && awaitingRetry) else {
                throw EngineError.wrongPhase(expected: "idle", actual: phase)
            }
            if phase == .failed { resetLocked() }
            awaitingRetry = false
            // Stragglers of an earlier session (a copy or read still running
            // outside the lock) must finish before their marks and slots can
            // be reused.
            let limit = clock.now() + 5_000_000_000
            while (!busy.isEmpty || reservedSlots > 0) && clock.now() < limit {
                m.wait(timeoutNanos: 10_000_000)
            }
            generation &+= 1
            self.consistency = consistency
            phase = .waiting
            failure = nil
            beganAt = clock.now()
            lastHeartbeat = beganAt
            stats = EngineCounters()
            return generation
        }
    }

    /// Blocks until no write has been in flight for `pauseNanos` (or the
    /// snapshot deadline passes). With `arm`, arms copy-on-write at that
    /// instant, atomically with the check. Without, only reports the pause
    /// (the caller freezes, then calls `arm(pauseNanos: 0)`).
    public func waitForPause(pauseNanos: UInt64, arm: Bool, maxWaitNanos: UInt64? = nil, hold: Bool = false) -> ArmResult {
        m.lock()
        defer { m.unlock() }
        waitersForPause += 1
        defer { waitersForPause -= 1 }
        let started = clock.now()
        while true {
            guard phase == .waiting else { return .notWaiting(phase) }
            let now = clock.now()
            if let maxWait = maxWaitNanos, now &- started >= maxWait { return .noPause }
            if now >= beganAt &+ config.snapshotDeadlineNanos {
                failLocked("the snapshot was not complete within \(config.snapshotDeadlineNanos / 1_000_000_000) s: no write-inactivity pause of \(pauseNanos / 1_000_000) ms")
                return .timedOut
            }
            if writesInFlight == 0 && now &- lastWriteEnd >= pauseNanos {
                if arm { armLocked(now); holding = hold }
                return .armed(at: now)
            }
            let quiet = writesInFlight == 0 ? now &- lastWriteEnd : 0
            let wake = min(pauseNanos - min(quiet, pauseNanos), beganAt &+ config.snapshotDeadlineNanos &- now)
            m.wait(timeoutNanos: max(1_000_000, min(wake, 50_000_000)))
        }
    }

    /// Arms with the wait-for-pause rules (pause 0: only no write in flight).
    /// With `hold`, new writes wait from here until `narrow` (a set cut;
    /// see `holding`).
    public func arm(pauseNanos: UInt64 = 0, hold: Bool = false) -> ArmResult {
        waitForPause(pauseNanos: pauseNanos, arm: true, hold: hold)
    }

    /// Lets held writes go (lock held).
    func releaseHoldLocked() {
        guard holding else { return }
        holding = false
        m.broadcast()
    }

    func armLocked(_ now: UInt64) {
        phase = .armed
        armedAt = now
        lastHeartbeat = now
        writesSinceArm = 0
        used.fill()
        protected.fill()
        cutChangesLocked()
    }

    /// armed → protecting with the used-block map (byte ranges). Ranges are
    /// widened to whole blocks; `excluded` byte ranges are removed (only
    /// blocks they cover wholly).
    public func narrow(used usedRanges: [Range<UInt64>], excluded: [Range<UInt64>] = []) throws -> NarrowResult {
        try m.withLock {
            // Whatever the outcome, held writes go on (into the protection, or
            // past a disarmed engine on a retry or failure).
            defer { releaseHoldLocked() }
            guard phase == .armed else {
                if phase == .failed { throw EngineError.sessionFailed(failure ?? "") }
                throw EngineError.wrongPhase(expected: "armed", actual: phase)
            }
            if consistency == .wip && writesSinceArm > 0 {
                let w = writesSinceArm
                disarmLocked()
                // Reads still running hold slots just freed: make them fail
                // rather than return a slot reused after the next arm.
                generation &+= 1
                phase = .waiting
                awaitingRetry = true
                return .retry(writes: w)
            }
            for r in usedRanges + excluded where r.upperBound > r.lowerBound {
                try checkRange(r.lowerBound, r.upperBound - r.lowerBound)
            }
            var map = BlockBitmap(blockCount: blockCount)
            for r in usedRanges where r.upperBound > r.lowerBound {
                let b = blocks(offset: r.lowerBound, length: r.upperBound - r.lowerBound)
                map.insert(range: b)
            }
            for r in excluded where r.upperBound > r.lowerBound {
                map.remove(range: innerBlocks(offset: r.lowerBound, length: r.upperBound - r.lowerBound))
            }
            used = map
            protected.formIntersection(map)
            // Originals copied while armed for blocks outside the map are not needed.
            var drop: [UInt64] = []
            buffered.forEachRun(in: 0..<blockCount) { r in
                for b in r where !map.contains(b) { drop.append(b) }
            }
            // A snapshot read or a move to hb files may be using those
            // copies right now: let it finish before the slots are reused.
            let gen = generation
            while drop.contains(where: { busy[$0] != nil }) {
                m.wait()
                guard phase == .armed, generation == gen else {
                    throw EngineError.sessionFailed(failure ?? "the session ended while the map was applied")
                }
            }
            for b in drop { freeEntryLocked(b) }
            phase = .protecting
            return .protecting(usedBlocks: map.count)
        }
    }

    /// The imager archived [offset, offset+length): those blocks leave the
    /// protected area and their buffered originals are freed. Only blocks
    /// wholly inside the range count. Returns the number of blocks released.
    @discardableResult
    public func release(offset: UInt64, length: UInt64) throws -> UInt64 {
        try checkRange(offset, length)
        let r = innerBlocks(offset: offset, length: length)
        return try m.withLock {
            guard phase == .protecting else {
                if phase == .failed { throw EngineError.sessionFailed(failure ?? "") }
                throw EngineError.wrongPhase(expected: "protecting", actual: phase)
            }
            // Wait for copies and reads of these blocks to finish; the
            // session may end (or a new one begin) meanwhile.
            let gen = generation
            while anyBusy([r]) {
                m.wait()
                guard phase == .protecting, generation == gen else {
                    if phase == .failed { throw EngineError.sessionFailed(failure ?? "") }
                    if phase == .protecting { throw EngineError.sessionFailed("the session ended during the release") }
                    throw EngineError.wrongPhase(expected: "protecting", actual: phase)
                }
            }
            let before = protected.countSet(in: r) + buffered.countSet(in: r)
            protected.remove(range: r)
            var drop: [UInt64] = []
            buffered.forEachRun(in: r) { run in drop.append(contentsOf: run) }
            for b in drop { freeEntryLocked(b) }
            stats.archivedBlocks += before
            m.broadcast()
            return before
        }
    }

    public func heartbeat() {
        m.withLock { lastHeartbeat = clock.now() }
    }

    /// Ends the session (any phase) and returns to passthrough; the writes
    /// before its cut go back to the change map (no commit).
    public func end() { endSession(commit: false) }

    /// Ends the session (any phase) and returns to passthrough. With
    /// `commit`, and only if the session reached protecting (a complete
    /// snapshot that did not fail), the cut's changes are dropped: the
    /// backup of this snapshot holds them. Otherwise they merge back into
    /// the change map. Returns whether the cut was committed.
    @discardableResult
    public func endSession(commit: Bool) -> Bool {
        m.withLock {
            let committed = commit && phase == .protecting
            if committed { dropPendingChangesLocked() }
            if phase != .idle { resetLocked() }
            phase = .idle
            failure = nil
            m.broadcast()
            return committed
        }
    }

    /// Fails the session: passthrough, buffers dropped, reason kept for status.
    public func fail(_ reason: String) {
        m.withLock { failLocked(reason) }
    }

    func failLocked(_ reason: String) {
        guard phase != .idle && phase != .failed else { return }
        resetLocked()
        phase = .failed
        failure = reason
        stats.sessionsFailed += 1
        m.broadcast()
    }

    /// Drops copies and buffers; protection off. Lock held.
    func disarmLocked() {
        protected.removeAll()
        used.removeAll()
        var drop: [UInt64] = []
        buffered.forEachRun(in: 0..<blockCount) { drop.append(contentsOf: $0) }
        for b in drop { freeEntryLocked(b) }
        fifo.removeAll(keepingCapacity: true)
        writesSinceArm = 0
        releaseHoldLocked()
    }

    func resetLocked() {
        // Every way a session ends without a commit (end, failure, a lost
        // heartbeat) comes here: writes before the abandoned cut belong to
        // the next backup.
        mergePendingChangesLocked()
        awaitingRetry = false
        passthroughSince = clock.now()
        disarmLocked()
        spill.removeAll()
        generation &+= 1
    }

    /// Checks every deadline against the clock; call it often (≥ 2 Hz).
    public func tick() -> [EngineEvent] {
        m.withLock {
            let now = clock.now()
            switch phase {
            case .idle, .failed:
                return []
            case .waiting, .armed, .protecting:
                // While waiting for a pause the client is blocked in `begin`
                // and cannot heart-beat; the snapshot deadline bounds that phase.
                if phase != .waiting && now &- lastHeartbeat > config.heartbeatTimeoutNanos {
                    let reason = "no heartbeat from the session client for \(config.heartbeatTimeoutNanos / 1_000_000_000) s"
                    resetLocked()
                    phase = .idle
                    failure = nil
                    stats.sessionsFailed += 1
                    m.broadcast()
                    return [.dropped(reason)]
                }
                if holding && now &- armedAt > config.holdDeadlineNanos {
                    let reason = "writes were held \(config.holdDeadlineNanos / 1_000_000_000) s for a set cut and the map never came; writes go on and the session failed"
                    failLocked(reason)
                    return [.failed(reason)]
                }
                if phase != .protecting && now &- beganAt > config.snapshotDeadlineNanos {
                    let reason = "the snapshot was not complete within \(config.snapshotDeadlineNanos / 1_000_000_000) s"
                    failLocked(reason)
                    return [.failed(reason)]
                }
                if let age = oldestMemoryAgeLocked(now), age > config.memoryDeadlineNanos {
                    let reason = "buffered data was not processed within \(config.memoryDeadlineNanos / 1_000_000_000) s (a block stayed \(age / 1_000_000) ms in the memory buffer)"
                    failLocked(reason)
                    return [.failed(reason)]
                }
                return []
            }
        }
    }
}
