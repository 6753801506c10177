#!/usr/bin/env bash
# Malformed handshakes, out-of-range and oversized requests, unknown
# commands, a client vanishing mid-request, control messages out of order:
# each gets a clear error or refusal, and the daemon keeps serving.
source "$(dirname "$0")/lib.sh"

attach_new hit-bad 64M
head -c 1M /dev/urandom > "$W/pattern"
dd if="$W/pattern" of="$DEV" bs=1M oflag=direct status=none || fail "write through $DEV"
python3 "$(dirname "$0")/nbd_badclient.py" "$RUN/hit-bad/nbd.sock" "$RUN/hit-bad/control.sock" $((64 << 20)) \
    || fail "hostile client"
# Still serving, data intact, refusals logged.
kill -0 "$(cat "$RUN/hit-bad/pid")" || fail "the daemon died"
nbdinfo "nbd+unix:///live?socket=$RUN/hit-bad/nbd.sock" >/dev/null || fail "nbdinfo after the hostile client"
cmp <(dd if="$DEV" bs=1M count=1 iflag=direct status=none) "$W/pattern" || fail "data changed"
grep -q "refused" "$RUN/hit-bad/daemon.log" || fail "no refusal logged"
grep -q "vanished mid-request" "$RUN/hit-bad/daemon.log" || fail "the vanished client was not logged"
log "ok"
