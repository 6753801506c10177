#!/usr/bin/env bash
# Stage 2 of the test VM, inside the chroot on the overlay of the host root:
# runs each Tests/VM/v_*.sh named in WORK/run.env and writes the summary to
# WORK/log and the exit status to WORK/rc (0 only if every test passed).
set -u
WORK=$1
source "$WORK/run.env"
cd "$ROOT"
exec > >(tee -a "$WORK/log" > /dev/ttyS0) 2>&1
export HOTIMAGE_IN_VM=1 DM_DISABLE_UDEV=1
export HOTIMAGE=$ROOT/.build/release/hotimage STAMP=$ROOT/.build/release/hotimage-stamp
echo "guest: kernel $(uname -r), $(nproc) cpu, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
passed=0 failed=0 skipped=0 failures=()
for t in $TESTS; do
  echo "-- $t"
  s=$(date +%s)
  timeout --kill-after=10 900 bash "Tests/VM/$t.sh"
  rc=$?
  d=$(( $(date +%s) - s ))
  case $rc in
    0) passed=$((passed + 1)); echo "PASS $t (${d} s)" ;;
    77) skipped=$((skipped + 1)); echo "SKIP $t" ;;
    *) failed=$((failed + 1)); failures+=("$t"); echo "FAIL $t (exit $rc, ${d} s)" ;;
  esac
done
[ $failed = 0 ] || echo "vm failed: ${failures[*]}"
echo "vm: $passed passed, $failed failed, $skipped skipped"
sync
[ $failed = 0 ] && echo 0 > "$WORK/rc" || echo 1 > "$WORK/rc"
