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
#    stays (the kernel keeps it); `hotimage status` removes it, restores the
#    origin and deletes the files; `detach` then removes the orphaned linear
#    device once unmounted. The live volume checks clean throughout.
source "$(dirname "$0")/dm-lib.sh"

# start_backup SOURCE NAME [opts]: a slow backup in the background; waits
# until its snapshot exists. Sets BPID.
start_backup() {
  local src=$1 name=$2; shift 2
  # Not through H (a function: $! would be a subshell, not hotimage).
  "$HOTIMAGE" backup "$src" --run-dir "$RUN" -o "$W/$name.qcow2" --max-rate 1M --workers 1 "$@" > "$W/$name.out" 2> "$W/$name.err" &
  BPID=$!
  wait_until 30 test -b "/dev/mapper/hotimage-$name-snap" || { cat "$W/$name.err"; fail "$name: the snapshot device never appeared"; }
  sleep 0.5
  losetup -a | grep -q "hb_00.tmp" || fail "$name: no loop over hb_00.tmp during the session (the test proves nothing)"
}

fill() {  # MNT: some data, so the backup takes a while at 1 MB/s
  head -c 24M /dev/urandom > "$1/data.bin"; sync
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
H status > "$W/status.out" 2> "$W/status.err"
cat "$W/status.err"
dm_session_gone $name "$HB" || fail "4: hotimage status did not clean up: $(dm_leftovers "$HB")"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "4: origin table not restored: $(dm_table "$DEV")"
[ -d "$RUN/$name" ] && [ -S "$RUN/$name/control.sock" ] && fail "4: the dead daemon's run directory is still there"
H detach $name > "$W/detach.out" 2>&1 && fail "4: detach of the orphan succeeded while mounted"
umount "$W/m1"
e2fsck -fn "$DEV" > "$W/fsck" 2>&1 || { cat "$W/fsck"; fail "4: e2fsck of the live volume"; }
H detach $name > "$W/detach.out" 2>&1 || { cat "$W/detach.out"; fail "4: detach of the orphaned linear device"; }
dmsetup ls | grep -q "hotimage-$name" && fail "4: detach left $(dmsetup ls)"
log "4: hotimage status cleaned the dead daemon's stack; detach removed the orphaned device"

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
