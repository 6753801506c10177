#!/usr/bin/env bash
# The backup suite of the host, again on /dev/nbdN (attach --via nbd):
# stamped-sector point-in-time test, filesystem end to end under writers,
# deadline and kill tests, live READs (spliced on the guest kernel),
# incrementals (change tracking behind kernel NBD). Each
# runs as on the host with HOTIMAGE_VIA=nbd.
source "$(dirname "$0")/../Machine/lib.sh"
[ -n "${HOTIMAGE_IN_VM:-}" ] || skip "runs inside Scripts/vm-test only (needs the nbd driver)"
export HOTIMAGE_VIA=nbd
failed=()
for t in ${HOTIMAGE_VM_MACHINE_TESTS:-t_stamp_pit t_session_faults t_backup_online t_live_reads t_incremental}; do
  s=$(date +%s)
  timeout --kill-after=10 1200 bash "$ROOT/Tests/Machine/$t.sh"
  rc=$?
  log "$t on nbd: exit $rc ($(( $(date +%s) - s )) s)"
  [ $rc = 0 ] || failed+=("$t")
done
[ ${#failed[@]} = 0 ] || fail "on /dev/nbdN: ${failed[*]}"
