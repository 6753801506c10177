#!/usr/bin/env bash
# The PostgreSQL writer against a real PostgreSQL 15 under pgbench.
#
# A cluster made by this test (initdb as postgres, a private socket
# directory, no TCP) lives on an ext4 volume behind HotCore; pgbench runs
# through two backups:
#   (b) with no writer (--writers none): the filesystem freeze alone;
#   (a) with the postgresql writer: CHECKPOINT + pg_backup_start before the
#       snapshot, pg_backup_stop after; the image records pg-backup and the
#       label.
# Each image is restored to a fresh loop device, where a second server
# starts (another port) by crash recovery, pg_amcheck finds no corruption
# and the pgbench invariants hold: sum(abalance) = sum(bbalance) =
# sum(tbalance) = sum(delta). With the writer, recovery starts at the
# writer's checkpoint (the label's START WAL LOCATION), and restore removed
# the postmaster.pid and postmaster.opts the writer marked (the copy without
# the writer keeps its postmaster.pid: the control). The filesystem freeze
# follows the writer's freeze without waiting for a write pause: the cut
# comes < 2 s after it under pgbench.
# (c) The writer's psql session killed between freeze and thaw: exit 6, the
# failed thaw recorded with the server's reason.
# Controls that could fail: a balance changed by one in the restored copy
# breaks the invariant check; and the label put back as `backup_label`
# makes the server refuse to start ("WAL ends before end of online
# backup"): pg_backup_stop's end-of-backup record is not in the snapshot,
# which is why the writer stores the label as backup_label.hotimage.
source "$(dirname "$0")/lib.sh"

PGBIN=/usr/lib/postgresql/15/bin
for b in initdb pg_ctl postgres psql pgbench pg_amcheck; do
  [ -x "$PGBIN/$b" ] || skip "PostgreSQL 15 is not installed ($PGBIN/$b missing: apt-get install postgresql postgresql-contrib)"
done
id postgres >/dev/null 2>&1 || skip "no postgres user (the postgresql package creates it)"
command -v setpriv >/dev/null || skip "setpriv (util-linux) is missing"

SCALE=${PG_SCALE:-10}          # pgbench scale 10: about 160 MB
PORT=5433 RPORT=5434           # Unix sockets only, in our own directory: no clash with a system cluster
chmod 711 "$W"                 # postgres must reach its directories under $W
SOCK=$W/sock PGLOG=$W/pglog
mkdir -p "$SOCK" "$PGLOG" && chown postgres: "$SOCK" "$PGLOG" && chmod 700 "$SOCK"

# As postgres: setpriv execs (the pid is the command's, for kill -INT).
asp() { (cd / && exec setpriv --reuid=postgres --regid=postgres --init-groups --reset-env "$@"); }
# sql PORT SQL...: one-line answers, as postgres over the private socket.
sql() { local p=$1; shift; asp "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$SOCK" -p "$p" -d postgres "${@/#/-c}"; }
# start_pg DATADIR PORT LOG: our servers only ever listen on $SOCK.
start_pg() {
  echo "$1" >> "$W/started"
  asp "$PGBIN/pg_ctl" -D "$1" -l "$3" -w -t 120 -o "-p $2 -k $SOCK -c listen_addresses=''" start > /dev/null
}
# Stop the servers this test started (before lib.sh's cleanup unmounts).
stop_ours() {
  [ -f "$W/started" ] || return 0
  local d
  while read -r d; do
    [ -f "$d/postmaster.pid" ] && asp "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop > /dev/null 2>&1
  done < "$W/started"
}
trap 'stop_ours; cleanup' EXIT

# The invariants of pgbench's tables, as one line "A B T H n".
sums() {
  sql "$1" "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
                   (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
                   (SELECT count(*) FROM pgbench_history)" | tr '|' ' '
}
invariants_hold() { local s; s=($(sums "$1")); [ "${s[0]}" = "${s[1]}" ] && [ "${s[1]}" = "${s[2]}" ] && [ "${s[2]}" = "${s[3]}" ]; }
# LSN "X/Y" as a number.
lsn() { local h=${1%/*} l=${1#*/}; echo $(( (16#$h << 32) + 16#$l )); }

# The live cluster on the protected volume.
attach_new hit-pg 700M
mkfs.ext4 -q -F "$DEV"
M=$W/m
mkdir -p "$M" && mount "$DEV" "$M" || fail "mount"
mkdir "$M/pg" && chown postgres: "$M/pg" && chmod 700 "$M/pg"
DATA=$M/pg/data
asp "$PGBIN/initdb" -D "$DATA" --auth-local=peer --auth-host=reject -U postgres > "$W/initdb.log" 2>&1 || { cat "$W/initdb.log"; fail "initdb"; }
start_pg "$DATA" $PORT "$PGLOG/live.log" || { cat "$PGLOG/live.log"; fail "the live server did not start"; }
t0=$(date +%s)
asp "$PGBIN/pgbench" -h "$SOCK" -p $PORT -i -q -s "$SCALE" postgres > "$W/pgbench-init.log" 2>&1 || { cat "$W/pgbench-init.log"; fail "pgbench -i"; }
sql $PORT "CREATE EXTENSION amcheck" || fail "CREATE EXTENSION amcheck"
# A site's idle_session_timeout shorter than the snapshot window (the WIP
# wait alone is up to 5 s under pgbench) would end the writer's session, and
# its backup, before the thaw: the writer turns it off for its session.
sql $PORT "ALTER SYSTEM SET idle_session_timeout = '1s'" "SELECT pg_reload_conf()" > /dev/null || fail "idle_session_timeout"
log "cluster on $DEV: PostgreSQL $(sql $PORT "SHOW server_version"), pgbench scale $SCALE ($(du -sm "$DATA" | cut -f1) MB) in $(( $(date +%s) - t0 )) s"

# The writer sees it, fully covered by the volume.
HI writers --writers postgresql --volumes "$M" --json > "$W/writers.json" || fail "hotimage writers: $(cat "$W/writers.json")"
python3 - "$W/writers.json" "$PORT:$DATA" <<'PY' || fail "the writer does not list the cluster as fully covered: $(cat "$W/writers.json")"
import json, sys
d = json.load(open(sys.argv[1]))
c = [x for w in d if w["writer"] == "postgresql" for x in w["components"] if x["component"]["id"] == sys.argv[2]]
assert len(c) == 1 and c[0]["coverage"] == "fully", c
PY
# postgresql-cluster = DATADIR limits the writer to those clusters.
HI writers --writers postgresql --writer-setting "postgresql-cluster=$DATA" --json | grep -q "\"$PORT:" \
  || fail "postgresql-cluster = its data directory: the cluster is not listed"
HI writers --writers postgresql --writer-setting "postgresql-cluster=$W" --json 2> "$W/writers.err" | grep -q "\"$PORT:" \
  && fail "postgresql-cluster = another directory: the cluster is still listed"
grep -q "no running cluster there" "$W/writers.err" || fail "postgresql-cluster = another directory: not said: $(cat "$W/writers.err")"

# pgbench through both backups.
(cd / && exec setpriv --reuid=postgres --regid=postgres --init-groups --reset-env \
   "$PGBIN/pgbench" -h "$SOCK" -p $PORT -n -c 4 -j 2 -T 300 postgres > "$W/pgbench.log" 2>&1) &
BENCH=$!
sleep 3
kill -0 $BENCH 2>/dev/null || { cat "$W/pgbench.log"; fail "pgbench stopped early"; }

# backup NAME WRITERS: an online backup while pgbench runs.
backup() {
  local before after rc
  before=$(sql $PORT "SELECT count(*) FROM pgbench_history")
  H backup hit-pg -o "$W/$1.qcow2" --writers "$2" --json > "$W/$1.events" 2> "$W/$1.err"; rc=$?
  after=$(sql $PORT "SELECT count(*) FROM pgbench_history")
  [ $rc = 0 ] || { tail -20 "$W/$1.err"; fail "$1: backup exited $rc"; }
  kill -0 $BENCH 2>/dev/null || fail "$1: pgbench did not run through the whole backup"
  [ "$after" -gt "$before" ] || fail "$1: no pgbench transaction during the backup"
  HI info --json "$W/$1.qcow2" > "$W/$1.info" || fail "$1: info"
  log "$1 (--writers $2): $(grep 'summary:' "$W/$1.err" | sed 's/hotimage: summary: //' | head -1); $((after - before)) pgbench transactions during it"
}
# (b) first: its recovery then owes nothing to the writer's checkpoint.
backup b none
sleep 2
backup a postgresql
# The writer froze the cluster (its checkpoint) and the filesystem freeze
# follows: backup does not wait for a write-inactivity pause then (none
# comes under pgbench; waiting up to 5 s only piled up WAL to replay on
# restore). The snapshot's seconds after the writers froze, less the thaw
# (pg_backup_stop), stay short. PG_GAP_CHECK=0 only logs them (to measure
# a build without this).
GAP=($(python3 - "$W/a.events" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
snap = [e for e in ev if e["event"] == "snapshot"][0]["seconds"]
thawed = [e for e in ev if e["event"] == "writers" and e.get("phase") == "thawed"][0]
thaw = max(c.get("thawSeconds") or 0 for c in thawed["components"])
print("%.3f %.3f %.3f" % (snap - thaw, snap, thaw))
PY
)) || fail "(a): no snapshot or thawed writers event: $(cat "$W/a.events")"
log "a: snapshot $(printf %s "${GAP[1]}") s after the writers froze, of which the thaw ${GAP[2]} s: the cut within ${GAP[0]} s of the writer's checkpoint; $(grep -o 'no write-inactivity pause[^(]*' "$W/a.err" || echo 'waited for a write pause')"
if [ "${PG_GAP_CHECK:-1}" = 1 ]; then
  grep -q "no write-inactivity pause before the freeze: the writers froze 1 component" "$W/a.err" \
    || fail "(a): backup did not say it skips the write pause: $(grep -v progress "$W/a.err" | tail -20)"
  awk -v g="${GAP[0]}" 'BEGIN { exit !(g < 2) }' || fail "(a): the cut came ${GAP[0]} s after the writers froze (want < 2 s under pgbench)"
fi
# (c) The writer's session dies while frozen (its backend terminated as
# soon as pg_backup_start has returned): the thaw fails with the reason,
# the backup exits 6 with a complete image, and the server's own words say
# it aborted the backup when the session ended.
( for _ in $(seq 1 150); do
    sql $PORT "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hotimage'
               AND state = 'idle' AND query LIKE '%pg_backup_start%'" | grep -q t && exit 0
    sleep 0.1
  done; exit 1 ) &
KILLER=$!
# An explicit --pause-ms wins over skipping the pause: the daemon waits
# for one (none comes under pgbench: up to 5 s), which gives the killer its
# window between freeze and thaw.
H backup hit-pg -o "$W/c.qcow2" --writers postgresql --pause-ms 200 > "$W/c.out" 2>&1; rc=$?
wait $KILLER || fail "(c): the writer's session was never seen between freeze and thaw: $(tail -5 "$W/c.out")"
grep -q "no write-inactivity pause before the freeze" "$W/c.out" && fail "(c): --pause-ms 200 given, yet the pause was skipped"
[ $rc = 6 ] || fail "(c): backup exited $rc (want 6): $(tail -5 "$W/c.out")"
HI verify "$W/c.qcow2" > /dev/null || fail "(c): verify"
HI info --json "$W/c.qcow2" | python3 -c '
import json, sys
c = [x for x in json.load(sys.stdin)["metadata"]["components"] if x["writer"] == "postgresql"][0]
assert c["action"] == "frozen" and c["thawed"] is False and not c.get("artifacts"), c
m = c["thawMessage"]
assert "aborting backup due to backend exiting before pg_backup_stop" in m and "terminating connection due to administrator command" in m, m
' || fail "(c): the image does not record the failed thaw"
log "c: session killed while frozen: exit 6; $(grep -o "failed to thaw: .*" "$W/c.out" | cut -c1-160)…"
[ "$(sql $PORT "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hotimage'")" = 0 ] \
  || fail "(c): a hotimage session is left on the live server"
kill -INT $BENCH; wait $BENCH

# (a)'s metadata: the cluster frozen by pg-backup, thawed, its label kept.
python3 - "$W/a.info" "$PORT:$DATA" "$W/a.label" <<'PY' || fail "(a): the image does not record the pg-backup: $(cat "$W/a.info")"
import json, sys
m = json.load(open(sys.argv[1]))["metadata"]
c = [x for x in m.get("components") or [] if x["writer"] == "postgresql" and x["id"] == sys.argv[2]]
assert len(c) == 1, m.get("components")
c = c[0]
assert c["action"] == "frozen" and c["method"] == "pg-backup" and c["thawed"] is True, c
arts = {a["path"]: a["content"] for a in c.get("artifacts") or []}
label = arts[sys.argv[2].split(":", 1)[1] + "/backup_label.hotimage"]
assert "LABEL: hotimage" in label and "BACKUP METHOD: streamed" in label, label
open(sys.argv[3], "w").write(label)
print("[t_pg_writer] (a) recorded: %s; thaw: %s" % (c["freezeMessage"], c["thawMessage"]))
PY
python3 - "$W/b.info" <<'PY' || fail "(b): the image records a writer: $(cat "$W/b.info")"
import json, sys
m = json.load(open(sys.argv[1]))["metadata"]
assert not [x for x in m.get("components") or [] if x.get("method") == "pg-backup"], m.get("components")
PY
LABEL_START=$(sed -n 's/^START WAL LOCATION: \([0-9A-F/]*\).*/\1/p' "$W/a.label")
[ -n "$LABEL_START" ] || fail "(a): no START WAL LOCATION in the label: $(cat "$W/a.label")"

# restore_to NAME [DEVICE]: the image verified, restored to a fresh loop
# device (or over DEVICE), checked clean and mounted read-write at $W/r-NAME.
restore_to() {
  local target=(--loop 700M)
  [ -z "${2:-}" ] || target=(--onto "$2" --force)
  backup_roundtrip "$W/$1.qcow2" "${target[@]}" --fs ext4 --mount "$W/r-$1" --rw
  RTARGET=$RESTORED RDATA=$W/r-$1/pg/data
}

# check_restored NAME: starts a server on the restored copy, checks it.
check_restored() {
  local rlog=$PGLOG/r-$1.log
  start_pg "$RDATA" $RPORT "$rlog" || { tail -20 "$rlog"; fail "$1: the restored cluster did not start"; }
  grep -q "database system was not properly shut down; automatic recovery in progress" "$rlog" \
    || { cat "$rlog"; fail "$1: the restored server did not recover from the snapshot"; }
  REDO_START=$(sed -n 's/.*redo starts at \([0-9A-F/]*\).*/\1/p' "$rlog" | head -1)
  REDO_DONE=$(sed -n 's/.*redo done at \([0-9A-F/]*\).*/\1/p' "$rlog" | head -1)
  [ -n "$REDO_START" ] && [ -n "$REDO_DONE" ] || { cat "$rlog"; fail "$1: no redo in the restored server's log"; }
  local s; s=($(sums $RPORT))
  invariants_hold $RPORT || fail "$1: pgbench invariants broken: accounts ${s[0]} branches ${s[1]} tellers ${s[2]} history ${s[3]}"
  [ "${s[4]}" -gt 0 ] || fail "$1: no pgbench history in the restored copy (the test proves nothing)"
  asp "$PGBIN/pg_amcheck" -h "$SOCK" -p $RPORT -d postgres > "$W/amcheck-$1.out" 2>&1 || { head -20 "$W/amcheck-$1.out"; fail "$1: pg_amcheck found corruption"; }
  log "$1: restored cluster started; redo $REDO_START .. $REDO_DONE ($(( $(lsn "$REDO_DONE") - $(lsn "$REDO_START") )) bytes of WAL); invariants hold: sums ${s[0]} over ${s[4]} transactions; pg_amcheck clean"
}

stop_restored() { asp "$PGBIN/pg_ctl" -D "$RDATA" -m fast -w stop > /dev/null || fail "stop the restored server"; umount "$W/r-$1" || fail "umount"; }

# (a) with the writer: it marked the live postmaster's postmaster.pid and
# postmaster.opts for restore to leave out (the pid is alive on this host:
# PostgreSQL would refuse to start over it), and restore removed them.
restore_to a
for f in postmaster.pid postmaster.opts; do
  [ -e "$RDATA/$f" ] && fail "(a): restore left $f in the restored data directory: $(cat "$W/a.restore")"
  grep -q "postgresql '$PORT:$DATA': removed /pg/data/$f from the restored filesystem" "$W/a.restore" \
    || fail "(a): restore did not say it removed $f: $(cat "$W/a.restore")"
done
HI info "$W/a.qcow2" | grep -q "restore leaves out $DATA/postmaster.pid, $DATA/postmaster.opts" \
  || fail "(a): info does not show the files restore leaves out: $(HI info "$W/a.qcow2" | grep component:)"
log "a: restore removed postmaster.pid and postmaster.opts (marked by the writer)"
check_restored a
[ "$REDO_START" = "$LABEL_START" ] || fail "(a): recovery started at $REDO_START, not at the writer's checkpoint $LABEL_START"
log "a: recovery started at the writer's checkpoint (label START WAL LOCATION $LABEL_START)"
# restore wrote the label (the server started with it there: it is inert).
cmp -s "$RDATA/backup_label.hotimage" "$W/a.label" || fail "(a): restore did not write the label as backup_label.hotimage"
[ "$(stat -c '%U %a' "$RDATA/backup_label.hotimage")" = "postgres 600" ] || fail "(a): the restored label's owner or mode"
log "a: restore wrote the label as backup_label.hotimage (postgres, 0600); the server started with it in place"
# Control: the check catches one changed balance.
sql $RPORT "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1" || fail "control update"
invariants_hold $RPORT && fail "control: the invariant check passed a broken state"
log "control: one balance changed by 1 breaks the invariants ($(sums $RPORT | cut -d' ' -f1-4))"
stop_restored a

# Control: the label as backup_label. Recovery then needs pg_backup_stop's
# end-of-backup WAL record, written after the snapshot: the server must
# refuse. (If it started, the snapshot would hold WAL from after the thaw.)
restore_to a "$RTARGET"
cp "$W/a.label" "$RDATA/backup_label" && chown postgres: "$RDATA/backup_label"
if start_pg "$RDATA" $RPORT "$PGLOG/r-a-label.log" 2>/dev/null; then
  fail "control: the restored cluster started with the label as backup_label (its end-of-backup record is in the snapshot?)"
fi
grep -q "WAL ends before end of online backup" "$PGLOG/r-a-label.log" || { tail "$PGLOG/r-a-label.log"; fail "control: unexpected failure with backup_label"; }
log "control: with the label as backup_label the server refuses: $(grep -o 'FATAL: .*' "$PGLOG/r-a-label.log" | head -1)"
umount "$W/r-a" || fail "umount"

# (b) without a writer: the filesystem freeze alone. Nothing marked the
# live postmaster's pid file: it is in the copy (control), removed by hand.
restore_to b
[ -e "$RDATA/backup_label.hotimage" ] && fail "(b): a label without the writer"
[ -f "$RDATA/postmaster.pid" ] || fail "(b): no postmaster.pid in the copy without a writer (the check of (a) proves nothing)"
rm -f "$RDATA/postmaster.pid"
check_restored b
stop_restored b

asp "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop > /dev/null || fail "stop the live server"
umount "$M" && H detach hit-pg > /dev/null || fail "detach"
log "ok"
