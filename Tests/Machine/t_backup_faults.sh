#!/usr/bin/env bash
# Issue 14's fault matrix, part 1: `hotimage backup` killed (SIGKILL) or
# stopped (SIGTERM) in every phase while a stamped writer keeps writing
# into a file on the mounted ext4: the before-snapshot hook, the
# write-inactivity wait, the freeze (inside the map read), streamlined
# imaging, emergency mode and the final write of the image. Phases too short
# to catch are held by the test hook HOTIMAGE_TEST_STALL=PHASE:FILE
# (Backup+PartialImage.swift). After each fault the same five checks:
#   1 the live file holds every completed write; e2fsck -fn is clean
#   2 the filesystem is not left frozen (a write completes within 5 s)
#   3 no hb files, no session (engine idle within the 3 s heartbeat bound
#     plus the 100 ms tick)
#   4 the run directory holds the attachment alone; no image under its
#     final name (a SIGKILL leaves only the locked-then-orphaned
#     .NAME.PID.hotimage-partial; with --keep-partial the image is kept,
#     `info` says incomplete and `restore` refuses it)
#   5 the next backup succeeds (and removes a killed backup's partial), and
#     its image verifies
source "$(dirname "$0")/lib.sh"

NAME=hit-faults
BLOCKS=2048     # the stamped file: 8 MiB
OUT=$W/out
mkdir -p "$OUT"
attach_new $NAME 128M --heartbeat-timeout 3 --memory-buffer 256K --hb-file-size 1M
MNT=$W/mnt
mkfs.ext4 -q -F "$DEV" && mkdir -p "$MNT" && mount "$DEV" "$MNT" || fail "mkfs/mount"
head -c 24M /dev/urandom > "$MNT/filler.bin"   # something to image at --max-rate
truncate -s $((BLOCKS * 4096)) "$MNT/stamped"
sync
RUNLIST=$(cd "$RUN" && find . | sort)

WN=0
start_writer() {  # pause_ms
  WN=$((WN + 1))
  rm -f "$W/w.stop" "$W/w.ready"
  "$STAMP" write "$MNT/stamped" --log "$W/w$WN.log" --blocks $BLOCKS --threads 2 --stop-file "$W/w.stop" \
      --burst-ms 300 --pause-ms "$1" --seed $WN --ready-file "$W/w.ready" > "$W/w$WN.out" 2>&1 &
  WRITER=$!
  wait_until 60 test -f "$W/w.ready" || fail "writer init did not finish"
}

stop_writer() {
  touch "$W/w.stop"
  wait $WRITER; local rc=$?
  [ $rc = 0 ] || { cat "$W/w$WN.out"; fail "$CASE: live writes failed (writer exit $rc)"; }
}

phase() { status_json $NAME | json_get "['engine']['phase']"; }

# The five checks. $1: the partial image expected (none | orphan | kept).
five_checks() {
  local partial=$1 t0
  # 2. Not frozen: a write and its fsync complete within 5 s.
  timeout 5 sh -c "echo probe > '$MNT/probe' && sync -f '$MNT/probe'" || fail "$CASE: the filesystem is left frozen"
  # 3. No session, no hb files: idle within the heartbeat bound.
  t0=$(date +%s%N)
  wait_until 5 sh -c "[ \"\$('$HOTIMAGE' status $NAME --json --run-dir '$RUN' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"engine\"][\"phase\"])')\" = idle ]" \
      || fail "$CASE: the session is still $(phase) 5 s after the fault"
  local idle_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  ls "$W/hb-$NAME"/hb_*.tmp >/dev/null 2>&1 && fail "$CASE: hb files left: $(ls "$W/hb-$NAME")"
  [ "$(status_json $NAME | json_get ".get('frozen')")" = None ] || fail "$CASE: the daemon says a filesystem is frozen"
  # 1. Every completed write is on the live volume, and it checks clean.
  stop_writer
  "$STAMP" check "$W/w$WN.log" "$MNT/stamped" > "$W/$CASE.live" 2>&1 || { cat "$W/$CASE.live"; fail "$CASE: the live file lost writes"; }
  umount "$MNT" || fail "$CASE: umount"
  e2fsck -fn "$DEV" > "$W/$CASE.fsck" 2>&1 || { cat "$W/$CASE.fsck"; fail "$CASE: e2fsck -fn on the live volume"; }
  mount "$DEV" "$MNT" || fail "$CASE: remount"
  # 4. The run directory holds the attachment alone; the image directory
  #    what the fault may leave.
  [ "$(cd "$RUN" && find . | sort)" = "$RUNLIST" ] || { diff <(echo "$RUNLIST") <(cd "$RUN" && find . | sort); fail "$CASE: the run directory changed"; }
  local left; left=$(ls -A "$OUT")
  case $partial in
    none) [ -z "$left" ] || fail "$CASE: left in the image directory: $left" ;;
    orphan) [ -e "$OUT/img.qcow2" ] && fail "$CASE: a killed backup left an image under its final name"
            [ "$(echo "$left" | wc -l)" = 1 ] && echo "$left" | grep -qx '\.img\.qcow2\.[0-9]*\.hotimage-partial' || fail "$CASE: left in the image directory: '$left' (expected the killed backup's partial alone)" ;;
    kept) [ "$left" = img.qcow2 ] || fail "$CASE: --keep-partial left: $left"
          HI info "$OUT/img.qcow2" | grep -q "^complete: *NO" || fail "$CASE: info does not say the kept image is incomplete"
          expect_exit 2 "" -- HI restore "$OUT/img.qcow2" "$W/restored.raw"
          rm -f "$OUT/img.qcow2" "$W/restored.raw" ;;
  esac
  # 5. The next backup succeeds (a killed backup's partial is removed).
  start_writer 200
  H backup $NAME -o "$OUT/next.qcow2" > /dev/null 2> "$W/$CASE.next" || { cat "$W/$CASE.next"; fail "$CASE: the next backup failed"; }
  if [ "$partial" = orphan ]; then
    grep -q "removed the partial image .*left by a killed backup" "$W/$CASE.next" || fail "$CASE: the next backup did not remove the partial"
  fi
  HI verify "$OUT/next.qcow2" > /dev/null || fail "$CASE: the next image does not verify"
  [ "$(ls -A "$OUT")" = next.qcow2 ] || fail "$CASE: after the next backup: $(ls -A "$OUT")"
  rm -f "$OUT/next.qcow2"
  stop_writer
  log "$CASE: ok (rc $RC; idle after $idle_ms ms; $(head -1 "$W/$CASE.live"))"
}

# fault CASE SIGNAL WAITFOR EXPECTED_RC PARTIAL [backup options...]
# WAITFOR: a file to appear, or "phase:P" for the engine phase P. STALL, if
# set, is passed as HOTIMAGE_TEST_STALL.
fault() {
  CASE=$1; local sig=$2 waitfor=$3 want=$4 partial=$5; shift 5
  # FAULTS_ONLY="case ..." runs only those (to show a check failing without its fix).
  if [ -n "${FAULTS_ONLY:-}" ] && [[ " $FAULTS_ONLY " != *" $CASE "* ]]; then stop_writer; return; fi
  HOTIMAGE_TEST_STALL=${STALL:-} "$HOTIMAGE" backup --run-dir "$RUN" $NAME -o "$OUT/img.qcow2" "$@" > /dev/null 2> "$W/$CASE.err" &
  local pid=$!
  case $waitfor in
    phase:*) wait_until 30 sh -c "[ \"\$('$HOTIMAGE' status $NAME --json --run-dir '$RUN' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"engine\"][\"phase\"])')\" = ${waitfor#phase:} ]" \
                 || { cat "$W/$CASE.err"; fail "$CASE: the session never reached ${waitfor#phase:}"; } ;;
    *) wait_until 30 test -e "$waitfor" || { cat "$W/$CASE.err"; fail "$CASE: never reached $waitfor"; } ;;
  esac
  sleep 0.3
  kill -0 $pid 2>/dev/null || { cat "$W/$CASE.err"; fail "$CASE: the backup ended before the signal"; }
  kill -s "$sig" $pid
  local t0; t0=$(date +%s%N)
  wait $pid; RC=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  [ "$RC" = "$want" ] || { tail -5 "$W/$CASE.err"; fail "$CASE: backup exited $RC after SIG$sig, expected $want"; }
  [ $ms -le 5000 ] || fail "$CASE: backup took $ms ms to exit after SIG$sig"
  five_checks "$partial"
}

T0=$(date +%s)
for sig in KILL TERM; do
  if [ $sig = KILL ]; then want=137; part=orphan; else want=130; part=none; fi
  s=$(echo $sig | tr A-Z a-z)
  # The before-snapshot hook (it records its pid; SIGTERM must end it).
  rm -f "$W/hook.pid"
  start_writer 200
  fault hook-$s $sig "$W/hook.pid" $want none --before-snapshot "echo \$\$ > $W/hook.pid; exec sleep 30"
  hookpid=$(cat "$W/hook.pid" 2>/dev/null || echo 0)
  if [ $hookpid = 0 ]; then :
  elif [ $sig = TERM ]; then
    kill -0 "$hookpid" 2>/dev/null && fail "hook-$s: the before-snapshot hook still runs after SIGTERM"
  else
    kill -9 "$hookpid" 2>/dev/null   # a killed backup cannot end its hook
  fi
  # The write-inactivity wait: a writer that never pauses, wip (no freeze
  # to fall back on), the daemon's 60 s snapshot deadline.
  start_writer 0
  fault wip-$s $sig phase:waiting $want $part --consistency wip
  # The freeze and the map read, held inside the frozen window.
  start_writer 200
  rm -f "$W/stall"
  STALL=frozen:$W/stall fault frozen-$s $sig "$W/stall" $want $part --pause-ms 50
  # Streamlined imaging, slowed down.
  start_writer 200
  fault imaging-$s $sig phase:protecting $want $part --max-rate 4M
  # Emergency mode: the writer overwrites protected blocks faster than a
  # slow imager archives them; hb files pass 1 MiB.
  start_writer 0
  rm -f "$W/stall"
  STALL=emergency:$W/stall fault emergency-$s $sig "$W/stall" $want $part --max-rate 2M --emergency-at 1M --workers 1
  if [ -f "$W/emergency-$s.err" ]; then grep -q "emergency mode:" "$W/emergency-$s.err" || fail "emergency-$s: emergency mode not in the log"; fi
  # The final write of the image (before its metadata and header).
  start_writer 200
  rm -f "$W/stall"
  STALL=finish:$W/stall fault finish-$s $sig "$W/stall" $want $part
done
# --keep-partial: SIGTERM while imaging keeps the image, marked incomplete.
start_writer 200
fault keep-partial-term TERM phase:protecting 130 kept --max-rate 4M --keep-partial
log "ok: 13 faults in $(( $(date +%s) - T0 )) s"
