// The point-in-time view: what the read-only `snapshot` export serves.
// Per block: buffered original → buffer; still protected → device;
// used but neither → archived (error); not used → zeros (a hole).

#if canImport(Glibc)
import Glibc
#endif

extension SnapshotEngine {
    enum Source {
        case zeros
        case device
        case memory(Int32)
        case spill(UInt64)
    }

    /// Reads the snapshot. Throws `noSession` outside armed/protecting,
    /// `archived` for a released block.
    public func snapshotRead(offset: UInt64, count: Int, into buf: UnsafeMutableRawPointer) throws {
        try checkRange(offset, UInt64(count))
        let range = blocks(offset: offset, length: UInt64(count))
        if range.isEmpty { return }
        var sources: [Source] = []
        sources.reserveCapacity(range.count)
        let gen: UInt64
        m.lock()
        while true {
            guard phase.copiesOnWrite else {
                let f = failure
                m.unlock()
                if let f { throw EngineError.sessionFailed(f) }
                throw EngineError.noSession
            }
            if !anyExclusive(range) { break }
            m.wait()
        }
        gen = generation
        for b in range {
            if let e = index[b] {
                sources.append(e.inMemory ? .memory(Int32(e.location)) : .spill(e.location))
                markShared(b)
            } else if protected.contains(b) {
                sources.append(.device)
                markShared(b)
            } else if used.contains(b) {
                // Drop the marks taken for the blocks before this one.
                for (k, s) in sources.enumerated() {
                    if case .zeros = s { continue }
                    unmark(range.lowerBound + UInt64(k))
                }
                m.broadcast()
                m.unlock()
                throw EngineError.archived(block: b)
            } else {
                sources.append(.zeros)
            }
        }
        m.unlock()

        var failure: Error?
        // Copy block by block; device reads are coalesced over runs.
        var i = 0
        let first = range.lowerBound
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: bs, alignment: 4096)
        defer { scratch.deallocate() }
        while i < sources.count && failure == nil {
            let b = first + UInt64(i)
            let blockStart = b << blockShift
            let lo = max(offset, blockStart)
            if case .device = sources[i] {
                var j = i
                while j + 1 < sources.count, case .device = sources[j + 1] { j += 1 }
                let runEnd = min((first + UInt64(j) + 1) << blockShift, offset + UInt64(count))
                do {
                    try device.read(into: buf + Int(lo - offset), count: Int(runEnd - lo), offset: lo)
                } catch { failure = error }
                i = j + 1
                continue
            }
            let hi = min(blockStart + UInt64(bs), offset + UInt64(count))
            let dst = buf + Int(lo - offset)
            let n = Int(hi - lo)
            let within = Int(lo - blockStart)
            switch sources[i] {
            case .zeros:
                memset(dst, 0, n)
            case .memory(let slot):
                dst.copyMemory(from: slotPointer(slot) + within, byteCount: n)
            case .spill(let loc):
                do {
                    try spill.load(loc, into: scratch, count: blockLength(b))
                    dst.copyMemory(from: scratch + within, byteCount: n)
                } catch { failure = error }
            case .device:
                break
            }
            i += 1
        }

        m.lock()
        for (k, s) in sources.enumerated() {
            if case .zeros = s { continue }
            unmark(first + UInt64(k))
        }
        let stillValid = generation == gen && phase.copiesOnWrite
        let f = self.failure
        m.broadcast()
        m.unlock()
        if let failure { throw failure }
        // The session failed while we read: the bytes may be from a reused slot.
        if !stillValid { throw EngineError.sessionFailed(f ?? "the session ended during the read") }
    }

    /// Allocation of the snapshot over a byte range, as (length, isHole)
    /// extents covering it exactly: holes are blocks outside the used map.
    public func snapshotExtents(offset: UInt64, length: UInt64) throws -> [(length: UInt64, hole: Bool)] {
        try checkRange(offset, length)
        return try m.withLock {
            guard phase.copiesOnWrite else { throw EngineError.noSession }
            let range = blocks(offset: offset, length: length)
            let end = offset + length
            // Build alternating extents from the used runs.
            var result: [(length: UInt64, hole: Bool)] = []
            var pos = offset
            let runs = used.runs(in: range)
            for r in runs {
                let s = max(r.lowerBound << blockShift, offset)
                let e = min(r.upperBound << blockShift, end)
                if s > pos { result.append((s - pos, true)) }
                if e > s { result.append((e - s, false)) }
                pos = max(pos, e)
            }
            if pos < end { result.append((end - pos, true)) }
            return result
        }
    }
}
