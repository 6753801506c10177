#!/usr/bin/env bash
# A coherent set across the two kernel backends: a HotCore volume attached
# --via nbd (kernel NBD) and a dm-snapshot one (attach --via dm), both ext4
# and mounted.
#  1. Two ordered writers (Scripts/set-writer.py), one nbd → dm and one
#     dm → nbd, run through `backup NBD DM -o DIR`: exit 0, verify DIR, both
#     members restored with one `restore DIR --to … --to …` to fresh loop
#     devices, e2fsck -fn clean, and in each direction the second file's
#     last record is the first's or one less. Negative control: two single
#     backups of the same load, one after the other, break that.
#  2. Afterwards no snapshot device, loop or hb file of the dm member, its
#     origin linear again, and both daemons idle and not frozen.
#  3. Refused (exit 2, nothing written): the dm member unmounted in a set.
source "$(dirname "$0")/dm-lib.sh"
WRITER=$ROOT/Scripts/set-writer.py
N=hit-sn D=hitdm-sd

set_cleanup() {
  set +e
  for j in $(jobs -p); do kill -9 "$j" 2>/dev/null; done
  wait 2>/dev/null
  grep " $W" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  # The nbd daemon detached (disconnecting /dev/nbdN) before dm_cleanup kills what is left.
  [ -S "$RUN/$N/control.sock" ] && "$HOTIMAGE" detach $N --force --run-dir "$RUN" >/dev/null 2>&1
  dm_cleanup
}
trap set_cleanup EXIT

last_record() { tail -1 "$1" 2>/dev/null || echo 0; }
# coherent FIRST SECOND: the second file's last record is the first's or one less.
coherent() { [ "$2" = "$1" ] || [ "$2" = $(($1 - 1)) ]; }

attach_new $N 128M --via nbd
case $DEV in /dev/nbd*) ;; *) fail "attach --via nbd printed $DEV" ;; esac
NDEV=$DEV
mkfs_ext4 "$NDEV" && mkdir -p "$W/m-n" && mount "$NDEV" "$W/m-n" || fail "mkfs/mount $NDEV"
dm_attach $D 128M --hb-file-size 8M --buffer-limit 128M
DDEV=$DEV DHB=$HB
linear=$(dm_table "$DDEV")
mkfs_ext4 "$DDEV" && mkdir -p "$W/m-d" && mount "$DDEV" "$W/m-d" || fail "mkfs/mount $DDEV"
log "members: $N on $NDEV (HotCore nbd), $D on $DDEV (dm-snapshot)"

# --- 1. the set under two ordered writers, and the negative control
rm -f "$W/stop"
python3 "$WRITER" "$W/stop" "$W/m-n/nd" "$W/m-d/nd" > "$W/w1.out" &
w1=$!
python3 "$WRITER" "$W/stop" "$W/m-d/dn" "$W/m-n/dn" > "$W/w2.out" &
w2=$!
wait_until 30 test -s "$W/m-d/nd" || fail "the ordered writers did not start"
wait_until 30 test -s "$W/m-n/dn" || fail "the ordered writers did not start"
sleep 1
t0=$(date +%s%N)
expect_exit 0 "set complete" --out "$W/set.events" -- H backup $N $D -o "$W/set" --json
log "set backup: $(( ($(date +%s%N) - t0) / 1000000 )) ms; $(grep -o 'members armed within [0-9.]* s' "$W/set.events" | head -1)"
expect_exit 0 "image complete" -- H backup $N -o "$W/single-n.qcow2"
expect_exit 0 "image complete" -- H backup $D -o "$W/single-d.qcow2"
touch "$W/stop"; wait $w1 && wait $w2 || fail "an ordered writer failed"
log "ordered writers: $(cat "$W/w1.out") and $(cat "$W/w2.out") records"
[ -f "$W/set/$N.qcow2" ] && [ -f "$W/set/$D.qcow2" ] && [ "$(ls "$W/set" | wc -l)" = 2 ] || fail "the set's images are not DIR/NAME.qcow2: $(ls "$W/set")"
grep -q '"event":"setSummary"' "$W/set.events" || fail "no setSummary event"
HI verify "$W/set" > "$W/verify.out" 2>&1 || fail "verify of the set: $(cat "$W/verify.out")"
for n in $N $D; do HI info "$W/set/$n.qcow2" --json > "$W/info-$n.json" || fail "info $n"; done
python3 - "$W/info-$N.json" "$W/info-$D.json" "$N" "$D" <<'PY' || fail "the images do not record one set"
import json, sys
a, b = [json.load(open(p))["metadata"]["set"] for p in sys.argv[1:3]]
assert a["id"] == b["id"] and a["cutTime"] == b["cutTime"], (a, b)
assert [m["name"] for m in a["members"]] == sys.argv[3:5], a
assert a["member"] == sys.argv[3] and b["member"] == sys.argv[4], (a, b)
PY

RN=$(make_loop "$W/r-n.img" 128M) RD=$(make_loop "$W/r-d.img" 128M)
HI restore "$W/set" --to $N="$RN" --to $D="$RD" > "$W/restore.out" 2>&1 || fail "restore of the set: $(cat "$W/restore.out")"
for x in n:$RN d:$RD; do
  e2fsck -fn "${x#*:}" > "$W/fsck-${x%%:*}" 2>&1 || fail "e2fsck -fn of the restored $x: $(tail -5 "$W/fsck-${x%%:*}")"
  mkdir -p "$W/r-${x%%:*}" && mount -o ro "${x#*:}" "$W/r-${x%%:*}" || fail "mount the restored $x"
done
a1=$(last_record "$W/r-n/nd") b1=$(last_record "$W/r-d/nd")
a2=$(last_record "$W/r-d/dn") b2=$(last_record "$W/r-n/dn")
umount "$W/r-n" "$W/r-d"
log "1. set: nbd→dm last records $a1/$b1, dm→nbd $a2/$b2"
[ "$a1" -gt 5 ] && [ "$a2" -gt 5 ] || fail "too few records at the cut ($a1, $a2): the test proves nothing"
coherent "$a1" "$b1" || fail "the set is not one point in time: nbd→dm, the dm volume's last record is $b1, the nbd one's $a1"
coherent "$a2" "$b2" || fail "the set is not one point in time: dm→nbd, the nbd volume's last record is $b2, the dm one's $a2"
# The negative control: each volume on its own, the nbd one first.
backup_roundtrip "$W/single-n.qcow2" --loop 128M --fs ext4 --mount "$W/s-n"
backup_roundtrip "$W/single-d.qcow2" --loop 128M --fs ext4 --mount "$W/s-d"
sa=$(last_record "$W/s-n/nd") sb=$(last_record "$W/s-d/nd")
umount "$W/s-n" "$W/s-d"
log "1. negative control, two single backups (nbd, then dm): nbd→dm last records $sa/$sb"
coherent "$sa" "$sb" && fail "negative control: two single backups kept the invariant ($sa, $sb): the test cannot tell"

# --- 2. nothing left of the cut
dm_session_gone $D "$DHB" || fail "2. $D: session leftovers: $(dm_leftovers "$DHB")"
[ ! -b "/dev/mapper/hotimage-$D-snap" ] || fail "2. the dm member's snapshot device is still there"
[ "$(dm_table "$DDEV")" = "$linear" ] || fail "2. $D: origin table not restored: $(dm_table "$DDEV")"
for n in $N $D; do
  st=$(status_json $n) || fail "2. status $n"
  [ "$(json_get "['session']['phase']" <<< "$st")" = idle ] || fail "2. $n is not idle: $st"
  [ "$(json_get ".get('frozen')" <<< "$st")" = None ] || fail "2. $n is still frozen: $st"
done
touch "$W/m-n/after" "$W/m-d/after" && sync || fail "2. the volumes are not writable after the set"
log "2. no snapshot device, loop or hb file of $D, its origin linear again; both daemons idle, nothing frozen"

# --- 3. an unmounted dm-snapshot member is refused
umount "$W/m-d"
expect_exit 2 "must hold a mounted filesystem" -- H backup $N $D -o "$W/refused"
[ -z "$(ls "$W/refused" 2>/dev/null)" ] || fail "3. a refused set left files: $(ls -a "$W/refused")"
dm_session_gone $D "$DHB" || fail "3. the refusal left a session: $(dm_leftovers "$DHB")"
log "3. refused: $(echo "$EXIT_MATCH" | cut -c1-160)"

umount "$W/m-n"
H detach $N > /dev/null || fail "detach $N"
H detach $D > /dev/null || fail "detach $D"
log "ok"
