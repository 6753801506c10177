#!/usr/bin/env bash
# The VM has what the kernel-path tests need: nbd and device-mapper in the
# kernel, loop devices over guest tmpfs, and the host's build.
source "$(dirname "$0")/../Machine/lib.sh"
[ -n "${HOTIMAGE_IN_VM:-}" ] || skip "runs inside Scripts/vm-test only"
assert "nbd devices exist" test -b /dev/nbd0
assert "device-mapper control node exists" test -c /dev/mapper/control
assert "kernel knows dm-snapshot" grep -q snapshot <(dmsetup targets)
dev=$(make_loop "$W/a.img" 64M)
assert "mkfs.ext4 on a guest loop device" mkfs.ext4 -q "$dev"
assert "hotimage runs in the guest" "$HOTIMAGE" --version
log "ok: $(uname -r), $dev"
