#!/usr/bin/env bash
# Images are as secret as the disk (docs/DESIGN.md, "Images are as secret as
# the disk"): under umask 022 (and 000), an image, an image overwritten with
# --force over a world-readable file, a partial image kept by --keep-partial
# after an interrupt, and a file restore creates (also under umask 277) are
# all mode 0600, owned by root; --group G gives 0640 and group G; an unknown
# group is refused (exit 2) before anything is created.
source "$(dirname "$0")/lib.sh"

umask 022
attach_new hit-secrecy 64M
mkfs.ext4 -q -F "$DEV"
M=$W/m
mkdir -p "$M" && mount "$DEV" "$M" || fail "mount"
echo "root:secret-hash:19000:0:99999:7:::" > "$M/shadow" && chmod 600 "$M/shadow"
sync

# want FILE MODE GROUP WHAT
want() {
  local got; got=$(stat -c '%a %U %G' "$1") || fail "$4: no file $1"
  [ "$got" = "$2 root $3" ] || fail "$4: $1 is '$got', expected '$2 root $3'"
}

H backup hit-secrecy -o "$W/a.qcow2" --writers none > "$W/a.out" 2>&1 || { cat "$W/a.out"; fail "backup"; }
want "$W/a.qcow2" 600 root "a backup under umask 022"

(umask 000; H backup hit-secrecy -o "$W/b.qcow2" --writers none > "$W/b.out" 2>&1) || { cat "$W/b.out"; fail "backup under umask 000"; }
want "$W/b.qcow2" 600 root "a backup under umask 000"

echo "world-readable" > "$W/c.qcow2" && chmod 666 "$W/c.qcow2"
H backup hit-secrecy -o "$W/c.qcow2" --force --writers none > "$W/c.out" 2>&1 || { cat "$W/c.out"; fail "backup --force"; }
want "$W/c.qcow2" 600 root "--force over a 0666 file"
log "images: 0600 under umask 022 and 000, and over a world-readable file"

# --keep-partial: interrupted (SIGINT from the after-snapshot hook, i.e.
# after the image was created and the snapshot taken).
expect_exit 130 "" -- H backup hit-secrecy -o "$W/p.qcow2" --writers none --keep-partial --after-snapshot 'kill -INT $PPID'
HI info "$W/p.qcow2" | grep -q "complete: *NO" || fail "--keep-partial: the image is not marked incomplete"
want "$W/p.qcow2" 600 root "a partial image kept by --keep-partial"
log "a kept partial image: 0600"

# --group: an existing group other than root.
G=$(getent group daemon nogroup users bin sys | head -1 | cut -d: -f1)
[ -n "$G" ] || fail "no group daemon, nogroup, users, bin or sys on this machine"
H backup hit-secrecy -o "$W/g.qcow2" --writers none --group "$G" > "$W/g.out" 2>&1 || { cat "$W/g.out"; fail "backup --group $G"; }
want "$W/g.qcow2" 640 "$G" "--group $G"
log "--group $G: 0640, group $G"

# An unknown group: usage error, nothing created, no session begun.
expect_exit 2 "no such group: hit-no-such-group" -- H backup hit-secrecy -o "$W/u.qcow2" --writers none --group hit-no-such-group
[ ! -e "$W/u.qcow2" ] || fail "--group hit-no-such-group created the image"
[ "$(status_json hit-secrecy | json_get "['engine']['phase']")" = idle ] || fail "--group hit-no-such-group left a session"
log "an unknown group: exit 2, no image"

# restore to a file that does not exist: created 0600.
HI restore "$W/a.qcow2" "$W/restored.raw" > "$W/r.out" 2>&1 || { cat "$W/r.out"; fail "restore"; }
want "$W/restored.raw" 600 root "a file created by restore"
# A umask that takes the owner's write bit: still exactly 0600 (fchmod).
(umask 277; HI restore "$W/a.qcow2" "$W/restored2.raw" > "$W/r2.out" 2>&1) || { cat "$W/r2.out"; fail "restore under umask 277"; }
want "$W/restored2.raw" 600 root "a file created by restore under umask 277"
log "a restored file: 0600"
log "ok"
