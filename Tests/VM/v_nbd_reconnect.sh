#!/usr/bin/env bash
# Kernel NBD attach (--via nbd) survives a daemon kill -9: the kernel holds
# I/O for the dead-connection timeout, `attach --reconnect` hands it new
# sockets, the writer under load sees no error, every write it completed is
# on the device, e2fsck is clean. Negative control: without a reconnect
# within the timeout, writes fail with EIO. A dead daemon's leftovers are
# cleaned up by `detach`.
source "$(dirname "$0")/../Machine/lib.sh"
[ -n "${HOTIMAGE_IN_VM:-}" ] || skip "runs inside Scripts/vm-test only (needs the nbd driver)"

attach_new r 256M --via nbd --dead-conn-timeout 60 --nbd-timeout 5
case "$DEV" in /dev/nbd[0-9]*) ;; *) fail "--via nbd gave $DEV, not /dev/nbdN" ;; esac
idx=${DEV#/dev/nbd}
assert "/dev/hotimage/r points at $DEV" test "$(readlink /dev/hotimage/r)" = "$DEV"
assert "backend identifier is ours" grep -q '^hotimage:r:' "/sys/block/nbd$idx/backend"
assert "size matches the real device" test "$(blockdev --getsize64 "$DEV")" = "$(blockdev --getsize64 "$BASE")"
mkfs.ext4 -q -E nodiscard "$DEV" || fail "mkfs.ext4 on $DEV"
mkdir -p "$W/mnt"; mount "$DEV" "$W/mnt" || fail "mount"

# Writer: file i holds i repeated; its number is recorded only after fsync.
cat > "$W/writer.py" <<'PY'
import os, sys, signal, time
d, done = sys.argv[1], sys.argv[2]
stop = False
def h(*a):
    global stop; stop = True
signal.signal(signal.SIGTERM, h)
i = 0
with open(done, "a") as log:
    while not stop:
        data = (b"%08d" % i) * 4096
        p = os.path.join(d, "f%d" % i)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, data); os.fsync(fd); os.close(fd)
        log.write("%d %.3f\n" % (i, time.time())); log.flush()
        i += 1
PY
python3 "$W/writer.py" "$W/mnt" "$W/done" 2>"$W/writer.err" &
wpid=$!
sleep 3
before=$(wc -l < "$W/done")
[ "$before" -gt 10 ] || fail "the writer completed only $before files before the kill"
old=$(cat "$RUN/r/pid")
kill -9 "$old"
log "killed daemon $old after $before files"
sleep 2
kill -0 $wpid 2>/dev/null || fail "the writer died while the daemon was down: $(cat "$W/writer.err")"
stalled=$(wc -l < "$W/done")
out=$(H attach "$BASE" --name r --via nbd --reconnect --dead-conn-timeout 60 --nbd-timeout 5 --buffer-dir "$W/hb-r") || fail "reconnect: $out"
[ "$(echo "$out" | tail -1)" = "$DEV" ] || fail "reconnect gave $(echo "$out" | tail -1), not $DEV"
grep -q "reconnected /dev/nbd$idx" "$RUN/r/daemon.log" || fail "the new daemon did not reconnect (log: $(tail -3 "$RUN/r/daemon.log"))"
# Requests the dead daemon had taken are resent after --nbd-timeout (5 s).
sleep 9
kill -TERM $wpid; wait $wpid
wrc=$?
after=$(wc -l < "$W/done")
log "files: $before before the kill, $stalled while down, $after at the end"
[ $wrc = 0 ] || fail "the writer failed (exit $wrc): $(cat "$W/writer.err")"
[ "$after" -gt $((stalled + 10)) ] || fail "writes did not continue after the reconnect ($stalled -> $after)"
sync
python3 - "$W/mnt" "$W/done" <<'PY' || fail "a completed write is missing or wrong"
import os, sys
d, done = sys.argv[1], sys.argv[2]
bad = 0
for line in open(done):
    i = int(line.split()[0])
    want = (b"%08d" % i) * 4096
    got = open(os.path.join(d, "f%d" % i), "rb").read()
    if got != want:
        bad += 1
        print("file f%d: %d bytes, differs" % (i, len(got)))
sys.exit(1 if bad else 0)
PY
umount "$W/mnt" || fail "umount"
e2fsck -fn "$DEV" >"$W/fsck" 2>&1 || { cat "$W/fsck"; fail "e2fsck after the reconnect"; }
dmesg | grep -i "nbd$idx.*I/O error\|blk_update_request.*nbd$idx" && fail "the kernel logged I/O errors on nbd$idx"
H detach r >/dev/null || fail "detach"
[ -e /dev/hotimage/r ] && fail "/dev/hotimage/r still there after detach"
[ "$(cat /sys/block/nbd$idx/size)" = 0 ] || fail "nbd$idx still configured after detach"

# Negative control: no reconnect within a 2 s timeout -> writes fail.
attach_new n 64M --via nbd --dead-conn-timeout 2
kill -9 "$(cat "$RUN/n/pid")"
sleep 4
if dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct 2>/dev/null; then
  fail "negative control: a write succeeded with the daemon dead past the timeout"
fi
out=$(H detach n) || fail "detach after a dead daemon: $out"
echo "$out" | grep -q "disconnected $DEV" || fail "detach did not disconnect $DEV: $out"
[ "$(cat /sys/block/${DEV#/dev/}/size)" = 0 ] || fail "$DEV still configured after cleanup"
log "ok: reconnect under load, negative control, dead-daemon cleanup"
