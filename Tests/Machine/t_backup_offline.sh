#!/usr/bin/env bash
# Offline and partial backups: an unmounted ext4 is imaged from libext2fs's
# map under exclusive access and restored; offline mode refuses a volume
# mounted read-write; a volume without a filesystem is imaged whole (raw);
# a swap file and an --exclude'd directory are absent from the image and
# recorded in it.
source "$(dirname "$0")/lib.sh"

# 1. Offline, unmounted ext4 (no HotCore): the ext2fs map.
BASE=$(make_loop "$W/off.img" 256M)
mkfs.ext4 -q -F "$BASE"
mkdir -p "$W/m" && mount "$BASE" "$W/m"
head -c 40M /dev/urandom > "$W/m/a.bin"; seq 1 1000000 > "$W/m/n.txt"
(cd "$W/m" && sha256sum a.bin n.txt) > "$W/off.sums"
# Offline refuses it while mounted read-write (exit 2), and leaves no image.
expect_exit 2 "mounted read-write" -- H backup "$BASE" --mode offline -o "$W/refused.qcow2"
[ -e "$W/refused.qcow2" ] && fail "a refused backup left an image"
umount "$W/m"
backup_roundtrip "$W/off.qcow2" --loop 256M --fs ext4 --mount "$W/r" --says "map ext2fs" -- H backup "$BASE" --mode offline -o "$W/off.qcow2"
T2=$RESTORED
(cd "$W/r" && sha256sum -c --quiet "$W/off.sums") || fail "offline restore: files differ"
umount "$W/r"
HI info "$W/off.qcow2" --json | python3 -c '
import json,sys; d=json.load(sys.stdin); m=d["metadata"]
assert m["mode"]=="offline" and m["consistency"]=="offline" and m["mapMethod"]=="ext2fs", m
assert m["filesystem"]["type"]=="ext4" and m["filesystem"]["uuid"], m["filesystem"]
assert 40<<20 < m["usedBytes"] < 80<<20, m["usedBytes"]' || fail "offline image metadata"
# Restore refuses a target holding a filesystem, without --force.
expect_exit 2 "already holds a filesystem" -- HI restore "$W/off.qcow2" "$T2"
# ... a mounted one, even with --force, and one that is too small.
mount -o ro "$T2" "$W/r"
expect_exit 2 "mounted" -- HI restore "$W/off.qcow2" "$T2" --force
umount "$W/r"
SMALL=$(make_loop "$W/small.img" 128M)
expect_exit 2 "too small" -- HI restore "$W/off.qcow2" "$SMALL" --force
log "offline: ext2fs map, restored and checked; refusals hold"

# 2. A device without a filesystem: raw map, every block.
RAW=$(make_loop "$W/raw.img" 32M)
head -c 8M /dev/urandom | dd of="$RAW" bs=1M seek=20 conv=fsync status=none
backup_roundtrip "$W/raw.qcow2" --same-as "$RAW" --says "every block" -- H backup "$RAW" --mode offline -o "$W/raw.qcow2"
log "raw: a device without a filesystem is imaged whole"

# 3. Online with a swap file and an excluded directory.
attach_new hit-ex 256M
mkfs.ext4 -q -F "$DEV"
mkdir -p "$W/x" && mount "$DEV" "$W/x"
mkdir -p "$W/x/cache/sub"
for i in 1 2 3; do python3 -c "import sys; sys.stdout.write('EXCLUDED-MARKER-$i-' * 200000)" > "$W/x/cache/sub/f$i"; done
python3 -c "import sys; sys.stdout.write('KEPT-MARKER-' * 200000)" > "$W/x/kept.txt"
dd if=/dev/zero of="$W/x/swapfile" bs=1M count=16 status=none && chmod 600 "$W/x/swapfile" && mkswap "$W/x/swapfile" >/dev/null
python3 -c "import sys; sys.stdout.write('SWAP-MARKER-' * 100000)" | dd of="$W/x/swapfile" bs=4096 seek=64 conv=notrunc,fsync status=none
mkswap "$W/x/swapfile" >/dev/null 2>&1
SWAPON=no
if swapon "$W/x/swapfile" 2>/dev/null; then SWAPON=yes; else log "swapon is not permitted here: the swap-file case checks --exclude only"; fi
sync
H backup hit-ex -o "$W/ex.qcow2" --exclude cache > "$W/ex.out" 2>&1; rc=$?
[ "$SWAPON" = yes ] && swapoff "$W/x/swapfile"
[ $rc = 0 ] || { cat "$W/ex.out"; fail "backup with --exclude"; }
HI info "$W/ex.qcow2" > "$W/ex.info" || fail "info"
grep -q "cache (--exclude, 3 file(s)" "$W/ex.info" || fail "the image does not record the exclusion: $(cat "$W/ex.info")"
HI restore "$W/ex.qcow2" "$W/ex.raw" >/dev/null 2>&1 || fail "restore ex"
grep -q "EXCLUDED-MARKER" "$W/ex.raw" && fail "excluded data is in the image"
grep -q "KEPT-MARKER" "$W/ex.raw" || fail "kept data is missing (the exclusion test proves nothing)"
if [ "$SWAPON" = yes ]; then
  grep -q "swap file" "$W/ex.info" || fail "the swap file is not recorded as excluded"
  grep -q "SWAP-MARKER" "$W/ex.raw" && fail "swap file data is in the image"
fi
qemu-img check "$W/ex.qcow2" >/dev/null 2>&1 || fail "qemu-img check (excluded image)"
e2fsck -fn "$W/ex.raw" >/dev/null 2>&1 || log "note: e2fsck on an image with excluded data reports what was left out (expected)"
umount "$W/x"
log "exclude: the directory's data is absent and recorded (swap file: $SWAPON)"
log "ok"
