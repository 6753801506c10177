#!/usr/bin/env bash
# The backup mode follows what uses the volume, never just its mounts:
#  1. a raw attached device (no filesystem) under a stamped writer that never
#     stops for long, `backup NAME` with no mode options (a read slowed to 2 s): online, and the image is
#     the device after a prefix of the writes (the stamp check at the cut the
#     backup reports). Negative control: the live device fails at that cut.
#  2. the same by the real device's path goes through the attachment;
#     --consistency freeze with nothing mounted, and --mode offline with
#     --consistency, are refused (exit 2).
#  3. offline (and auto, for a device not attached) is refused while a process
#     holds the device open (a sleep with it on fd 3), naming the process, and
#     accepted once it exits; --consistency on it is refused (not attached).
#  4. a whole disk whose partition is mounted, and a device with a loop
#     stacked on it, are in use; a read-only mount is quiet.
#  5. a process that opens the device while an offline backup reads it fails
#     the backup (exit 1) and no image is left.
source "$(dirname "$0")/lib.sh"

# 1. The defect: a raw attached device written all the time.
attach_new hit-raw 64M
"$STAMP" write "$DEV" --log "$W/raw.log" --blocks 16384 --threads 2 --stop-file "$W/raw.stop" \
    --burst-ms 300 --pause-ms 400 --seed 5 --ready-file "$W/raw.ready" > "$W/raw.writer.out" 2>&1 &
writer=$!
wait_until 60 test -f "$W/raw.ready" || fail "writer init did not finish"
sleep 0.5
H backup hit-raw -o "$W/raw.qcow2" --max-rate 32M --json > "$W/raw.json" 2> "$W/raw.err" || { cat "$W/raw.err"; fail "backup hit-raw"; }
sleep 0.5
touch "$W/raw.stop"; wait $writer || { cat "$W/raw.writer.out"; fail "the writer saw failed live writes"; }
python3 - "$W/raw.json" > "$W/raw.cut" <<'EOF' || fail "backup events: $(cat "$W/raw.json" | head -5)"
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
start = next(e for e in ev if e["event"] == "start")
snap = next(e for e in ev if e["event"] == "snapshot")
assert start["mode"] == "online", start
assert snap["consistency"] == "raw" and snap["mapMethod"] == "raw", snap
print(snap["cutMonotonicNs"])
EOF
qemu-img convert -O raw "$W/raw.qcow2" "$W/raw.img.raw" || fail "qemu-img convert"
"$STAMP" check "$W/raw.log" "$W/raw.img.raw" --cut-ns "$(cat "$W/raw.cut")" > "$W/raw.check" 2>&1 \
    || { cat "$W/raw.check"; fail "the image of a raw attached device is not the device at its cut"; }
log "raw attached: $(head -1 "$W/raw.check")"
"$STAMP" check "$W/raw.log" "$DEV" > "$W/raw.live" 2>&1 || { cat "$W/raw.live"; fail "the live device lost writes"; }
if "$STAMP" check "$W/raw.log" "$DEV" --cut-ns "$(cat "$W/raw.cut")" > "$W/raw.neg" 2>&1; then
  fail "negative control: the live device passes at the cut; no write overlapped the backup"
fi
log "raw attached control: $(head -1 "$W/raw.neg")"

# 2. By the real device; refused combinations.
expect_exit 0 "online" --out "$W/real.out" -- H backup "$BASE" -o "$W/real.qcow2"
expect_exit 2 "no mounted filesystem to freeze" --out "$W/frz.out" -- H backup hit-raw -o "$W/frz.qcow2" --consistency freeze
expect_exit 2 "applies to online backups" --out "$W/offc.out" -- H backup hit-raw -o "$W/offc.qcow2" --mode offline --consistency wip
[ -e "$W/frz.qcow2" ] || [ -e "$W/offc.qcow2" ] && fail "a refused backup left an image"
# Offline through an attachment needs the protected device quiet: it is now.
expect_exit 0 "offline" --out "$W/attoff.out" -- H backup hit-raw -o "$W/attoff.qcow2" --mode offline
sleep 300 3<"$DEV" &
holder=$!
expect_exit 2 "pid $holder \\(sleep\\) has $DEV open" --out "$W/attbusy.out" -- H backup hit-raw -o "$W/attbusy.qcow2" --mode offline
grep -q "back up online through the attachment" "$W/attbusy.out" || fail "no advice: $(cat "$W/attbusy.out")"
kill $holder; wait $holder 2>/dev/null
H detach hit-raw >/dev/null || fail "detach hit-raw"
log "attached: by the real device online; offline only when quiet"

# 3. A device not attached, held open by a process.
RAW=$(make_loop "$W/plain.img" 32M)
head -c 4M /dev/urandom | dd of="$RAW" bs=1M seek=8 conv=fsync status=none
sleep 300 3<>"$RAW" &
holder=$!
for mode in auto offline; do
  expect_exit 2 "pid $holder \\(sleep\\) has ${RAW} open" --out "$W/held-$mode.out" -- H backup "$RAW" -o "$W/held.qcow2" --mode $mode
  grep -q "hotimage attach $RAW" "$W/held-$mode.out" || fail "the refusal does not say what to do: $(cat "$W/held-$mode.out")"
done
[ -e "$W/held.qcow2" ] && fail "a refused backup left an image"
expect_exit 2 "not behind HotCore" --out "$W/held-wip.out" -- H backup "$RAW" -o "$W/held.qcow2" --consistency wip
kill $holder; wait $holder 2>/dev/null
backup_roundtrip "$W/quiet.qcow2" --same-as "$RAW" --says "offline" -- H backup "$RAW" -o "$W/quiet.qcow2"
log "not attached: refused while held open (named), accepted once quiet"

# 4. A whole disk with a mounted partition; a stacked loop; a read-only mount.
truncate -s 64M "$W/disk.img"
printf 'label: gpt\n,16M\n,\n' | sfdisk -q "$W/disk.img" >/dev/null 2>&1 || fail "sfdisk"
DISK=$(losetup -f --show -P "$W/disk.img" 2>/dev/null || losetup -j "$W/disk.img" | head -1 | cut -d: -f1)
[ -b "$DISK" ] || fail "no partitioned loop device"
# The partition scan of losetup -P does not always run here: partx adds them.
wait_until 2 test -b "${DISK}p2" || partx -a "$DISK" 2>/dev/null
wait_until 10 test -b "${DISK}p2" || fail "${DISK}p2 did not appear"
mkfs.ext4 -q -F "${DISK}p2" && mkdir -p "$W/p2" && mount "${DISK}p2" "$W/p2" || fail "mount ${DISK}p2"
expect_exit 2 "${DISK}p2 is mounted read-write at $W/p2" --out "$W/disk.out" -- H backup "$DISK" -o "$W/disk.qcow2" --mode offline
umount "$W/p2"
STACK=$(losetup -f --show "${DISK}p1" 2>/dev/null || losetup -j "${DISK}p1" | head -1 | cut -d: -f1)
trap 'losetup -d "$STACK" 2>/dev/null; partx -d "$DISK" 2>/dev/null; cleanup' EXIT
expect_exit 2 "$STACK is stacked on ${DISK}p1" --out "$W/stack.out" -- H backup "$DISK" -o "$W/stack.qcow2"
losetup -d "$STACK"
mount -o ro "${DISK}p2" "$W/p2" || fail "mount -o ro"
expect_exit 0 "offline" --out "$W/ro.out" -- H backup "${DISK}p2" -o "$W/ro.qcow2"
umount "$W/p2"
partx -d "$DISK" 2>/dev/null; losetup -d "$DISK"
log "a mounted partition and a stacked loop make a disk busy; a read-only mount is quiet"

# 5. A process that opens the device while it is read offline.
BIG=$(make_loop "$W/big.img" 64M)
head -c 48M /dev/urandom | dd of="$BIG" bs=1M conv=fsync status=none
H backup "$BIG" -o "$W/late.qcow2" --max-rate 8M > "$W/late.out" 2>&1 &
bk=$!
wait_until 20 grep -q "offline" "$W/late.out" || fail "the slow offline backup did not start: $(cat "$W/late.out")"
sleep 1
sleep 300 3<"$BIG" &
holder=$!
wait $bk; rc=$?
kill $holder; wait $holder 2>/dev/null
[ $rc = 1 ] || fail "an offline backup of a volume opened meanwhile exited $rc (want 1): $(tail -3 "$W/late.out")"
grep -q "put to use while it was read" "$W/late.out" || fail "message: $(tail -3 "$W/late.out")"
[ -e "$W/late.qcow2" ] && fail "the image of a volume opened during the backup was kept"
log "offline: a volume opened during the read fails the backup"
log "ok"
