#!/usr/bin/env bash
# dm-snapshot point in time, stamped sectors: a writer stamps 4 KiB blocks
# of /dev/mapper/hotimage-NAME (attach --via dm over a loop device) while a
# session (raw: no filesystem) is taken and the whole snapshot device is
# copied; every block of the copy must hold exactly the last write
# completed before the cut. The COW store starts at 16 MiB and must grow
# (more than one hb file) without the snapshot losing anything. Negative
# control: the live device fails the check at the cut. After the session no
# snapshot devices, loops or hb files are left, and the origin's table is
# linear again.
source "$(dirname "$0")/dm-lib.sh"

name=hitdm-pit
BLOCKS=16384   # 64 MiB
dm_attach $name 64M --hb-file-size 16M --buffer-limit 128M
linear=$(dm_table "$DEV")
rm -f "$W/stop"
"$STAMP" write "$DEV" --log "$W/pit.log" --blocks $BLOCKS --threads 2 \
    --stop-file "$W/stop" --burst-ms 300 --pause-ms 200 --seed 11 --ready-file "$W/ready" \
    > "$W/writer.out" 2>&1 &
writer=$!
wait_until 120 test -f "$W/ready" || fail "writer init did not finish"
sleep 0.5
t0=$(date +%s%N)
H snapshot $name --consistency raw -- sh -c '
  echo "$HOTIMAGE_ARMED_NS" > "'$W'/cut"
  dmsetup table "'$DEV'" > "'$W'/origin.table"
  sleep 1
  dd if="$HOTIMAGE_SNAPSHOT_DEVICE" of="'$W'/snap" bs=1M iflag=direct status=none &&
  "'$HOTIMAGE'" status "'$name'" --json --run-dir "'$RUN'" > "'$W'/status"
' 2> "$W/snapshot.err" || { cat "$W/snapshot.err"; tail -30 "$RUN/$name/daemon.log"; fail "snapshot"; }
t1=$(date +%s%N)
sleep 1
touch "$W/stop"
wait $writer; wrc=$?
cat "$W/writer.out"
[ $wrc = 0 ] || fail "the writer saw failed live writes (exit $wrc)"
grep -q "snapshot-origin" "$W/origin.table" || fail "during the session the origin was not snapshot-origin: $(cat "$W/origin.table")"
cut=$(cat "$W/cut")
"$STAMP" check "$W/pit.log" "$W/snap" --cut-ns "$cut" > "$W/check" 2>&1 \
    || { cat "$W/check"; fail "the dm snapshot is not the point-in-time state"; }
log "snapshot: $(head -1 "$W/check")"
"$STAMP" check "$W/pit.log" "$DEV" > "$W/live" 2>&1 || { cat "$W/live"; fail "the live device lost writes"; }
log "live:     $(head -1 "$W/live")"
if "$STAMP" check "$W/pit.log" "$DEV" --cut-ns "$cut" > "$W/neg" 2>&1; then
  fail "negative control passed: no write landed after the cut, the test proves nothing"
fi
log "control:  $(head -1 "$W/neg")"
read -r used total files growths < <(python3 -c '
import json; d=json.load(open("'$W'/status"))["dm"]
print(d["cowUsedBytes"], d["cowTotalBytes"], len(d["hbFiles"]), d["growths"])')
log "COW: $((used >> 10)) KiB used of $((total >> 20)) MiB in $files hb file(s), grown $growths time(s); session $(( (t1 - t0) / 1000000 )) ms"
[ "$used" -gt 0 ] || fail "no chunk was copied on write"
[ "$files" -gt 1 ] || fail "the COW store never grew past its first hb file"
dm_session_gone $name "$HB" || fail "session leftovers: $(dm_leftovers "$HB")"
[ "$(dm_table "$DEV")" = "$linear" ] || fail "the origin's table is not restored: $(dm_table "$DEV")"
H detach $name > /dev/null || fail "detach"
dmsetup ls | grep -q "hotimage-$name" && fail "detach left $(dmsetup ls)"
log "ok"
