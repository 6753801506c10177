#!/usr/bin/env bash
# Set directories with real images: info, verify and restore of a directory.
# Part 1 (always): a directory of single-volume images is no set: info shows
# why (exit 0), verify names each image (exit 1), restore refuses it and
# writes nothing (exit 2); a positional TARGET with a directory is a usage
# error pointing at --to; --to with an image is one too.
# Part 2 (needs 'backup SRC SRC… -o DIR', issue 16's backup side; skipped,
# exit 77, while backup takes one source): two ext4 volumes backed up as a
# set; info and verify say whole; restore refuses a missing --to (naming the
# member and --only), a mounted target (writing nothing), a damaged member
# (naming it) and a directory with a member gone; restores both members to
# files with their content, and one with --only to a loop device.
# (The set logic case by case is unit-tested: Tests/HotImagerTests/ImageSetTests.swift.)
source "$(dirname "$0")/lib.sh"

fill() {  # device seed: ext4 with some files, their checksums in W/sum-SEED
  mkfs.ext4 -q -F "$1"
  mkdir -p "$W/m" && mount "$1" "$W/m" || fail "mount $1"
  seq "$2" 300000 > "$W/m/n.txt"; head -c 3M /dev/urandom > "$W/m/r.bin"; mkdir "$W/m/d"; echo "$2" > "$W/m/d/seed"
  (cd "$W/m" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 md5sum) > "$W/sum-$2"
  umount "$W/m"
}
same_content() {  # restored-file seed
  mkdir -p "$W/c" && mount -o ro "$1" "$W/c" || fail "mount the restored $1"
  (cd "$W/c" && md5sum --quiet -c "$W/sum-$2") > "$W/cmp-$2" 2>&1 || { umount "$W/c"; fail "$1 differs from volume $2: $(head -5 "$W/cmp-$2")"; }
  umount "$W/c"
}

A=$(make_loop "$W/a.img" 32M); fill "$A" 1
B=$(make_loop "$W/b.img" 32M); fill "$B" 2

# Part 1: single images in one directory.
mkdir -p "$W/singles"
H backup "$A" --mode offline -o "$W/singles/a.qcow2" >/dev/null 2>&1 || fail "backup of $A"
H backup "$B" --mode offline -o "$W/singles/b.qcow2" >/dev/null 2>&1 || fail "backup of $B"
expect_exit 0 "no image in .* is a member of a set" -- HI info "$W/singles"
grep -q "a.qcow2 is not a member of a set" <<< "$EXIT_OUT" || fail "info does not name a.qcow2: $EXIT_OUT"
expect_exit 1 "problem: b.qcow2 is not a member of a set" -- HI verify "$W/singles"
expect_exit 2 "not a whole set; nothing was restored" -- HI restore "$W/singles" --to a="$W/ra.raw"
[ ! -e "$W/ra.raw" ] || fail "a refused restore created its target"
expect_exit 2 "set directory: give each member's target with --to NAME=TARGET" -- HI restore "$W/singles" "$W/ra.raw"
expect_exit 2 "apply to a set directory" -- HI restore "$W/singles/a.qcow2" --to a="$W/ra.raw"
HI info "$W/singles/a.qcow2" | grep -q "^set" && fail "a single image's info shows set lines"
log "part 1 ok: a directory of single images is refused and named"

# Part 2: a set made by the backup of two sources.
H backup "$A" "$B" --mode offline -o "$W/set" > "$W/set.out" 2>&1; rc=$?
if [ $rc = 2 ] && grep -qE "Unexpected argument|unexpected argument" "$W/set.out"; then
  skip "part 1 passed; part 2 needs 'hotimage backup SRC SRC… -o DIR', which this build does not have: $(head -1 "$W/set.out")"
fi
[ $rc = 0 ] || fail "backup of the set: exit $rc: $(tail -5 "$W/set.out")"
HI info "$W/set" --json > "$W/set.json" || fail "info --json of the set"
read -r N1 N2 <<< "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(*[m["name"] for m in d["members"]])' "$W/set.json")"
[ -n "$N1" ] && [ -n "$N2" ] || fail "the set does not list two members: $(cat "$W/set.json")"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["whole"] and all(m["complete"] for m in d["members"]) else 1)' "$W/set.json" \
  || fail "the fresh set is not whole: $(cat "$W/set.json")"
expect_exit 0 "whole: +yes" -- HI info "$W/set"
expect_exit 0 "OK, 2 member\(s\) whole and intact" -- HI verify "$W/set"
HI info "$W/set/$N1.qcow2" | grep -q "set member: *'$N1'" || fail "info of $N1.qcow2 does not say it is member '$N1'"

# Refusals: a member without a target; a mounted target (nothing written).
expect_exit 2 "no target for member '$N2'.*--only NAME" -- HI restore "$W/set" --to "$N1=$W/r1.raw"
C=$(make_loop "$W/c.img" 32M); mkfs.ext4 -q -F "$C"; mkdir -p "$W/busy" && mount "$C" "$W/busy"
expect_exit 2 "member '$N2': $C is mounted" -- HI restore "$W/set" --to "$N1=$W/r1.raw" --to "$N2=$C"
[ ! -e "$W/r1.raw" ] || fail "a refused restore wrote member '$N1'"
umount "$W/busy"

# Both members to files: their content.
expect_exit 0 "member '$N2': restored" -- HI restore "$W/set" --to "$N2=$W/r2.raw" --to "$N1=$W/r1.raw"
e2fsck -fn "$W/r1.raw" > "$W/fsck1" 2>&1 || fail "e2fsck of member '$N1': $(cat "$W/fsck1")"
e2fsck -fn "$W/r2.raw" > "$W/fsck2" 2>&1 || fail "e2fsck of member '$N2': $(cat "$W/fsck2")"
same_content "$W/r1.raw" 1; same_content "$W/r2.raw" 2
# One member with --only, to a device holding a filesystem (--force).
expect_exit 0 "" -- HI restore "$W/set" --only "$N2" --to "$N2=$C" --force --json
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); m=d["members"]; sys.exit(0 if [x["member"] for x in m]==[sys.argv[2]] and m[0]["status"]=="restored" else 1)' \
  <(echo "$EXIT_OUT" | sed -n '/^{/,$p') "$N2" || fail "restore --only --json: $EXIT_OUT"
same_content "$C" 2

# A damaged member: verify names it; restore refuses, writing nothing.
cp -r "$W/set" "$W/bad"
host=$(python3 - "$W/bad/$N2.qcow2" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(112)
cb = struct.unpack(">I", h[20:24])[0]; l1_size = struct.unpack(">I", h[36:40])[0]
l1_off = struct.unpack(">Q", h[40:48])[0]; n = 1 << (cb - 3); x = 62 - (cb - 8)
f.seek(l1_off); l1 = struct.unpack(">%dQ" % l1_size, f.read(8 * l1_size))
for e in l1:
    t = e & 0x00fffffffffffe00
    if not t: continue
    f.seek(t)
    for e2 in struct.unpack(">%dQ" % n, f.read(8 * n)):
        if e2 & (1 << 62): print(e2 & ((1 << x) - 1)); sys.exit(0)
        if e2 & 0x00fffffffffffe00: print(e2 & 0x00fffffffffffe00); sys.exit(0)
sys.exit(1)
PY
) || fail "no data cluster in $N2.qcow2"
python3 -c 'import sys; f=open(sys.argv[1],"r+b"); o=int(sys.argv[2])+10; f.seek(o); b=f.read(1); f.seek(o); f.write(bytes([b[0]^0x5a]))' "$W/bad/$N2.qcow2" "$host"
expect_exit 1 "problem: member '$N2' \($N2.qcow2\): " -- HI verify "$W/bad"
grep "^problem:" <<< "$EXIT_OUT" | grep -qv "member '$N2'" && fail "verify blames another member: $EXIT_OUT"
expect_exit 2 "member '$N2': .* is damaged.*nothing was restored" -- HI restore "$W/bad" --to "$N1=$W/b1.raw" --to "$N2=$W/b2.raw"
[ ! -e "$W/b1.raw" ] || fail "restore of a set with a damaged member wrote member '$N1'"

# A member gone.
rm "$W/bad/$N2.qcow2"
expect_exit 1 "member '$N2' \($N2.qcow2\) is missing" -- HI verify "$W/bad"
expect_exit 2 "not a whole set" -- HI restore "$W/bad" --only "$N1" --to "$N1=$W/b1.raw"
log "ok"
