#!/usr/bin/env bash
# dm-snapshot overflow: a COW store of one 4 MiB hb file with no room to
# grow (--buffer-limit 4M), a writer overwriting a 40 MiB file again and
# again during a slow backup. The kernel invalidates the snapshot; the
# backup must fail with exit 3 and say the COW store overflowed; the writer
# never sees an error; afterwards no snapshot devices, loops or hb files are
# left, the origin maps its data directly again, and the live volume is
# untouched: every file equals what was written last (cmp), e2fsck -fn clean.
# Negative control: the same load with a first hb file of 64 MiB (the
# writer's fsync bursts are 40 MiB, faster than the store can be grown under
# TCG) completes.
source "$(dirname "$0")/dm-lib.sh"

name=hitdm-ovf
dm_attach $name 96M --hb-file-size 4M --buffer-limit 4M
linear=$(dm_table "$DEV")
mkfs_ext4 "$DEV" || fail "mkfs"
mnt=$W/mnt && mkdir -p "$mnt" && mount "$DEV" "$mnt" || fail "mount"
head -c 40M /dev/urandom > "$W/a.bin"
head -c 40M /dev/urandom > "$W/b.bin"
seq 1 500000 > "$W/numbers.txt"
cp "$W/a.bin" "$mnt/data.bin" && cp "$W/numbers.txt" "$mnt/numbers.txt" && sync
# The writer alternates b and a over the file, each pass fsync'd, and ends
# with a: the file must then equal a.
( while [ ! -e "$W/stop" ]; do
    dd if="$W/b.bin" of="$mnt/data.bin" bs=1M conv=notrunc,fsync status=none || echo "writer: write failed" >> "$W/writer.err"
    dd if="$W/a.bin" of="$mnt/data.bin" bs=1M conv=notrunc,fsync status=none || echo "writer: write failed" >> "$W/writer.err"
  done ) &
writer=$!
sleep 1
t0=$(date +%s%N)
H backup $name -o "$W/ovf.qcow2" --max-rate 2M --workers 1 > "$W/backup.out" 2> "$W/backup.err"
rc=$?
t1=$(date +%s%N)
touch "$W/stop"; wait $writer
log "backup exited $rc after $(( (t1 - t0) / 1000000 )) ms: $(grep -m1 'backup failed' "$W/backup.err")"
[ $rc = 3 ] || { cat "$W/backup.err"; tail -30 "$RUN/$name/daemon.log"; fail "backup exited $rc, expected 3 (session failed)"; }
grep -q "overflowed" "$W/backup.err" || { cat "$W/backup.err"; fail "the failure does not say the COW store overflowed"; }
[ -e "$W/ovf.qcow2" ] && fail "the partial image was left behind"
[ -s "$W/writer.err" ] && fail "the live writer saw errors: $(cat "$W/writer.err")"
H status $name > "$W/status" 2>&1
grep -q "overflowed" "$W/status" || fail "status does not show the failure: $(cat "$W/status")"
dm_session_gone $name "$HB" || fail "leftovers after overflow: $(dm_leftovers "$HB")"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "origin table not restored: $(dm_table "$DEV")"
cmp "$mnt/data.bin" "$W/a.bin" || fail "the live data.bin is not what was written last"
cmp "$mnt/numbers.txt" "$W/numbers.txt" || fail "the live numbers.txt changed"
umount "$mnt"
e2fsck -fn "$DEV" > "$W/fsck" 2>&1 || { cat "$W/fsck"; fail "e2fsck of the live volume after the overflow"; }
log "overflow: failed cleanly; live volume intact (cmp, e2fsck clean), nothing left behind"

H detach $name > /dev/null || fail "detach"

# Negative control: the same load with room to grow completes.
name=hitdm-ovf2
dm_attach $name 96M --hb-file-size 64M --buffer-limit 128M
mkfs_ext4 "$DEV" && mount "$DEV" "$mnt" || fail "mount 2"
cp "$W/a.bin" "$mnt/data.bin" && sync
rm -f "$W/stop"
( while [ ! -e "$W/stop" ]; do
    dd if="$W/b.bin" of="$mnt/data.bin" bs=1M conv=notrunc,fsync status=none
    dd if="$W/a.bin" of="$mnt/data.bin" bs=1M conv=notrunc,fsync status=none
  done ) &
writer=$!
sleep 1
H backup $name -o "$W/ok.qcow2" --max-rate 6M --workers 1 > "$W/backup2.out" 2> "$W/backup2.err"
rc=$?
touch "$W/stop"; wait $writer
[ $rc = 0 ] || { cat "$W/backup2.err"; fail "control: with room to grow the backup exited $rc"; }
log "control: with a 64 MiB first hb file the same load completes ($(grep -m1 'COW buffer peak' "$W/backup2.err" | sed 's/.*COW buffer peak/COW peak/'))"
umount "$mnt"
H detach $name > /dev/null || fail "detach 2"
log "ok"
