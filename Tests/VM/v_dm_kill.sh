#!/usr/bin/env bash
# The dm-snapshot watchdog and leftovers, each with the state checked before
# (so the test can fail) and after:
# 1. kill -9 of the backup process mid-backup (attach --via dm): within 10 s
#    no snapshot devices, no loops over hb files, no hb files; the origin
#    maps its data directly; the daemon lives on, idle.
# 2. The same with a transient daemon (an existing dm device): it also exits.
# 3. SIGSTOP of the backup process (heartbeat silence, --heartbeat-timeout 3):
#    the session is dropped although the stopped process still holds the
#    snapshot device open (error table, deferred remove).
# 5. A client that begins and never sends its map (--snapshot-deadline 2):
#    the session fails after 2 s and the snapshot is removed while the
#    client is still connected.
# 4. kill -9 of the session daemon mid-backup: the backup fails; the stack
#    stays (the kernel keeps it); `hotimage status` lists it and changes
#    nothing (dm devices and tables, loops, hb files, run directory, mounts
#    compared before and after); `detach` while the linear device is mounted
#    removes the stack, restores the origin and deletes the files, then
#    refuses (exit 1) to remove the mounted linear device; after umount it
#    removes that too. The live volume checks clean throughout.
# 6. kill -9 of a transient session daemon (an existing dm device) mid-backup:
#    `status` lists and changes nothing; `detach NAME` (NAME: the dm device's
#    name) restores the origin's table and removes snapshot, COW, REAL, the
#    loops, the hb files and the run directory.
source "$(dirname "$0")/dm-lib.sh"

# start_backup SOURCE NAME [opts]: a slow backup in the background; waits
# until its snapshot exists. Sets BPID.
start_backup() {
  local src=$1 name=$2; shift 2
  # Not through H (a function: $! would be a subshell, not hotimage).
  "$HOTIMAGE" backup "$src" --run-dir "$RUN" -o "$W/$name.qcow2" --max-rate 1M --workers 1 "$@" > "$W/$name.out" 2> "$W/$name.err" &
  BPID=$!
  wait_until 30 test -b "/dev/mapper/hotimage-$name-snap" || {
    # What the backup and its children are doing; a crashed one's backtrace
    # takes a while under TCG, so give it time to be written in full.
    ps -eo pid,ppid,stat,etime,args | grep -E "[h]otimage" >&2
    wait_until 90 sh -c "! kill -0 $BPID 2>/dev/null" || true
    cat "$W/$name.err"; fail "$name: the snapshot device never appeared"; }
  sleep 0.5
  losetup -a | grep -q "hb_00.tmp" || fail "$name: no loop over hb_00.tmp during the session (the test proves nothing)"
}

fill() {  # MNT: some data, so the backup takes a while at 1 MB/s
  head -c 24M /dev/urandom > "$1/data.bin"; sync
}

# What `status` must not change: dm devices and tables, loops, hb files,
# run directories, mounts.
kernel_state() {
  dmsetup ls | sort; dmsetup table | sort; losetup -a | sort
  ls -A "$@" "$RUN"/* 2>&1; grep -F " $W" /proc/self/mounts
}
# status_leaves_alone NAME LABEL HBDIR: status lists NAME's leftovers and changes nothing.
status_leaves_alone() {
  local n=$1 label=$2 hbdir=$3
  kernel_state "$hbdir" > "$W/state.before"
  H status > "$W/status.out" 2> "$W/status.err" || { cat "$W/status.err"; fail "$label: status failed"; }
  kernel_state "$hbdir" > "$W/state.after"
  cmp -s "$W/state.before" "$W/state.after" || fail "$label: status changed kernel state: $(diff "$W/state.before" "$W/state.after" | tr '\n' ' ')"
  grep -q "^$n: daemon dead" "$W/status.out" || fail "$label: status does not list the dead daemon: $(cat "$W/status.out")"
  grep -q "hotimage-$n-snap" "$W/status.out" || fail "$label: status does not list the snapshot device: $(cat "$W/status.out")"
  grep -q "loop device .* over .*hb_00.tmp" "$W/status.out" || fail "$label: status does not list the loop over hb_00.tmp: $(cat "$W/status.out")"
  grep -q "remove with: hotimage detach $n" "$W/status.out" || fail "$label: status gives no hint: $(cat "$W/status.out")"
  H status $n | grep -q "^$n: daemon dead" || fail "$label: status $n does not list the dead daemon"
  dm_session_gone $n "$hbdir" && fail "$label: the leftovers are gone after status"
  return 0
}

# 1. kill -9 of the backup process
name=hitdm-k1
dm_attach $name 64M --hb-file-size 8M --buffer-limit 64M
linear=$(dm_table "$DEV")
mkfs_ext4 "$DEV" && mkdir -p "$W/m1" && mount "$DEV" "$W/m1" || fail "mount"
fill "$W/m1"
start_backup $name $name
dd if=/dev/urandom of="$W/m1/data.bin" bs=1M count=4 conv=notrunc,fsync status=none
t0=$(date +%s%N)
kill -9 $BPID; wait $BPID 2>/dev/null
wait_until 10 dm_session_gone $name "$HB" || fail "1: 10 s after kill -9 of the backup: $(dm_leftovers "$HB")"
log "1: kill -9 of the backup: cleaned up in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "1: origin table not restored: $(dm_table "$DEV")"
H status $name | grep -q "session: idle" || fail "1: the daemon is not idle: $(H status $name)"

# 3. SIGSTOP: heartbeat silence (the daemon's timeout is 10 s by default;
#    this attachment uses 3 s to keep the test short)
umount "$W/m1"; H detach $name >/dev/null || fail "detach k1"
name=hitdm-k3
dm_attach $name 64M --hb-file-size 8M --buffer-limit 64M --heartbeat-timeout 3
linear=$(dm_table "$DEV")
mkfs_ext4 "$DEV" && mount "$DEV" "$W/m1" || fail "mount k3"
fill "$W/m1"
start_backup $name $name
t0=$(date +%s%N)
kill -STOP $BPID
# The stopped process still holds the snapshot open: that device may stay
# until it closes, but with an error table (holding nothing below it).
dropped() {
  dmsetup ls | grep -qE "^hotimage-$name-(cow|real)\b" && return 1
  losetup -a | grep -q "hb_[0-9]*\.tmp" && return 1
  ls "$HB"/hb_*.tmp >/dev/null 2>&1 && return 1
  if dmsetup ls | grep -qE "^hotimage-$name-snap\b"; then dm_table "hotimage-$name-snap" | grep -q " error" || return 1; fi
  return 0
}
wait_until 10 dropped || fail "3: heartbeat silence: $(dm_leftovers "$HB") snap table: $(dm_table "hotimage-$name-snap")"
log "3: SIGSTOP of the backup: session dropped after $(( ($(date +%s%N) - t0) / 1000000 )) ms (heartbeat timeout 3 s)"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "3: origin table not restored"
kill -CONT $BPID; wait $BPID; rc=$?
[ $rc = 3 ] || { cat "$W/$name.err"; fail "3: the resumed backup exited $rc, expected 3"; }
wait_until 5 sh -c "! dmsetup ls | grep -q hotimage-$name-snap" || fail "3: the deferred removal of the snapshot did not happen"
umount "$W/m1"; e2fsck -fn "$DEV" >/dev/null 2>&1 || fail "3: e2fsck of the live volume"
H detach $name >/dev/null || fail "detach k3"

# 2. kill -9 of a backup through a transient daemon (existing dm device)
LVBASE=$(make_loop "$W/lv.img" 64M)
dmsetup create hitdm-lv --table "0 $(( 64 * 2048 )) linear $LVBASE 0" || fail "dmsetup create"
lvlinear=$(dm_table hitdm-lv)
mkfs_ext4 /dev/mapper/hitdm-lv && mount /dev/mapper/hitdm-lv "$W/m1" || fail "mount lv"
fill "$W/m1"
start_backup "$W/m1" hitdm-lv --buffer-dir "$W/hb-lv" --hb-file-size 8M
dpid=$(cat "$RUN/hitdm-lv/pid")
t0=$(date +%s%N)
kill -9 $BPID; wait $BPID 2>/dev/null
wait_until 10 dm_session_gone hitdm-lv "$W/hb-lv" || fail "2: 10 s after kill -9: $(dm_leftovers "$W/hb-lv")"
wait_until 10 sh -c "! kill -0 $dpid 2>/dev/null" || fail "2: the transient daemon did not exit"
log "2: kill -9 of a backup of an existing dm device: cleaned up and the daemon gone in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
[ "$(dm_table hitdm-lv)" = "$lvlinear" ] || fail "2: lv table not restored"
umount "$W/m1"; e2fsck -fn /dev/mapper/hitdm-lv >/dev/null 2>&1 || fail "2: e2fsck lv"

# 6. kill -9 of a transient session daemon: status lists, detach NAME cleans
mount /dev/mapper/hitdm-lv "$W/m1" || fail "6: mount lv"
start_backup "$W/m1" hitdm-lv --buffer-dir "$W/hb-lv" --hb-file-size 8M
kill -9 "$(cat "$RUN/hitdm-lv/pid")"
wait $BPID; rc=$?
[ $rc = 3 ] || [ $rc = 1 ] || fail "6: the backup exited $rc after its daemon was killed"
dm_table hitdm-lv | grep -q snapshot-origin || fail "6: the origin is not snapshot-origin after the kill (the test proves nothing)"
status_leaves_alone hitdm-lv 6 "$W/hb-lv"
grep -q "hitdm-lv maps through hotimage-hitdm-lv-real" "$W/status.out" || fail "6: status does not list the origin: $(cat "$W/status.out")"
H detach hitdm-lv > "$W/detach6.out" 2>&1 || { cat "$W/detach6.out"; fail "6: detach hitdm-lv after its daemon died"; }
dm_session_gone hitdm-lv "$W/hb-lv" || fail "6: detach did not clean up: $(dm_leftovers "$W/hb-lv")"
[ "$(dm_table hitdm-lv)" = "$lvlinear" ] || fail "6: lv table not restored: $(dm_table hitdm-lv)"
[ -e "$RUN/hitdm-lv" ] && fail "6: the run directory is left: $(ls -A "$RUN/hitdm-lv")"
H status | grep -q hitdm-lv && fail "6: status still lists hitdm-lv"
dd if=/dev/urandom of="$W/m1/after.bin" bs=1M count=2 conv=fsync status=none || fail "6: the live volume is not writable"
umount "$W/m1"; e2fsck -fn /dev/mapper/hitdm-lv >/dev/null 2>&1 || fail "6: e2fsck lv"
log "6: kill -9 of a transient daemon: status left it alone; detach: $(grep -v 'left by' "$W/detach6.out" | tr '\n' ';')"
dmsetup remove hitdm-lv

# 4. kill -9 of the session daemon
name=hitdm-k4
dm_attach $name 64M --hb-file-size 8M --buffer-limit 64M
linear=$(dm_table "$DEV")
mkfs_ext4 "$DEV" && mount "$DEV" "$W/m1" || fail "mount k4"
fill "$W/m1"
start_backup $name $name
kill -9 "$(cat "$RUN/$name/pid")"
wait $BPID; rc=$?
[ $rc = 3 ] || [ $rc = 1 ] || fail "4: the backup exited $rc after its daemon was killed"
log "4: backup exited $rc after kill -9 of the daemon: $(grep -m1 'backup failed' "$W/$name.err")"
dmsetup ls | grep -q "hotimage-$name-snap" || fail "4: no leftovers after killing the daemon (the test proves nothing)"
dm_table "$DEV" | grep -q snapshot-origin || fail "4: the origin is not snapshot-origin after the kill"
dd if=/dev/urandom of="$W/m1/after.bin" bs=1M count=2 conv=fsync status=none || fail "4: the live volume is not writable"
status_leaves_alone $name 4 "$HB"
dm_table "$DEV" | grep -q snapshot-origin || fail "4: status restored the origin"
log "4: status lists and leaves alone: $(tail -n +2 "$W/status.out" | tr -s ' ' | tr '\n' ';')"
H detach $name > "$W/detach.out" 2>&1 && fail "4: detach of the orphan succeeded while mounted"
grep -q "/dev/mapper/hotimage-$name is mounted on $W/m1" "$W/detach.out" || fail "4: detach does not say the linear device is mounted: $(cat "$W/detach.out")"
dm_session_gone $name "$HB" || fail "4: detach did not clean up the session: $(dm_leftovers "$HB")"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "4: origin table not restored: $(dm_table "$DEV")"
[ -d "$RUN/$name" ] && [ -S "$RUN/$name/control.sock" ] && fail "4: the dead daemon's run directory is still there"
umount "$W/m1"
e2fsck -fn "$DEV" > "$W/fsck" 2>&1 || { cat "$W/fsck"; fail "4: e2fsck of the live volume"; }
H detach $name > "$W/detach.out" 2>&1 || { cat "$W/detach.out"; fail "4: detach of the orphaned linear device"; }
dmsetup ls | grep -q "hotimage-$name" && fail "4: detach left $(dmsetup ls)"
log "4: detach cleaned the dead daemon's stack, then (unmounted) removed the orphaned device"

# 5. the snapshot deadline
name=hitdm-k5
dm_attach $name 32M --hb-file-size 8M --snapshot-deadline 2
python3 - "$RUN/$name/control.sock" > "$W/k5.out" 2>&1 <<'PY' &
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.write(json.dumps({"op": "begin", "consistency": "raw"}) + "\n"); f.flush()
print("begin:", f.readline().strip(), flush=True)
time.sleep(8)
f.write(json.dumps({"op": "status"}) + "\n"); f.flush()
st = json.loads(f.readline())["status"]["session"]
print("after:", st["phase"], st.get("failure"), flush=True)
PY
client=$!
wait_until 10 test -b "/dev/mapper/hotimage-$name-snap" || fail "5: no snapshot was taken: $(cat "$W/k5.out")"
t0=$(date +%s%N)
wait_until 6 dm_session_gone $name "$HB" || fail "5: the snapshot outlived its 2 s deadline: $(dm_leftovers "$HB")"
log "5: snapshot deadline 2 s: removed $(( ($(date +%s%N) - t0) / 1000000 )) ms after it appeared"
wait $client
grep -q "after: failed .*not complete within 2" "$W/k5.out" || fail "5: the session does not say why: $(cat "$W/k5.out")"
H detach $name >/dev/null || fail "detach k5"
log "ok"
