#!/usr/bin/env bash
# Writers in a real backup (docs/WRITERS.md):
#   containers: a cgroup-v2 "container" (a chroot on the volume, in its own
#     cgroup) rewriting a counter file thousands of times a second is frozen
#     around the snapshot: the counter in the image is the value read live
#     while it was frozen; it runs again after. Negative control: with
#     --writers none the image's counter is not the value read just after
#     the snapshot.
#   failure branches with external writers in a writers.d: a freeze that
#   hangs (killed at --writer-timeout, exit 5, no image, hooks run with
#   HOTIMAGE_ERROR=5), a refused freeze (exit 5; --allow-unfrozen goes on,
#   recorded), a failed thaw (exit 6, image complete, the volume writable,
#   recorded), a writer that cannot list (exit 5); a component off the
#   volume is not asked to freeze; hotimage killed while frozen: the writers
#   see end of file and thaw (the container runs again).
#   `hotimage writers` shows coverage: fully / partially / not.
source "$(dirname "$0")/lib.sh"

CG2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)
[ -n "$CG2" ] || skip "cgroup v2 is not mounted"
BB=$(command -v busybox) || skip "busybox is not installed"
file -L "$BB" 2>/dev/null | grep -q static || ldd "$BB" 2>&1 | grep -q "not a dynamic" || skip "busybox is not static"

attach_new hit-writers 256M
mkfs.ext4 -q -F "$DEV"
M=$W/m
mkdir -p "$M" && mount "$DEV" "$M"

# The container: busybox in a chroot on the volume, in cgroup hit-writers-box.
BOX=$M/box
mkdir -p "$BOX/bin" "$BOX/data"
cp "$BB" "$BOX/bin/busybox"
# A systemd-like layout under a subtree of our own: TOP/machine.slice/machine-box.scope.
TOP=$CG2/hit-writers-$$
CG=$TOP/machine.slice/machine-box.scope
mkdir -p "$CG"
cleanup_cg() { [ -d "$CG" ] || return 0; echo 0 > "$CG/cgroup.freeze" 2>/dev/null; echo 1 > "$CG/cgroup.kill" 2>/dev/null; sleep 0.2; rmdir "$CG" "$TOP/machine.slice" "$TOP" 2>/dev/null; }
trap 'cleanup_cg; cleanup' EXIT
# The container process joins the cgroup itself before it execs, so that
# every write it ever makes is inside the cgroup.
sh -c "echo \$\$ > $CG/cgroup.procs; exec chroot $BOX /bin/busybox sh -c 'i=0; while :; do i=\$((i+1)); echo \$i > /data/c.tmp; mv /data/c.tmp /data/counter; done'" &
disown $!  # cleanup_cg ends it through the cgroup
wait_until 5 test -s "$BOX/data/counter" || fail "the container does not write"
SET=(--writer-setting "container=${CG#$CG2/} $BOX")
frozen() { grep -q "frozen 1" "$CG/cgroup.events"; }
counter() { cat "$BOX/data/counter"; }

# `hotimage writers`: coverage of the container by three volume sets.
HI writers --writers containers "${SET[@]}" --volumes "$M" > "$W/wl.out" || fail "writers: $(cat "$W/wl.out")"
grep -q "fully covered" "$W/wl.out" || fail "the container on the volume is not fully covered: $(cat "$W/wl.out")"
HI writers --writers containers "${SET[@]}" --volumes /proc > "$W/wl2.out" || fail "writers (2)"
grep -q "not covered" "$W/wl2.out" || fail "the container is covered by /proc: $(cat "$W/wl2.out")"
HI writers --writers containers --json "${SET[@]}" --volumes "$M" | json_get '[0]["components"][0]["coverage"]' | grep -qx fully \
  || fail "writers --json coverage"
# Discovery: the populated scopes under machine.slice, root from /proc/PID/root.
HI writers --writers containers --writer-setting "container-cgroup-root=$TOP" --volumes "$M" > "$W/wl3.out" || fail "writers (3)"
grep -q "^  machine.slice/machine-box.scope .*fully covered" "$W/wl3.out" && grep -q "root: $BOX  on $M" "$W/wl3.out" \
  || fail "the machine.slice container was not found with its chroot as root: $(cat "$W/wl3.out")"
log "writers: the container is fully covered by its volume, not by /proc; found under machine.slice with its chroot as root"

# 1. The container frozen around the snapshot. The test reads the counter
# while the writers event says frozen and the kernel agrees before and after.
image_counter() {  # IMAGE -> the counter in the image's filesystem
  local dev; dev=$(make_loop "$W/r.img" 256M)
  HI restore "$1" "$dev" --force >/dev/null 2>&1 || fail "restore $1"
  mkdir -p "$W/r" && mount -o ro "$dev" "$W/r" || fail "mount the restored image"
  cat "$W/r/box/data/counter"; umount "$W/r"; losetup -d "$dev"; rm -f "$W/r.img"
}
H backup hit-writers -o "$W/1.qcow2" --json --writers containers "${SET[@]}" --pause-ms 1000 > "$W/1.json" 2> "$W/1.err" &
BK=$!
seen=""
for _ in $(seq 1 3000); do
  if grep -q '"event":"writers".*"phase":"frozen"\|"phase":"frozen".*"event":"writers"' "$W/1.json" 2>/dev/null; then
    frozen && { v=$(counter); frozen && seen=$v; }; break
  fi
  sleep 0.01
done
wait $BK; rc=$?
[ $rc = 0 ] || fail "backup with the container writer: exit $rc: $(cat "$W/1.err")"
[ -n "$seen" ] || fail "could not read the counter while the container was frozen (events: $(head -c 600 "$W/1.json"))"
got=$(image_counter "$W/1.qcow2")
[ "$got" = "$seen" ] || fail "the image holds counter $got; the container was frozen at $seen"
HI info "$W/1.qcow2" --json > "$W/1.info"
grep -q '"method" *: *"cgroup-freeze"' "$W/1.info" && grep -q '"thawed" *: *true' "$W/1.info" \
  || fail "the image does not record the cgroup freeze and thaw: $(grep -A3 components "$W/1.info" | head -20)"
frozen && fail "the container is still frozen after the backup"
a=$(counter); sleep 0.3; b=$(counter)
[ "$a" != "$b" ] || fail "the container does not run after the backup"
log "container frozen at counter $seen; the image holds $got; it runs again after (recorded: cgroup-freeze, thawed)"

# 1b. Negative control: no writers. The counter moves during the snapshot.
H backup hit-writers -o "$W/1b.qcow2" --json --writers none > "$W/1b.json" 2> "$W/1b.err" &
BK=$!
after=""
for _ in $(seq 1 3000); do
  grep -q '"event":"snapshot"' "$W/1b.json" 2>/dev/null && { after=$(counter); break; }
  sleep 0.01
done
wait $BK || fail "backup without writers: $(cat "$W/1b.err")"
got=$(image_counter "$W/1b.qcow2")
[ -n "$after" ] && [ "$got" != "$after" ] || fail "negative control: without the freeze the image still holds the counter read after the snapshot ($got)"
log "negative control: without writers the image holds $got, the live counter just after the snapshot was $after"

# External writers for the failure branches.
WD=$W/writers.d
mkdir -p "$WD"
MK=$W/marks
mkdir -p "$MK"
mkwriter() {  # NAME PATH FREEZE-CMD FROZEN-JSON THAW-JSON [COMPONENTS-CMD]
  local comps="echo '{\"writer\":\"$1\",\"components\":[{\"id\":\"c\",\"files\":[{\"path\":\"$2\"}]}]}'"
  [ $# -ge 6 ] && comps=$6
  cat > "$WD/$1" <<SH
#!/bin/sh
trap '' PIPE
case "\$1" in
components) $comps ;;
freeze) read -r req; touch $MK/$1.asked; $3
        echo '$4'
        if read -r line; then echo line > $MK/$1.thaw; else echo eof > $MK/$1.thaw; fi
        echo '$5' ;;
esac
SH
  chmod +x "$WD/$1"
}
OK_F='{"frozen":[{"id":"c","ok":true,"method":"test"}]}'
OK_T='{"thawed":[{"id":"c","ok":true}]}'
HL=$W/hooks.log
hooks=(--after-snapshot "echo after-snapshot \$HOTIMAGE_ERROR >> $HL" --after-backup "echo after-backup \$HOTIMAGE_ERROR >> $HL")

# 2. A freeze that hangs: killed at the timeout, exit 5, no image, the other writer thawed.
mkwriter hang "$M/box" "sleep 600" "$OK_F" "$OK_T"
mkwriter good "$M/box" ":" "$OK_F" "$OK_T"
: > "$HL"
t0=$(date +%s%N)
expect_exit 5 "no freeze answer within 2 s" -- H backup hit-writers -o "$W/2.qcow2" --writers-dir "$WD" --writers hang,good --writer-timeout 2 "${hooks[@]}"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ -e "$W/2.qcow2" ] && fail "an image exists after a failed freeze"
[ "$(cat "$MK/good.thaw" 2>/dev/null)" = line ] || fail "the writer that froze was not thawed"
wait_until 3 sh -c '! pgrep -f "slee[p] 600" >/dev/null' || fail "the hanging writer's process group survived: $(pgrep -af 'slee[p] 600')"
printf 'after-snapshot 5\nafter-backup 5\n' | cmp -s - "$HL" || fail "hooks after a failed freeze: $(cat "$HL")"
log "a hanging freeze: killed, exit 5 after $ms ms, no image, the other writer thawed, after-* hooks ran with 5"

# 3. A refused freeze: exit 5; --allow-unfrozen goes on and records it.
mkwriter refuse "$M/box" ":" '{"frozen":[{"id":"c","ok":false,"message":"database busy"}]}' "$OK_T"
expect_exit 5 "database busy" -- H backup hit-writers -o "$W/3.qcow2" --writers-dir "$WD" --writers refuse
H backup hit-writers -o "$W/3b.qcow2" --writers-dir "$WD" --writers refuse --allow-unfrozen > "$W/3b.out" 2>&1 \
  || fail "--allow-unfrozen: $(cat "$W/3b.out")"
HI info "$W/3b.qcow2" --json | grep -q '"action" *: *"freeze-failed"' || fail "the unfrozen component is not recorded"
log "a refused freeze: exit 5 with the writer's reason; --allow-unfrozen: image made, recorded freeze-failed"

# 4. A failed thaw: the image is complete, exit 6, recorded; the volume is writable.
mkwriter nothaw "$M/box" ":" "$OK_F" '{"thawed":[{"id":"c","ok":false,"message":"resume failed"}]}'
expect_exit 6 "" -- H backup hit-writers -o "$W/4.qcow2" --writers-dir "$WD" --writers nothaw
HI verify "$W/4.qcow2" > /dev/null || fail "the image after a failed thaw does not verify"
HI info "$W/4.qcow2" --json | grep -q '"thawMessage" *: *"resume failed"' || fail "the failed thaw is not recorded"
timeout 5 sh -c "echo x > $M/after-thaw && sync" || fail "the volume is not writable after a failed thaw"
log "a failed thaw: exit 6, image verifies, recorded, the filesystem thawed"

# 5. A writer that cannot list its components: exit 5.
mkwriter nolist "$M/box" ":" "$OK_F" "$OK_T" "exit 9"
expect_exit 5 "nolist" -- H backup hit-writers -o "$W/5.qcow2" --writers-dir "$WD" --writers nolist,good
log "a writer that cannot list: exit 5"

# 6. A component off the volume is not asked to freeze.
rm -f "$MK"/*
mkwriter elsewhere "/proc/self" ":" "$OK_F" "$OK_T"
H backup hit-writers -o "$W/6.qcow2" --writers-dir "$WD" --writers elsewhere > "$W/6.out" 2>&1 || fail "off-volume writer: $(cat "$W/6.out")"
[ -e "$MK/elsewhere.asked" ] && fail "a component not on the volume was asked to freeze"
HI info "$W/6.qcow2" --json | grep -q '"action" *: *"not-covered"' || fail "the off-volume component is not recorded as not covered"
log "a component off the volume: not frozen, recorded not-covered"

# 6b. A file handed over at thaw time is written into the restored
# filesystem, owned like its directory; --no-writer-files leaves it out.
mkdir -p "$M/lab" && chown 4321:4321 "$M/lab"
mkwriter label "$M/lab" ":" "$OK_F" "{\"thawed\":[{\"id\":\"c\",\"ok\":true,\"artifacts\":[{\"path\":\"$M/lab/label\",\"content\":\"START WAL 1\\\\n\"}]}]}"
H backup hit-writers -o "$W/6b.qcow2" --writers-dir "$WD" --writers label > "$W/6b.out" 2>&1 || fail "artifact writer: $(cat "$W/6b.out")"
[ -e "$M/lab/label" ] && fail "the artifact was written to the live volume"
for how in with without; do
  dev=$(make_loop "$W/r6.img" 256M)
  flag=(); [ $how = without ] && flag=(--no-writer-files)
  HI restore "$W/6b.qcow2" "$dev" --force "${flag[@]}" > "$W/6b.r.out" 2>&1 || fail "restore with artifacts: $(cat "$W/6b.r.out")"
  mkdir -p "$W/r6" && mount -o ro "$dev" "$W/r6" || fail "mount the restored image (6b)"
  if [ $how = with ]; then
    [ "$(cat "$W/r6/lab/label" 2>/dev/null)" = "START WAL 1" ] || fail "the artifact in the restored filesystem: '$(cat "$W/r6/lab/label" 2>&1)'"
    [ "$(stat -c '%u:%g %a' "$W/r6/lab/label")" = "4321:4321 600" ] || fail "artifact owner/mode: $(stat -c '%u:%g %a' "$W/r6/lab/label")"
  else
    [ -e "$W/r6/lab/label" ] && fail "--no-writer-files wrote the artifact"
  fi
  umount "$W/r6"; losetup -d "$dev"; rm -f "$W/r6.img"
done
log "a thaw-time file: kept in the image, written by restore into the restored filesystem (owner of its directory, 0600); not with --no-writer-files"

# 7. hotimage killed while frozen: the writers read end of file and thaw.
rm -f "$MK"/*
mkwriter slow "$M/box" "sleep 3" "$OK_F" "$OK_T"
# Not through H (a function): $! must be hotimage itself.
"$HOTIMAGE" backup hit-writers --run-dir "$RUN" -o "$W/7.qcow2" --writers-dir "$WD" --writers slow,containers "${SET[@]}" > "$W/7.out" 2>&1 &
BK=$!
wait_until 10 frozen || fail "the container was not frozen (7): $(cat "$W/7.out")"
kill -9 $BK; wait $BK 2>/dev/null
wait_until 10 test -e "$MK/slow.thaw" || fail "the external writer did not finish after hotimage died"
[ "$(cat "$MK/slow.thaw")" = eof ] || fail "the external writer got a line, not end of file"
wait_until 10 sh -c "! grep -q 'frozen 1' $CG/cgroup.events" || fail "the container stayed frozen after hotimage died"
a=$(counter); sleep 0.3; [ "$a" != "$(counter)" ] || fail "the container does not run after hotimage died"
log "hotimage killed while frozen: both writers saw end of file and thawed; the container runs"

H status hit-writers --json | json_get '["engine"]["phase"]' | grep -qx idle || wait_until 15 sh -c "$HOTIMAGE status hit-writers --run-dir $RUN --json | grep -q '\"phase\" *: *\"idle\"'" \
  || fail "the daemon did not return to idle"
log "PASS"
