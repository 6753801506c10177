#!/usr/bin/env bash
# Online backups end to end: ext4 and XFS behind HotCore, a writer creating,
# overwriting and deleting files during the whole backup; a before-snapshot
# hook holds the writer and records the file states, an after-snapshot hook
# lets it go on. The image passes hotimage verify and qemu-img check, is
# restored to another loop device, checks clean (e2fsck -fn / xfs_repair -n
# after a log-replay mount), and every file equals the recorded state;
# qemu-img convert equals our restore. Then again with a memory buffer so
# small that hb files and emergency mode happen.
source "$(dirname "$0")/lib.sh"

# backup_case NAME FS [attach options...] -- [backup options...]
backup_case() {
  local name=$1 fs=$2; shift 2
  local aopts=() bopts=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do aopts+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  bopts=("$@")
  attach_new "$name" 400M "${aopts[@]}"
  case $fs in
    ext4) mkfs.ext4 -q -F "$DEV" ;;
    xfs) mkfs.xfs -q -f "$DEV" ;;
  esac
  local mnt=$W/mnt-$name
  mkdir -p "$mnt" && mount "$DEV" "$mnt" || fail "$name: mount"
  head -c 60M /dev/urandom > "$mnt/random.bin"
  seq 1 3000000 > "$mnt/numbers.txt"
  sync
  mkdir -p "$mnt/churn"
  rm -f "$W/$name.stop" "$W/$name.pause" "$W/$name.ack"
  python3 "$ROOT/Scripts/demo-writer.py" "$mnt/churn" "$W/$name.journal" "$W/$name.stop" "$W/$name.pause" "$W/$name.ack" &
  local writer=$!
  # A second writer that overwrites the big file in place, 8 MiB at a time
  # (copy-on-write load).
  ( while [ ! -e "$W/$name.stop" ]; do
      dd if=/dev/urandom of="$mnt/random.bin" bs=1M count=8 seek=$((RANDOM % 52)) conv=notrunc,fsync status=none 2>/dev/null
      sleep 0.05
    done ) &
  local churner=$!
  sleep 2
  local hook="$ROOT/Scripts/demo-hook-pause.sh $W/$name.pause $W/$name.ack $mnt/churn $W/$name.state"
  # The random file's checksum at the snapshot: the hook pauses only the
  # journalled writer, so stop the overwriting loop for the hook's moment too.
  H backup "$name" -o "$W/$name.qcow2" --json \
      --before-snapshot "kill -STOP $churner; pkill -STOP -P $churner; sha256sum < $mnt/random.bin > $W/$name.rsum; $hook" \
      --after-snapshot "pkill -CONT -P $churner; kill -CONT $churner; rm -f $W/$name.pause" \
      "${bopts[@]}" > "$W/$name.events" 2> "$W/$name.err"
  local rc=$?
  sleep 1   # the writers go on after the snapshot: the negative control below needs it
  touch "$W/$name.stop"; pkill -CONT -P $churner; kill -CONT $churner 2>/dev/null; wait $writer $churner
  [ $rc = 0 ] || { tail -20 "$W/$name.err"; tail -20 "$RUN/$name/daemon.log"; fail "$name: backup exited $rc"; }
  grep -q '"event":"summary"' "$W/$name.events" || fail "$name: no summary event"
  SUMMARY=$(grep '"event":"summary"' "$W/$name.events")
  grep -q "summary:" "$W/$name.err" || fail "$name: no summary on stderr"
  log "$name: $(grep 'summary:' "$W/$name.err" | sed 's/hotimage: summary: //' | tr '\n' ';')"

  local copy=$W/copy-$name
  backup_roundtrip "$W/$name.qcow2" --loop 400M --fs "$fs" --mount "$copy" --qemu-same
  qemu-img info --output=json "$W/$name.qcow2" | python3 -c '
import json,sys; d=json.load(sys.stdin)
assert d["virtual-size"] == 400*1024*1024, d["virtual-size"]
assert d["format-specific"]["data"]["compression-type"] == "zstd", d' || fail "$name: qemu-img info"
  (cd "$copy/churn" && find . -type f -name 'rec-*' | sort | xargs -r sha256sum) > "$W/$name.state.restored"
  cmp -s "$W/$name.state" "$W/$name.state.restored" || { diff "$W/$name.state" "$W/$name.state.restored" | head; fail "$name: restored files differ from the recorded state"; }
  seq 1 3000000 | cmp -s - "$copy/numbers.txt" || fail "$name: numbers.txt differs"
  [ "$(sha256sum < "$copy/random.bin")" = "$(cat "$W/$name.rsum")" ] || fail "$name: random.bin differs from its state at the snapshot"
  umount "$copy"
  log "$name: $(wc -l < "$W/$name.state") churn files equal the state at the snapshot; $fs check clean"
  # The negative control: a state recorded now (the writer ran on) must differ.
  (cd "$mnt/churn" && find . -type f -name 'rec-*' | sort | xargs -r sha256sum) > "$W/$name.state.now"
  cmp -s "$W/$name.state" "$W/$name.state.now" && fail "$name: the writer did not write after the snapshot (the test proves nothing)"
  umount "$mnt"
  H detach "$name" >/dev/null || fail "$name: detach"
}

backup_case hit-ext4 ext4 --
backup_case hit-xfs xfs --
# A 1 MiB memory buffer and small hb files: originals spill to hb files and
# emergency mode archives them first.
backup_case hit-tiny ext4 --memory-buffer 1M --hb-file-size 4M -- --emergency-at 1M --workers 2 --max-rate 30M
echo "$SUMMARY" | python3 -c '
import json,sys; s=json.load(sys.stdin)["summary"]
assert s["spillPeakBytes"] > 0, "no hb files were used"
assert len(s["emergencyEpisodes"]) > 0, "no emergency mode"
print("[t_backup_online] tiny buffer: hb files peaked at %d KiB; emergency mode %d time(s), %.1f s, %d clusters out of order" % (
  s["spillPeakBytes"]//1024, len(s["emergencyEpisodes"]), sum(e["seconds"] for e in s["emergencyEpisodes"]), sum(e["clusters"] for e in s["emergencyEpisodes"])))
' || fail "tiny buffer: $SUMMARY"
grep -q "emergency mode:" "$W/hit-tiny.err" || fail "tiny buffer: emergency mode not in the log"
log "ok"
