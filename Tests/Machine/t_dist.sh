#!/usr/bin/env bash
# dist/: the systemd unit passes `systemd-analyze verify` with no warning
# (negative control: a misspelt key is reported), and the udev rule's name
# extraction gives NAME from the backend identifier the daemon sets.
source "$(dirname "$0")/lib.sh"
command -v systemd-analyze >/dev/null || skip "systemd-analyze is not installed"
U="$ROOT/dist/systemd/hotimage-attach@.service"
mkdir -p "$W/units" /etc/hotimage/attach
conf=/etc/hotimage/attach/hit-dist.conf
[ -e "$conf" ] && skip "$conf exists; not touching a real configuration"
echo "DEVICE=/dev/null" > "$conf"
trap 'rm -f "$conf"; rmdir /etc/hotimage/attach 2>/dev/null; cleanup' EXIT
cp "$U" "$W/units/hotimage-attach@.service"
sed 's/^Restart=always/Restartt=always/' "$U" > "$W/units/broken@.service"
# verify wants the ExecStart binary to exist.
export PATH="$W/bin:$PATH"; mkdir -p "$W/bin"
sed -i "s|/usr/local/bin/hotimage|$HOTIMAGE|g" "$W/units/"*.service
out=$(systemd-analyze verify "$W/units/hotimage-attach@hit-dist.service" 2>&1 | grep -v "^$")
[ -z "$out" ] || fail "systemd-analyze verify reports: $out"
bad=$(systemd-analyze verify "$W/units/broken@hit-dist.service" 2>&1)
echo "$bad" | grep -q "Unknown key" || fail "negative control: a misspelt key went unreported"
# The udev rules' PROGRAMs, run on what the kernel shows.
R="$ROOT/dist/udev/60-hotimage.rules"
prog_nbd=$(grep 'KERNEL=="nbd' "$R" | sed -n 's/.*PROGRAM="\([^"]*\)".*/\1/p')
prog_loop=$(grep 'KERNEL=="loop' "$R" | sed -n 's/.*PROGRAM="\([^"]*\)".*/\1/p')
mkdir -p "$W/sys/block/nbd3" "$W/sys/block/loop7/loop"
echo "hotimage:data:/dev/vdb1" > "$W/sys/block/nbd3/backend"
echo "/run/hotimage/web/fuse/disk" > "$W/sys/block/loop7/loop/backing_file"
n=$(${prog_nbd//\/sys%p/$W/sys/block/nbd3}) || fail "nbd PROGRAM failed"
l=$(${prog_loop//\/sys%p/$W/sys/block/loop7}) || fail "loop PROGRAM failed"
[ "$n" = data ] || fail "udev nbd rule names '$n', want data"
[ "$l" = web ] || fail "udev loop rule names '$l', want web"
log "ok: unit verifies clean, udev names data and web"
