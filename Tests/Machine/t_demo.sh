#!/usr/bin/env bash
# The README's main command must keep working: run Scripts/demo as is.
source "$(dirname "$0")/lib.sh"
"$ROOT/Scripts/demo" > "$W/demo.out" 2>&1 || { tail -30 "$W/demo.out"; fail "Scripts/demo"; }
grep -q "demo: OK" "$W/demo.out" || fail "Scripts/demo did not report OK"
grep -E "identical|equals" "$W/demo.out" | sed "s/^/[$T] /"
log "ok"
