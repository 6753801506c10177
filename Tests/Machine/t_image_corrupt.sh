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

# Host offsets of structures, read from the qcow2 tables: the first L2
# table, and a compressed cluster from the middle of the image (guest and
# host offset).
layout=$(python3 - "$W/good.qcow2" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(112)
cb = struct.unpack(">I", h[20:24])[0]; l1_size = struct.unpack(">I", h[36:40])[0]
l1_off = struct.unpack(">Q", h[40:48])[0]; n = 1 << (cb - 3); x = 62 - (cb - 8)
f.seek(l1_off); l1 = struct.unpack(">%dQ" % l1_size, f.read(8 * l1_size))
first_l2, comp = None, []
for i, e in enumerate(l1):
    t = e & 0x00fffffffffffe00
    if not t: continue
    first_l2 = first_l2 or t
    f.seek(t); l2 = struct.unpack(">%dQ" % n, f.read(8 * n))
    for j, e2 in enumerate(l2):
        if e2 & (1 << 62): comp.append(((i * n + j) << cb, e2 & ((1 << x) - 1)))
g, host = comp[len(comp) // 2] if comp else (-1, -1)
print(first_l2, g, host)
PY
) || fail "reading the layout"
read -r L2 GUEST_COMP HOST_COMP <<< "$layout"
log "layout: L2 table at $L2, a compressed cluster at guest $GUEST_COMP (host $HOST_COMP)"
[ "$GUEST_COMP" != -1 ] || fail "the image has no compressed cluster (the test proves nothing)"

flip() {  # file offset
  python3 - "$1" "$2" <<'PY'
import sys
p, off = sys.argv[1], int(sys.argv[2])
with open(p, "r+b") as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x5a]))
PY
}

check_damaged() {  # name what
  expect_exit "1|2" "" --out "$W/$1.verify" -- HI verify "$W/$1.qcow2"
  HI restore "$W/$1.qcow2" "$W/$1.raw" > "$W/$1.restore" 2>&1; local rr=$?
  [ $rr != 0 ] || fail "$2: restore accepted a damaged image"
  log "$2: verify exit $EXIT_RC: $(grep -m1 -E 'problem|error|hotimage:' "$W/$1.verify" | cut -c1-150); restore exit $rr"
}

cp "$W/good.qcow2" "$W/c1.qcow2"
flip "$W/c1.qcow2" $(( HOST_COMP + 10 ))
check_damaged c1 "flipped byte in a compressed cluster"
grep -q "cluster $(( GUEST_COMP / 65536 ))\b" "$W/c1.verify" || fail "verify does not name the damaged guest cluster $(( GUEST_COMP / 65536 )): $(cat "$W/c1.verify")"
cp "$W/good.qcow2" "$W/c2.qcow2"; flip "$W/c2.qcow2" $(( L2 + 16 )); check_damaged c2 "flipped byte in an L2 table"
cp "$W/good.qcow2" "$W/c3.qcow2"
SIZE=$(stat -c %s "$W/good.qcow2")
flip "$W/c3.qcow2" $(( SIZE - 40 )); check_damaged c3 "flipped byte in the metadata tail"
cp "$W/good.qcow2" "$W/c4.qcow2"; truncate -s $(( SIZE / 2 )) "$W/c4.qcow2"; check_damaged c4 "truncated to half"
grep -q "problem\|truncat\|beyond\|past the end\|end of file" "$W/c4.verify" || fail "truncation not named: $(cat "$W/c4.verify")"
log "ok"
