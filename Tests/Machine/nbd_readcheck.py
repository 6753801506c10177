#!/usr/bin/env python3
"""READs of a HotCore live export checked byte for byte, for t_live_reads.sh.

Pipelines batches of READs of many sizes (512 B to 2 MiB, so both sides of
the 1 MiB splice limit) at sector-aligned random offsets, including the
device's last bytes, and compares every reply with the device itself read
directly. Then WRITEs through the export and reads them back at once (a
spliced reply must show the new data), sends a pipelined burst of 300 small
WRITEs (some FUA) and checks each cookie is answered once and every block
reads back as last written, checks that a READ past the end gets
an error and the connection goes on, and that replies of interleaved
requests match their cookies.
Usage: nbd_readcheck.py NBD_SOCKET DEVICE SIZE {structured|simple} SEED
"""
import os, random, socket, struct, sys

SOCK, DEV, SIZE, MODE, SEED = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
IHAVEOPT = 0x49484156454F5054
REQ_MAGIC, SIMPLE_MAGIC, STRUCT_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
CMD_READ, CMD_WRITE = 0, 1
SECTOR = 512
rng = random.Random(SEED)
dev = os.open(DEV, os.O_RDONLY)


def fail(msg):
    print("readcheck: FAIL:", msg)
    sys.exit(1)


def recvn(s, n):
    parts, got = [], 0
    while got < n:
        c = s.recv(min(n - got, 1 << 20))
        if not c:
            fail("server closed after %d of %d bytes" % (got, n))
        parts.append(c)
        got += len(c)
    return b"".join(parts)


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        recvn(s, ln)
        if typ & 0x80000000:
            fail("option %d refused: type %x" % (opt, typ))
        if typ == 1:  # ACK
            return


def connect(structured):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(SOCK)
    greet = recvn(s, 18)
    if greet[:8] != b"NBDMAGIC":
        fail("bad greeting")
    s.sendall(struct.pack(">I", 3))
    if structured:
        option(s, OPT_STRUCTURED_REPLY)
    name = b"live"
    option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    return s


def send_request(s, cmd, cookie, offset, length, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, cookie, offset, length) + payload)


def read_reply(s, lengths):
    """One whole reply: (cookie, errno, data). `lengths` maps a READ's
    cookie to its length (a simple reply carries no length)."""
    magic = struct.unpack(">I", recvn(s, 4))[0]
    if magic == SIMPLE_MAGIC:
        err, cookie = struct.unpack(">IQ", recvn(s, 12))
        n = lengths.get(cookie, 0) if err == 0 else 0
        return cookie, err, recvn(s, n)
    if magic != STRUCT_MAGIC:
        fail("reply magic %x" % magic)
    data, err, cookie = b"", 0, None
    while True:
        flags, typ, cookie, ln = struct.unpack(">HHQI", recvn(s, 16))
        body = recvn(s, ln)
        if typ == 1:  # OFFSET_DATA
            off = struct.unpack(">Q", body[:8])[0]
            data += body[8:]
        elif typ & 0x8000:
            err = struct.unpack(">I", body[:4])[0]
        elif typ != 0:
            fail("unexpected structured reply type %d" % typ)
        if flags & 1:  # DONE
            return cookie, err, data
        magic = struct.unpack(">I", recvn(s, 4))[0]
        if magic != STRUCT_MAGIC:
            fail("chunk magic %x" % magic)


def expected(offset, length):
    return os.pread(dev, length, offset)


SIZES = [SECTOR, 4096, 3 * 4096 + SECTOR, 65536, 1 << 20, (1 << 20) + SECTOR, 2 << 20]
s = connect(MODE == "structured")
checked = 0
cookie = 100
for batch in range(12):
    reqs = {}
    for _ in range(16):
        length = rng.choice(SIZES)
        if rng.random() < 0.1:
            offset = SIZE - length  # the device's last bytes
        else:
            offset = rng.randrange(0, (SIZE - length) // SECTOR + 1) * SECTOR
        cookie += 1
        reqs[cookie] = (offset, length)
        send_request(s, CMD_READ, cookie, offset, length)
    lengths = {c: l for c, (o, l) in reqs.items()}
    for _ in range(len(reqs)):
        c, err, data = read_reply(s, lengths)
        if c not in reqs:
            fail("reply for unknown cookie %d" % c)
        offset, length = reqs.pop(c)
        if err:
            fail("READ %d+%d: errno %d" % (offset, length, err))
        if len(data) != length:
            fail("READ %d+%d: %d bytes" % (offset, length, len(data)))
        if data != expected(offset, length):
            fail("READ %d+%d: data differs from the device" % (offset, length))
        checked += 1

# Written data is read back at once, through the same connection.
for i in range(20):
    length = rng.choice([4096, 65536, 1 << 20])
    offset = rng.randrange(0, (SIZE - length) // 4096 + 1) * 4096
    payload = rng.randbytes(length)
    cookie += 1
    send_request(s, CMD_WRITE, cookie, offset, length, payload)
    c, err, _ = read_reply(s, {})
    if c != cookie or err:
        fail("WRITE %d+%d: cookie %d errno %d" % (offset, length, c, err))
    cookie += 1
    send_request(s, CMD_READ, cookie, offset, length)
    c, err, data = read_reply(s, {cookie: length})
    if c != cookie or err or data != payload:
        fail("READ after WRITE %d+%d: cookie %d errno %d, %s" %
             (offset, length, c, err, "same" if data == payload else "data differs"))
    checked += 1

# A pipelined burst of small WRITEs (their replies are batched by the
# server), some with FUA: every cookie answered once, then every block reads
# back as written (a later WRITE of the same block wins).
burst, blocks = {}, {}
writes = []
for i in range(300):
    length = rng.choice([512, 4096, 8192])
    offset = rng.randrange(0, (SIZE - length) // 4096 + 1) * 4096
    payload = rng.randbytes(length)
    cookie += 1
    flags = 1 if i % 37 == 0 else 0  # FUA
    writes.append(struct.pack(">IHHQQI", REQ_MAGIC, flags, CMD_WRITE, cookie, offset, length) + payload)
    burst[cookie] = (offset, length)
    for b in range(offset // SECTOR, (offset + length) // SECTOR):
        blocks[b] = payload[(b * SECTOR - offset):(b * SECTOR - offset) + SECTOR]
s.sendall(b"".join(writes))
for _ in range(len(burst)):
    c, err, _ = read_reply(s, {})
    if c not in burst or err:
        fail("burst WRITE reply: cookie %d (%s) errno %d" % (c, "known" if c in burst else "unknown or repeated", err))
    del burst[c]
for b, data in blocks.items():
    cookie += 1
    send_request(s, CMD_READ, cookie, b * SECTOR, SECTOR)
    c, err, got = read_reply(s, {cookie: SECTOR})
    if err or got != data:
        fail("block %d after the WRITE burst: errno %d, %s" % (b, err, "same" if got == data else "differs"))
checked += len(blocks)

# A READ past the end fails; the connection goes on.
cookie += 1
send_request(s, CMD_READ, cookie, SIZE - SECTOR, 2 * SECTOR)
c, past_err, _ = read_reply(s, {cookie: 2 * SECTOR})
if past_err == 0:
    fail("READ past the end succeeded")
cookie += 1
send_request(s, CMD_READ, cookie, 0, 4096)
c, err, data = read_reply(s, {cookie: 4096})
if err or data != expected(0, 4096):
    fail("READ after a refused READ: errno %d" % err)
print("readcheck: %s replies: %d READs equal to the device, past-end READ refused (errno %d)"
      % (MODE, checked + 1, past_err))
