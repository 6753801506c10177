#!/usr/bin/env bash
# Fail-open proofs: a writer that never pauses makes the session fail at the
# snapshot deadline while every live write lands; a session client killed
# with SIGKILL, or stopped with SIGSTOP (no heartbeat), returns HotCore to
# passthrough within 10 s with the hb files deleted and the live data intact.
source "$(dirname "$0")/lib.sh"

BLOCKS=16384

start_writer() {  # name pause_ms
  rm -f "$W/$1.stop" "$W/$1.ready"
  "$STAMP" write "$DEV" --log "$W/$1.log" --blocks $BLOCKS --threads 2 --stop-file "$W/$1.stop" \
      --burst-ms 300 --pause-ms "$2" --seed 11 --ready-file "$W/$1.ready" > "$W/$1.writer.out" 2>&1 &
  WRITER=$!
  wait_until 60 test -f "$W/$1.ready" || fail "$1: writer init did not finish"
}

stop_writer_and_check_live() {  # name
  touch "$W/$1.stop"
  wait $WRITER; local rc=$?
  [ $rc = 0 ] || { cat "$W/$1.writer.out"; fail "$1: live writes failed (writer exit $rc)"; }
  "$STAMP" check "$W/$1.log" "$DEV" > "$W/$1.live" 2>&1 || { cat "$W/$1.live"; fail "$1: the live device lost writes"; }
  log "$1 live: $(head -1 "$W/$1.live")"
}

# CLOCK_MONOTONIC now, in ns, without starting a process: the offset from
# the real-time clock is measured once.
MONO_OFFSET=$(python3 -c 'import time; print(time.time_ns() - time.monotonic_ns())')
mono_ns() { local r=${EPOCHREALTIME/./}; echo $(( r * 1000 - MONO_OFFSET )); }

phase() { status_json "$1" | json_get "['engine']['phase']"; }

# 1. A writer that never pauses: no consistent point, the session fails at
#    the (shortened) snapshot deadline, live writes are untouched.
attach_new hit-nopause 64M --snapshot-deadline 3
start_writer hit-nopause 0
expect_exit 3 "not complete within 3 s" -- H snapshot hit-nopause --consistency raw -- true
# From the engine's begin to its failure, both on the engine's clock.
st=$(status_json hit-nopause)
ms=$(( ($(echo "$st" | json_get "['engine']['passthroughSinceNanos']") - $(echo "$st" | json_get "['engine']['lastBeginNanos']")) / 1000000 ))
[ $ms -ge 3000 ] && [ $ms -le 3300 ] || fail "the deadline of 3 s took $ms ms"
log "never-pausing writer: session failed after $ms ms: $(tail -1 <<< "$EXIT_OUT")"
[ "$(phase hit-nopause)" = failed ] || [ "$(phase hit-nopause)" = idle ] || fail "phase after deadline: $(phase hit-nopause)"
stop_writer_and_check_live hit-nopause
H detach hit-nopause --force >/dev/null || fail "detach hit-nopause"

# 2./3. The session client dies (SIGKILL) or hangs (SIGSTOP) mid-session.
client_fault() {  # name signal
  local name=$1 sig=$2
  attach_new "$name" 64M --memory-buffer 256K --hb-file-size 1M
  start_writer "$name" 200
  # Not through H(): $! must be the client itself, not a subshell.
  "$HOTIMAGE" snapshot --run-dir "$RUN" "$name" --consistency raw -- sleep 61.$RANDOM > "$W/$name.client.out" 2>&1 &
  local client=$!
  wait_until 20 sh -c "[ \"\$('$HOTIMAGE' status $name --json --run-dir '$RUN' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"engine\"][\"phase\"])')\" = protecting ]" \
      || fail "$name: session never reached protecting"
  # Let copy-on-write fill the tiny memory buffer so hb files exist.
  wait_until 20 sh -c "ls '$W/hb-$name'/hb_*.tmp >/dev/null 2>&1" || fail "$name: no hb files appeared"
  # Timed on CLOCK_MONOTONIC, which the daemon's engine clock also is: t0
  # at the signal (bash's $EPOCHREALTIME, no fork, moved onto the monotonic
  # clock), the end from the engine's own passthroughSinceNanos, so neither
  # process start-up nor the polling below adds to the measurement.
  local t0; t0=$(mono_ns)
  kill -s "$sig" $client
  wait_until 15 sh -c "[ \"\$('$HOTIMAGE' status $name --json --run-dir '$RUN' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"engine\"][\"phase\"])')\" = idle ]" \
      || fail "$name: not back to passthrough within 15 s after SIG$sig"
  local t1; t1=$(status_json "$name" | json_get "['engine']['passthroughSinceNanos']")
  local ms=$(( (t1 - t0) / 1000000 ))
  [ $ms -ge 0 ] && [ $ms -le 10200 ] || fail "$name: passthrough took $ms ms (limit 10 s and the 100 ms tick)"
  ls "$W/hb-$name"/hb_*.tmp >/dev/null 2>&1 && fail "$name: hb files left after the session was dropped"
  log "$name: SIG$sig → passthrough in $ms ms, hb files deleted"
  kill -9 $client 2>/dev/null; wait $client 2>/dev/null
  pkill -f "sleep 61\." 2>/dev/null
  stop_writer_and_check_live "$name"
  H detach "$name" --force >/dev/null || fail "detach $name"
}
client_fault hit-kill KILL
client_fault hit-stop STOP
log "ok"
