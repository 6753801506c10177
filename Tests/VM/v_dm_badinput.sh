#!/usr/bin/env bash
# Bad input to the dm-snapshot backend gets one clear line and the
# documented exit code, and leaves nothing behind: not a block device, a
# mounted device, not a dm device for --backend dm-snapshot, the wrong
# backend for an attachment, --consistency wip, a buffer directory on the
# protected volume, a full buffer directory.
source "$(dirname "$0")/dm-lib.sh"

# expect N PATTERN -- CMD...: expect_exit, and the line that matched in the log.
expect() { expect_exit "$@"; log "exit $EXIT_RC: $EXIT_MATCH"; }

truncate -s 16M "$W/plain.file"
expect 2 "not a block device" -- H attach "$W/plain.file" --via dm --name hitdm-file
LOOP=$(make_loop "$W/plain.img" 64M)
mkfs_ext4 "$LOOP" && mkdir -p "$W/m" && mount "$LOOP" "$W/m" || fail "mount plain"
expect 1 "is mounted on" -- H attach "$LOOP" --via dm --name hitdm-mounted
expect 2 "not a device-mapper device" -- H backup "$W/m" -o "$W/x.qcow2" --backend dm-snapshot
umount "$W/m"

name=hitdm-bad
dm_attach $name 64M --hb-file-size 8M --buffer-limit 8M
mkfs_ext4 "$DEV" && mount "$DEV" "$W/m" || fail "mount"
echo data > "$W/m/f"
expect 2 "attached via dm" -- H backup $name -o "$W/x.qcow2" --backend hotcore
expect 3 "wip is HotCore's" -- H backup $name -o "$W/x.qcow2" --consistency wip
umount "$W/m"; H detach $name >/dev/null || fail "detach"

# A buffer directory on the protected volume itself.
BASE2=$(make_loop "$W/self.img" 64M)
out=$(H attach "$BASE2" --via dm --name hitdm-self2 --buffer-dir "$W/m/hb" --hb-file-size 8M 2>&1) || fail "attach self2: $out"
mkfs_ext4 /dev/mapper/hotimage-hitdm-self2 && mount /dev/mapper/hotimage-hitdm-self2 "$W/m" && mkdir -p "$W/m/hb" || fail "mount self2"
expect 3 "would be written through the volume they protect" -- H backup hitdm-self2 -o "$W/x.qcow2"
umount "$W/m"; H detach hitdm-self2 >/dev/null || fail "detach self2"

# A full buffer directory: a 4 MiB tmpfs for 8 MiB hb files.
mkdir -p "$W/full" && mount -t tmpfs -o size=4M tmpfs "$W/full" || fail "tmpfs"
BASE3=$(make_loop "$W/full.img" 64M)
out=$(H attach "$BASE3" --via dm --name hitdm-full --buffer-dir "$W/full/hb" --hb-file-size 8M 2>&1) || fail "attach full: $out"
mkfs_ext4 /dev/mapper/hotimage-hitdm-full && mount /dev/mapper/hotimage-hitdm-full "$W/m" || fail "mount full"
echo data > "$W/m/f"
expect 3 "is full" -- H backup hitdm-full -o "$W/x.qcow2"
dm_session_gone hitdm-full "$W/full/hb" || fail "leftovers after a full buffer dir: $(dm_leftovers "$W/full/hb")"
[ "$(cat "$W/m/f")" = data ] || fail "the volume changed"
umount "$W/m"; H detach hitdm-full >/dev/null || fail "detach full"
umount "$W/full"
log "ok"
