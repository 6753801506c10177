#!/usr/bin/env python3
"""Filesystem churn with a journal, for Scripts/demo.

Keeps creating, overwriting and deleting files rec-K.dat (K < FILES) under a
directory; every file is 64 KiB whose first line holds its own SHA-256 of the
rest. Each operation is fsync'd (file and directory) and then recorded in the
journal (outside the volume) as: K OP SEQ START_NS END_NS SHA, with
CLOCK_MONOTONIC times, so a checker can compute the state at any cut.
Runs until STOPFILE exists. With PAUSEFILE and ACKFILE, it stops between
operations while PAUSEFILE exists and says so by creating ACKFILE (removed
when it goes on): a before-snapshot hook can hold it at a known state.
"""
import hashlib, os, random, sys, time

d, journal, stopfile = sys.argv[1], sys.argv[2], sys.argv[3]
pausefile = sys.argv[4] if len(sys.argv) > 4 else None
ackfile = sys.argv[5] if len(sys.argv) > 5 else None
FILES = 200
rnd = random.Random(1)
j = open(journal, "w")
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
seq = 0
while not os.path.exists(stopfile):
    for _ in range(rnd.randint(5, 40)):
        seq += 1
        k = rnd.randrange(FILES)
        path = os.path.join(d, "rec-%d.dat" % k)
        start = time.monotonic_ns()
        if rnd.random() < 0.15:
            op, sha = "del", "-"
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        else:
            op = "put"
            body = ("seq %d file %d\n" % (seq, k)).encode() + os.urandom(65536 - 200)
            sha = hashlib.sha256(body).hexdigest()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, sha.encode() + b"\n" + body)
            os.fsync(fd)
            os.close(fd)
        os.fsync(dfd)
        j.write("%d %s %d %d %d %s\n" % (k, op, seq, start, time.monotonic_ns(), sha))
    j.flush()
    if pausefile and os.path.exists(pausefile):
        open(ackfile, "w").close()
        while os.path.exists(pausefile) and not os.path.exists(stopfile):
            time.sleep(0.01)
        os.unlink(ackfile)
    time.sleep(rnd.choice([0.01, 0.05, 0.3]))
j.close()
