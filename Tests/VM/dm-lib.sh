# Helpers for the dm-snapshot tests in the VM (sourced by v_dm_*.sh after
# Tests/Machine/lib.sh). Test devices are named hitdm-*; dmsetup is only a
# test oracle here (hotimage never runs it). dm_cleanup (chained before the
# suite's cleanup) kills this test's daemons, lets `hotimage detach NAME`
# clean their leftovers, and removes by name whatever dm devices the test made.
source "$(dirname "${BASH_SOURCE[0]}")/../Machine/lib.sh"
[ -n "${HOTIMAGE_IN_VM:-}" ] || skip "runs inside Scripts/vm-test only"
[ -c /dev/mapper/control ] || skip "no device-mapper in this kernel"

dm_cleanup() {
  set +e
  for j in $(jobs -p); do kill -9 "$j" 2>/dev/null; done
  wait 2>/dev/null
  grep " $W" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  for d in "$RUN"/*/; do [ -f "$d/pid" ] && kill -9 "$(cat "$d/pid")" 2>/dev/null; done
  sleep 0.2
  for n in $( (ls "$RUN" 2>/dev/null; dmsetup ls 2>/dev/null | awk '{print $1}' | sed -nE 's/^hotimage-(.*)-(snap|cow|real)$/\1/p') | sort -u); do
    "$HOTIMAGE" detach "$n" --run-dir "$RUN" >/dev/null 2>&1
  done
  for n in $(dmsetup ls 2>/dev/null | awk '{print $1}' | grep -E '^(hotimage-)?hitdm-' | sort -r); do
    dmsetup remove --force "$n" >/dev/null 2>&1
  done
  cleanup
}
trap dm_cleanup EXIT

# dm_attach NAME SIZE [attach options...]: a loop device BASE of SIZE and
# `attach --via dm` over it; sets BASE, DEV (/dev/mapper/hotimage-NAME), HB.
dm_attach() {
  local name=$1 size=$2; shift 2
  BASE=$(make_loop "$W/$name.img" "$size")
  HB=$W/hb-$name
  local out
  out=$(H attach "$BASE" --via dm --name "$name" --buffer-dir "$HB" "$@" 2>&1) || fail "attach --via dm $name: $out"
  DEV=$(echo "$out" | tail -1)
  [ "$DEV" = "/dev/mapper/hotimage-$name" ] || fail "attach printed '$DEV', expected /dev/mapper/hotimage-$name"
  [ -b "$DEV" ] || fail "$DEV is not a block device"
}

# The session's devices, loops over hb files and hb files of NAME: none.
dm_session_gone() {
  local name=$1 hbdir=$2
  dmsetup ls | grep -qE "^hotimage-$name-(snap|cow|real)\b" && return 1
  losetup -a | grep -q "hb_[0-9]*\.tmp" && return 1
  ls "$hbdir"/hb_*.tmp >/dev/null 2>&1 && return 1
  return 0
}
dm_leftovers() {  # for messages
  echo "dm: $(dmsetup ls | tr '\n' ' ') loops: $(losetup -a | grep hb_ | tr '\n' ' ') files: $(ls "$1" 2>/dev/null | tr '\n' ' ')"
}
# The table of a dm device, as dmsetup prints it.
dm_table() { dmsetup table "$1" 2>/dev/null; }
# mkfs.ext4 without lazy inode-table/journal init: the kernel's background
# zeroing would otherwise write most of a fresh volume during the first
# backup (dm-snapshot copies every written chunk, used or not).
mkfs_ext4() { mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$@"; }
