#!/usr/bin/env bash
# Changed-block tracking (issue 17): HotCore marks every 64 KiB cluster a
# write touches, hands the clusters written before a cut to the session
# (map reply `changes`, RUN/NAME/changes.bin), keeps the map in a state
# file beside the buffer directory across clean restarts, and says when it
# cannot be trusted:
#   a. a fresh attach is untrusted ("no saved map"); writes are counted;
#   b. a committed cut (end commit) makes it trusted; a clean detach and
#      attach carry it over (same since, same count);
#   c. a daemon killed with -9: untrusted ("without a clean detach");
#   d. a write to the real device while detached: untrusted ("written while
#      detached");
#   e. writes before a cut are in changes.bin, writes after it are not and
#      show in status after the commit; an end without commit merges back.
# The session is driven over the control socket by a small python client
# (one JSON line per request), so the commit can be given.
source "$(dirname "$0")/lib.sh"

NAME=hit-cbt
CL=65536

# ctl STEP...: one control connection running the steps in order:
#   begin | map | end | end:ID | dd:CLUSTER[:COUNT] (64 KiB writes to the
#   protected device, O_DIRECT + fsync) | sleep:S
# Prints one line per step: MAP <reply json> and BITS <clusters in
# changes.bin>, END <reply json>.
ctl() {
  python3 - "$RUN/$NAME/control.sock" "$DEV" "$@" <<'PY'
import json, os, socket, subprocess, sys, time
sock, dev, steps = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rwb")
def call(req):
    f.write((json.dumps(req) + "\n").encode()); f.flush()
    line = f.readline()
    if not line: sys.exit("no reply to %s" % req)
    return json.loads(line)
size = call({"op": "hello"})["size"]
for st in steps:
    op, _, arg = st.partition(":")
    if op == "begin":
        r = call({"op": "begin", "consistency": "raw", "pauseMs": 50})
        if not r.get("ok"): sys.exit("begin: %s" % r)
    elif op == "map":
        r = call({"op": "map", "used": [[0, size]]})
        if not r.get("ok"): sys.exit("map: %s" % r)
        print("MAP " + json.dumps(r, sort_keys=True))
        ch = r.get("changes") or {}
        p = ch.get("path")
        bits = []
        if p:
            data = open(p, "rb").read()
            clusters = (size + ch["clusterBytes"] - 1) // ch["clusterBytes"]
            if len(data) != (clusters + 63) // 64 * 8: sys.exit("changes.bin: %d bytes for %d clusters" % (len(data), clusters))
            mode = os.stat(p).st_mode & 0o777
            if mode != 0o600: sys.exit("changes.bin mode %o" % mode)
            for i in range(len(data) // 8):
                w = int.from_bytes(data[i*8:i*8+8], "little")
                bits += [i * 64 + b for b in range(64) if w >> b & 1]
        print("BITS " + ",".join(map(str, bits)))
    elif op == "end":
        req = {"op": "end"}
        if arg: req["commit"] = arg
        r = call(req)
        if not r.get("ok"): sys.exit("end: %s" % r)
        print("END " + json.dumps(r, sort_keys=True))
    elif op == "dd":
        c, _, n = arg.partition(":")
        subprocess.run(["dd", "if=/dev/urandom", "of=" + dev, "bs=64K", "count=" + (n or "1"), "seek=" + c,
                        "oflag=direct", "conv=fsync,notrunc", "status=none"], check=True)
    elif op == "sleep":
        time.sleep(float(arg))
    else:
        sys.exit("unknown step " + st)
PY
}

# wr CLUSTER [COUNT]: 64 KiB writes to the protected device.
wr() { dd if=/dev/urandom of="$DEV" bs=64K count="${2:-1}" seek="$1" oflag=direct conv=fsync,notrunc status=none || fail "dd to $DEV"; }

tracking() { status_json $NAME | json_get "['tracking']$1"; }
changed() { tracking "['changedClusters']"; }
expect_changed() {  # N what
  wait_until 5 sh -c "[ \"\$('$HOTIMAGE' status $NAME --json --run-dir '$RUN' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"tracking\"][\"changedClusters\"])')\" = $1 ]" \
    || fail "$2: changedClusters $(changed), expected $1"
}
reattach() {
  local out
  out=$(H attach "$BASE" --name $NAME --buffer-dir "$W/hb-$NAME") || fail "attach again: $out"
  DEV=$(echo "$out" | tail -1)
  [ -b "$DEV" ] || fail "attach printed '$DEV'"
}
get() { sed -n "s/^$1 //p" <<< "$OUT" | json_get "$2"; }

# a. Fresh: untrusted, no saved map; writes counted at cluster granularity.
attach_new $NAME 64M
STATE="$W/hb-$NAME.cbt"
[ -f "$STATE" ] || fail "a: no state file $STATE after attach"
[ "$(stat -c %a "$STATE")" = 600 ] || fail "a: state file mode $(stat -c %a "$STATE")"
[ "$(tracking "['trusted']")" = False ] || fail "a: a fresh map is trusted"
[ "$(tracking "['reason']")" = "no saved map" ] || fail "a: reason '$(tracking "['reason']")'"
[ "$(tracking "['stateFile']")" = "$STATE" ] || fail "a: stateFile $(tracking "['stateFile']")"
[ "$(changed)" = 0 ] || fail "a: $(changed) clusters changed before any write"
wr 1; wr 5; wr 5; wr 10 2
# 8 KiB across the boundary of clusters 19 and 20.
dd if=/dev/urandom of="$DEV" bs=4K count=2 seek=$((20 * 16 - 1)) oflag=direct conv=fsync,notrunc status=none || fail "dd"
expect_changed 6 "a"
H status $NAME | grep -q "changes: untrusted (no saved map); the next incremental compares" || fail "a: status line: $(H status $NAME)"
log "a. fresh attach: untrusted (no saved map); 6 clusters after writes to 1, 5, 5, 10-11, 19/20"

# b. A committed cut makes the map trusted; a clean restart keeps it.
OUT=$(ctl begin map end:test-id-1) || fail "b: session: $OUT"
[ "$(sed -n 's/^BITS //p' <<< "$OUT")" = "1,5,10,11,19,20" ] || fail "b: changes.bin: $OUT"
[ "$(get MAP "['changes']['trusted']")" = False ] || fail "b: the first cut claims trust: $OUT"
[ "$(get MAP "['changes']['changedClusters']")" = 6 ] || fail "b: map changedClusters: $OUT"
[ "$(get MAP "['changes']['clusterBytes']")" = $CL ] || fail "b: clusterBytes: $OUT"
[ "$(get END "['committed']")" = True ] || fail "b: not committed: $OUT"
[ -e "$RUN/$NAME/changes.bin" ] && fail "b: changes.bin left after the session"
[ "$(tracking "['trusted']")" = True ] || fail "b: not trusted after a commit"
[ "$(tracking "['since']")" = test-id-1 ] || fail "b: since $(tracking "['since']")"
[ "$(changed)" = 0 ] || fail "b: $(changed) clusters after the commit"
wr 30 2
expect_changed 2 "b"
H status $NAME | grep -q "changes: 2 clusters (128.0 KiB) since image test-id-1 (trusted)" || fail "b: status line: $(H status $NAME)"
H detach $NAME >/dev/null || fail "b: detach"
grep -q '"clean":true' "$STATE" || fail "b: state file not clean after detach: $(head -1 "$STATE")"
reattach
[ "$(tracking "['trusted']")" = True ] || fail "b: not trusted after a clean restart: $(tracking "['reason']")"
[ "$(tracking "['since']")" = test-id-1 ] || fail "b: since after restart $(tracking "['since']")"
[ "$(changed)" = 2 ] || fail "b: $(changed) clusters after restart (2 before)"
grep -q '"clean":false' "$STATE" || fail "b: state file not marked unclean while attached"
log "b. committed cut test-id-1; clean detach + attach: trusted, since test-id-1, 2 clusters"

# e. Writes before the cut are the cut's; after it they are the next one's;
#    an end without commit gives them back.
wr 40
expect_changed 3 "e"
OUT=$(ctl begin map dd:50 end) || fail "e: session: $OUT"
[ "$(sed -n 's/^BITS //p' <<< "$OUT")" = "30,31,40" ] || fail "e: uncommitted cut: $OUT"
[ "$(get MAP "['changes']['trusted']")" = True ] || fail "e: trusted cut expected: $OUT"
[ "$(get MAP "['changes']['since']")" = test-id-1 ] || fail "e: since: $OUT"
expect_changed 4 "e: after an end without commit"
[ "$(tracking "['since']")" = test-id-1 ] || fail "e: since moved without a commit"
OUT=$(ctl begin map dd:60 sleep:0.2 end:test-id-2) || fail "e: session 2: $OUT"
[ "$(sed -n 's/^BITS //p' <<< "$OUT")" = "30,31,40,50" ] || fail "e: committed cut: $OUT"
[ "$(get END "['committed']")" = True ] || fail "e: not committed: $OUT"
[ "$(tracking "['since']")" = test-id-2 ] || fail "e: since $(tracking "['since']")"
expect_changed 1 "e: after the commit only the write after the cut"
OUT=$(ctl begin map end:test-id-3) || fail "e: session 3: $OUT"
[ "$(sed -n 's/^BITS //p' <<< "$OUT")" = "60" ] || fail "e: the write after the last cut is not in the next: $OUT"
expect_changed 0 "e: after the third commit"
log "e. cut = writes before it (30,31,40); 50 after it merged back without a commit; 60 after the next cut is the next's"

# c. kill -9: the next attach does not trust the map.
wr 2
kill -9 "$(cat "$RUN/$NAME/pid")"
wait_until 5 sh -c "! kill -0 $(cat "$RUN/$NAME/pid") 2>/dev/null" || fail "c: daemon still alive"
H detach $NAME >/dev/null 2>&1 || fail "c: cleanup of the killed daemon"
reattach
[ "$(tracking "['trusted']")" = False ] || fail "c: trusted after kill -9"
[ "$(tracking "['reason']")" = "the daemon stopped without a clean detach" ] || fail "c: reason '$(tracking "['reason']")'"
[ "$(tracking ".get('since')")" = None ] || fail "c: since $(tracking "['since']") while untrusted"
[ "$(changed)" = 0 ] || fail "c: an untrusted map starts empty ($(changed))"
log "c. kill -9 → untrusted: $(tracking "['reason']")"

# d. Trusted again, clean detach, a write to the real device, attach.
OUT=$(ctl begin map end:test-id-4) || fail "d: session: $OUT"
[ "$(tracking "['trusted']")" = True ] || fail "d: not trusted after a commit"
H detach $NAME >/dev/null || fail "d: detach"
reattach
[ "$(tracking "['trusted']")" = True ] || fail "d: not trusted after a clean restart: $(tracking "['reason']")"
H detach $NAME >/dev/null || fail "d: detach 2"
dd if=/dev/urandom of="$BASE" bs=4K count=1 seek=100 oflag=direct conv=fsync,notrunc status=none || fail "d: dd to $BASE"
reattach
[ "$(tracking "['trusted']")" = False ] || fail "d: trusted after a write while detached"
case "$(tracking "['reason']")" in
  "the device was written while detached ("*" sectors)") ;;
  *) fail "d: reason '$(tracking "['reason']")'" ;;
esac
H status $NAME | grep -q "changes: untrusted (the device was written while detached" || fail "d: status line: $(H status $NAME)"
log "d. written while detached → untrusted: $(tracking "['reason']")"
H detach $NAME >/dev/null || fail "detach"
log "ok"
