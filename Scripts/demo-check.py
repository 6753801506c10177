#!/usr/bin/env python3
"""Checks a snapshot of Scripts/demo-writer.py's directory against its journal.

For each file the expected state at the cut is the last operation that
completed (END < CUT); an operation that straddles the cut (START < CUT <=
END) may or may not be in it, and then any state of that file is accepted.
Every file's content must match its own checksum line.
Usage: demo-check.py SNAPSHOT_DIR JOURNAL CUT_NS
"""
import hashlib, os, sys

d, journal, cut = sys.argv[1], sys.argv[2], int(sys.argv[3])
last, straddle = {}, set()
for line in open(journal):
    k, op, seq, start, end, sha = line.split()
    k, start, end = int(k), int(start), int(end)
    if end < cut:
        last[k] = (op, sha)
    elif start < cut:
        straddle.add(k)
bad, exact = [], 0
for k in range(200):
    path = os.path.join(d, "rec-%d.dat" % k)
    present = os.path.exists(path)
    if k in straddle:
        continue
    op, sha = last.get(k, ("del", "-"))
    if op == "del":
        if present:
            bad.append("rec-%d.dat exists but was deleted (or never written) before the cut" % k)
        else:
            exact += 1
        continue
    if not present:
        bad.append("rec-%d.dat missing; it was written before the cut" % k)
        continue
    data = open(path, "rb").read()
    head, _, body = data.partition(b"\n")
    if hashlib.sha256(body).hexdigest() != head.decode(errors="replace"):
        bad.append("rec-%d.dat is torn (checksum line does not match)" % k)
    elif head.decode() != sha:
        bad.append("rec-%d.dat holds another version than the last one before the cut" % k)
    else:
        exact += 1
print("demo-check: %d files as at the cut, %d straddling the cut, %d wrong" % (exact, len(straddle), len(bad)))
for b in bad[:10]:
    print("demo-check:   " + b)
sys.exit(1 if bad else 0)
