import Foundation
import Testing
import HotOS
#if canImport(Glibc)
import Glibc
#endif

// SplicePipe: file bytes into a pipe, then into a socket, without a copy in
// the process. Each test writes its own file under /tmp and a socketpair.

private final class SpliceFixture {
    let path: String
    let fd: Int32
    let bytes: [UInt8]
    var sv: [Int32] = [-1, -1]

    init(size: Int, seed: UInt64) {
        path = "/tmp/splicepipe-test-\(getpid())-\(UUID().uuidString)"
        var x = seed
        bytes = (0..<size).map { _ in
            x = x &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: x >> 56)
        }
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        fd = open(path, O_RDONLY)
        precondition(fd >= 0 && socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &sv) == 0)
        // Room for a whole pipe in the socket, so drain never waits for a reader.
        var big: Int32 = 4 << 20
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit {
        close(fd); close(sv[0]); close(sv[1])
        unlink(path)
    }

    func receive(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = out.withUnsafeMutableBytes { read(sv[1], $0.baseAddress! + got, count - got) }
            if n <= 0 { break }
            got += n
        }
        return Array(out[0..<got])
    }
}

@Test func spliceMovesFileRangesToASocket() throws {
    let f = SpliceFixture(size: 3 << 20, seed: 7)
    let pipe = try SplicePipe(capacity: 1 << 20)
    #expect(pipe.capacity >= 1 << 20)
    // Aligned, unaligned, tiny, a whole pipe, the file's last bytes.
    let ranges: [(UInt64, Int)] = [(0, 4096), (4096 * 5 + 100, 9000), (12345, 1), (1 << 20, 1 << 20),
                                   (UInt64(f.bytes.count - 777), 777), (511, (1 << 20) - 4096)]
    for (offset, count) in ranges {
        #expect(SplicePipe.bytesSpanned(offset: offset, count: count) <= pipe.capacity)
        try pipe.fill(from: f.fd, offset: offset, count: count)
        #expect(pipe.buffered == count)
        try pipe.drain(to: f.sv[0])
        #expect(pipe.buffered == 0)
        let got = f.receive(count)
        #expect(got == Array(f.bytes[Int(offset)..<Int(offset) + count]), "range \(offset)+\(count)")
    }
}

@Test func spliceBytesSpannedCountsWholePages() {
    #expect(SplicePipe.bytesSpanned(offset: 0, count: 4096) == 4096)
    #expect(SplicePipe.bytesSpanned(offset: 0, count: 4097) == 8192)
    #expect(SplicePipe.bytesSpanned(offset: 512, count: 4096) == 8192)
    #expect(SplicePipe.bytesSpanned(offset: 4095, count: 1) == 4096)
    #expect(SplicePipe.bytesSpanned(offset: 4095, count: 2) == 8192)
    #expect(SplicePipe.bytesSpanned(offset: 512, count: 1 << 20) == (1 << 20) + 4096)
}

@Test func spliceRangePastTheEndIsAnError() throws {
    let f = SpliceFixture(size: 10000, seed: 3)
    let pipe = try SplicePipe(capacity: 1 << 20)
    #expect(throws: OSError.self) { try pipe.fill(from: f.fd, offset: 8192, count: 4096) }
    // What the file had before its end went into the pipe; the caller closes it.
    #expect(pipe.buffered == 10000 - 8192)
}

@Test func spliceIntoAFullPipeFailsInsteadOfWaiting() throws {
    // An unaligned range of a whole pipe's size needs one page more than the
    // pipe has: the fill must stop with EAGAIN, not block for good.
    let f = SpliceFixture(size: 3 << 20, seed: 5)
    let pipe = try SplicePipe(capacity: 1 << 20)
    let count = pipe.capacity
    #expect(SplicePipe.bytesSpanned(offset: 512, count: count) > pipe.capacity)
    do {
        try pipe.fill(from: f.fd, offset: 512, count: count)
        Issue.record("filled \(count) bytes over \(count + 4096) bytes of pages")
    } catch let e as OSError {
        #expect(e.errno == EAGAIN)
    }
}

// The daemon turns splicing off for good when a fill fails with EINVAL and
// nothing reached the pipe (NBDConnection.spliceRead): the kernel's answer
// for a source it cannot splice from. A directory is such a source on every
// kernel (no splice_read), so that answer is checked here.
@Test func aSourceTheKernelCannotSpliceGivesEINVALWithNothingBuffered() throws {
    let dir = open("/tmp", O_RDONLY | O_DIRECTORY)
    #expect(dir >= 0)
    defer { close(dir) }
    let pipe = try SplicePipe(capacity: 1 << 20)
    defer { pipe.close() }
    do {
        try pipe.fill(from: dir, offset: 0, count: 4096)
        Issue.record("splice from a directory succeeded")
    } catch let e as OSError {
        #expect(e.errno == EINVAL, "\(e)")
    }
    #expect(pipe.buffered == 0)
}
