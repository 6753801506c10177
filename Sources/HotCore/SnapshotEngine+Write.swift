// The live write path: WRITE, TRIM and WRITE_ZEROES all go through
// `mutate`, which copies the originals of protected blocks into the memory
// buffer before the device is changed. A session problem never fails the
// write: it fails the session (fail open).

#if canImport(Glibc)
import Glibc
#endif

extension SnapshotEngine {
    /// Live read: the device as it is now.
    public func read(offset: UInt64, count: Int, into buf: UnsafeMutableRawPointer) throws {
        try checkRange(offset, UInt64(count))
        try device.read(into: buf, count: count, offset: offset)
    }

    public func write(offset: UInt64, count: Int, from buf: UnsafeRawPointer) throws {
        try checkRange(offset, UInt64(count))
        try mutate(offset: offset, length: UInt64(count)) {
            try device.write(from: buf, count: count, offset: offset)
        }
    }

    /// TRIM (`unmap`) and WRITE_ZEROES: the range reads as zeros afterwards.
    public func zero(offset: UInt64, length: UInt64, unmap: Bool) throws {
        try checkRange(offset, length)
        try mutate(offset: offset, length: length) {
            try device.zero(offset: offset, length: length, unmap: unmap)
        }
    }

    public func flush() throws { try device.flush() }

    func mutate(offset: UInt64, length: UInt64, _ body: () throws -> Void) throws {
        m.lock()
        var counted = false
        if holding && phase == .armed {
            // A set cut: this write follows the cut; it waits until every
            // member is armed (the map releases it). It counts as a write
            // since arm (a wip map read is not trusted past it).
            writesSinceArm += 1
            stats.heldWrites += 1
            counted = true
            while holding && phase == .armed { m.wait() }
        }
        writesInFlight += 1
        // Marked in the same hold of the lock that counts the write in
        // flight: arming waits for no write in flight, so this write is
        // wholly before the cut (marked in `changes` before arm moves them to
        // pending) or wholly after it.
        if changes != nil { markChangedLocked(offset: offset, length: length) }
        if phase.copiesOnWrite {
            stats.writesDuringSession += 1
            if phase == .armed && !counted { writesSinceArm += 1 }
            copyBeforeWriteLocked(blocks(offset: offset, length: length))
        }
        m.unlock()
        defer {
            m.lock()
            writesInFlight -= 1
            lastWriteEnd = clock.now()
            if waitersForPause > 0 { m.broadcast() }
            m.unlock()
        }
        try body()
    }

    /// Copies the originals of the protected blocks in `range` into memory
    /// slots. Lock held on entry and on return; dropped for the device read.
    func copyBeforeWriteLocked(_ range: Range<UInt64>) {
        // A write larger than half the memory buffer is copied in pieces, so
        // the mover can empty slots between them (a 1 MiB request against a
        // 1 MiB buffer must not fail the session). The write itself goes on
        // only after every piece is copied.
        let piece = UInt64(max(1, slotCount / 2))
        if UInt64(range.count) > piece {
            var lo = range.lowerBound
            while lo < range.upperBound {
                let hi = min(range.upperBound, lo + piece)
                copyBeforeWriteLocked(lo..<hi)
                lo = hi
            }
            return
        }
        let gen = generation
        var need: [Range<UInt64>] = []
        while true {
            guard phase.copiesOnWrite, generation == gen else { return }
            need = protected.runs(in: range)
            if need.isEmpty { return }
            if !anyBusy(need) { break }
            m.wait()
        }
        markExclusive(need)
        let count = need.reduce(0) { $0 + Int($1.count) }

        // Room in the memory buffer: wait for the mover, bounded.
        if freeSlots.count < count {
            stats.writeWaits += 1
            let deadline = clock.now() &+ config.maxWriteWaitNanos
            m.broadcast()   // wake the mover
            while freeSlots.count < count && generation == gen && phase.copiesOnWrite {
                let now = clock.now()
                if now >= deadline || count > slotCount {
                    failLocked("the memory buffer stayed full for \(config.maxWriteWaitNanos / 1_000_000) ms: the buffer files could not take the copies fast enough")
                    break
                }
                m.wait(timeoutNanos: min(deadline - now, 20_000_000))
            }
            if freeSlots.count < count || generation != gen || !phase.copiesOnWrite {
                for r in need { for b in r { unmark(b) } }
                m.broadcast()
                return
            }
        }
        var slots: [Int32] = []
        slots.reserveCapacity(count)
        for _ in 0..<count { slots.append(freeSlots.removeLast()) }
        reservedSlots += count
        m.unlock()

        // Read the originals straight into their slots, one preadv-like pass
        // per contiguous run.
        var readError: Error?
        var i = 0
        for r in need {
            var iov: [(UnsafeMutableRawPointer, Int)] = []
            iov.reserveCapacity(r.count)
            for b in r {
                iov.append((slotPointer(slots[i]), blockLength(b)))
                i += 1
            }
            do { try device.read(into: iov, offset: r.lowerBound << blockShift) } catch {
                readError = error
                break
            }
        }

        m.lock()
        reservedSlots -= count
        if let e = readError {
            freeSlots.append(contentsOf: slots)
            failLocked("could not read originals for copy-on-write: \(e)")
        } else if generation == gen && phase.copiesOnWrite {
            let now = clock.now()
            i = 0
            for r in need {
                for b in r {
                    if used.contains(b) {
                        index[b] = BufferEntry(inMemory: true, location: UInt64(slots[i]))
                        fifo.append(FifoItem(block: b, slot: slots[i], storedAt: now))
                        buffered.insert(b)
                    } else {
                        // The map arrived during the copy and left this block out.
                        freeSlots.append(slots[i])
                    }
                    i += 1
                }
                protected.remove(range: r)
            }
            stats.copies += UInt64(count)
            let mem = UInt64(slotCount - freeSlots.count) * UInt64(bs)
            if mem > stats.peakMemoryBytes { stats.peakMemoryBytes = mem }
            if Double(slotCount - freeSlots.count) > config.highWater * Double(slotCount) { m.broadcast() }
        } else {
            freeSlots.append(contentsOf: slots)
        }
        for r in need { for b in r { unmark(b) } }
        m.broadcast()
    }
}
