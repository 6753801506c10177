#!/usr/bin/env python3
"""Hostile NBD and control-protocol client for t_bad_input.sh.

Sends malformed handshakes, out-of-range and oversized requests, unknown
commands, bad magics and half requests to a HotCore daemon, checking each
answer; exits non-zero with a message on the first unexpected behaviour.
Usage: nbd_badclient.py NBD_SOCKET CONTROL_SOCKET EXPORT_SIZE
"""
import json, socket, struct, sys

NBD_SOCK, CTL_SOCK, SIZE = sys.argv[1], sys.argv[2], int(sys.argv[3])
IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
EINVAL, ENOSPC, EOVERFLOW = 22, 28, 75
checks = 0


def fail(msg):
    print("badclient: FAIL:", msg)
    sys.exit(1)


def ok(what):
    global checks
    checks += 1
    print("badclient: ok  ", what)


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(NBD_SOCK)
    greet = recvn(s, 18)
    if greet[:8] != b"NBDMAGIC" or struct.unpack(">Q", greet[8:16])[0] != IHAVEOPT:
        fail("bad greeting %r" % greet)
    return s


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b


def closed(s):
    """True when the server closed the connection (EOF) within the timeout."""
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def go(s, name=b"live"):
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    while True:
        magic, opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        payload = recvn(s, ln)
        if typ == 1:
            return
        if typ & 0x80000000:
            fail("GO refused: type %x %r" % (typ, payload))


def request(s, cmd, offset, length, payload=b"", cookie=1, flags=0):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + payload)


def reply(s, cookie, readlen=0):
    magic, err, ck = struct.unpack(">IIQ", recvn(s, 16))
    if magic != SIMPLE_MAGIC:
        fail("reply magic %x" % magic)
    if ck != cookie:
        fail("reply cookie %d, expected %d" % (ck, cookie))
    data = recvn(s, readlen) if err == 0 and readlen else b""
    return err, data


# 1. Unknown client flags: the server closes.
s = connect()
s.sendall(struct.pack(">I", 0xF0000000))
closed(s) or fail("unknown client flags did not close the connection")
ok("unknown client flags close the handshake")

# 2. Garbage instead of IHAVEOPT.
s = connect()
s.sendall(struct.pack(">I", 3) + b"GARBAGE!" + b"\0" * 8)
closed(s) or fail("bad option magic did not close the connection")
ok("bad option magic closes the handshake")

# 3. A huge option length: refused without buffering it.
s = connect()
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 0x7FFFFFFF))
closed(s) or fail("a 2 GiB option was not refused")
ok("oversized option refused")

# 4. Unknown export.
s = connect()
s.sendall(struct.pack(">I", 3))
data = struct.pack(">I", 5) + b"nope!" + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
magic, opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
recvn(s, ln)
typ == 0x80000006 or fail("unknown export answered type %x" % typ)
ok("unknown export: NBD_REP_ERR_UNKNOWN")
s.close()

# 5. Transmission-phase mistakes on one connection; it keeps serving.
s = connect()
go(s)
request(s, 0, SIZE - 512, 4096, cookie=10)
err, _ = reply(s, 10)
err == EINVAL or fail("read past the end: errno %d" % err)
ok("read past the end: EINVAL")
request(s, 1, SIZE, 512, payload=b"x" * 512, cookie=11)
err, _ = reply(s, 11)
err in (ENOSPC, EINVAL) or fail("write past the end: errno %d" % err)
ok("write past the end: errno %d, payload skipped" % err)
request(s, 42, 0, 512, cookie=12)
err, _ = reply(s, 12)
err == EINVAL or fail("unknown command: errno %d" % err)
ok("unknown command: EINVAL")
request(s, 0, 0, 64 << 20, cookie=13)
err, _ = reply(s, 13)
err in (EOVERFLOW, EINVAL) or fail("64 MiB read: errno %d" % err)
ok("oversized read: errno %d" % err)
request(s, 0, 0, 4096, cookie=14, flags=0x8000)
err, _ = reply(s, 14)
err == EINVAL or fail("unknown flag: errno %d" % err)
ok("unknown command flag: EINVAL")
# Pipelined: three reads in one send, answered by cookie.
s.sendall(b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, 20 + i, i * 4096, 4096) for i in range(3)))
seen = set()
for _ in range(3):
    magic, err, ck = struct.unpack(">IIQ", recvn(s, 16))
    err == 0 or fail("pipelined read errno %d" % err)
    recvn(s, 4096)
    seen.add(ck)
seen == {20, 21, 22} or fail("pipelined cookies %r" % seen)
ok("pipelined reads answered")
request(s, 0, 0, 4096, cookie=30)
err, data = reply(s, 30, 4096)
(err == 0 and len(data) == 4096) or fail("valid read after errors failed")
ok("valid read after the errors")
s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 31, 0, 512))
closed(s) or fail("bad request magic did not close the connection")
ok("bad request magic closes the connection")

# 6. A client that vanishes mid-request.
s = connect()
go(s)
s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 1, 40, 0, 65536) + b"y" * 1000)
s.close()
ok("client vanished mid-write")

# 7. The snapshot export does not exist without a session.
s = connect()
s.sendall(struct.pack(">I", 3))
data = struct.pack(">I", 8) + b"snapshot" + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
magic, opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
typ == 0x80000006 or fail("snapshot export without session: type %x" % typ)
ok("no snapshot export while idle")
s.close()

# 8. Control protocol: garbage, unknown ops, ops out of order.
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.settimeout(10)
c.connect(CTL_SOCK)
f = c.makefile("rwb")


def call(line):
    f.write(line + b"\n")
    f.flush()
    r = f.readline()
    if not r:
        fail("control connection closed after %r" % line)
    return json.loads(r)


for line, what in [(b"this is not json", "garbage line"),
                   (b'{"no_op": 1}', "object without op"),
                   (b'{"op": "explode"}', "unknown op"),
                   (b'{"op": "map", "used": [[0, 4096]]}', "map before begin"),
                   (b'{"op": "archived", "ranges": [[0, 4096]]}', "archived without a session"),
                   (b'{"op": "begin", "consistency": "sideways"}', "unknown consistency"),
                   (b'{"op": "begin", "consistency": "freeze", "mountPoint": "/nonexistent"}', "freeze of a non-mount")]:
    r = call(line)
    (r.get("ok") is False and r.get("error")) or fail("%s accepted: %r" % (what, r))
    ok("control: %s refused (%s)" % (what, r["error"][:60]))
r = call(b'{"op": "status"}')
r.get("ok") or fail("status after garbage: %r" % r)
r["status"]["engine"]["phase"] == "idle" or fail("phase after garbage: %r" % r["status"]["engine"]["phase"])
ok("control still answers; session idle")
# A session whose map is out of order ranges: begin raw, send a bad range.
r = call(b'{"op": "begin", "consistency": "raw", "pauseMs": 0}')
r.get("ok") or fail("raw begin: %r" % r)
r = call(b'{"op": "map", "used": [[4096, 0]]}')
r.get("ok") is False or fail("inverted range accepted")
ok("control: inverted range refused")
r = call(b'{"op": "archived", "ranges": [[0, 4096]]}')
r.get("ok") is False or fail("archived while armed accepted")
ok("control: archived before the map refused")
r = call(b'{"op": "end"}')
r.get("ok") or fail("end: %r" % r)
c.close()
print("badclient: %d checks passed" % checks)
