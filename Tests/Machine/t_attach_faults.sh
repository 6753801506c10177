#!/usr/bin/env bash
# Attachment faults (issue 14), --via fuse:
#  a. attach refuses a buffer directory on a device stacked on the real
#     device (a loop over it, mounted, holding the directory);
#  b. the user's story: attach with --buffer-dir under a directory over
#     which the protected device is mounted afterwards, hb created in it,
#     files written, backup: the session start refuses (the path is on the
#     protected volume now), the volume keeps working, every write lands;
#     without hb in the new mount the held descriptor keeps the hb files
#     off the volume and the snapshot and backup complete;
#  c. kill -9 of the daemon under a mounted ext4 with a writer: what the
#     filesystem sees (recorded), status lists the leftovers and changes
#     nothing (loops, mounts, run directory, nbdfuse, link compared before
#     and after), detach refuses
#     while mounted and says what to do, after umount it removes everything
#     (loop, FUSE mount, run directory, link); re-attach + e2fsck recovers;
#     and kill -9 with nbdfuse stopped (left alive) or killed too.
#  PARTS="a b w b2 c c2" (default all) runs only some, to show each fails
#  without the change it guards.
source "$(dirname "$0")/lib.sh"
PARTS=" ${PARTS:-a b w b2 c c2} "
part() { [[ $PARTS == *" $1 "* ]]; }

STACKS=()
extra_cleanup() {
  set +e
  grep " $W" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  for s in "${STACKS[@]}"; do losetup -d "$s" 2>/dev/null; done
  cleanup
}
trap extra_cleanup EXIT

# A file writer on a mounted filesystem: random 4 KiB pwrites into FILE
# with a pause every 512 writes (so a write-inactivity point exists);
# stops at STOP, fsyncs and writes the file's expected sha256 to FILE.want.
# Exits 1 at the first failed write (an error a backup caused).
cat > "$W/fw.py" <<'PY'
import hashlib, os, random, sys, time
path, stop, prog = sys.argv[1], sys.argv[2], sys.argv[3]
size = os.path.getsize(path); blocks = size // 4096
data = bytearray(open(path, "rb").read())
fd = os.open(path, os.O_RDWR); n = 0; rnd = random.Random(7)
while not os.path.exists(stop):
    b = rnd.randrange(blocks); buf = os.urandom(4096)
    os.pwrite(fd, buf, b * 4096); data[b*4096:(b+1)*4096] = buf
    n += 1
    if n % 16 == 0: os.fsync(fd)
    if n % 512 == 0: time.sleep(0.3)
    if n % 64 == 0: open(prog + ".tmp", "w").write(f"{n}\n"); os.replace(prog + ".tmp", prog)
os.fsync(fd); os.close(fd)
open(path + ".want", "w").write(hashlib.sha256(data).hexdigest())
PY
start_fw() {  # file
  rm -f "$W/fw.stop"
  python3 "$W/fw.py" "$1" "$W/fw.stop" "$W/fw.prog" > "$W/fw.out" 2>&1 &
  FW=$!
  wait_until 20 test -s "$W/fw.prog" || fail "the file writer did not start: $(cat "$W/fw.out")"
}
stop_fw_and_check() {  # file what
  touch "$W/fw.stop"
  wait $FW || fail "$2: a live write failed: $(cat "$W/fw.out")"
  [ "$(sha256sum < "$1" | cut -d' ' -f1)" = "$(cat "$1.want")" ] || fail "$2: $1 does not hold every write"
  sync; echo 3 > /proc/sys/vm/drop_caches
  [ "$(sha256sum < "$1" | cut -d' ' -f1)" = "$(cat "$1.want")" ] || fail "$2: $1 differs after dropping caches"
  log "$2: $(cat "$W/fw.prog") writes, all landed"
}
progress() { cat "$W/fw.prog" 2>/dev/null || echo 0; }

# a. A loop device over the real device, mounted, holds the buffer directory.
if part a; then
BASE=$(make_loop "$W/stack.img" 64M)
STACK=$(losetup -f --show "$BASE") || fail "losetup over $BASE"
STACKS+=("$STACK")
mkfs.ext4 -q -F "$STACK" || fail "mkfs $STACK"
mkdir -p "$W/stack"; mount "$STACK" "$W/stack" || fail "mount $STACK"
# The refusal names the directory and the device.
expect_exit 2 "buffer directory $W/stack/hb is on $STACK \\(mounted on $W/stack\\), stacked on" -- H attach "$BASE" --name hit-stack --buffer-dir "$W/stack/hb"
grep -q "another volume" <<< "$EXIT_OUT" || fail "refusal does not say what to do: $EXIT_OUT"
[ -e "$RUN/hit-stack/pid" ] && fail "a refused attach left a daemon"
log "a. stacked loop: $(tail -1 <<< "$EXIT_OUT")"
umount "$W/stack"; losetup -d "$STACK"
fi

# b. The user's story: --buffer-dir under /srv/adv, then the protected device
#    mounted at /srv/adv and hb made inside it, files written, backup.
# volume_over_its_buffer NAME [attach options]: the user's story. Attach a
# new 256 MiB loop as hit-NAME with --buffer-dir $W/srv/NAME/hb, then make
# ext4 on the protected device, mount it at $W/srv/NAME (over the buffer
# directory's parent), make hb inside it and a 64 MiB file. Sets BASE, DEV,
# HBDIR. The directory attach made is 0700 whatever the umask.
volume_over_its_buffer() {
  local n=$1; shift
  BASE=$(make_loop "$W/$n.img" 256M)
  HBDIR=$W/srv/$n/hb
  mkdir -p "$W/srv/$n"
  local out
  out=$(H attach "$BASE" --name "hit-$n" --buffer-dir "$HBDIR" --memory-buffer 1M --hb-file-size 8M "$@") || fail "attach hit-$n: $out"
  DEV=$(echo "$out" | tail -1)
  [ "$(stat -c %a "$HBDIR")" = 700 ] || fail "the buffer directory attach made is $(stat -c %a "$HBDIR"), not 700"
  mkfs.ext4 -q -F "$DEV" || fail "mkfs $DEV"
  mount "$DEV" "$W/srv/$n" || fail "mount $DEV"
  mkdir "$HBDIR"
  head -c 64M /dev/urandom > "$W/srv/$n/data"; sync
}

if part b; then
volume_over_its_buffer adv
start_fw "$W/srv/adv/data"
t0=$(date +%s)
out=$(timeout 120 "$HOTIMAGE" backup --run-dir "$RUN" hit-adv -o "$W/adv.qcow2" 2>&1); rc=$?
secs=$(( $(date +%s) - t0 ))
[ $rc != 0 ] && [ $rc != 124 ] || fail "backup with the buffer directory on the volume exited $rc after $secs s: $out"
echo "$out" | grep -q "buffer directory $W/srv/adv/hb (as its path resolves now) is on $DEV (mounted on $W/srv/adv), a device of attachment 'hit-adv'" \
  || fail "backup refusal does not name the directory and device: $out"
[ -e "$W/adv.qcow2" ] && fail "a refused backup left an image"
p=$(status_json hit-adv | json_get "['engine']['phase']")
[ "$p" = idle ] || fail "phase after the refused session: $p"
before=$(progress); sleep 2; [ "$(progress)" -gt "$before" ] || fail "writes stopped after the refused session"
[ -z "$(ls -A "$W/srv/adv/hb")" ] || fail "hb files on the volume: $(ls "$W/srv/adv/hb")"
log "b. backup refused in $secs s (exit $rc): $(echo "$out" | grep -m1 "buffer directory")"
stop_fw_and_check "$W/srv/adv/data" "b. refused session"
umount "$W/srv/adv" || fail "umount $W/srv/adv"
H detach hit-adv >/dev/null || fail "detach hit-adv"
fi

# w. The wedge itself, with the check and the held descriptor switched off
#    (HOTIMAGE_TEST_BUFFER_ON_VOLUME=1, tests only): hb files really go
#    through the protected volume. No live write may wait without bound on
#    the daemon's own hb I/O: the backup ends (the session may fail), the
#    writer never stops for good, every write lands. (Before the hb store
#    stopped unlinking under the engine's lock, this hung for good: writer
#    and jbd2 in D state, the daemon in vfs_unlink, 'status' hanging.)
if part w; then
HOTIMAGE_TEST_BUFFER_ON_VOLUME=1 volume_over_its_buffer wedge --buffer-deadline 2
start_fw "$W/srv/wedge/data"
t0=$(date +%s)
# A snapshot held for 8 s keeps copy-on-write (and the movers) busy, then a backup.
out=$(timeout 60 "$HOTIMAGE" snapshot --run-dir "$RUN" hit-wedge -- sleep 8 2>&1); src=$?
ssecs=$(( $(date +%s) - t0 ))
[ $src != 124 ] || fail "w: the snapshot hung for 60 s with hb files on the volume (state of the writer: $(cut -d' ' -f3 /proc/$FW/stat))"
log "w. snapshot held 8 s: ended in $ssecs s, exit $src: $(echo "$out" | grep -m1 -iE "failed|taken")"
t0=$(date +%s)
out=$(timeout 120 "$HOTIMAGE" backup --run-dir "$RUN" hit-wedge -o "$W/wedge.qcow2" 2>&1); rc=$?
secs=$(( $(date +%s) - t0 ))
[ $rc != 124 ] || fail "w: the backup hung for 120 s with hb files on the volume (state of the writer: $(cut -d' ' -f3 /proc/$FW/stat))"
before=$(progress); sleep 3
[ "$(progress)" -gt "$before" ] || fail "w: live writes stopped after the backup (writer state $(cut -d' ' -f3 /proc/$FW/stat))"
sp=$(status_json hit-wedge | json_get "['engine']['counters']['spilledBlocks']")
log "w. hb files on the volume ($sp blocks spilled): backup ended in $secs s, exit $rc: $(echo "$out" | grep -m1 -E "summary|snapshot failed|failed:")"
stop_fw_and_check "$W/srv/wedge/data" "w. hb files on the volume"
umount "$W/srv/wedge" || fail "umount $W/srv/wedge"
H detach hit-wedge --force >/dev/null || fail "detach hit-wedge"
fi

# b2. The same mount over the parent, without hb inside: the path names
#     nothing now; the daemon's held descriptor keeps the hb files in the
#     directory it opened at attach (on the test's filesystem, not the volume).
if part b2; then
BASE=$(make_loop "$W/held.img" 256M)
mkdir -p "$W/srv/held"
out=$(H attach "$BASE" --name hit-held --buffer-dir "$W/srv/held/hb" --memory-buffer 256K --hb-file-size 4M) || fail "attach hit-held: $out"
DEV=$(echo "$out" | tail -1)
pid=$(cat "$RUN/hit-held/pid")
mkfs.ext4 -q -F "$DEV" || fail "mkfs $DEV"
mount "$DEV" "$W/srv/held" || fail "mount $DEV"
head -c 64M /dev/urandom > "$W/srv/held/data"; sync
start_fw "$W/srv/held/data"
H snapshot hit-held -- sleep 8 > "$W/held.snap" 2>&1 &
SNAP=$!
hbfds() { find /proc/"$pid"/fd -lname '*hb_*.tmp' 2>/dev/null; }
wait_until 30 sh -c "find /proc/$pid/fd -lname '*hb_*.tmp' 2>/dev/null | grep -q ." || fail "b2: no hb files were opened: $(cat "$W/held.snap")"
nhb=$(hbfds | wc -l)
voldev=$(stat -c %d "$W/srv/held"); tmpdev=$(stat -c %d "$W")
for f in $(hbfds); do
  d=$(stat -L -c %d "$f")
  [ "$d" != "$voldev" ] || fail "b2: $(readlink "$f") is on the protected volume"
  [ "$d" = "$tmpdev" ] || fail "b2: $(readlink "$f") is on device $d, not the directory opened at attach ($tmpdev)"
  [ "$(stat -L -c %a "$f")" = 600 ] || fail "b2: $(readlink "$f") is $(stat -L -c %a "$f"), not 600"
done
[ -e "$W/srv/held/hb" ] && fail "b2: hb appeared on the volume"
wait $SNAP || fail "b2: snapshot failed: $(cat "$W/held.snap")"
out=$(timeout 300 "$HOTIMAGE" backup --run-dir "$RUN" hit-held -o "$W/held.qcow2" 2>&1) || fail "b2: backup failed: $out"
log "b2. hb files in the held directory ($nhb open during the snapshot, none on the volume); backup: $(echo "$out" | grep -m1 summary)"
stop_fw_and_check "$W/srv/held/data" "b2. held directory"
umount "$W/srv/held" || fail "umount $W/srv/held"
H detach hit-held >/dev/null || fail "detach hit-held"
fi

# c. kill -9 of the daemon under a mounted ext4 with a writer.
gone_checks() {  # name
  local n=$1
  losetup -a | grep -q "$RUN/$n/fuse/disk" && fail "$n: a loop over the dead FUSE file is left: $(losetup -a | grep "$RUN/$n/")"
  grep -q " $RUN/$n/fuse " /proc/mounts && fail "$n: the FUSE mount is left"
  [ -e "$RUN/$n" ] && fail "$n: the run directory is left: $(ls -A "$RUN/$n")"
  [ -e "/dev/hotimage/$n" ] && fail "$n: /dev/hotimage/$n is left"
  pgrep -f "$RUN/$n/fuse/disk" >/dev/null && fail "$n: an nbdfuse process is left"
  H status | grep -q "$n" && fail "$n: status still lists it"
  return 0
}
# What `status` must not change for NAME: loops, mounts, the run directory,
# nbdfuse processes, the link.
kernel_state() {  # name
  losetup -a | sort; cat /proc/self/mounts; ls -A "$RUN/$1" 2>&1
  pgrep -f "$RUN/$1/fuse/disk"; readlink "/dev/hotimage/$1"
}
# status_leaves_alone NAME LABEL [status args]: prints status's output.
status_leaves_alone() {
  local n=$1 label=$2 st; shift 2
  kernel_state "$n" > "$W/state.before"
  st=$(H status "$@" 2>&1) || fail "$label: status failed: $st"
  kernel_state "$n" > "$W/state.after"
  cmp -s "$W/state.before" "$W/state.after" || fail "$label: status changed kernel state: $(diff "$W/state.before" "$W/state.after" | tr '\n' ' ')"
  echo "$st"
}
if part c; then
attach_new hit-kill 128M
mkfs.ext4 -q -F "$DEV" || fail "mkfs $DEV"
mkdir -p "$W/kill"; mount "$DEV" "$W/kill" || fail "mount $DEV"
head -c 32M /dev/urandom > "$W/kill/data"; sync
rm -f "$W/fw.stop" "$W/fw.prog"
python3 "$W/fw.py" "$W/kill/data" "$W/fw.stop" "$W/fw.prog" > "$W/kill.fw" 2>&1 &
FW=$!
wait_until 20 test -s "$W/fw.prog" || fail "c: writer did not start"
dmesg -C 2>/dev/null
kill -9 "$(cat "$RUN/hit-kill/pid")"
# The writer must get an error, not hang (no daemon will ever answer).
wait_until 20 sh -c "! kill -0 $FW 2>/dev/null" || fail "c: the writer still runs 20 s after the daemon died (state $(cut -d' ' -f3 /proc/$FW/stat))"
wait $FW; log "c. writer after kill -9: exit $?, $(tail -1 "$W/kill.fw")"
sleep 1
log "c. kernel: $(dmesg 2>/dev/null | grep -oE "I/O error, dev [a-z0-9]+|Buffer I/O error on dev(ice)? [a-z0-9]+|Aborting journal|Detected aborted journal|Remounting filesystem read-only|I/O error while writing superblock" | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
log "c. touch: $(touch "$W/kill/new" 2>&1); ls works: $(ls "$W/kill" | wc -l) entries"
st=$(status_leaves_alone hit-kill c) || exit 1
echo "$st" | grep -q "hit-kill: daemon dead" || fail "c: status does not list the dead daemon: $st"
echo "$st" | grep -q "loop device $DEV over $RUN/hit-kill/fuse/disk, mounted on $W/kill" || fail "c: status does not show the loop: $st"
echo "$st" | grep -q "hotimage detach hit-kill" || fail "c: status gives no hint: $st"
losetup -a | grep -q "$RUN/hit-kill/fuse/disk" || fail "c: status changed kernel state (the loop is gone)"
out=$(H detach hit-kill 2>&1) && fail "c: detach succeeded with $DEV mounted: $out"
echo "$out" | grep -q "unmount it first ('umount $W/kill'" || fail "c: detach refusal does not say what to do: $out"
H status hit-kill | grep -q "daemon dead" || fail "c: the refused detach dropped the records"
timeout 60 umount "$W/kill" || fail "c: umount of the filesystem on the dead device failed or hung"
out=$(H detach hit-kill 2>&1) || fail "c: detach after umount failed: $out"
log "c. detach: $(echo "$out" | tr '\n' ';')"
gone_checks hit-kill
# Recovery: attach the real device again, fsck, mount.
out=$(H attach "$BASE" --name hit-kill --buffer-dir "$W/hb-hit-kill") || fail "c: re-attach failed: $out"
DEV=$(echo "$out" | tail -1)
e2fsck -fy "$DEV" > "$W/kill.fsck" 2>&1; rc=$?
[ $rc -le 1 ] || fail "c: e2fsck after the kill exited $rc: $(tail -5 "$W/kill.fsck")"
e2fsck -fn "$DEV" > /dev/null 2>&1 || fail "c: the filesystem is not clean after e2fsck -fy"
mount "$DEV" "$W/kill" && umount "$W/kill" || fail "c: mount after recovery"
log "c. recovery: re-attach + e2fsck -fy exit $rc, clean, mounts"
H detach hit-kill >/dev/null || fail "c: detach after recovery"
fi

# c2. nbdfuse left alive (stopped) when the daemon is killed; c3. both killed.
part c2 && for n in hit-kill2 hit-kill3; do
  attach_new $n 64M
  nf=$(pgrep -f "$RUN/$n/fuse/disk") || fail "$n: no nbdfuse"
  if [ $n = hit-kill2 ]; then kill -STOP $nf; kill -9 "$(cat "$RUN/$n/pid")"
  else kill -9 "$(cat "$RUN/$n/pid")" $nf; fi
  sleep 0.5
  st=$(status_leaves_alone $n $n $n) || exit 1
  echo "$st" | grep -q "daemon dead" || fail "$n: status: $st"
  [ $n = hit-kill2 ] && { echo "$st" | grep -q "nbdfuse process $nf" || fail "$n: status does not show nbdfuse: $st"; }
  out=$(H detach $n 2>&1) || fail "$n: detach failed: $out"
  gone_checks $n
  log "$n: $(echo "$out" | grep -v "left by" | tr '\n' ';')"
done
log "ok"
