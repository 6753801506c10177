#!/usr/bin/env bash
# dm-snapshot backups end to end under write load, restored and checked.
#
# 1. attach --via dm over a loop device, ext4, a journalled writer and an
#    in-place overwriter running through the whole backup (default backend:
#    the attachment's). hb files of 8 MiB: the COW store must grow past its
#    first file. A before-snapshot hook holds the writers and records every
#    file's state; the restored image (verify, qemu-img check, e2fsck -fn)
#    must hold exactly that state. Negative control: the live files moved on.
# 2. An existing dm-linear device (made with dmsetup, as an LVM LV would be),
#    backed up by its mount point with --backend dm-snapshot: a transient
#    session daemon, which is gone afterwards with everything it made.
# 3. An incremental of the LV (--base): compared, as dm-snapshot tracks no
#    changes; it verifies and restores with the change.
# Both: no snapshot devices, loops or hb files after the backup; the origin
# maps its data directly again.
source "$(dirname "$0")/dm-lib.sh"

# run_backup NAME MNT SOURCE [backup options...]: writers, hooks, backup,
# restore, compare. Sets SUMMARY.
run_backup() {
  local name=$1 mnt=$2 src=$3; shift 3
  head -c 24M /dev/urandom > "$mnt/random.bin"
  seq 1 1000000 > "$mnt/numbers.txt"
  sync
  mkdir -p "$mnt/churn"
  rm -f "$W/$name.stop" "$W/$name.pause" "$W/$name.ack"
  python3 "$ROOT/Scripts/demo-writer.py" "$mnt/churn" "$W/$name.journal" "$W/$name.stop" "$W/$name.pause" "$W/$name.ack" &
  local writer=$!
  ( while [ ! -e "$W/$name.stop" ]; do
      dd if=/dev/urandom of="$mnt/random.bin" bs=1M count=4 seek=$((RANDOM % 20)) conv=notrunc,fsync status=none 2>/dev/null
      sleep 0.05
    done ) &
  local churner=$!
  sleep 1
  local hook="$ROOT/Scripts/demo-hook-pause.sh $W/$name.pause $W/$name.ack $mnt/churn $W/$name.state"
  local t0; t0=$(date +%s%N)
  H backup "$src" -o "$W/$name.qcow2" --json --max-rate 8M --workers 2 \
      --before-snapshot "kill -STOP $churner; pkill -STOP -P $churner; sha256sum < $mnt/random.bin > $W/$name.rsum; $hook" \
      --after-snapshot "pkill -CONT -P $churner; kill -CONT $churner; rm -f $W/$name.pause" \
      "$@" > "$W/$name.events" 2> "$W/$name.err"
  local rc=$?
  local t1; t1=$(date +%s%N)
  sleep 1
  touch "$W/$name.stop"; pkill -CONT -P $churner; kill -CONT $churner 2>/dev/null; wait $writer $churner
  [ $rc = 0 ] || { tail -20 "$W/$name.err"; for f in "$RUN"/*/daemon.log; do grep -v "remove ioctl" "$f" | tail -40; done; fail "$name: backup exited $rc"; }
  SUMMARY=$(grep '"event":"summary"' "$W/$name.events") || fail "$name: no summary event"
  log "$name: backup $(( (t1 - t0) / 1000000 )) ms; $(grep 'summary:' "$W/$name.err" | sed 's/hotimage: summary: //' | tr '\n' ';')"
  local copy=$W/copy-$name
  backup_roundtrip "$W/$name.qcow2" --loop "$(blockdev --getsize64 "$(findmnt -n -o SOURCE "$mnt")")" --fs ext4 --mount "$copy"
  (cd "$copy/churn" && find . -type f -name 'rec-*' | sort | xargs -r sha256sum) > "$W/$name.state.restored"
  cmp -s "$W/$name.state" "$W/$name.state.restored" || { diff "$W/$name.state" "$W/$name.state.restored" | head; fail "$name: restored files differ from the recorded state"; }
  seq 1 1000000 | cmp -s - "$copy/numbers.txt" || fail "$name: numbers.txt differs"
  [ "$(sha256sum < "$copy/random.bin")" = "$(cat "$W/$name.rsum")" ] || fail "$name: random.bin differs from its state at the snapshot"
  umount "$copy"
  (cd "$mnt/churn" && find . -type f -name 'rec-*' | sort | xargs -r sha256sum) > "$W/$name.state.now"
  cmp -s "$W/$name.state" "$W/$name.state.now" && fail "$name: the writer did not write after the snapshot (the test proves nothing)"
  [ "$(sha256sum < "$mnt/random.bin")" = "$(cat "$W/$name.rsum")" ] && fail "$name: random.bin was not overwritten after the snapshot"
  log "$name: $(wc -l < "$W/$name.state") churn files and random.bin equal their state at the snapshot; e2fsck clean; live files moved on"
}

# 1. attach --via dm
name=hitdm-ext4
dm_attach $name 128M --hb-file-size 8M --buffer-limit 256M
linear=$(dm_table "$DEV")
mkfs_ext4 "$DEV" || fail "mkfs"
mkdir -p "$W/mnt1" && mount "$DEV" "$W/mnt1" || fail "mount"
H status $name > "$W/status.idle" || fail "status"
grep -q "via dm" "$W/status.idle" || fail "status does not say via dm: $(cat "$W/status.idle")"
run_backup $name "$W/mnt1" $name
echo "$SUMMARY" | python3 -c '
import json,sys; s=json.load(sys.stdin)["summary"]
assert s["cowPeakBytes"] > 8 << 20, "COW peak %d: the store never needed more than its first 8 MiB hb file" % s["cowPeakBytes"]
print("[v_dm_backup] COW peak %.1f MiB (first hb file 8 MiB)" % (s["cowPeakBytes"] / 2**20))' || fail "COW growth: $SUMMARY"
grep -q "COW store grown" "$RUN/$name/daemon.log" 2>/dev/null || grep -q "COW store grown" "$W/$name.err" || log "(growth is logged by the daemon)"
dm_session_gone $name "$HB" || fail "$name: session leftovers: $(dm_leftovers "$HB")"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "$name: origin table not restored: $(dm_table "$DEV")"
H detach $name > "$W/detach.out" 2>&1 && fail "detach succeeded while mounted"
grep -q "mounted" "$W/detach.out" || fail "detach refusal does not say why: $(cat "$W/detach.out")"
umount "$W/mnt1"
e2fsck -fn "$DEV" > "$W/live.fsck" 2>&1 || { cat "$W/live.fsck"; fail "$name: e2fsck of the live volume"; }
H detach $name > /dev/null || fail "detach"

# 2. an existing dm device (stand-in for an LVM LV), by mount point
LVBASE=$(make_loop "$W/lv.img" 96M)
dmsetup create hitdm-lv --table "0 $(( 96 * 2048 )) linear $LVBASE 0" || fail "dmsetup create"
lvlinear=$(dm_table hitdm-lv)
mkfs_ext4 /dev/mapper/hitdm-lv || fail "mkfs lv"
mkdir -p "$W/mnt2" && mount /dev/mapper/hitdm-lv "$W/mnt2" || fail "mount lv"
run_backup hitdm-lv "$W/mnt2" "$W/mnt2" --backend dm-snapshot --buffer-dir "$W/hb-lv" --hb-file-size 16M --buffer-limit 128M
grep -q "dm-snapshot session daemon started" "$W/hitdm-lv.err" || fail "no transient daemon was started: $(head -5 "$W/hitdm-lv.err")"
wait_until 10 sh -c "! test -S $RUN/hitdm-lv/control.sock" || fail "the transient daemon did not exit"
dm_session_gone hitdm-lv "$W/hb-lv" || fail "lv: session leftovers: $(dm_leftovers "$W/hb-lv")"
[ "$(dm_table hitdm-lv)" = "$lvlinear" ] || fail "lv: table not restored: $(dm_table hitdm-lv)"
# 3. An incremental through dm-snapshot: compared (dm tracks no changes).
echo "changed after the full $$" > "$W/mnt2/inc-file"; sync
H backup "$W/mnt2" -o "$W/lv-inc.qcow2" --base "$W/hitdm-lv.qcow2" --backend dm-snapshot --buffer-dir "$W/hb-lv" \
    --hb-file-size 16M --buffer-limit 128M > "$W/lv-inc.out" 2>&1 || fail "dm incremental: $(tail -5 "$W/lv-inc.out")"
HI info "$W/lv-inc.qcow2" --json > "$W/lv-inc.info" || fail "info lv-inc"
python3 - "$W/lv-inc.info" <<'PY' || fail "dm incremental: $(cat "$W/lv-inc.info" | head -c 600)"
import json, sys
m = json.load(open(sys.argv[1]))["metadata"]
c = m["chain"]
assert c["method"] == "compared" and "dm-snapshot" in (c["reason"] or ""), c
# The writers ran through the full backup: much changed, but not all.
assert c["changedClusters"] > 0 and c["unchangedClusters"] > 0, c
print("[v_dm_backup] dm incremental: compared (%s): %d written, %d left to the base" % (c["reason"], c["changedClusters"], c["unchangedClusters"]))
PY
HI verify "$W/lv-inc.qcow2" > "$W/lv-inc.verify" 2>&1 || fail "verify lv-inc: $(cat "$W/lv-inc.verify")"
HI restore "$W/lv-inc.qcow2" "$W/lv-inc.raw" > /dev/null 2>&1 || fail "restore lv-inc"
e2fsck -fn "$W/lv-inc.raw" > /dev/null 2>&1 || fail "e2fsck of the restored dm incremental"
[ "$(debugfs -R "cat /inc-file" "$W/lv-inc.raw" 2>/dev/null)" = "changed after the full $$" ] || fail "the restored dm incremental lacks the change"
dm_session_gone hitdm-lv "$W/hb-lv" || fail "lv incremental: session leftovers: $(dm_leftovers "$W/hb-lv")"
umount "$W/mnt2"
e2fsck -fn /dev/mapper/hitdm-lv > "$W/lv.fsck" 2>&1 || { cat "$W/lv.fsck"; fail "e2fsck of the live lv"; }
dmsetup remove hitdm-lv
log "ok"
