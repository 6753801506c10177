#!/usr/bin/env bash
# Issue 14's fault matrix, part 2: resources that run out or slow down while
# a stamped writer keeps writing into a file on the mounted ext4.
#   buffer directory full (a 2 MiB tmpfs): the session fails (exit 3), every
#     live write lands, the next backup works once the tmpfs is larger;
#   output directory full (a 16 MiB filesystem): exit 1, partial removed,
#     HotCore idle, live writes land;
#   a slow buffer disk (its loop device throttled for the daemon by the
#     blkio controller): emergency mode engages, then the buffer deadline
#     fails the session cleanly (exit 3), live writes land;
#   a 4 TiB sparse ext4 (lazy inode-table init): attach, backup, detach; the
#     daemon's peak RSS stays within the memory buffer + 64 MiB and the
#     freeze lasts under 1 s (both printed by the backup's summary).
source "$(dirname "$0")/lib.sh"

BLOCKS=2048
CG=
# The blkio cgroup of case 3 goes away even when the test fails.
drop_cgroup() {
  [ -n "$CG" ] && [ -d "$CG" ] || return 0
  # Lift the limit first: bios already queued under it would otherwise
  # drain at the throttled rate and hold up umount and detach for minutes.
  echo "$HBMAJMIN 0" > "$CG/blkio.throttle.write_bps_device"
  for p in $(cat "$CG/cgroup.procs"); do echo "$p" > /sys/fs/cgroup/blkio/cgroup.procs; done
  rmdir "$CG"
}
trap 'drop_cgroup; cleanup' EXIT

start_writer() {  # mnt pause_ms
  rm -f "$W/w.stop" "$W/w.ready"
  truncate -s $((BLOCKS * 4096)) "$1/stamped"
  "$STAMP" write "$1/stamped" --log "$W/w.log" --blocks $BLOCKS --threads 2 --stop-file "$W/w.stop" \
      --burst-ms 300 --pause-ms "$2" --seed $RANDOM --ready-file "$W/w.ready" > "$W/w.out" 2>&1 &
  WRITER=$!
  wait_until 60 test -f "$W/w.ready" || fail "writer init did not finish"
}

stop_writer_check() {  # case mnt
  touch "$W/w.stop"
  wait $WRITER; local rc=$?
  [ $rc = 0 ] || { cat "$W/w.out"; fail "$1: live writes failed (writer exit $rc)"; }
  "$STAMP" check "$W/w.log" "$2/stamped" > "$W/$1.live" 2>&1 || { cat "$W/$1.live"; fail "$1: the live file lost writes"; }
}

# idle_clean CASE NAME: no session, no hb files, not frozen.
idle_clean() {
  wait_until 5 sh -c "[ \"\$('$HOTIMAGE' status $2 --json --run-dir '$RUN' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"engine\"][\"phase\"])')\" != protecting ]" \
      || fail "$1: the session did not end"
  local st; st=$(status_json "$2")
  echo "$st" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["engine"]["phase"] in ("idle","failed"), d["engine"]["phase"]; assert d.get("frozen") is None' \
      || fail "$1: not idle or frozen: $st"
  ls "$W/hb-$2"/hb_*.tmp >/dev/null 2>&1 && fail "$1: hb files left"
  return 0
}

# fresh NAME SIZE [attach options]: attach, mkfs, mount at $W/mnt-NAME, 24 MiB of data.
fresh() {
  local name=$1 size=$2; shift 2
  attach_new "$name" "$size" --heartbeat-timeout 3 "$@"
  MNT=$W/mnt-$name
  mkfs.ext4 -q -F "$DEV" && mkdir -p "$MNT" && mount "$DEV" "$MNT" || fail "$name: mkfs/mount"
  head -c 24M /dev/urandom > "$MNT/filler.bin"
  sync
}

T0=$(date +%s)
# 1. The buffer directory fills up.
case_buffull() {
name=hit-buffull
mkdir -p "$W/hb-$name" && mount -t tmpfs -o size=2M tmpfs "$W/hb-$name" || fail "tmpfs"
fresh $name 128M --memory-buffer 256K --hb-file-size 1M
start_writer "$MNT" 0
expect_exit 3 "" --out "$W/$name.err" -- H backup $name -o "$W/$name.qcow2" --max-rate 2M --emergency-at 64M
[ -e "$W/$name.qcow2" ] && fail "$name: the failed backup left its image"
idle_clean $name $name
stop_writer_check $name "$MNT"
log "$name: exit 3: $(grep 'backup failed' "$W/$name.err" | sed 's/.*backup failed: //' | cut -c1-150)"
mount -o remount,size=64M "$W/hb-$name" || fail "$name: grow the tmpfs"
start_writer "$MNT" 200
H backup $name -o "$W/$name.qcow2" > /dev/null 2> "$W/$name.next" || { cat "$W/$name.next"; fail "$name: the next backup failed"; }
HI verify "$W/$name.qcow2" > /dev/null || fail "$name: the next image does not verify"
stop_writer_check $name "$MNT"
log "$name: the next backup with room in the buffer directory: ok"
umount "$MNT"; H detach $name > /dev/null || fail "$name: detach"; umount "$W/hb-$name"
}

# 2. The output directory fills up.
case_outfull() {
name=hit-outfull
fresh $name 128M
OUTDEV=$(make_loop "$W/out.img" 16M)
mkfs.ext4 -q -F "$OUTDEV" && mkdir -p "$W/outsmall" && mount "$OUTDEV" "$W/outsmall" && rmdir "$W/outsmall/lost+found" || fail "output fs"
start_writer "$MNT" 200
expect_exit 1 "" --out "$W/$name.err" -- H backup $name -o "$W/outsmall/$name.qcow2" --compress none
[ -z "$(ls -A "$W/outsmall")" ] || fail "$name: left in the full output directory: $(ls -A "$W/outsmall")"
idle_clean $name $name
stop_writer_check $name "$MNT"
log "$name: exit 1, nothing left: $(grep 'backup failed' "$W/$name.err" | sed 's/.*backup failed: //' | cut -c1-150)"
umount "$W/outsmall"
umount "$MNT"; H detach $name > /dev/null || fail "$name: detach"
}

# 3. A slow buffer disk: the hb files' filesystem on a loop device whose
#    writes the blkio controller throttles for the daemon. cgroup v2 here has
#    no io controller (it is bound to the v1 blkio hierarchy), so v1's
#    blkio.throttle.write_bps_device; hb files are written with O_DIRECT,
#    which the throttle sees.
case_slowbuf() {
name=hit-slowbuf
BLKIO=/sys/fs/cgroup/blkio
if [ -w "$BLKIO/cgroup.procs" ] || [ -w /sys/fs/cgroup/unified/cgroup.procs ]; then
  HBDEV=$(make_loop "$W/hbdisk.img" 64M)
  mkfs.ext4 -q -F "$HBDEV" && mkdir -p "$W/hb-$name" && mount "$HBDEV" "$W/hb-$name" || fail "hb fs"
  fresh $name 128M --memory-buffer 1M --hb-file-size 1M --buffer-deadline 3
  pid=$(status_json $name | json_get "['pid']")
  CG=$BLKIO/hit-slowbuf-$$
  mkdir "$CG" || fail "$name: cannot create a blkio cgroup"
  HBMAJMIN=$(stat -c '%t:%T' "$HBDEV" | python3 -c 'import sys; a,b=sys.stdin.read().split(":"); print("%d:%d" % (int(a,16), int(b,16)))')
  echo "$HBMAJMIN 262144" > "$CG/blkio.throttle.write_bps_device" || fail "$name: blkio throttle refused"
  echo "$pid" > "$CG/cgroup.procs" || fail "$name: cannot move the daemon into the cgroup"
  start_writer "$MNT" 0
  H backup $name -o "$W/$name.qcow2" --max-rate 3M --emergency-at 256K --workers 1 --json > "$W/$name.events" 2> "$W/$name.err"; rc=$?
  drop_cgroup; CG=
  grep '"event":"summary"' "$W/$name.events" | python3 -c 'import json,sys; assert json.load(sys.stdin)["summary"]["emergencyEpisodes"]' \
      || { tail -5 "$W/$name.err"; fail "$name: the summary shows no emergency mode"; }
  [ $rc = 3 ] || { tail -5 "$W/$name.err"; fail "$name: backup exited $rc, expected 3 (the buffer deadline)"; }
  # Either bound on buffered data: a block older than the buffer deadline, or
  # the memory buffer full for longer than the daemon lets a write wait.
  grep -Eq "buffered data was not processed within 3 s|the memory buffer stayed full" "$W/$name.err" \
      || { tail -5 "$W/$name.err"; fail "$name: not a buffer bound"; }
  [ -e "$W/$name.qcow2" ] && fail "$name: the failed backup left its image"
  idle_clean $name $name
  stop_writer_check $name "$MNT"
  log "$name: emergency mode engaged, then exit 3: $(grep -h 'backup failed' "$W/$name.err" "$W/$name.events" | head -1 | sed 's/.*backup failed: //' | cut -c1-120)"
  umount "$MNT"; H detach $name > /dev/null || fail "$name: detach"; umount "$W/hb-$name"
else
  log "$name skipped: no writable blkio cgroup here"
fi
}

# 4. A 4 TiB sparse ext4, lazy inode-table init (the default), few inodes
#    and a small journal so the map (bitmaps, tables, journal) stays small.
case_4t() {
name=hit-4t
attach_new $name 4T --heartbeat-timeout 3 --memory-buffer 16M
MNT=$W/mnt-$name
mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=1 -i 67108864 -J size=16 "$DEV" || fail "$name: mkfs"
mkdir -p "$MNT" && mount "$DEV" "$MNT" || fail "$name: mount"
for i in 1 2 3; do head -c 4M /dev/urandom > "$MNT/f$i"; done
sync
H backup $name -o "$W/$name.qcow2" --json > "$W/$name.events" 2> "$W/$name.err" || { tail -5 "$W/$name.err"; fail "$name: backup"; }
grep "summary:" "$W/$name.err" | sed 's/^/    /'
grep -q "session daemon peak RSS" "$W/$name.err" || fail "$name: the summary does not print the daemon's peak RSS"
grep -q "filesystem frozen" "$W/$name.err" || fail "$name: the summary does not print the freeze"
grep '"event":"summary"' "$W/$name.events" | python3 -c '
import json,sys; s=json.load(sys.stdin)["summary"]
# The daemon runs under mlockall: its program and libraries (RssFile) are
# resident whatever it does; the bound is on the rest, its own memory.
rss, files, frz = s["daemonPeakRSSBytes"], s["daemonFileRSSBytes"], s["freezeSeconds"]
print("[t_backup_resources] hit-4t: daemon peak RSS %.1f MiB = %.1f MiB program and libraries + %.1f MiB own (limit 16 + 64 MiB); freeze %.3f s; %.1f MiB used; %.1f s" % (
  rss / 2**20, files / 2**20, (rss - files) / 2**20, frz, s["usedBytes"] / 2**20, s["seconds"]))
assert rss - files <= (16 + 64) << 20, "peak own memory %d over the memory buffer + 64 MiB" % (rss - files)
assert frz < 1.0, "the freeze lasted %.3f s" % frz
' || fail "$name: RSS or freeze over the limit"
HI verify "$W/$name.qcow2" > /dev/null || fail "$name: verify"
rm -f "$W/$name.qcow2"
umount "$MNT"; H detach $name > /dev/null || fail "$name: detach"
losetup -d "$BASE"; rm -f "$W/$name.img"
}

for c in ${RES_ONLY:-buffull outfull slowbuf 4t}; do case_$c; done
log "ok in $(( $(date +%s) - T0 )) s"
