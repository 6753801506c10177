# Test helpers for the machine-level suite (sourced by each t_*.sh).
# Each test works in its own directory and names its daemons "hit-<test>";
# cleanup (always, via trap) unmounts, detaches and removes only those.
set -u
source "$(dirname "${BASH_SOURCE[0]}")/../../Scripts/lib.sh"

T=$(basename "$0" .sh)
W=$(mktemp -d /tmp/hotimage-test.XXXXXX)
RUN=$W/run
mkdir -p "$RUN"
HOTIMAGE=${HOTIMAGE:-$ROOT/.build/release/hotimage}
STAMP=${STAMP:-$ROOT/.build/release/hotimage-stamp}
H() { local sub=$1; shift; "$HOTIMAGE" "$sub" --run-dir "$RUN" "$@"; }
HI() { "$HOTIMAGE" "$@"; }  # commands without a daemon (info, verify, restore)
HOTIMAGE_RUN=$RUN

log() { echo "[$T] $*"; }
fail() { echo "[$T] FAIL: $*" >&2; for f in "$RUN"/*/daemon.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done; exit 1; }
skip() { echo "[$T] SKIP: $*"; exit 77; }
assert() { local what=$1; shift; "$@" || fail "$what"; }

cleanup() {
  set +e
  # Background jobs of the test (writers, clients) first.
  for j in $(jobs -p); do kill -9 "$j" 2>/dev/null; done
  wait 2>/dev/null
  # Unmount anything under our directory, then our daemons, then our loops.
  grep " $W" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  for d in "$RUN"/*/; do
    [ -d "$d" ] || continue
    local n; n=$(basename "$d")
    if [ -S "$d/control.sock" ]; then "$HOTIMAGE" detach "$n" --force --run-dir "$RUN" >/dev/null 2>&1; fi
    if [ -f "$d/pid" ]; then kill -9 "$(cat "$d/pid")" 2>/dev/null; sleep 0.2; fi
    # A daemon that had to be killed leaves its loop over the nbdfuse file.
    if [ -f "$d/device" ]; then losetup -d "$(cat "$d/device")" 2>/dev/null; fi
    if [ -d "$d/fuse" ]; then fusermount3 -u "$d/fuse" 2>/dev/null; fi
  done
  drop_loops_under "$W"
  rm -rf "$W"
}
trap cleanup EXIT

# attach_new NAME SIZE [attach options...]: a backing loop device of SIZE and
# a HotCore daemon over it; sets BASE (real device) and DEV (protected device).
attach_new() {
  local name=$1 size=$2; shift 2
  BASE=$(make_loop "$W/$name.img" "$size")
  local out
  # HOTIMAGE_VIA (the VM suite sets nbd) applies unless the test names --via.
  local via=()
  case " $* " in *" --via "*) ;; *) [ -n "${HOTIMAGE_VIA:-}" ] && via=(--via "$HOTIMAGE_VIA") ;; esac
  out=$(H attach "$BASE" --name "$name" --buffer-dir "$W/hb-$name" "${via[@]}" "$@") || fail "attach $name: $out"
  DEV=$(echo "$out" | tail -1)
  [ -b "$DEV" ] || fail "attach printed '$DEV', not a block device"
}

# wait_until SECONDS CMD...: polls CMD every 0.1 s.
wait_until() {
  local limit=$1; shift
  local end=$(( $(date +%s%N) + limit * 1000000000 ))
  while [ "$(date +%s%N)" -lt $end ]; do "$@" && return 0; sleep 0.1; done
  return 1
}

status_json() { H status "$1" --json; }
json_get() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }
