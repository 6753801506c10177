#!/usr/bin/env bash
# The CLI's help texts (golden files in Tests/Machine/golden; regenerate with
# Tests/Machine/t_cli.sh --update after a deliberate change) and its usage
# errors: exit code 2 and one clear line.
source "$(dirname "$0")/lib.sh"
G=$(dirname "$0")/golden
for c in main attach detach status snapshot backup restore info verify writers vm vm-layout vm-stop vm-resume; do
  sub=${c//-/ }; [ $c = main ] && sub=
  COLUMNS=100 "$HOTIMAGE" $sub --help > "$W/help-$c.txt" 2>&1
  if [ "${1:-}" = --update ]; then cp "$W/help-$c.txt" "$G/help-$c.txt"; continue; fi
  diff -u "$G/help-$c.txt" "$W/help-$c.txt" || fail "help of '${sub:-hotimage}' differs from its golden file"
done

# Help paragraphs are one logical line each, which the formatter reflows to
# the terminal; tables and examples are indented lines short enough that it
# never breaks them (a manual line longer than the width is wrapped with no
# indent, leaving a short orphan mid-table). Rendered wide enough that
# nothing wraps, every indented line of the overview must come out intact at
# 80 and 100 columns, and a line too long for 80 columns that is not
# indented must be a whole paragraph, not the first of a hand-broken one.
# WRAP_KNOWN lists commands whose help is known to break (none now; the
# test says when one listed no longer does).
WRAP_KNOWN=" "
for c in main attach detach status snapshot backup restore info verify writers vm vm-layout vm-stop vm-resume; do
  sub=${c//-/ }; [ $c = main ] && sub=
  for w in 1000 80 100; do COLUMNS=$w "$HOTIMAGE" $sub --help > "$W/wrap-$c-$w.txt" 2>&1; done
  if problems=$(python3 - "$W/wrap-$c" <<'PY'
import sys
base = sys.argv[1]
render = lambda w: open(f"{base}-{w}.txt").read().split("\n")
wide = render(1000)
overview = wide[:next((i for i, l in enumerate(wide) if l.startswith("USAGE:")), len(wide))]
bad = []
for w in (80, 100):
    lines = set(render(w))
    bad += [f"{w} columns break: {l!r}" for l in overview if l.startswith(" ") and l.strip() and l not in lines]
for a, b in zip(overview, overview[1:]):
    if len(a) > 79 and not a.startswith(" ") and b.strip() and not b.startswith(" "):
        bad.append(f"a paragraph broken by hand (join its lines with \\): {a[:60]!r}...")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
  ); then
    case "$WRAP_KNOWN" in *" $c "*) log "help of '${sub:-hotimage}' no longer wraps: remove '$c' from WRAP_KNOWN" ;; esac
  else
    case "$WRAP_KNOWN" in
      *" $c "*) log "known (TODO issue 14): help of '${sub:-hotimage}' is broken by the formatter:"; echo "$problems" | sed "s/^/[$T]   /" ;;
      *) fail "help of '${sub:-hotimage}' is broken by the formatter:"$'\n'"$problems" ;;
    esac
  fi
done

expect_exit 2 "is not a size" -- "$HOTIMAGE" attach /dev/null --memory-buffer lots
expect_exit 2 "must be fuse, nbd or dm" -- "$HOTIMAGE" attach /dev/null --via carrier-pigeon
expect_exit 2 "plain name" -- "$HOTIMAGE" attach /dev/null --name ../x
expect_exit 2 "applies to --via nbd only" -- "$HOTIMAGE" attach /dev/null --reconnect
expect_exit 2 "1 to 16" -- "$HOTIMAGE" attach /dev/null --via nbd --nbd-connections 17
if [ ! -e /sys/module/nbd ] && [ ! -e /dev/nbd0 ]; then
  # This kernel has no nbd: the refusal names the cause and the alternative.
  expect_exit 2 "needs the kernel's nbd driver.*use --via fuse" -- "$HOTIMAGE" attach /dev/null --via nbd --run-dir "$RUN"
else
  log "this kernel has nbd: the no-driver refusal is not checked here"
fi
expect_exit 2 "give the command to run" -- "$HOTIMAGE" snapshot data
expect_exit 2 "consistency must be" -- "$HOTIMAGE" snapshot data --consistency maybe -- true
expect_exit 1 "no HotCore daemon 'nope'" -- "$HOTIMAGE" status nope --run-dir "$RUN"
expect_exit 1 "no HotCore daemon 'nope'" -- "$HOTIMAGE" detach nope --run-dir "$RUN"
expect_exit 2 "mode must be online, auto or offline" -- "$HOTIMAGE" backup x -o y --mode sideways
expect_exit 2 "compress" -- "$HOTIMAGE" backup x -o y --compress lzma
expect_exit 2 "cluster-size must be" -- "$HOTIMAGE" backup x -o y --cluster-size 3K
expect_exit 2 "neither an attachment" -- "$HOTIMAGE" backup /nonexistent -o "$W/x.qcow2" --run-dir "$RUN"
expect_exit 2 "too short for a qcow2 header" -- "$HOTIMAGE" verify /etc/hostname
expect_exit 1 "magic|qcow2" -- "$HOTIMAGE" info /etc/hostname
expect_exit 2 "Missing expected argument" -- "$HOTIMAGE" restore
expect_exit 2 "no such writer: nope" -- "$HOTIMAGE" writers --writers nope --writers-dir "$W"
expect_exit 2 "writer-timeout must be" -- "$HOTIMAGE" backup x -o "$W/x.qcow2" --writer-timeout 0
expect_exit 2 "wants key=value" -- "$HOTIMAGE" backup x -o "$W/x.qcow2" --writer-setting novalue
expect_exit 2 "no built-in writer" -- "$HOTIMAGE" writer-exec nosuch components
expect_exit 2 "one of them" -- "$HOTIMAGE" vm stop
expect_exit 2 "one of them" -- "$HOTIMAGE" vm resume --all --from /nonexistent
expect_exit 2 "yes or no" -- "$HOTIMAGE" vm stop --all --partial maybe
expect_exit 2 "seconds > 0" -- "$HOTIMAGE" vm resume --all --wait 0
# libvirt that cannot be reached (no virsh, or no daemon at the URI): its own
# exit code, not 5 (backup's "a writer could not freeze").
expect_exit 7 "virsh is not installed|does not answer" -- "$HOTIMAGE" vm layout --uri "qemu:///system?socket=$W/no-libvirt.sock"
expect_exit 1 "neither a block device nor a regular file" -- "$HOTIMAGE" attach /dev/null --name hit-null --run-dir "$RUN"
log "ok"
