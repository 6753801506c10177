#!/bin/sh
# before-snapshot hook of the demo and tests: hold the writer between
# operations and record the state of its files (sha256 per file).
# Usage: demo-hook-pause.sh PAUSEFILE ACKFILE DIR STATEFILE
set -e
touch "$1"
i=0
while [ ! -e "$2" ]; do
  i=$((i + 1)); [ $i -gt 1000 ] && { echo "writer did not pause" >&2; exit 1; }
  sleep 0.01
done
(cd "$3" && find . -type f -name 'rec-*' | sort | xargs -r sha256sum) > "$4"
echo "hook: $HOTIMAGE_PHASE, writer paused, $(wc -l < "$4") files recorded, volumes $HOTIMAGE_VOLUMES, freeze $HOTIMAGE_FREEZE" >&2
