#!/usr/bin/env bash
# Incremental backups (backup --base): qcow2 chains read by qemu-img, the
# change map tracked by HotCore and when it is not trusted, merge.
#
# a. Raw, stamped: a full and four incrementals of an unmounted HotCore
#    volume, each under a stamped writer on its own block range:
#      l1 tracked (the full committed the map); a clean detach/attach
#      between l1 and l2, nothing written meanwhile: l2 tracked (the map was
#      kept); the daemon killed: l3 compared (untrusted); a clean detach and
#      a write to the real device while detached: l4 compared, and it holds
#      that write (a map trusted wrongly would miss it).
#    Every link, read through its chain by qemu-img convert, holds each
#    writer's range as it was at the link's cut; hotimage restore equals
#    qemu-img's reading; qemu-img check is clean; verify passes.
# b. Bad chains: an edited base (one byte), a swapped base (another image of
#    the same volume), a missing base: verify and restore name the link and
#    refuse; --base with a base of another volume is refused.
# c. merge: l2 folded into l1 restores to the same bytes; the whole chain
#    --into a full image restores to the same bytes; l3 (made against l2)
#    still verifies after l2 was replaced by its merge.
# d. ext4 under a file writer: full + two incrementals; every restored link's
#    files equal the writer's journal at that link's cut.
# e. A set: --base DIR makes each member an incremental of its image there
#    (tracked); the set verifies and restores to the devices' bytes.
source "$(dirname "$0")/lib.sh"

N=hit-inc
BLOCKS=4096          # 16 MiB per writer range; the volume is 64 MiB

start_writer() {  # tag first-block [--no-init]
  local tag=$1 first=$2; shift 2
  rm -f "$W/$tag.stop" "$W/$tag.ready"
  "$STAMP" write "$DEV" --log "$W/$tag.log" --first-block "$first" --blocks $BLOCKS --threads 2 \
      --stop-file "$W/$tag.stop" --burst-ms 200 --pause-ms 300 --seed "$first" --ready-file "$W/$tag.ready" "$@" \
      > "$W/$tag.out" 2>&1 &
  WPID=$!
  wait_until 60 test -f "$W/$tag.ready" || fail "$tag: writer init did not finish"
  sleep 0.3
}
stop_writer() {  # tag
  touch "$W/$1.stop"; wait $WPID || fail "$1: the writer saw failed writes: $(cat "$W/$1.out")"
}

# link NAME [backup options]: a backup of $N into $W/NAME.qcow2; CUT is its cut.
link() {
  local name=$1; shift
  H backup $N -o "$W/$name.qcow2" --json "$@" > "$W/$name.events" 2> "$W/$name.err" \
    || fail "$name: backup exited $?: $(tail -5 "$W/$name.err")"
  CUT=$(grep '"event":"snapshot"' "$W/$name.events" | json_get "['cutMonotonicNs']")
  echo "$CUT" > "$W/$name.cut"
  METHOD=$(HI info "$W/$name.qcow2" --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["metadata"].get("chain"); print(c["method"] if c else "full")')
  READ=$(grep '"event":"incremental"' "$W/$name.events" | json_get "['readClusters']" 2>/dev/null || echo all)
  log "$name: $METHOD, $READ cluster(s) read; $(grep 'summary: incremental' "$W/$name.err" | sed 's/.*summary: //')"
}

# check_link NAME TAG[:final]...: the chain read by qemu-img holds each
# writer range at the link's cut (or, :final, as the writer left it).
check_link() {
  local name=$1; shift
  local img=$W/$name.qcow2 cut; cut=$(cat "$W/$name.cut")
  qemu-img check "$img" > "$W/$name.qcheck" 2>&1 || fail "$name: qemu-img check: $(cat "$W/$name.qcheck")"
  grep -qi leak "$W/$name.qcheck" && fail "$name: qemu-img check reports leaks"
  rm -f "$W/$name.qemu.raw" "$W/$name.restored"
  qemu-img convert -O raw "$img" "$W/$name.qemu.raw" || fail "$name: qemu-img convert through the chain"
  for spec in "$@"; do
    local tag=${spec%%:*} opt=()
    [ "$spec" = "${spec%:final}" ] && opt=(--cut-ns "$cut")
    "$STAMP" check "$W/$tag.log" "$W/$name.qemu.raw" "${opt[@]}" > "$W/$name.$tag.check" 2>&1 \
      || { cat "$W/$name.$tag.check"; fail "$name: range of $tag is not its state at the cut"; }
  done
  HI verify "$img" > "$W/$name.verify" 2>&1 || fail "$name: verify: $(cat "$W/$name.verify")"
  HI restore "$img" "$W/$name.restored" > "$W/$name.restore" 2>&1 || fail "$name: restore: $(cat "$W/$name.restore")"
  cmp -s "$W/$name.qemu.raw" "$W/$name.restored" || fail "$name: hotimage restore differs from qemu-img's reading of the chain"
  log "$name: the chain holds $* at its cut; restore = qemu-img; check clean"
}
# reattach: $N over $BASE again (the same buffer directory, so the same state file).
reattach() {
  local out
  out=$(H attach "$BASE" --name $N --buffer-dir "$W/hb-$N" --hb-file-size 1M ${HOTIMAGE_VIA:+--via $HOTIMAGE_VIA}) || fail "re-attach: $out"
  DEV=$(echo "$out" | tail -1)
}
method_is() { [ "$METHOD" = "$1" ] || fail "$2: expected a $1 incremental, got $METHOD: $(grep -h 'incremental' "$W/$2.err" | head -3)"; }
tracking() { H status $N --json | json_get "$1"; }

# ---- a. raw, stamped ----
attach_new $N 64M --hb-file-size 1M
start_writer w1 0
link l0
[ "$METHOD" = full ] || fail "l0 is not a full image"
link l1 --base "$W/l0.qcow2" --compress none     # raw clusters: b. edits one in place
method_is tracked l1
[ "$READ" -le 256 ] || fail "l1 (tracked) read $READ clusters; w1 wrote 256 (the rest of the volume is unchanged)"
stop_writer w1
check_link l0 w1
check_link l1 w1
[ "$(qemu-img info --output=json "$W/l1.qcow2" | json_get "['backing-filename']")" = l0.qcow2 ] \
  || fail "l1's backing file is not stored relative (l0.qcow2)"

# Clean detach and attach, nothing written meanwhile: the map is kept.
L1ID=$(HI info "$W/l1.qcow2" --json | json_get "['metadata']['id']")
H detach $N > /dev/null || fail "detach"
reattach
[ "$(tracking "['tracking']['trusted']")" = True ] || fail "the map is not trusted after a clean detach/attach: $(tracking "['tracking']")"
[ "$(tracking "['tracking']['since']")" = "$L1ID" ] || fail "the map does not continue from l1 ($L1ID): $(tracking "['tracking']")"
start_writer w2 4096
link l2 --base "$W/l1.qcow2"
method_is tracked l2
# Only w1's and w2's ranges (256 clusters of 64 KiB each) were written
# since l1's cut (w1 ran on after it); the rest of the volume is not read.
[ "$READ" -le 512 ] && [ "$READ" -ge 256 ] || fail "l2 (tracked) read $READ clusters; w1 and w2 wrote at most 512"
stop_writer w2
check_link l2 w1:final w2

# The daemon killed: the map is not trusted; the next incremental compares.
kill -9 "$(cat "$RUN/$N/pid")"; sleep 0.5
H detach $N > /dev/null 2>&1 || fail "detach of the dead daemon"
reattach
[ "$(tracking "['tracking']['trusted']")" = False ] || fail "the map is trusted after the daemon was killed"
log "after kill -9: $(H status $N | grep -i 'changes')"
start_writer w3 8192
link l3 --base "$W/l2.qcow2"
method_is compared l3
[ "$READ" = 1024 ] || fail "l3 (compared) read $READ clusters, not every used one (1024)"
stop_writer w3
check_link l3 w1:final w2:final w3

# A change made to the real device while detached is found (compared).
H detach $N > /dev/null || fail "detach"
"$STAMP" write "$BASE" --log "$W/w4.log" --first-block 12288 --blocks $BLOCKS --threads 1 --duration 1 --seed 9 \
    > "$W/w4.out" 2>&1 || fail "w4: $(cat "$W/w4.out")"
reattach
[ "$(tracking "['tracking']['trusted']")" = False ] || fail "the map is trusted though the device was written while detached"
log "after a write while detached: $(H status $N | grep -i 'changes')"
link l4 --base "$W/l3.qcow2"
method_is compared l4
check_link l4 w1:final w2:final w3:final w4:final
# Negative control: l3 does not hold w4's writes (the check can fail).
"$STAMP" check "$W/w4.log" "$W/l3.qemu.raw" > /dev/null 2>&1 && fail "l3 already holds the write made while detached: the test proves nothing"
# The loop device's backing file written directly (not through this loop
# device, so its counter does not move) while detached: untrusted too.
H detach $N > /dev/null || fail "detach"
dd if=/dev/urandom of="$W/$N.img" bs=4K count=1 seek=16000 conv=notrunc status=none
reattach
[ "$(tracking "['tracking']['trusted']")" = False ] || fail "the map is trusted though the loop's backing file was written while detached"
log "after the backing file was written while detached: $(H status $N | grep -i 'changes')"
# Tracked links are small: l2 (16 MiB of a 64 MiB volume changed) holds about a quarter.
s0=$(stat -c %s "$W/l0.qcow2"); s2=$(stat -c %s "$W/l2.qcow2")
log "sizes: l0 $s0, l1 $(stat -c %s "$W/l1.qcow2"), l2 $s2, l3 $(stat -c %s "$W/l3.qcow2"), l4 $(stat -c %s "$W/l4.qcow2")"

# ---- b. bad chains ----
expect_refused() {  # what cmd...
  local what=$1; shift
  local out rc
  out=$("$@" 2>&1); rc=$?
  [ $rc = 2 ] || fail "$what: exit $rc, not 2: $out"
  echo "$out" | grep -q "$W/" || fail "$what: the message names no link: $out"
  log "$what: exit 2: $(echo "$out" | tail -1 | cut -c1-200)"
}
# The incremental written over its own base (or a link below it) is refused.
expect_refused "backup -o BASE --base BASE --force" H backup $N -o "$W/l1.qcow2" --base "$W/l1.qcow2" --force
expect_refused "backup -o LINK --base l2 --force" H backup $N -o "$W/l0.qcow2" --base "$W/l2.qcow2" --force
HI verify "$W/l2.qcow2" > /dev/null 2>&1 || fail "a refused backup harmed the chain"
# Missing base.
mv "$W/l1.qcow2" "$W/l1.away"
expect_refused "verify, base missing" HI verify "$W/l2.qcow2"
expect_refused "restore, base missing" HI restore "$W/l2.qcow2" "$W/x.raw"
[ -e "$W/x.raw" ] && fail "restore with a missing base created its target"
# Swapped base: l0 under l1's name (same volume, same size, another image).
cp "$W/l0.qcow2" "$W/l1.qcow2"
expect_refused "verify, swapped base" HI verify "$W/l2.qcow2"
expect_refused "restore, swapped base" HI restore "$W/l2.qcow2" "$W/x.raw"
# Edited base: one byte of l1's first data cluster.
mv "$W/l1.away" "$W/l1.qcow2"
cp "$W/l1.qcow2" "$W/l1.good"
off=$(qemu-img map --output=json "$W/l1.qcow2" | python3 -c '
import json,sys
for e in json.load(sys.stdin):
    if e.get("data") and e.get("offset") is not None and e.get("depth", 0) == 0: print(e["offset"] + 100); break')
[ -n "$off" ] || fail "no data cluster in l1 to edit"
printf '\x5a' | dd of="$W/l1.qcow2" bs=1 seek="$off" conv=notrunc status=none
out=$(HI verify "$W/l2.qcow2" 2>&1); rc=$?
[ $rc = 1 ] || fail "verify of a chain with an edited base: exit $rc, not 1: $out"
echo "$out" | grep -q "$W/l1.qcow2" || fail "verify does not name the edited link: $out"
log "verify, edited base: exit 1: $(echo "$out" | grep problem | head -1 | cut -c1-200)"
expect_refused "restore, edited base" HI restore "$W/l2.qcow2" "$W/x.raw"
mv "$W/l1.good" "$W/l1.qcow2"
HI verify "$W/l2.qcow2" > /dev/null 2>&1 || fail "the chain does not verify once l1 is back"
# A base of another volume.
other=$(make_loop "$W/other.img" 32M)
out=$(HI backup "$other" --mode offline -o "$W/other.qcow2" 2>&1) || fail "offline backup of another volume: $out"
expect_refused "backup --base of another volume" H backup $N -o "$W/bad.qcow2" --base "$W/other.qcow2"
[ -e "$W/bad.qcow2" ] && fail "a refused incremental left its image"

# ---- c. merge ----
cp "$W/l2.qemu.raw" "$W/l2.expect"
out=$(HI merge "$W/l2.qcow2" 2>&1) || fail "merge l2: $out"
log "merge l2: $(echo "$out" | tail -1)"
[ "$(qemu-img info --output=json "$W/l2.qcow2" | json_get "['backing-filename']")" = l0.qcow2 ] || fail "merged l2's base is not l0"
check_link l2 w1:final w2
cmp -s "$W/l2.expect" "$W/l2.restored" || fail "merged l2 restores to other bytes than the chain did"
HI verify "$W/l3.qcow2" > /dev/null 2>&1 || fail "l3 (made against l2) no longer verifies after l2 was merged"
out=$(HI merge "$W/l4.qcow2" --into "$W/full4.qcow2" 2>&1) || fail "merge --into: $out"
[ "$(qemu-img info --output=json "$W/full4.qcow2" | json_get ".get('backing-filename')")" = None ] || fail "merge --into left a backing file"
HI restore "$W/full4.qcow2" "$W/full4.raw" > /dev/null 2>&1 || fail "restore of the merged full image"
cmp -s "$W/l4.restored" "$W/full4.raw" || fail "the merged full image restores to other bytes than the chain"
out=$(HI merge "$W/l0.qcow2" 2>&1); [ $? = 2 ] || fail "merge of a full image: $out"
log "merge: l2 into l1 and the whole chain into a full image restore to the chain's bytes"
H detach $N > /dev/null || fail "detach"

# ---- d. ext4 under a file writer ----
E=hit-inc-fs
attach_new $E 256M
mkfs.ext4 -q -F "$DEV" && mkdir -p "$W/fs" && mount "$DEV" "$W/fs" || fail "ext4"
head -c 40M /dev/urandom > "$W/fs/static.bin"; mkdir -p "$W/fs/churn"
head -c 3M /dev/urandom > "$W/fs/excl.bin"; sync
EXSUM=$(sha256sum < "$W/fs/excl.bin")
rm -f "$W/fs.stop"
python3 "$ROOT/Scripts/demo-writer.py" "$W/fs/churn" "$W/fs.journal" "$W/fs.stop" &
FW=$!
sleep 1.5
prev=
for i in 0 1 2; do
  # e0 leaves excl.bin out; e1 and e2 do not, and must hold it though it
  # was never written since (a tracked incremental reads what its base left out).
  ex=(); [ $i = 0 ] && ex=(--exclude "$W/fs/excl.bin")
  H backup $E -o "$W/e$i.qcow2" --json ${prev:+--base "$prev"} "${ex[@]}" > "$W/e$i.events" 2> "$W/e$i.err" \
    || fail "e$i: backup: $(tail -5 "$W/e$i.err")"
  grep '"event":"snapshot"' "$W/e$i.events" | json_get "['cutMonotonicNs']" > "$W/e$i.cut"
  m=$(HI info "$W/e$i.qcow2" --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["metadata"].get("chain"); print(c["method"] if c else "full")')
  [ $i = 0 ] && [ "$m" != full ] && fail "e0 is not a full image"
  [ $i != 0 ] && [ "$m" != tracked ] && fail "e$i: expected a tracked incremental, got $m"
  log "e$i ($m): $(grep -h 'summary: incremental\|summary: image' "$W/e$i.err" | sed 's/.*summary: //' | tr '\n' ';')"
  prev=$W/e$i.qcow2
  sleep 1
done
touch "$W/fs.stop"; wait $FW
for i in 0 1 2; do
  rm -f "$W/e$i.raw"
  HI restore "$W/e$i.qcow2" "$W/e$i.raw" > /dev/null 2>&1 || fail "e$i: restore"
  e2fsck -fn "$W/e$i.raw" > "$W/e$i.fsck" 2>&1 || fail "e$i: e2fsck: $(tail -5 "$W/e$i.fsck")"
  mkdir -p "$W/e$i.mnt"; mount -o ro "$W/e$i.raw" "$W/e$i.mnt" || fail "e$i: mount"
  python3 "$ROOT/Scripts/demo-check.py" "$W/e$i.mnt/churn" "$W/fs.journal" "$(cat "$W/e$i.cut")" > "$W/e$i.check" 2>&1 \
    || { cat "$W/e$i.check"; fail "e$i: the files are not the journal's state at the cut"; }
  cmp -s "$W/fs/static.bin" "$W/e$i.mnt/static.bin" || fail "e$i: static.bin differs"
  if [ $i = 0 ]; then
    [ "$(sha256sum < "$W/e$i.mnt/excl.bin")" = "$EXSUM" ] && fail "e0: the excluded file's data is in the image"
  else
    [ "$(sha256sum < "$W/e$i.mnt/excl.bin")" = "$EXSUM" ] || fail "e$i: excl.bin (left out of the base, never written since) is not in the incremental"
  fi
  umount "$W/e$i.mnt"
  log "e$i: $(tail -1 "$W/e$i.check")"
done
# Negative control: the last link's files are not e0's cut (the writer wrote between).
python3 "$ROOT/Scripts/demo-check.py" "$W/fs/churn" "$W/fs.journal" "$(cat "$W/e0.cut")" > /dev/null 2>&1 \
  && fail "the live files still equal e0's cut: the writer wrote nothing between links (the test proves nothing)"
umount "$W/fs"
H detach $E > /dev/null || fail "detach $E"

# ---- e. a set: --base DIR ----
attach_new hit-inc-a 32M; DA=$DEV
attach_new hit-inc-b 32M; DB=$DEV
head -c 32M /dev/urandom > "$DA"; head -c 32M /dev/urandom > "$DB"; sync
H backup hit-inc-a hit-inc-b -o "$W/set0" > "$W/set0.out" 2>&1 || fail "set0: $(tail -5 "$W/set0.out")"
dd if=/dev/urandom of="$DA" bs=64K count=3 seek=100 oflag=direct conv=notrunc status=none
dd if=/dev/urandom of="$DB" bs=64K count=1 seek=7 oflag=direct conv=notrunc status=none
H backup hit-inc-a hit-inc-b -o "$W/set1" --base "$W/set0" > "$W/set1.out" 2>&1 || fail "set1: $(tail -5 "$W/set1.out")"
for n in hit-inc-a hit-inc-b; do
  c=$(HI info "$W/set1/$n.qcow2" --json | json_get "['metadata']['chain']")
  echo "$c" | grep -q "'method': 'tracked'" || fail "set1/$n is not a tracked incremental: $c"
  # Relative across sibling directories: the tree of backups can move whole.
  [ "$(qemu-img info --output=json "$W/set1/$n.qcow2" | json_get "['backing-filename']")" = "../set0/$n.qcow2" ] \
    || fail "set1/$n: its backing file is not ../set0/$n.qcow2"
done
[ "$(HI info "$W/set1/hit-inc-a.qcow2" --json | json_get "['metadata']['chain']['changedClusters']")" = 3 ] || fail "set1/hit-inc-a: not 3 clusters written"
[ "$(HI info "$W/set1/hit-inc-b.qcow2" --json | json_get "['metadata']['chain']['changedClusters']")" = 1 ] || fail "set1/hit-inc-b: not 1 cluster written"
HI verify "$W/set1" > "$W/set1.verify" 2>&1 || fail "verify set1: $(cat "$W/set1.verify")"
HI restore "$W/set1" --to hit-inc-a="$W/ra.raw" --to hit-inc-b="$W/rb.raw" > "$W/set1.restore" 2>&1 || fail "restore set1: $(cat "$W/set1.restore")"
cmp -s "$W/ra.raw" "$DA" || fail "set1: hit-inc-a restored differs from the (quiet) device"
cmp -s "$W/rb.raw" "$DB" || fail "set1: hit-inc-b restored differs from the (quiet) device"
out=$(H backup hit-inc-a hit-inc-b -o "$W/set2" --base "$W/set0/hit-inc-a.qcow2" 2>&1); [ $? = 2 ] || fail "a set with --base FILE: $out"
echo "$out" | grep -q "previous set.s directory" || fail "a set with --base FILE: not the reason: $out"
# The two sets moved together elsewhere: the chains still read.
mkdir "$W/archive" && mv "$W/set0" "$W/set1" "$W/archive/" || fail "moving the sets"
HI verify "$W/archive/set1" > "$W/set1.moved" 2>&1 || fail "set1 moved with set0 does not verify: $(cat "$W/set1.moved")"
log "set: --base DIR makes tracked incrementals of every member (3 and 1 clusters), restored equal to the devices"
H detach hit-inc-a > /dev/null && H detach hit-inc-b > /dev/null || fail "detach the set's volumes"
log "ok"
