#!/usr/bin/env bash
# The libvirt writer and `hotimage vm` against a real libvirt daemon and real
# qemu (TCG) guests:
#   - layout: the guest whose images live on the protected volume is fully
#     covered, one with its base image elsewhere partially, one with nothing
#     there not at all; --cdrom-counts turns a CD image elsewhere into
#     partial coverage; a volume without the disks covers nothing;
#   - stop --volumes --partial no stops only the fully covered guest (managed
#     save, on the volume), then --partial yes the other, recorded in one
#     file; stop --all and resume --all; a paused guest comes back paused;
#     an unknown name or a transient guest fail with a clear message; a save
#     cut short by --wait leaves a report that matches libvirt (stopped and
#     recorded, or running and not);
#   - resume --from brings both back from their saved memory (same boot id,
#     the counter goes on) and empties the record;
#   - writer-exec libvirt freeze/thaw (the backup's side of the writer):
#     saved while frozen, running after, also when hotimage's end of the pipe
#     just closes;
#   - the scripts' routine (vm stop, backup, vm resume): the image restores
#     to a filesystem whose disk image and save file are the ones written at
#     the stop;
#   - a backup with the libvirt writer while the guests run: the covered
#     ones are managed-saved for the snapshot and running again after, the
#     image records it (and their definitions);
#   - from both images, a guest restored from the restored save file and
#     disk goes on from the saved point (its memory and its disk agree).
#   - a guest with a disk on each of two attached volumes, backed up as a
#     set (backup VOL1 VOL2 -o DIR --writers libvirt): either volume alone
#     covers it partially; the set asks the writer once with both, so it is
#     fully covered and managed-saved once; both images record that one
#     component; restored from the set it goes on from the saved point.
#
# libvirtd runs as a child of this test in a private mount namespace: its
# configuration, sockets and logs are directories of the test bound over
# /etc/libvirt, /run/libvirt, /var/log/libvirt and /var/cache/libvirt, and
# the protected volume itself is mounted at /var/lib/libvirt, so the disk
# images (images/) and libvirt's managed saves (qemu/save/) are on the volume
# being backed up, as on a host with /var/lib/libvirt on its own volume.
# Nothing of the host's libvirt (if any) is seen or touched.
if [ -z "${HIT_VM_LIBVIRT_NS:-}" ]; then
  command -v unshare >/dev/null || { echo "[t_vm_libvirt] SKIP: unshare is not installed"; exit 77; }
  HIT_VM_LIBVIRT_NS=1 exec unshare -m --propagation private bash "$0" "$@"
fi
source "$(dirname "$0")/lib.sh"
source "$ROOT/Scripts/vm-lib.sh"
source "$ROOT/Tests/Machine/libvirt-lib.sh"

for c in virsh libvirtd qemu-system-x86_64 qemu-img busybox python3; do
  command -v $c >/dev/null || skip "$c is not installed (Scripts/lib.sh installs libvirt-daemon, libvirt-clients, qemu-system-x86)"
done
vm_kernel >/dev/null 2>&1 || skip "no guest kernel (Scripts/vm-lib.sh vm_kernel: apt-get download failed?)"
vm_guest_agent >/dev/null 2>&1 || skip "no qemu-ga for the guest (Scripts/vm-lib.sh vm_guest_agent: apt-get download failed?)"
VM_MODULES="virtio_pci virtio_blk virtio_console crc32c_generic ext4" VM_EXTRA_BINS="$VM_QEMU_GA" \
  vm_initramfs "$ROOT/Tests/Machine/libvirt-guest-init" >/dev/null || fail "guest initramfs"

attach_new hit-vm 768M
mkfs.ext4 -q -F "$DEV"
VOL=/var/lib/libvirt
lv_start "$DEV"
mkdir -p "$VOL/images" "$W/outside"
log "libvirtd $(V version --daemon 2>/dev/null | awk '/daemon/ {print $NF}') on $VOL = $DEV (protected)"

# a: everything on the volume (a qcow2 over a raw base, relative backing
#    name), a CD image elsewhere; b: its base elsewhere, a second disk with
#    an ext4 it writes to, a guest agent; c: all elsewhere.
qemu-img create -q -f raw "$VOL/images/a-base.raw" 16M
(cd "$VOL/images" && qemu-img create -q -f qcow2 -b a-base.raw -F raw a.qcow2)
qemu-img create -q -f raw "$W/outside/b-base.raw" 16M
qemu-img create -q -f qcow2 -b "$W/outside/b-base.raw" -F raw "$VOL/images/b.qcow2"
qemu-img create -q -f raw "$W/outside/c.raw" 16M
truncate -s 1M "$W/outside/cd.iso"
lv_define hit-vm-a "$VOL/images/a.qcow2" qcow2 "$W/outside/cd.iso"
truncate -s 8M "$VOL/images/b-data.ext4" && mkfs.ext4 -q -F "$VOL/images/b-data.ext4"
LV_EXTRA="<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$VOL/images/b-data.ext4'/><target dev='vdb' bus='virtio'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" \
  lv_define hit-vm-b "$VOL/images/b.qcow2" qcow2
lv_define hit-vm-c "$W/outside/c.raw" raw
V start hit-vm-a >/dev/null && V start hit-vm-b >/dev/null || fail "start: $(tail -3 "$LV/log/qemu/"*.log)"
wait_until 60 beating hit-vm-a && wait_until 60 beating hit-vm-b || fail "the guests do not beat: $(tail -3 "$W"/console-*.log)"
ID_A=$(beat_id hit-vm-a); ID_B=$(beat_id hit-vm-b)
grep -q "guest: agent on" "$W/console-hit-vm-b.log" && grep -q "guest: /data mounted" "$W/console-hit-vm-b.log" \
  || fail "b has no agent or no /data: $(cat "$W/console-hit-vm-b.log")"
log "guests a ($ID_A) and b ($ID_B, with a guest agent) running, c defined"

# 1. layout.
layout() { "$HOTIMAGE" vm layout --json "$@" > "$W/layout.json" || fail "vm layout $*: exit $?"; }
cov() { python3 -c "import json,sys; d={x['name']: x for x in json.load(open(sys.argv[1]))['domains']}; print(d[sys.argv[2]]$2)" "$W/layout.json" "$1"; }
layout "$VOL"
[ "$(cov hit-vm-a "['coverage']")" = fully ] || fail "a is not fully covered: $(cat "$W/layout.json")"
[ "$(cov hit-vm-b "['coverage']")" = partially ] || fail "b is not partially covered"
[ "$(cov hit-vm-c "['coverage']")" = not ] || fail "c is covered"
[ "$(cov hit-vm-a "['disposition']")" = "must be stopped" ] && [ "$(cov hit-vm-c "['disposition']")" = "may be backed up as is" ] \
  || fail "dispositions: $(cat "$W/layout.json")"
[ "$(cov hit-vm-a "[\"files\"][1][\"path\"]")" = "$VOL/images/a-base.raw" ] || fail "a's backing file is not listed second"
[ "$(cov hit-vm-a "['agent']")" = no ] && [ "$(cov hit-vm-b "['agent']")" = yes ] || fail "agents: a $(cov hit-vm-a "['agent']"), b $(cov hit-vm-b "['agent']")"
[ "$(cov hit-vm-a "['files'][2]['role']")" = cdrom ] && [ "$(cov hit-vm-a "['files'][2]['counts']")" = False ] || fail "a's CD image"
layout "$VOL" --cdrom-counts
[ "$(cov hit-vm-a "['coverage']")" = partially ] || fail "--cdrom-counts: a's CD image elsewhere did not count"
layout "$W/outside"
[ "$(cov hit-vm-a "['coverage']")" = not ] && [ "$(cov hit-vm-c "['coverage']")" = fully ] || fail "layout of the other place: $(cat "$W/layout.json")"
"$HOTIMAGE" vm layout "$VOL" > "$W/layout.txt" || fail "vm layout (text)"
grep -q "^hit-vm-a: running, must be stopped; persistent; agent no; fully covered" "$W/layout.txt" || fail "text layout: $(cat "$W/layout.txt")"
log "layout: a fully, b partially, c not covered; b's agent answers; --cdrom-counts; another place covers c only"

# 2. Refusals and failures that change nothing.
expect_exit 2 "no such domain: hit-vm-nope" -- "$HOTIMAGE" vm stop hit-vm-a hit-vm-nope --record "$W/none.json"
[ "$(V domstate hit-vm-a)" = running ] && [ ! -e "$W/none.json" ] || fail "a stop naming an unknown domain did something"
expect_exit 2 "one of them" -- "$HOTIMAGE" vm stop --all hit-vm-a
expect_exit 2 "not a mount point or directory" -- "$HOTIMAGE" vm layout "$W/nowhere"
expect_exit 2 "without a managed save" -- "$HOTIMAGE" vm resume hit-vm-c
lv_xml hit-vm-t "$W/outside/c.raw" raw > "$W/t.xml"
V create "$W/t.xml" >/dev/null || fail "virsh create"
expect_exit 1 "transient domain has no managed save" -- "$HOTIMAGE" vm stop hit-vm-t --record "$W/t.json"
V destroy hit-vm-t >/dev/null
log "unknown names and usage refused (exit 2, nothing done); a transient guest cannot be saved (exit 1)"

# 3. stop --volumes: fully covered first, then partially covered too.
R=$W/stopped.json
"$HOTIMAGE" vm stop --volumes "$VOL" --partial no --record "$R" > "$W/stop1.out" || fail "vm stop --partial no: $(cat "$W/stop1.out")"
[ "$(V domstate hit-vm-a --reason)" = "shut off (saved)" ] || fail "a is not saved: $(V domstate hit-vm-a --reason)"
[ "$(V domstate hit-vm-b)" = running ] || fail "--partial no stopped the partially covered b"
SAVE_A=$VOL/qemu/save/hit-vm-a.save
[ -s "$SAVE_A" ] && V dominfo hit-vm-a | grep -q "Managed save: *yes" || fail "no managed save of a on the volume"
layout "$VOL"
[ "$(cov hit-vm-a "['coverage']")" = fully ] && [ "$(cov hit-vm-a "['disposition']")" = "may be backed up as is" ] || fail "saved a"
cov hit-vm-a "['files']" | grep -q "'role': 'save'" || fail "a's save file is not listed"
"$HOTIMAGE" vm stop --volumes "$VOL" --record "$R" > "$W/stop2.out" || fail "vm stop: $(cat "$W/stop2.out")"
grep -q "hit-vm-a: shut off, left as is" "$W/stop2.out" && grep -q "hit-vm-b: stopped (managed-save" "$W/stop2.out" || fail "stop 2: $(cat "$W/stop2.out")"
[ "$(python3 -c "import json; print(' '.join(s['name']+':'+s['priorState'] for s in json.load(open('$R'))['stopped']))")" = "hit-vm-a:running hit-vm-b:running" ] \
  || fail "record: $(cat "$R")"
log "stop --volumes: a alone with --partial no, then b; both in the record; a's save on the volume, a now as is"

# 4. The scripts' routine: back up while they are saved.
sha256sum "$SAVE_A" "$VOL/images/a.qcow2" "$VOL/images/a-base.raw" > "$W/stopped.sums"
H backup hit-vm -o "$W/stopped.qcow2" > "$W/backup1.out" 2>&1 || fail "backup of the stopped guests: $(cat "$W/backup1.out")"

# 5. resume --from: both back from their memory, the record emptied.
"$HOTIMAGE" vm resume --from "$R" > "$W/resume.out" || fail "vm resume --from: $(cat "$W/resume.out")"
[ "$(V domstate hit-vm-a --reason)" = "running (restored)" ] && [ "$(V domstate hit-vm-b --reason)" = "running (restored)" ] \
  || fail "not restored: a $(V domstate hit-vm-a --reason), b $(V domstate hit-vm-b --reason)"
[ ! -e "$R" ] || fail "the record is still there after everything resumed: $(cat "$R")"
wait_until 20 beats_after hit-vm-a 2 || fail "a does not beat after resume"
[ "$(beat_id hit-vm-a)" = "$ID_A" ] && [ "$(grep -c "guest: boot" "$W/console-hit-vm-a.log")" = 1 ] || fail "a booted again instead of being restored"
[ "$(beat_id hit-vm-b)" = "$ID_B" ] || fail "b booted again"
expect_exit 2 "no such record" -- "$HOTIMAGE" vm resume --from "$R"
log "resume --from: both restored from their saves (same boot ids, no new boot), record removed"

# 6. A paused guest comes back paused.
V suspend hit-vm-b >/dev/null
"$HOTIMAGE" vm stop hit-vm-b --record "$W/p.json" >/dev/null || fail "stop of paused b"
[ "$(python3 -c "import json; print(json.load(open('$W/p.json'))['stopped'][0]['priorState'])")" = paused ] || fail "prior state: $(cat "$W/p.json")"
"$HOTIMAGE" vm resume hit-vm-b > "$W/pr.out" || fail "resume of paused b: $(cat "$W/pr.out")"
[ "$(V domstate hit-vm-b)" = paused ] || fail "b came back $(V domstate hit-vm-b), not paused"
V resume hit-vm-b >/dev/null
rm -f "$W/p.json"
log "a paused guest is saved and comes back paused"

# stop --all / resume --all: every guest that must be stopped, c left as is.
"$HOTIMAGE" vm stop --all --record "$W/all.json" > "$W/all.out" || fail "vm stop --all: $(cat "$W/all.out")"
grep -q "hit-vm-c: shut off, left as is" "$W/all.out" && [ "$(V domstate hit-vm-a --reason)" = "shut off (saved)" ] \
  && [ "$(V domstate hit-vm-b --reason)" = "shut off (saved)" ] || fail "vm stop --all: $(cat "$W/all.out")"
"$HOTIMAGE" vm resume --all > "$W/allr.out" || fail "vm resume --all: $(cat "$W/allr.out")"
[ "$(V domstate hit-vm-a)" = running ] && [ "$(V domstate hit-vm-b)" = running ] && [ "$(V domstate hit-vm-c)" = "shut off" ] \
  || fail "vm resume --all: $(cat "$W/allr.out")"
rm -f "$W/all.json"
log "stop --all saved a and b, left c; resume --all brought back exactly those"

# 7. A save cut short by --wait: whatever libvirt did, the report says it.
"$HOTIMAGE" vm stop hit-vm-b --wait 0.3 --record "$W/short.json" > "$W/short.out" 2>&1; rc=$?
st=$(V domstate hit-vm-b)
if [ $rc = 0 ]; then
  [ "$st" = "shut off" ] && grep -q hit-vm-b "$W/short.json" || fail "--wait 0.3: exit 0 but b is $st / not recorded"
  "$HOTIMAGE" vm resume --from "$W/short.json" >/dev/null || fail "resume after the short save"
  how="saved anyway"
else
  [ $rc = 1 ] && grep -q "aborted, the domain keeps running" "$W/short.out" || fail "--wait 0.3: exit $rc: $(cat "$W/short.out")"
  [ "$st" = running ] && [ ! -e "$W/short.json" ] || fail "--wait 0.3 said aborted but b is $st, record: $(cat "$W/short.json" 2>/dev/null)"
  V dominfo hit-vm-b | grep -q "Managed save: *no" || fail "an aborted save left a managed save"
  how="aborted, still running"
fi
log "--wait 0.3: $how, as reported: $(head -1 "$W/short.out")"

# 8. The writer as backup runs it: freeze saves, thaw restores; end of
#    file on stdin (hotimage died) thaws too.
freeze_thaw() {  # how (thaw|eof)
  coproc WR { "$HOTIMAGE" writer-exec libvirt freeze --setting vm-wait=60 2>"$W/writer.err"; }
  echo '{"protocol":1,"components":["hit-vm-a","hit-vm-c"],"volumes":["'"$VOL"'"],"timeoutSeconds":60}' >&"${WR[1]}"
  local line; read -r -t 90 line <&"${WR[0]}" || fail "writer: no freeze answer: $(cat "$W/writer.err")"
  echo "$line" > "$W/frozen.json"
  [ "$(V domstate hit-vm-a --reason)" = "shut off (saved)" ] || fail "writer freeze: a is $(V domstate hit-vm-a --reason)"
  if [ "$1" = thaw ]; then echo '{"thaw":true}' >&"${WR[1]}"; else exec {WR[1]}>&-; fi
  read -r -t 90 line <&"${WR[0]}" || fail "writer: no thaw answer ($1): $(cat "$W/writer.err")"
  echo "$line" > "$W/thawed.json"
  wait "$WR_PID" || fail "writer exited $?"
  [ "$(V domstate hit-vm-a --reason)" = "running (restored)" ] || fail "writer thaw ($1): a is $(V domstate hit-vm-a --reason)"
}
freeze_thaw thaw
python3 - "$W/frozen.json" "$W/thawed.json" <<'PY' || fail "writer answers: $(cat "$W/frozen.json" "$W/thawed.json")"
import json, sys
f = {r["id"]: r for r in json.load(open(sys.argv[1]))["frozen"]}
t = {r["id"]: r for r in json.load(open(sys.argv[2]))["thawed"]}
assert f["hit-vm-a"]["ok"] and f["hit-vm-a"]["method"] == "managed-save", f
assert f["hit-vm-c"]["ok"] and f["hit-vm-c"]["method"] == "none (shut off)", f
assert t["hit-vm-a"]["ok"] and t["hit-vm-a"]["message"] == "restored, running", t
PY
freeze_thaw eof
[ "$(beat_id hit-vm-a)" = "$ID_A" ] || fail "a booted again after the writer's thaw"
log "writer-exec freeze/thaw: managed save while frozen, restored after a thaw request and after end of file"

# 9. A backup with the libvirt writer while the guests run: a is
#    managed-saved for the snapshot and restored after it, b (its agent
#    answers) frozen inside the guest and thawed, c (not covered) left
#    alone; the image records it. a's save file exists only while a is saved
#    (libvirt removes it when it restores from it), so finding it in the
#    image shows the snapshot was taken then; b's ext4 in the image is clean
#    as only a frozen ext4 is (no needs_recovery) — and, the negative
#    control, it is not in a backup without writers.
HI writers --writers libvirt --volumes "$VOL" > "$W/writers.out" || fail "hotimage writers: $(cat "$W/writers.out")"
grep -q "hit-vm-a.*fully covered" "$W/writers.out" && grep -q "hit-vm-b.*partially covered" "$W/writers.out" \
  && grep -q "hit-vm-c.*not covered" "$W/writers.out" || fail "hotimage writers coverage: $(cat "$W/writers.out")"
[ ! -e "$SAVE_A" ] || fail "a's save file is still there while a runs"
H backup hit-vm -o "$W/live.qcow2" --writers libvirt > "$W/backup2.out" 2>&1 || fail "backup with the libvirt writer: exit $?: $(cat "$W/backup2.out")"
[ "$(V domstate hit-vm-a --reason)" = "running (restored)" ] || fail "a after the backup: $(V domstate hit-vm-a --reason)"
[ "$(V domstate hit-vm-b)" = running ] || fail "b after the backup: $(V domstate hit-vm-b --reason)"
[ "$(beat_id hit-vm-a)" = "$ID_A" ] && [ "$(beat_id hit-vm-b)" = "$ID_B" ] || fail "a guest booted again during the backup"
[ "$(V domstate hit-vm-c)" = "shut off" ] || fail "c was started"
HI info "$W/live.qcow2" --json > "$W/live.info" || fail "info"
python3 - "$W/live.info" <<'PY' || fail "the image's record of the components: $(cat "$W/live.info")"
import json, sys
m = json.load(open(sys.argv[1]))["metadata"]
c = {x["id"]: x for x in m["components"] if x["writer"] == "libvirt"}
for g, cov, meth in (("hit-vm-a", "fully", "managed-save"), ("hit-vm-b", "partially", "agent-fsfreeze")):
    assert c[g]["coverage"] == cov and c[g]["action"] == "frozen", c[g]
    assert c[g]["method"] == meth and c[g]["thawed"] is True, c[g]
    assert "<domain" in c[g]["details"]["xml"] and c[g]["details"]["persistent"] == "yes", c[g]["details"]
assert "Froze 1 filesystem" in c["hit-vm-b"]["freezeMessage"], c["hit-vm-b"]
assert c["hit-vm-c"]["action"] == "not-covered", c["hit-vm-c"]
PY
H backup hit-vm -o "$W/nowriters.qcow2" --writers none > "$W/backup3.out" 2>&1 || fail "backup without writers: $(cat "$W/backup3.out")"
log "backup with the libvirt writer: a saved, b frozen by its agent for the snapshot, both running after; c not covered; recorded with their definitions"

# 10. Both images restore to a filesystem from which the guest comes back:
#     the stopped one to exactly the files of the stop; from each, a guest
#     restored from the restored save file and disk goes on from the saved
#     point (the same boot id; the next beat is the one after the disk's).
restore_image() {  # image dir
  local dev; dev=$(make_loop "$W/$(basename "$2").img" 768M)
  HI restore "$1" "$dev" > "$W/restore.out" 2>&1 || fail "restore $1: $(cat "$W/restore.out")"
  mkdir -p "$2" && mount "$dev" "$2" || fail "mount the restored $1"
  qemu-img check -q "$2/images/a.qcow2" && qemu-img check -q "$2/images/b.qcow2" || fail "qemu-img check of the disks restored from $1"
}
restore_image "$W/stopped.qcow2" "$W/r1"
(cd / && sed "s|$VOL/|$W/r1/|" "$W/stopped.sums" | sha256sum -c --quiet) || fail "restored files differ from the ones at the stop"
restore_image "$W/live.qcow2" "$W/r2"
restore_image "$W/nowriters.qcow2" "$W/r3"
[ -s "$W/r2/qemu/save/hit-vm-a.save" ] && [ ! -e "$W/r2/qemu/save/hit-vm-b.save" ] || fail "the live image's save files: $(ls "$W/r2/qemu/save")"
[ ! -e "$W/r3/qemu/save/hit-vm-a.save" ] || fail "a save file in the image made without writers"
dumpe2fs -h "$W/r2/images/b-data.ext4" 2>/dev/null | grep -q "^Filesystem features:.*needs_recovery" \
  && fail "b's ext4 in the image was not frozen by its agent (needs_recovery)"
e2fsck -fn "$W/r2/images/b-data.ext4" >/dev/null 2>&1 || fail "b's ext4 in the image does not check clean"
dumpe2fs -h "$W/r3/images/b-data.ext4" 2>/dev/null | grep -q "^Filesystem features:.*needs_recovery" \
  || fail "negative control: b's ext4 in the image without writers looks frozen too"
log "b's ext4 (frozen by its agent) checks clean in the image; without writers it needs journal recovery"
# libvirt restores a save only under its own uuid, and refuses a second
# domain with it: the original a goes.
V destroy hit-vm-a >/dev/null; V undefine hit-vm-a >/dev/null || fail "undefine a"
# guest_from SAVE-DIR DISK-DIR LABEL: restores a from SAVE-DIR's save file
# with DISK-DIR's disk; sets DISK (the beat on the disk before) and FIRST
# (the first beat after), each "ID SEQ".
guest_from() {
  local save=$1/qemu/save/hit-vm-a.save con="console-hit-vm-$3"
  [ -s "$save" ] || fail "$3: no save file of a in the restored image"
  V save-image-dumpxml "$save" > "$W/$3.xml" || fail "$3: libvirt cannot read the restored save file"
  # A copy next to it (its backing name is relative): the restored files stay as restored.
  local disk=$2/images/a-$3.qcow2
  cp "$2/images/a.qcow2" "$disk"
  qemu-img dd -f qcow2 -O raw bs=512 count=1 if="$disk" of="$W/$3-sector0" || fail "$3: read the restored disk"
  DISK=$(sed -n 's/.*id=\([0-9a-f]*\) seq=\([0-9]*\).*/\1 \2/p' "$W/$3-sector0")
  sed -i -e "s|$VOL/images/a.qcow2|$disk|g" -e "s|$VOL/images/|$2/images/|g" -e "s|console-hit-vm-a.log|$con.log|" "$W/$3.xml"
  grep -q "$disk" "$W/$3.xml" || fail "$3: the saved definition does not name the disk"
  V restore "$save" --xml "$W/$3.xml" > "$W/$3.out" 2>&1 || fail "$3: virsh restore from the restored files: $(cat "$W/$3.out")"
  wait_until 20 beating "${con#console-}" || fail "$3: the guest restored from the image does not beat"
  FIRST=$(grep -m1 "guest: beat" "$W/$con.log" | sed 's/.*id=\([0-9a-f]*\) seq=\([0-9]*\).*/\1 \2/')
  grep -q "guest: boot" "$W/$con.log" && fail "$3: the restored guest booted"
  V destroy hit-vm-a >/dev/null
}
# The first beat after a restore is the disk's (the save caught the guest
# between its disk write and its console line) or the next one.
agree() { [ "${DISK% *}" = "$ID_A" ] && [ "${FIRST% *}" = "$ID_A" ] && { [ "${FIRST#* }" = "${DISK#* }" ] || [ "${FIRST#* }" = $((${DISK#* } + 1)) ]; }; }
for img in stopped:r1 live:r2; do
  guest_from "$W/${img#*:}" "$W/${img#*:}" "${img%:*}"
  agree || fail "${img%:*}: the restored guest goes on at '$FIRST' but its disk says '$DISK': memory and disk disagree"
  log "${img%:*}: the guest restored from the image goes on at seq ${FIRST#* } after disk seq ${DISK#* } (boot id $ID_A)"
done
# Negative control: the stopped image's memory with the live image's disk.
guest_from "$W/r1" "$W/r2" mixed
agree && fail "negative control: memory of one image with the disk of the other agreed ('$FIRST' after '$DISK')"
log "negative control: the stopped image's memory on the live image's disk disagrees ('$FIRST' after '$DISK')"
log "both images restore: stopped = the files of the stop; from each, the guest resumes from its saved memory on its disk"

# 11. A guest on two volumes, backed up as a set: d's system disk (and its
#     managed save) on the first volume, its /data disk on a second attached
#     volume. Either volume alone covers d partially; the set asks the
#     libvirt writer once with both, so d is fully covered and managed-saved
#     once for the one cut; both images record that one component; the
#     guest restored from the set (save file and disk from one member, /data
#     from the other) goes on from the saved point and writes on /data.
attach_new hit-vm2 128M
mkfs.ext4 -q -F "$DEV" && mkdir -p "$W/vol2" && mount "$DEV" "$W/vol2" || fail "11: second volume"
VOL2=$W/vol2
qemu-img create -q -f qcow2 "$VOL/images/d.qcow2" 16M
truncate -s 8M "$VOL2/d-data.ext4" && mkfs.ext4 -q -F "$VOL2/d-data.ext4"
LV_EXTRA="<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$VOL2/d-data.ext4'/><target dev='vdb' bus='virtio'/></disk>" \
  lv_define hit-vm-d "$VOL/images/d.qcow2" qcow2
V start hit-vm-d >/dev/null || fail "11: start d: $(tail -3 "$LV/log/qemu/hit-vm-d.log")"
wait_until 60 beating hit-vm-d || fail "11: d does not beat: $(tail -3 "$W/console-hit-vm-d.log")"
grep -q "guest: /data mounted" "$W/console-hit-vm-d.log" || fail "11: d has no /data: $(cat "$W/console-hit-vm-d.log")"
ID_D=$(beat_id hit-vm-d)
layout "$VOL"
[ "$(cov hit-vm-d "['coverage']")" = partially ] || fail "11: the first volume alone covers d $(cov hit-vm-d "['coverage']")"
layout "$VOL2"
[ "$(cov hit-vm-d "['coverage']")" = partially ] || fail "11: the second volume alone covers d $(cov hit-vm-d "['coverage']")"
layout "$VOL" "$VOL2"
[ "$(cov hit-vm-d "['coverage']")" = fully ] || fail "11: both volumes do not cover d fully: $(cat "$W/layout.json")"
H backup hit-vm hit-vm2 -o "$W/vmset" --writers libvirt --json > "$W/set.events" 2> "$W/set.err" \
  || fail "11: set backup with the libvirt writer: exit $?: $(tail -20 "$W/set.err")"
grep -q "set complete" "$W/set.err" || fail "11: no set complete: $(tail -5 "$W/set.err")"
[ "$(V domstate hit-vm-d --reason)" = "running (restored)" ] || fail "11: d after the set: $(V domstate hit-vm-d --reason)"
[ "$(beat_id hit-vm-d)" = "$ID_D" ] || fail "11: d booted again during the set backup"
for n in hit-vm hit-vm2; do HI info "$W/vmset/$n.qcow2" --json > "$W/vmset-$n.info" || fail "11: info $n"; done
python3 - "$W/set.events" "$W/vmset-hit-vm.info" "$W/vmset-hit-vm2.info" <<'PY' || fail "11: the set's record of d: $(grep '"writers"' "$W/set.events")"
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
frozen = [e for e in ev if e.get("event") == "writers" and e.get("phase") == "frozen"]
assert len(frozen) == 1, "writers asked %d times" % len(frozen)
d = [c for c in frozen[0]["components"] if c["id"] == "hit-vm-d"]
assert len(d) == 1, d
d = d[0]
assert d["writer"] == "libvirt" and d["coverage"] == "fully" and d["action"] == "frozen", d
assert d["method"] == "managed-save", d
thawed = [e for e in ev if e.get("event") == "writers" and e.get("phase") == "thawed"]
assert len(thawed) == 1, "writers thawed %d times" % len(thawed)
t = [c for c in thawed[0]["components"] if c["id"] == "hit-vm-d"]
assert len(t) == 1 and t[0]["thawed"] is True and t[0]["freezeSeconds"] == d["freezeSeconds"], t
d = t[0]
snaps = [e for e in ev if e.get("event") == "snapshot" and "members" in e]
assert len(snaps) == 1, "%d set cuts" % len(snaps)
for p in sys.argv[2:]:
    m = json.load(open(p))["metadata"]
    rec = [c for c in m["components"] if c["id"] == "hit-vm-d"]
    assert len(rec) == 1, (p, rec)
    r = rec[0]
    assert r["coverage"] == "fully" and r["action"] == "frozen" and r["method"] == "managed-save" and r["thawed"] is True, r
    assert r["freezeSeconds"] == d["freezeSeconds"] and r["thawSeconds"] == d["thawSeconds"], (r, d)
    assert m["set"]["member"] in ("hit-vm", "hit-vm2"), m["set"]
print("d: frozen once (%.2f s), fully covered, recorded in both images" % d["freezeSeconds"])
PY
log "11: $(python3 -c '
import json,sys
for l in open(sys.argv[1]):
    if l.startswith("{") and "\"writers\"" in l:
        e=json.loads(l)
        if e.get("phase")=="frozen": print("; ".join("%s %s %s" % (c["id"], c["coverage"], c["action"]) for c in e["components"]))' "$W/set.events")"
S1=$(make_loop "$W/s1.img" 768M) S2=$(make_loop "$W/s2.img" 128M)
HI restore "$W/vmset" --to hit-vm="$S1" --to hit-vm2="$S2" > "$W/set.restore" 2>&1 || fail "11: restore of the set: $(cat "$W/set.restore")"
mkdir -p "$W/s1" "$W/s2" && mount "$S1" "$W/s1" && mount "$S2" "$W/s2" || fail "11: mount the restored set"
SAVE_D=$W/s1/qemu/save/hit-vm-d.save
[ -s "$SAVE_D" ] || fail "11: no save file of d in the first member: $(ls "$W/s1/qemu/save")"
qemu-img check -q "$W/s1/images/d.qcow2" || fail "11: qemu-img check of d's restored disk"
V save-image-dumpxml "$SAVE_D" > "$W/d-set.xml" || fail "11: libvirt cannot read the restored save file"
qemu-img dd -f qcow2 -O raw bs=512 count=1 if="$W/s1/images/d.qcow2" of="$W/d-sector0" || fail "11: read d's restored disk"
DISK=$(sed -n 's/.*id=\([0-9a-f]*\) seq=\([0-9]*\).*/\1 \2/p' "$W/d-sector0")
sed -i -e "s|$VOL/images/|$W/s1/images/|g" -e "s|$VOL2/|$W/s2/|g" -e "s|console-hit-vm-d.log|console-hit-vm-dset.log|" "$W/d-set.xml"
grep -q "$W/s2/d-data.ext4" "$W/d-set.xml" || fail "11: the saved definition does not name d's /data disk"
V destroy hit-vm-d >/dev/null; V undefine hit-vm-d >/dev/null || fail "11: undefine d"
V restore "$SAVE_D" --xml "$W/d-set.xml" > "$W/d-set.out" 2>&1 || fail "11: virsh restore from the restored set: $(cat "$W/d-set.out")"
wait_until 20 beating hit-vm-dset || fail "11: the guest restored from the set does not beat"
FIRST=$(grep -m1 "guest: beat" "$W/console-hit-vm-dset.log" | sed 's/.*id=\([0-9a-f]*\) seq=\([0-9]*\).*/\1 \2/')
grep -q "guest: boot" "$W/console-hit-vm-dset.log" && fail "11: the guest restored from the set booted"
ID_A=$ID_D agree || fail "11: the guest restored from the set goes on at '$FIRST' but its disk says '$DISK'"
# ext4 commits every 5 s: after 25 beats its /data writes since the restore are on the restored disk.
wait_until 60 beats_after hit-vm-dset 25 || fail "11: the restored guest stopped beating"
V destroy hit-vm-d >/dev/null
DL=$(make_loop "$W/s2/d-data.ext4" 8M)
mkdir -p "$W/d-data" && mount "$DL" "$W/d-data" || fail "11: mount d's restored /data after the run"
read -r bid bseq <<< "$(sed 's/id=\([0-9a-f]*\) seq=\([0-9]*\)/\1 \2/' "$W/d-data/beat")"
umount "$W/d-data"
e2fsck -fn "$DL" > "$W/d-data.fsck" 2>&1 || fail "11: d's /data after the restored run: $(tail -5 "$W/d-data.fsck")"
losetup -d "$DL"
[ "$bid" = "$ID_D" ] && [ "$bseq" -gt "${FIRST#* }" ] || fail "11: d's /data holds '$bid $bseq', not a beat after the restore (first $FIRST)"
log "11: the guest restored from the set goes on at seq ${FIRST#* } after disk seq ${DISK#* }, and wrote beat $bseq to its /data from the other member (clean)"
log "ok"
