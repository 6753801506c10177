#!/usr/bin/env bash
# Benchmark (Scripts/bench cow), not a test: one random-overwrite workload on
# the same ext4 volume during a backup, once through HotCore (--via nbd) and
# once through the dm-snapshot backend (--via dm). Prints peak copy-on-write
# bytes (HotCore: memory + hb files; dm: the COW store's used bytes) and
# fio's write latency p50/p99, and their ratios. HotCore protects only used,
# not yet archived blocks, so its peak should be at most half of dm's.
source "$(dirname "$0")/../Machine/lib.sh"
[ -n "${HOTIMAGE_IN_VM:-}" ] || skip "runs inside Scripts/vm-test only"
FILE_MB=${COW_FILE_MB:-192}     # overwritten file; the volume is 512 MiB
RATE=${COW_RATE_IOPS:-300}      # fixed rate: both runs issue the same writes
RUNTIME=${COW_RUNTIME:-45}
MAXRATE=${COW_MAX_RATE:-12M}    # same imager speed for both

one() {  # backend
  local b=$1 src dev
  BASE=$(make_loop "$W/$b.img" 512M)
  if [ "$b" = hotcore ]; then
    dev=$(H attach "$BASE" --name bc-$b --via nbd --buffer-dir "$W/hb-$b" --memory-buffer 16M | tail -1) || fail "attach $b"
  else
    dev=$(H attach "$BASE" --name bc-$b --via dm --buffer-dir "$W/hb-$b" | tail -1) || fail "attach $b"
  fi
  src=bc-$b
  mkfs.ext4 -q -E nodiscard "$dev" || fail "mkfs $b"
  mkdir -p "$W/m-$b"; mount "$dev" "$W/m-$b" || fail "mount $b"
  dd if=/dev/urandom of="$W/m-$b/data" bs=1M count=$FILE_MB oflag=direct status=none
  # A second file of the same size that nobody writes: used blocks that
  # HotCore releases once archived.
  dd if=/dev/urandom of="$W/m-$b/cold" bs=1M count=$FILE_MB oflag=direct status=none
  sync
  fio --name=ow --filename="$W/m-$b/data" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
      --rate_iops=$RATE --runtime=$RUNTIME --time_based --size=${FILE_MB}M --randseed=7 \
      --output-format=json --output="$W/$b.fio" >/dev/null 2>&1 &
  local fio=$!
  sleep 3
  local t0; t0=$(date +%s%N)
  H backup "$src" -o "$W/$b.qcow2" --json --max-rate "$MAXRATE" --workers 2 > "$W/$b.events" 2> "$W/$b.err" \
    || { tail -5 "$W/$b.err"; fail "backup through $b"; }
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  wait $fio
  umount "$W/m-$b"; H detach "$src" >/dev/null
  python3 - "$b" "$W/$b.events" "$W/$b.fio" "$ms" >> "$W/results" <<'PY'
import json, sys
b, ev, fio, ms = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = [json.loads(l) for l in open(ev) if "\"summary\"" in l][-1]["summary"]
w = json.load(open(fio))["jobs"][0]["write"]
p = w["clat_ns"]["percentile"]
print(json.dumps({"backend": b, "peak": s["cowPeakBytes"], "p50": p["50.000000"] / 1e3,
                  "p99": p["99.000000"] / 1e3, "iops": w["iops"], "backup_ms": ms}))
PY
}

one hotcore
one dm
python3 - "$W/results" <<'PY'
import json, sys
r = {d["backend"]: d for d in map(json.loads, open(sys.argv[1]))}
h, d = r["hotcore"], r["dm"]
print("bench cow: same %s-IOPS random 4 KiB overwrite of a file during a backup" % int(round(h["iops"])))
print("%-9s %12s %10s %10s %10s" % ("backend", "peak COW", "p50 us", "p99 us", "backup s"))
for x in (h, d):
    print("%-9s %9.1f MiB %10.0f %10.0f %10.1f" % (x["backend"], x["peak"] / 2**20, x["p50"], x["p99"], x["backup_ms"] / 1e3))
ratio = h["peak"] / d["peak"] if d["peak"] else float("nan")
print("ratios hotcore/dm: peak COW %.2f (target <= 0.5: %s), p50 %.2f, p99 %.2f"
      % (ratio, "met" if ratio <= 0.5 else "NOT met", h["p50"] / d["p50"], h["p99"] / d["p99"]))
PY
