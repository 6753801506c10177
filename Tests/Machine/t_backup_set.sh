#!/usr/bin/env bash
# Coherent sets (backup SRC SRC… -o DIR): one point in time across volumes.
#  (a) two attached ext4 volumes and a writer that appends record n to a
#      file on the first (fsync), then to one on the second (fsync), with no
#      pause: in the restored pair the second's last record is the first's
#      or one less. Negative control: two single-volume backups of the same
#      load break that.
#  (b) three unmounted volumes, a stamped raw writer on each: every restored
#      member holds its op log's state at the set's one cut (writes that
#      followed a member's arm were held until every member was armed).
#  (c) a member whose COW buffer overflows: exit 3, no image left, nothing
#      frozen or in a session on any member, every live write landed.
#  snapshot of the set: one export per volume (HOTIMAGE_SNAPSHOT_URIS), the
#  copies keep the ordered writer's invariant.
#  Refusals: a directory that holds images, the same volume twice, a
#  relative --exclude.
source "$(dirname "$0")/lib.sh"
WRITER=$ROOT/Scripts/set-writer.py

mkfs_mount() {  # NAME: ext4 on the attachment's device, mounted at $W/m-NAME
  mkfs.ext4 -q -F "$DEV" && mkdir -p "$W/m-$1" && mount "$DEV" "$W/m-$1" || fail "$1: mkfs/mount"
}

last_record() { tail -1 "$1" 2>/dev/null || echo 0; }

# --- (a) ordered writes across two volumes
attach_new hit-sa 200M; mkfs_mount hit-sa
attach_new hit-sb 200M; mkfs_mount hit-sb
head -c 40M /dev/urandom > "$W/m-hit-sa/bulk"; sync
rm -f "$W/stop"
python3 "$WRITER" "$W/stop" "$W/m-hit-sa/log" "$W/m-hit-sb/log" > "$W/writer.out" &
wpid=$!
wait_until 20 test -s "$W/m-hit-sb/log" || fail "the ordered writer did not start"
sleep 1
expect_exit 0 "set complete" --out "$W/set.err" -- H backup hit-sa "$W/m-hit-sb" -o "$W/set" --json
mv "$W/set.err" "$W/set.events"
# The negative control: the same load, each volume on its own, one after the other.
expect_exit 0 "image complete" -- H backup hit-sa -o "$W/single-a.qcow2"
expect_exit 0 "image complete" -- H backup hit-sb -o "$W/single-b.qcow2"
# snapshot of the set: one export per volume, the copies at one cut.
expect_exit 0 "" --out "$W/snapset.out" -- H snapshot hit-sa hit-sb -- sh -c '
  for kv in $HOTIMAGE_SNAPSHOT_URIS; do nbdcopy "${kv#*=}" "'$W'/snap-${kv%%=*}.raw" || exit 1; done
  [ -n "$HOTIMAGE_SNAPSHOT_URI_HIT_SA" ] && [ "$HOTIMAGE_VOLUMES" = "hit-sa hit-sb" ]'
touch "$W/stop"; wait $wpid || fail "the ordered writer failed"
log "ordered writer: $(cat "$W/writer.out") records"
[ -f "$W/set/hit-sa.qcow2" ] && [ -f "$W/set/hit-sb.qcow2" ] || fail "the set's images are not DIR/NAME.qcow2: $(ls "$W/set")"
grep -q '"event":"setSummary"' "$W/set.events" || fail "no setSummary event"
grep '"event":"snapshot"' "$W/set.events" | grep -q '"members"' || fail "the snapshot event does not list the members"
for n in hit-sa hit-sb; do HI info "$W/set/$n.qcow2" --json > "$W/info-$n.json" || fail "info $n"; done
python3 - "$W/info-hit-sa.json" "$W/info-hit-sb.json" <<'PY' || fail "the images do not record one set"
import json, sys
sets = [json.load(open(p))["metadata"]["set"] for p in sys.argv[1:]]
a, b = sets
assert a["id"] == b["id"] and a["cutTime"] == b["cutTime"], sets
assert [m["name"] for m in a["members"]] == ["hit-sa", "hit-sb"], a
assert a["member"] == "hit-sa" and b["member"] == "hit-sb", sets
assert all(m["filesystemUUID"] and m["deviceBytes"] == 200 << 20 for m in a["members"]), a
PY
records() {  # IMAGE...: the last record of each image's log, restored and mounted
  local out=()
  for img in "$@"; do
    local stem=${img%.qcow2}
    backup_roundtrip "$img" --loop 200M --fs ext4 --mount "$stem.mnt"
    out+=("$(last_record "$stem.mnt/log")")
    umount "$stem.mnt"
  done
  echo "${out[@]}"
}
read -r ra rb <<< "$(records "$W/set/hit-sa.qcow2" "$W/set/hit-sb.qcow2")"
log "(a) set: last record $ra on the first volume, $rb on the second"
[ "$ra" -gt 10 ] || fail "(a) too few records at the cut ($ra): the test proves nothing"
[ "$rb" = "$ra" ] || [ "$rb" = $((ra - 1)) ] || fail "(a) the set is not one point in time: the second volume's last record is $rb, the first's $ra"
read -r sa sb <<< "$(records "$W/single-a.qcow2" "$W/single-b.qcow2")"
log "(a) negative control, two single backups: $sa and $sb"
[ "$sb" = "$sa" ] || [ "$sb" = $((sa - 1)) ] && fail "(a) negative control: two single backups kept the invariant ($sa, $sb): the test cannot tell"
na=$(debugfs -R "cat /log" "$W/snap-hit-sa.raw" 2>/dev/null | tail -1)
nb=$(debugfs -R "cat /log" "$W/snap-hit-sb.raw" 2>/dev/null | tail -1)
log "(a) snapshot of the set: last record $na and $nb"
[ "${na:-0}" -gt 0 ] || fail "(a) snapshot: no record in the first copy"
[ "$nb" = "$na" ] || [ "$nb" = $((na - 1)) ] || fail "(a) snapshot of the set is not one point in time ($na, $nb)"
umount "$W/m-hit-sa" "$W/m-hit-sb"

# --- refusals
expect_exit 2 "already holds images" -- H backup hit-sa hit-sb -o "$W/set"
expect_exit 2 "same volume" -- H backup hit-sa "$(cat "$RUN/hit-sa/device")" -o "$W/set2"
expect_exit 2 "absolute paths" -- H backup hit-sa hit-sb -o "$W/set3" --exclude rel/path
[ ! -e "$W/set2" ] || [ -z "$(ls "$W/set2")" ] || fail "a refused set left files: $(ls "$W/set2")"

# --- (b) three unmounted volumes, stamped raw writers, one cut
BLOCKS=8192   # 32 MiB
names=(hit-sr1 hit-sr2 hit-sr3)
writers=()
rm -f "$W/stop"
for n in "${names[@]}"; do
  attach_new "$n" 32M --memory-buffer 1M --hb-file-size 1M
  "$STAMP" write "$DEV" --log "$W/$n.log" --blocks $BLOCKS --threads 2 --stop-file "$W/stop" \
      --burst-ms 600 --pause-ms 100 --seed 11 --ready-file "$W/$n.ready" > "$W/$n.writer.out" 2>&1 &
  writers+=($!)
done
for n in "${names[@]}"; do wait_until 60 test -f "$W/$n.ready" || fail "(b) $n: writer init did not finish"; done
sleep 0.5
expect_exit 0 "set complete" --out "$W/raw.events" -- H backup "${names[@]}" -o "$W/raw" --consistency wip --pause-ms 0 --json
sleep 0.5
touch "$W/stop"
for p in "${writers[@]}"; do wait "$p" || fail "(b) a stamped writer saw failed live writes"; done
cut=$(python3 -c '
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        e = json.loads(l)
        if e.get("event") == "snapshot" and "members" in e: print(e["cutMonotonicNs"])' "$W/raw.events")
[ -n "$cut" ] || fail "(b) no set snapshot event with the cut"
for n in "${names[@]}"; do
  backup_roundtrip "$W/raw/$n.qcow2"
  "$STAMP" check "$W/$n.log" "$W/raw/$n.raw" --cut-ns "$cut" > "$W/$n.check" 2>&1 \
    || { cat "$W/$n.check"; fail "(b) $n: the restored member is not the state at the set's cut"; }
  log "(b) $n: $(head -1 "$W/$n.check")"
done
log "(b) three raw members at one cut; $(grep -o 'members armed within [0-9.]* s' <<< "$(cat "$W/raw.events")" | head -1)"

# --- (c) a member's COW buffer overflows: the whole set fails, nothing left
attach_new hit-so1 200M; mkfs_mount hit-so1
attach_new hit-so2 200M --memory-buffer 256K --hb-file-size 1M --buffer-limit 2M; mkfs_mount hit-so2
head -c 60M /dev/urandom > "$W/m-hit-so1/bulk"
head -c 60M /dev/urandom > "$W/src"; cp "$W/src" "$W/m-hit-so2/big"; sync
# Overwrite the big file in place during the backup (COW load far over 2 MiB).
# Each pass writes the whole file: when the loop stops, the file is the source again.
( while [ ! -e "$W/ow.stop" ]; do dd if="$W/src" of="$W/m-hit-so2/big" bs=1M conv=notrunc,fsync status=none; done ) &
ow=$!
expect_exit 3 "" --out "$W/over.out" -- H backup hit-so1 hit-so2 -o "$W/over" --max-rate 10M
touch "$W/ow.stop"; wait $ow
grep -qi "buffer\|limit" "$W/over.out" || fail "(c) the failure does not say the buffer overflowed: $(tail -5 "$W/over.out")"
[ -z "$(ls "$W/over" 2>/dev/null)" ] || fail "(c) a failed set left files: $(ls -a "$W/over")"
cmp "$W/src" "$W/m-hit-so2/big" || fail "(c) a live write was lost"
for n in hit-so1 hit-so2; do
  st=$(status_json "$n") || fail "(c) status $n"
  phase=$(json_get "['session']['phase']" <<< "$st"); frozen=$(json_get ".get('frozen')" <<< "$st")
  case $phase in idle|failed) ;; *) fail "(c) $n is still in a session ($phase)";; esac
  [ "$frozen" = None ] || fail "(c) $n is still frozen ($frozen)"
done
touch "$W/m-hit-so1/after" "$W/m-hit-so2/after" && sync || fail "(c) the volumes are not writable after the failed set"
# --keep-partial: every image kept, the failed member's marked incomplete; the set is not whole.
rm -f "$W/ow.stop"
( while [ ! -e "$W/ow.stop" ]; do dd if="$W/src" of="$W/m-hit-so2/big" bs=1M conv=notrunc,fsync status=none; done ) &
ow=$!
expect_exit 3 "every image is kept" -- H backup hit-so1 hit-so2 -o "$W/keep" --max-rate 10M --keep-partial
touch "$W/ow.stop"; wait $ow
HI info "$W/keep/hit-so2.qcow2" | grep -q "^complete: *NO" || fail "(c) --keep-partial: the failed member is not marked incomplete"
HI info "$W/keep/hit-so1.qcow2" | grep -q "^complete: *yes" || fail "(c) --keep-partial: the sound member is not complete"
expect_exit 1 "hit-so2.*incomplete" -- HI verify "$W/keep"
expect_exit 2 "" -- HI restore "$W/keep" --to hit-so1="$W/k1.raw" --to hit-so2="$W/k2.raw"
[ ! -e "$W/k1.raw" ] || fail "(c) restore of a partial set wrote a member"
# --- (d) the client interrupted, then killed, while imaging: every member released
phases_idle() { local n ph; for n in "$@"; do ph=$(status_json "$n" | json_get "['session']['phase']"); case $ph in idle|failed) ;; *) return 1;; esac; done; }
"$HOTIMAGE" backup hit-so1 hit-so2 -o "$W/intr" --max-rate 5M --run-dir "$RUN" > "$W/intr.out" 2>&1 &
bp=$!
wait_until 20 grep -q "set cut at" "$W/intr.out" || fail "(d) the set cut was not taken: $(tail -5 "$W/intr.out")"
sleep 1; kill -TERM $bp; wait $bp; rc=$?
[ $rc = 130 ] || fail "(d) an interrupted set exited $rc, not 130: $(tail -5 "$W/intr.out")"
[ -z "$(ls "$W/intr")" ] || fail "(d) an interrupted set left images: $(ls -a "$W/intr")"
phases_idle hit-so1 hit-so2 || fail "(d) a member is still in a session after the interrupt"
"$HOTIMAGE" backup hit-so1 hit-so2 -o "$W/killed" --max-rate 5M --run-dir "$RUN" > "$W/killed.out" 2>&1 &
bp=$!
wait_until 20 grep -q "set cut at" "$W/killed.out" || fail "(d) the set cut was not taken: $(tail -5 "$W/killed.out")"
sleep 1; kill -9 $bp; wait $bp 2>/dev/null
t0=$(date +%s)
wait_until 15 phases_idle hit-so1 hit-so2 || fail "(d) after the client was killed a member stayed in its session over 15 s"
log "(d) interrupted: exit 130, nothing left; client killed: both members back to passthrough in $(( $(date +%s) - t0 )) s"
log "(c) overflow: $(grep -m1 "set's\|hit-so2: backup failed" "$W/over.out" | cut -c1-240)"
log "PASS"
