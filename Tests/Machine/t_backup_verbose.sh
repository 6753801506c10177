#!/usr/bin/env bash
# A writer whose application is not on the host (here: libvirt behind a
# socket that does not exist; on a host without virsh, virsh itself) stays
# silent during `backup` unless --verbose; `hotimage writers`, whose job is
# to say what is there, says it.
source "$(dirname "$0")/lib.sh"

attach_new hit-verbose 64M
mkfs.ext4 -q -F "$DEV"
mkdir -p "$W/m" && mount "$DEV" "$W/m" || fail "mount"
NOLIBVIRT=(--writers libvirt --writer-setting "libvirt-uri=qemu:///system?socket=$W/no-libvirt.sock")

H backup hit-verbose -o "$W/q.qcow2" "${NOLIBVIRT[@]}" > "$W/q.out" 2>&1 || { cat "$W/q.out"; fail "backup"; }
! grep "writer libvirt" "$W/q.out" || fail "backup without --verbose spoke of the absent libvirt"
log "backup: silent about an absent libvirt"

H backup hit-verbose -o "$W/v.qcow2" --verbose "${NOLIBVIRT[@]}" > "$W/v.out" 2>&1 || { cat "$W/v.out"; fail "backup --verbose"; }
grep "writer libvirt: .*\(not installed\|does not answer\)" "$W/v.out" || { cat "$W/v.out"; fail "backup --verbose did not say libvirt is absent"; }
log "backup --verbose: says so"

"$HOTIMAGE" writers "${NOLIBVIRT[@]}" > "$W/w.out" 2>&1 || { cat "$W/w.out"; fail "hotimage writers"; }
grep -q "writer libvirt: .*\(not installed\|does not answer\)" "$W/w.out" || { cat "$W/w.out"; fail "hotimage writers did not say libvirt is absent"; }
log "hotimage writers: says so"
log "ok"
