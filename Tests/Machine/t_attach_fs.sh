#!/usr/bin/env bash
# attach refusals, an ext4 filesystem on the protected device, a session read
# by real clients (nbdinfo --map, nbdcopy, qemu-img info/convert), the copy
# checked by e2fsck and file by file, then a clean detach.
source "$(dirname "$0")/lib.sh"

attach_new hit-fs 256M
log "protected device $DEV over $BASE"

# Refusals: the same name, the held real device, a mounted device.
out=$(H attach "$BASE" --name hit-fs 2>&1) && fail "a second attach with the same name succeeded"
echo "$out" | grep -q "already attached" || fail "duplicate name message: $out"
out=$(H attach "$BASE" --name hit-other 2>&1) && fail "attaching a held device succeeded"
echo "$out" | grep -q "busy" || fail "held device message: $out"
OTHER=$(make_loop "$W/other.img" 64M)
mkfs.ext4 -q -F "$OTHER" && mkdir -p "$W/othermnt" && mount "$OTHER" "$W/othermnt"
out=$(H attach "$OTHER" --name hit-mounted 2>&1) && fail "attaching a mounted device succeeded"
echo "$out" | grep -q "mounted on" || fail "mounted device message: $out"
umount "$W/othermnt"
[ "$(cat /sys/block/$(basename "$DEV")/loop/dio)" = 1 ] || fail "the loop over nbdfuse does not use direct I/O"

mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4 on $DEV"
mkdir -p "$W/mnt" && mount "$DEV" "$W/mnt" || fail "mount $DEV"
head -c 30M /dev/urandom > "$W/mnt/random.bin"
seq 1 200000 > "$W/mnt/numbers.txt"
mkdir -p "$W/mnt/dir"; for i in $(seq 1 50); do head -c $((i * 3000)) /dev/urandom > "$W/mnt/dir/f$i"; done
sync
mkdir -p "$W/before"; cp -a "$W/mnt/." "$W/before/"

nbdinfo --list "nbd+unix:///?socket=$RUN/hit-fs/nbd.sock" | grep -q 'export="snapshot"' && fail "snapshot export listed while idle"

# A writer keeps changing the filesystem during the whole session.
( while [ ! -f "$W/stop" ]; do head -c 1M /dev/urandom > "$W/mnt/churn.$((RANDOM % 8))"; sync -f "$W/mnt"; sleep 0.05; done ) &
WRITER=$!
sleep 0.5
H snapshot hit-fs -- sh -c '
  set -e
  nbdinfo --list "nbd+unix:///?socket=$HOTIMAGE_NBD_SOCKET" > "'$W'/list.txt"
  nbdinfo --map "$HOTIMAGE_SNAPSHOT_URI" > "'$W'/map.txt"
  nbdcopy "$HOTIMAGE_SNAPSHOT_URI" "'$W'/copy.raw"
  qemu-img info "$HOTIMAGE_SNAPSHOT_URI" > "'$W'/qinfo.txt"
  qemu-img convert -O raw "$HOTIMAGE_SNAPSHOT_URI" "'$W'/qcopy.raw"
' 2> "$W/snapshot.err" || { cat "$W/snapshot.err"; fail "hotimage snapshot"; }
touch "$W/stop"; wait $WRITER

grep -q 'export="snapshot"' "$W/list.txt" || fail "snapshot export not listed during the session"
grep -q 'hole,zero' "$W/map.txt" || fail "nbdinfo --map shows no holes in the snapshot export"
grep -q ' data' "$W/map.txt" || fail "nbdinfo --map shows no data"
grep -q 'virtual size: 256 MiB' "$W/qinfo.txt" || fail "qemu-img info: $(cat "$W/qinfo.txt")"
cmp -s "$W/copy.raw" "$W/qcopy.raw" || fail "qemu-img convert and nbdcopy disagree"
e2fsck -fn "$W/copy.raw" > "$W/fsck.txt" 2>&1 || { cat "$W/fsck.txt"; fail "e2fsck -fn on the snapshot copy"; }
mkdir -p "$W/copymnt" && mount -o ro,loop,noload "$W/copy.raw" "$W/copymnt" || fail "mount the copy"
diff -r "$W/before/random.bin" "$W/copymnt/random.bin" >/dev/null || fail "random.bin differs in the snapshot"
diff -r "$W/before/dir" "$W/copymnt/dir" >/dev/null || fail "dir/ differs in the snapshot"
cmp -s "$W/before/numbers.txt" "$W/copymnt/numbers.txt" || fail "numbers.txt differs"
umount "$W/copymnt"
log "snapshot copy: e2fsck clean, files identical; $(grep -c 'hole,zero' "$W/map.txt") hole extents"

# Detach refuses while mounted, then works and cleans up everything.
out=$(H detach hit-fs 2>&1) && fail "detach succeeded while mounted"
echo "$out" | grep -q "mounted" || fail "detach refusal message: $out"
umount "$W/mnt"
H detach hit-fs >/dev/null || fail "detach"
[ -b "$DEV" ] && losetup "$DEV" 2>/dev/null | grep -q "$RUN" && fail "$DEV still attached after detach"
[ -e "$RUN/hit-fs/control.sock" ] && fail "control socket left behind"
[ -d "$W/hb-hit-fs" ] && fail "buffer directory left behind"
grep -q "$RUN/hit-fs/fuse" /proc/self/mounts && fail "nbdfuse still mounted"
# The real device holds the filesystem, intact.
e2fsck -fn "$BASE" > "$W/fsck2.txt" 2>&1 || { cat "$W/fsck2.txt"; fail "e2fsck on the real device after detach"; }
log "ok"
