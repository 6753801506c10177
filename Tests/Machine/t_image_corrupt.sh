#!/usr/bin/env bash
# Damaged images: a byte flipped in a compressed cluster, in an L2 table, in
# the hotimage metadata; a truncated file. hotimage verify names each (exit
# 1), restore refuses to produce wrong data; the intact image verifies and
# restores. (The byte-level cases of every structure are unit tests of the
# QCow2 module; this proves the commands end to end.)
source "$(dirname "$0")/lib.sh"

BASE=$(make_loop "$W/v.img" 64M)
mkfs.ext4 -q -F "$BASE"
mkdir -p "$W/m" && mount "$BASE" "$W/m"
seq 1 2000000 > "$W/m/n.txt"; head -c 8M /dev/urandom > "$W/m/r.bin"; sync; umount "$W/m"
H backup "$BASE" --mode offline -o "$W/good.qcow2" >/dev/null 2>&1 || fail "backup"
HI verify "$W/good.qcow2" > "$W/good.verify" || fail "the intact image does not verify: $(cat "$W/good.verify")"

# Host offsets of structures, from qemu-img's own view of the image.
layout=$(python3 - "$W/good.qcow2" <<'PY'
import struct, sys, json, subprocess
f = open(sys.argv[1], "rb"); h = f.read(112)
l1_off = struct.unpack(">Q", h[40:48])[0]
f.seek(l1_off); l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
m = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", sys.argv[1]]))
comp = [e for e in m if e.get("data") and e.get("compressed")]
raw = [e for e in m if e.get("data") and "offset" in e and not e.get("compressed")]
print(l2_off, comp[len(comp)//2]["start"] if comp else -1, raw[0]["offset"] if raw else -1)
PY
) || fail "reading the layout"
read -r L2 GUEST_COMP RAWOFF <<< "$layout"
log "layout: L2 table at $L2, a compressed cluster at guest $GUEST_COMP, a raw cluster at host $RAWOFF"

flip() {  # file offset
  python3 - "$1" "$2" <<'PY'
import sys
p, off = sys.argv[1], int(sys.argv[2])
with open(p, "r+b") as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x5a]))
PY
}

check_damaged() {  # name what
  HI verify "$W/$1.qcow2" > "$W/$1.verify" 2>&1; local rc=$?
  [ $rc = 1 ] || [ $rc = 2 ] || fail "$2: verify exited $rc: $(cat "$W/$1.verify")"
  HI restore "$W/$1.qcow2" "$W/$1.raw" > "$W/$1.restore" 2>&1; local rr=$?
  if [ $rr = 0 ]; then
    # Restore may only succeed if it produced exactly the original bytes.
    cmp -s "$W/$1.raw" "$BASE" || fail "$2: restore succeeded with wrong data"
  fi
  log "$2: verify exit $rc: $(grep -m1 -E 'problem|error|hotimage:' "$W/$1.verify" | cut -c1-150); restore exit $rr"
}

# A compressed data cluster: find its host offset through our reader's view.
HOST=$(qemu-img map --output=json "$W/good.qcow2" | python3 -c '
import json,sys; m=json.load(sys.stdin); g=int(sys.argv[1])
print([e for e in m if e["start"]<=g<e["start"]+e["length"]][0].get("offset",-1))' "$GUEST_COMP")
cp "$W/good.qcow2" "$W/c1.qcow2"
if [ "$GUEST_COMP" != -1 ]; then
  # qemu-img map gives no host offset for compressed clusters: read the L2 entry.
  OFF=$(python3 - "$W/c1.qcow2" "$GUEST_COMP" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(112)
cb = struct.unpack(">I", h[20:24])[0]; l1_off = struct.unpack(">Q", h[40:48])[0]
g = int(sys.argv[2]) >> cb; l2n = 1 << (cb - 3)
f.seek(l1_off + 8 * (g // l2n)); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2 + 8 * (g % l2n)); e = struct.unpack(">Q", f.read(8))[0]
x = 62 - (cb - 8); print((e & ((1 << x) - 1)) + 10)
PY
)
  flip "$W/c1.qcow2" "$OFF"
  check_damaged c1 "flipped byte in a compressed cluster"
  grep -q "$(printf '0x%x' "$GUEST_COMP")\|cluster $(( GUEST_COMP / 65536 ))" "$W/c1.verify" || fail "verify does not name the damaged guest region: $(cat "$W/c1.verify")"
fi
cp "$W/good.qcow2" "$W/c2.qcow2"; flip "$W/c2.qcow2" $(( L2 + 16 )); check_damaged c2 "flipped byte in an L2 table"
cp "$W/good.qcow2" "$W/c3.qcow2"
SIZE=$(stat -c %s "$W/good.qcow2")
flip "$W/c3.qcow2" $(( SIZE - 40 )); check_damaged c3 "flipped byte in the metadata tail"
cp "$W/good.qcow2" "$W/c4.qcow2"; truncate -s $(( SIZE / 2 )) "$W/c4.qcow2"; check_damaged c4 "truncated to half"
grep -q "problem\|truncat\|beyond\|past the end\|end of file" "$W/c4.verify" || fail "truncation not named: $(cat "$W/c4.verify")"
log "ok"
