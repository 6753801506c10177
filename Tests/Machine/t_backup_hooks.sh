#!/usr/bin/env bash
# The hook routine, branch by branch (each hook appends its phase, error
# and freeze setting to a log):
#   before-snapshot fails → exit 4, nothing else runs, no image;
#   the snapshot fails    → after-snapshot and after-backup run with the
#                           error (3), no image;
#   after-snapshot fails  → the image is made anyway, after-backup runs,
#                           exit 6;
#   all succeed           → exit 0, the hooks are recorded in the image;
#   a hook past its timeout is killed and counts as failed;
#   hooks from the configuration file run before the command line's.
#   --keep-partial keeps an incomplete image that restore refuses.
source "$(dirname "$0")/lib.sh"

attach_new hit-hooks 64M --snapshot-deadline 3
mkfs.ext4 -q -F "$DEV"
mkdir -p "$W/m" && mount "$DEV" "$W/m"
echo data > "$W/m/file"; sync
HL=$W/hooks.log
rec() { echo "echo \"$1 \$HOTIMAGE_PHASE err=\$HOTIMAGE_ERROR freeze=\$HOTIMAGE_FREEZE vol=\$HOTIMAGE_VOLUMES\" >> $HL${2:+; $2}"; }

# 1. before-snapshot fails.
: > "$HL"
expect_exit 4 "" -- H backup hit-hooks -o "$W/1.qcow2" --before-snapshot "$(rec b 'exit 7')" --after-snapshot "$(rec a)" --after-backup "$(rec z)"
[ "$(cat "$HL")" = "b before-snapshot err=0 freeze=yes vol=$W/m" ] || fail "before-snapshot failure ran: $(cat "$HL")"
[ -e "$W/1.qcow2" ] && fail "an image exists after an aborted backup"
log "before-snapshot fails: exit 4, no other hook, no image"

# 2. The snapshot fails: a writer that never pauses, --consistency wip, a 3 s deadline.
: > "$HL"
( while true; do dd if=/dev/zero of="$W/m/busy" bs=4k count=1 conv=fsync status=none; done ) &
BUSY=$!
expect_exit 3 "" -- H backup hit-hooks -o "$W/2.qcow2" --consistency wip --before-snapshot "$(rec b)" --after-snapshot "$(rec a)" --after-backup "$(rec z)"
kill $BUSY; wait $BUSY 2>/dev/null
printf 'b before-snapshot err=0 freeze=no vol=%s\na after-snapshot err=3 freeze=no vol=%s\nz after-backup err=3 freeze=no vol=%s\n' "$W/m" "$W/m" "$W/m" > "$W/2.want"
cmp -s "$W/2.want" "$HL" || { diff "$W/2.want" "$HL"; fail "snapshot failure: hooks"; }
[ -e "$W/2.qcow2" ] && fail "an image exists after a failed snapshot"
log "snapshot fails: after-snapshot and after-backup ran with error 3, no image"

# 3. after-snapshot fails: the backup goes on, exit 6.
: > "$HL"
expect_exit 6 "" -- H backup hit-hooks -o "$W/3.qcow2" --before-snapshot "$(rec b)" --after-snapshot "$(rec a 'exit 5')" --after-backup "$(rec z)"
[ "$(wc -l < "$HL")" = 3 ] && grep -q "^z after-backup err=0" "$HL" || fail "after-snapshot failure: hooks: $(cat "$HL")"
HI verify "$W/3.qcow2" >/dev/null || fail "the image after a failed after-snapshot hook does not verify"
qemu-img check "$W/3.qcow2" >/dev/null 2>&1 || fail "qemu-img check (image 3)"
log "after-snapshot fails: image complete, after-backup ran, exit 6"

# 4. All succeed, from the configuration file and the command line; a hook timeout.
: > "$HL"
cat > "$W/hotimage.conf" <<CONF
# test configuration
before-snapshot = $(rec cb)
after-backup = $(rec cz)
compress = zlib
CONF
H backup hit-hooks -o "$W/4.qcow2" --config "$W/hotimage.conf" --before-snapshot "$(rec b)" --after-backup "$(rec z)" > "$W/4.out" 2>&1 \
  || fail "hooks all succeed: $(cat "$W/4.out")"
[ "$(cut -d' ' -f1 "$HL" | tr '\n' ' ')" = "cb b cz z " ] || fail "hook order: $(cat "$HL")"
HI info "$W/4.qcow2" > "$W/4.info"
grep -q "compression: *zlib" "$W/4.info" || fail "the config file's compress was not used: $(cat "$W/4.info")"
[ "$(grep -c '^hook:' "$W/4.info")" = 2 ] || fail "the image does not record the two snapshot hooks: $(cat "$W/4.info")"
qemu-img info "$W/4.qcow2" | grep -q "compression type: zlib" || fail "qemu-img does not see zlib"
qemu-img check "$W/4.qcow2" >/dev/null 2>&1 || fail "qemu-img check (zlib image)"
echo "bad key = 1" > "$W/bad.conf"
expect_exit 2 "bad.conf:1: unknown key" -- H backup hit-hooks -o "$W/5.qcow2" --config "$W/bad.conf"
t0=$(date +%s)
expect_exit 4 "timed out" -- H backup hit-hooks -o "$W/6.qcow2" --hook-timeout 1 --before-snapshot "sleep 30"
[ $(( $(date +%s) - t0 )) -lt 10 ] || fail "hook timeout: the backup took $(( $(date +%s) - t0 )) s: $EXIT_OUT"
log "config file hooks first, then the command line; compress from the file; timeouts kill"

# 5. --keep-partial: a backup interrupted (SIGTERM from its after-snapshot
#    hook) keeps an incomplete image; restore refuses it.
expect_exit 130 "" -- H backup hit-hooks -o "$W/7.qcow2" --keep-partial --after-snapshot 'kill -TERM $PPID'
[ -e "$W/7.qcow2" ] || fail "--keep-partial: no partial image"
HI info "$W/7.qcow2" | grep -q "complete: *NO" || fail "--keep-partial: not marked incomplete"
expect_exit 2 "incomplete" -- HI restore "$W/7.qcow2" "$W/7.raw"
HI verify "$W/7.qcow2" > /dev/null 2>&1 && fail "verify passes an incomplete image"
qemu-img check "$W/7.qcow2" >/dev/null 2>&1 || fail "qemu-img check (partial image)"
log "--keep-partial: an interrupted backup's image is kept, marked incomplete, refused by restore"

# 6. A full disk for the image: exit 1, a clear error, no image left, the
#    session ended (HotCore back to passthrough).
head -c 20M /dev/urandom > "$W/m/random"; sync
mkdir -p "$W/full" && mount -t tmpfs -o size=2M tmpfs "$W/full"
expect_exit 1 "" --out "$W/8.out" -- H backup hit-hooks -o "$W/full/8.qcow2"
grep -qi "no space left" "$W/8.out" || fail "full disk message: $(cat "$W/8.out")"
[ -e "$W/full/8.qcow2" ] && fail "a failed backup left its partial image"
[ "$(status_json hit-hooks | json_get "['engine']['phase']")" = idle ] || fail "the session did not end after the failure"
log "full disk: exit 1 ($(grep -i 'no space' "$W/8.out" | head -1 | cut -c1-100)), image removed, HotCore idle"
umount "$W/full"
log "ok"
