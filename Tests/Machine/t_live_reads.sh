#!/usr/bin/env bash
# READs of the live export, checked byte for byte against the device:
# spliced from the device's page cache (the default) and copied through a
# buffer (HOTIMAGE_NO_SPLICE=1), with structured and with simple replies,
# 512 B to 2 MiB (both sides of the 1 MiB splice limit), pipelined, the
# device's last bytes, data read back right after a WRITE, a pipelined burst
# of small WRITEs (batched replies) read back, a READ past the end refused; and the whole device read back through the protected device.
# `status --json` must show which way the READs went.
source "$(dirname "$0")/lib.sh"
CHECK="$(dirname "$0")/nbd_readcheck.py"
SIZE=$((96 << 20))

attach_new hit-reads 96M
dd if=/dev/urandom of="$DEV" bs=1M count=96 oflag=direct status=none || fail "fill $DEV"
SOCK=$RUN/hit-reads/nbd.sock
python3 "$CHECK" "$SOCK" "$BASE" $SIZE structured 1 || fail "structured replies, spliced"
python3 "$CHECK" "$SOCK" "$BASE" $SIZE simple 2 || fail "simple replies, spliced"
dd if="$DEV" bs=1M iflag=direct status=none | cmp -s - "$BASE" || fail "the protected device reads differently from the device"
st=$(status_json hit-reads)
spliced=$(echo "$st" | json_get "['reads']['spliced']")
copied=$(echo "$st" | json_get "['reads']['copied']")
[ "$(echo "$st" | json_get "['reads']['spliceEnabled']")" = True ] || fail "splicing is off: $(grep -i splic "$RUN/hit-reads/daemon.log")"
[ "$spliced" -gt 100 ] || fail "only $spliced READs were spliced"
[ "$copied" -gt 0 ] || fail "no READ over 1 MiB was copied"
H status hit-reads | grep -q "NBD reads: $spliced spliced" || fail "status text: $(H status hit-reads)"
log "spliced: $spliced READs spliced, $copied copied (over 1 MiB), all equal to the device"
H detach hit-reads >/dev/null || fail "detach"

# The same READs copied, as with splicing refused by the kernel.
out=$(HOTIMAGE_NO_SPLICE=1 H attach "$BASE" --name hit-reads2 --buffer-dir "$W/hb2" ${HOTIMAGE_VIA:+--via $HOTIMAGE_VIA}) || fail "attach: $out"
python3 "$CHECK" "$RUN/hit-reads2/nbd.sock" "$BASE" $SIZE structured 3 || fail "structured replies, copied"
st=$(status_json hit-reads2)
[ "$(echo "$st" | json_get "['reads']['spliced']")" = 0 ] || fail "READs spliced with HOTIMAGE_NO_SPLICE=1"
[ "$(echo "$st" | json_get "['reads']['spliceEnabled']")" = False ] || fail "spliceEnabled with HOTIMAGE_NO_SPLICE=1"
log "copied: $(echo "$st" | json_get "['reads']['copied']") READs, all equal to the device"
H detach hit-reads2 >/dev/null || fail "detach"
log ok
