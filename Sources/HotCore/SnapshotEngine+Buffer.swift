// The COW buffer's two tiers. Originals enter the memory tier on the write
// path; the mover (a daemon thread calling `spillStep`) moves the oldest to
// the spill store (hb_NN.tmp files) when the memory tier passes its
// high-water mark or a block has waited `spillAfterNanos`. Archived blocks
// free their copy in either tier at once.

extension SnapshotEngine {
    /// Frees the buffered copy of `b`, if any. Lock held.
    func freeEntryLocked(_ b: UInt64) {
        guard let e = index.removeValue(forKey: b) else { return }
        buffered.remove(b)
        if e.inMemory {
            freeSlots.append(Int32(e.location))
        } else {
            spill.free(e.location)
        }
    }

    /// Age of the oldest block still in memory. Lock held; drops stale fifo items.
    func oldestMemoryAgeLocked(_ now: UInt64) -> UInt64? {
        while let first = fifo.first {
            if let e = index[first.block], e.inMemory, e.location == UInt64(first.slot) {
                return now &- first.storedAt
            }
            fifo.removeFirst()
        }
        return nil
    }

    var memorySlotsInUse: Int { slotCount - freeSlots.count - reservedSlots }

    /// Whether the mover has work now. Lock held.
    func spillWantedLocked(_ now: UInt64) -> Bool {
        guard phase.copiesOnWrite else { return false }
        if Double(slotCount - freeSlots.count) > config.highWater * Double(slotCount) { return true }
        if let age = oldestMemoryAgeLocked(now), age >= config.spillAfterNanos { return true }
        return false
    }

    /// Blocks the mover until there is spill work or `timeoutNanos` pass.
    public func waitForSpillWork(timeoutNanos: UInt64) -> Bool {
        m.withLock {
            if spillWantedLocked(clock.now()) { return true }
            m.wait(timeoutNanos: timeoutNanos)
            return spillWantedLocked(clock.now())
        }
    }

    /// Moves up to `maxBlocks` of the oldest memory blocks to the spill
    /// store. Returns how many moved. A spill failure fails the session.
    @discardableResult
    public func spillStep(maxBlocks: Int = 256) -> Int {
        m.lock()
        let gen = generation
        let now = clock.now()
        guard spillWantedLocked(now) else { m.unlock(); return 0 }
        var batch: [FifoItem] = []
        batch.reserveCapacity(maxBlocks)
        // Take the oldest entries that nobody is using.
        var skipped: [FifoItem] = []
        while batch.count < maxBlocks, let first = fifo.first {
            fifo.removeFirst()
            guard let e = index[first.block], e.inMemory, e.location == UInt64(first.slot) else { continue }
            if busy[first.block] != nil { skipped.append(first); continue }
            busy[first.block] = -1
            batch.append(first)
            // Below the high-water mark, move only the blocks that are old enough.
            if Double(memorySlotsInUse - batch.count) <= config.highWater * Double(slotCount),
               let next = fifo.first, now &- next.storedAt < config.spillAfterNanos { break }
        }
        for s in skipped.reversed() { fifo.prepend(s) }
        m.unlock()
        if batch.isEmpty { return 0 }

        var stored: [UInt64?] = Array(repeating: nil, count: batch.count)
        var failure: Error?
        do {
            let locs = try spill.store(batch: batch.map { (UnsafeRawPointer(slotPointer($0.slot)), blockLength($0.block)) })
            for i in locs.indices { stored[i] = locs[i] }
        } catch {
            failure = error
        }

        m.lock()
        defer { m.broadcast(); m.unlock() }
        var moved = 0
        for (i, item) in batch.enumerated() {
            unmark(item.block)
            guard let loc = stored[i] else { continue }
            if generation == gen, let e = index[item.block], e.inMemory, e.location == UInt64(item.slot) {
                index[item.block] = BufferEntry(inMemory: false, location: loc)
                freeSlots.append(item.slot)
                moved += 1
            } else {
                spill.free(loc)
            }
        }
        // Items that were not moved go back to the front, oldest first.
        if generation == gen {
            for (i, item) in batch.enumerated().reversed() where stored[i] == nil {
                fifo.prepend(item)
            }
        }
        stats.spilledBlocks += UInt64(moved)
        let sb = spill.bytesAllocated
        if sb > stats.peakSpillBytes { stats.peakSpillBytes = sb }
        if let f = failure, generation == gen {
            failLocked("could not move buffered blocks to the buffer files: \(f)")
        }
        return moved
    }

    /// Buffered blocks as byte ranges, lowest first, at most `limit` ranges:
    /// what emergency mode archives first.
    public func bufferedRanges(limit: Int = 1024) -> [Range<UInt64>] {
        m.withLock {
            var out: [Range<UInt64>] = []
            buffered.forEachRun(in: 0..<blockCount) { r in
                guard out.count < limit else { return }
                let end = min(r.upperBound << blockShift, device.size)
                out.append((r.lowerBound << blockShift)..<end)
            }
            return out
        }
    }
}
