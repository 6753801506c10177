#!/usr/bin/env python3
"""Ordered writes across volumes, for coherent-set tests.

set-writer.py STOPFILE FILE1 FILE2 [FILE...]: for n = 1, 2, ...: appends the
line "n" to FILE1 and fsyncs it, then to FILE2 and fsyncs, and so on, with no
pause, until STOPFILE exists. So at any moment the last record of FILE(k+1)
is that of FILE(k) or one less; an image of the set taken at one point in
time keeps that. Prints the last n on exit.
"""
import os
import sys

stop, files = sys.argv[1], sys.argv[2:]
fds = [os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for f in files]
n = 0
while not os.path.exists(stop):
    n += 1
    rec = b"%d\n" % n
    for fd in fds:
        os.write(fd, rec)
        os.fsync(fd)
print(n)
