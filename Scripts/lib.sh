# Shared shell functions of Scripts/, Tests/Machine/ and Tests/VM/ (the test
# VM runs on the host's root, so its tests source this file in place):
# packages, build, loop devices that are created and removed by name (never
# anything the project did not create), and the test steps every suite
# repeats (expect_exit, backup_roundtrip).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/opt/swift/usr/bin:$PATH
# postgresql, postgresql-contrib: t_pg_writer's server, pgbench and pg_amcheck (Debian starts
# a 15/main cluster on install; the test makes its own and ignores that one).
APT_PACKAGES="libnbd-dev libnbd-bin nbdkit libzstd-dev libxxhash-dev libext2fs-dev libdevmapper-dev qemu-utils fuse3 fio xfsprogs e2fsprogs util-linux fdisk python3 psmisc bc procps postgresql postgresql-contrib"
# libvirt for the libvirt writer's test (t_vm_libvirt: a daemon the test
# starts, TCG guests), without recommends (lvm2, the xen/vbox/lxc drivers).
APT_PACKAGES_NO_RECOMMENDS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 busybox-static"

die() { echo "error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE and freezing need it)"; }

# Installs the Debian packages that are missing (nothing if all are there).
ensure_packages() {
  local missing=() lean=()
  for p in $APT_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  for p in $APT_PACKAGES_NO_RECOMMENDS; do
    dpkg -s "$p" >/dev/null 2>&1 || lean+=("$p")
  done
  [ ${#missing[@]} = 0 ] && [ ${#lean[@]} = 0 ] && return 0
  echo "installing: ${missing[*]} ${lean[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  if [ ${#missing[@]} != 0 ]; then
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  fi
  if [ ${#lean[@]} != 0 ]; then
    apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null || die "apt-get install ${lean[*]} failed"
  fi
}

# Builds the release binaries once; sets HOTIMAGE and STAMP. HOTIMAGE_BIN=PATH
# skips the build and uses that binary (STAMP: hotimage-stamp beside it), as
# `Scripts/bench ab` does for the base commit's build and for the new one.
build_release() {
  if [ -n "${HOTIMAGE_BIN:-}" ]; then
    [ -x "$HOTIMAGE_BIN" ] || die "HOTIMAGE_BIN=$HOTIMAGE_BIN is not an executable"
    HOTIMAGE=$HOTIMAGE_BIN
    STAMP="$(dirname "$HOTIMAGE_BIN")/hotimage-stamp"
    export HOTIMAGE STAMP
    return 0
  fi
  (cd "$ROOT" && swift build -c release 2>&1 | grep -E 'error|warning: unre|Compiling|Build complete' | tail -3) || true
  HOTIMAGE="$ROOT/.build/release/hotimage"
  STAMP="$ROOT/.build/release/hotimage-stamp"
  [ -x "$HOTIMAGE" ] || die "build failed: $HOTIMAGE missing"
  export HOTIMAGE STAMP
}

# make_loop FILE SIZE: creates FILE of SIZE and a loop device over it; prints
# the device. The loop is found again by its file for cleanup.
make_loop() {
  local file=$1 size=$2 dev
  truncate -s "$size" "$file"
  dev=$(losetup -f --show "$file" 2>/dev/null || true)
  # losetup can report EBUSY and still attach: trust losetup -j.
  [ -n "$dev" ] || dev=$(losetup -j "$file" | head -1 | cut -d: -f1)
  [ -n "$dev" ] || die "could not attach a loop device to $file"
  echo "$dev"
}

# Removes every loop device whose backing file is under DIR.
drop_loops_under() {
  local dir=$1
  losetup -a 2>/dev/null | while IFS= read -r line; do
    local dev=${line%%:*}
    case "$line" in *"($dir"*) losetup -d "$dev" 2>/dev/null || true ;; esac
  done
}

# fill_mixed DIR BYTES: fills the mounted filesystem at DIR with about BYTES
# of the benches' mixed data, three equal shares: text (words of a fixed
# vocabulary, in lines), binaries (libraries and programs of this system,
# copied until the share is reached) and random data.
fill_mixed() {
  local dir=$1 target=$2 third n src left i c
  [ -n "$dir" ] && [ -d "$dir" ] && [ "$target" -gt 0 ] || die "fill_mixed: no directory or no size"
  third=$(( target / 3 ))
  python3 - "$dir/text" "$third" <<'PY'
import os, random, sys
d, want = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
r = random.Random(5)
vocab = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 11))) for _ in range(20000)]
done, i = 0, 0
while done < want:
    lines = [" ".join(r.choices(vocab, k=r.randint(4, 16))) for _ in range(20000)]
    b = ("\n".join(lines) + "\n").encode()
    open(os.path.join(d, "t%05d.txt" % i), "wb").write(b)
    done += len(b); i += 1
PY
  mkdir -p "$dir/bin"
  n=0
  for src in /usr/lib/x86_64-linux-gnu /usr/bin /usr/lib /opt/swift/usr/lib /usr/libexec /usr/share; do
    [ "$(du -sb "$dir/bin" | cut -f1)" -ge "$third" ] && break
    n=$((n + 1)); cp -a "$src" "$dir/bin/$n" 2>/dev/null
  done
  mkdir -p "$dir/random"
  left=$(( target - $(du -sb "$dir" | cut -f1) ))
  i=0
  while [ $left -gt 0 ]; do
    c=$(( left > 268435456 ? 256 : (left + 1048575) / 1048576 ))
    head -c "${c}M" /dev/urandom > "$dir/random/r$i"; left=$(( left - c * 1048576 )); i=$((i + 1))
  done
}

# lib_fail MESSAGE...: the test's fail (Tests/Machine/lib.sh: the daemon logs,
# exit 1) where one is defined, die otherwise.
lib_fail() { if declare -F fail >/dev/null; then fail "$@"; else die "$@"; fi; }

# expect_exit N PATTERN [--out FILE] -- CMD [ARGS...]: runs CMD (a program or
# a shell function, in this shell) and fails unless it exits N and its output
# matches the extended regular expression PATTERN (grep -E). The output is
# stdout and stderr together, as a user sees it: hotimage reports refusals on
# stderr, and results on stdout. N may name several codes ("1|2"); an empty
# PATTERN checks the exit code alone. The output goes to FILE (default: a
# temporary file), never a pipe, so that a child left running (a hook the
# command timed out) cannot hold the test up. Sets EXIT_RC, EXIT_OUT (the
# output) and EXIT_MATCH (its first line matching PATTERN).
expect_exit() {
  [ $# -ge 3 ] || lib_fail "usage: expect_exit N PATTERN [--out FILE] -- CMD [ARGS...]"
  local want=$1 pat=$2 file="" tmp=""
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    case $1 in
      --out) file=$2; shift 2 ;;
      *) lib_fail "expect_exit: unknown option '$1' (the command follows --)" ;;
    esac
  done
  [ "${1:-}" = -- ] && [ $# -ge 2 ] || lib_fail "expect_exit: no command after --"
  shift
  [ -n "$file" ] || { tmp=$(mktemp); file=$tmp; }
  "$@" > "$file" 2>&1
  EXIT_RC=$?
  EXIT_OUT=$(cat "$file")
  [ -z "$tmp" ] || rm -f "$tmp"
  EXIT_MATCH=""
  local said; said=$(tail -20 <<< "$EXIT_OUT")
  case "|$want|" in
    *"|$EXIT_RC|"*) ;;
    *) lib_fail "'$*' exited $EXIT_RC, expected $want; its output (last 20 lines):"$'\n'"$said" ;;
  esac
  [ -z "$pat" ] && return 0
  EXIT_MATCH=$(grep -E -m1 -e "$pat" <<< "$EXIT_OUT")
  case $? in
    0) ;;
    1) lib_fail "'$*' exited $EXIT_RC as expected, but its output does not match /$pat/; it said (last 20 lines):"$'\n'"$said" ;;
    *) lib_fail "expect_exit: /$pat/ is not an extended regular expression" ;;
  esac
}

# backup_roundtrip IMAGE [options] [-- BACKUP-COMMAND...]: the round trip of
# a backup image, checked step by step; STEM is IMAGE without .qcow2 and
# each step's output is kept in STEM.<step> for the failure message.
#   -- CMD...        first runs the backup CMD: exit 0 (output in STEM.out);
#   --says PATTERN   and its output matches PATTERN (grep -E).
#   Then always: hotimage verify IMAGE; qemu-img check IMAGE exits 0, finds
#   no errors and no leaks; hotimage restore IMAGE to a fresh target:
#   --loop SIZE      a fresh loop device of SIZE over STEM.restored;
#   --onto DEV       DEV, which the caller made (default: a fresh file STEM.raw);
#   --force          restore --force (a target that holds a filesystem).
#   Then, as asked:
#   --same-as PATH   the restored bytes equal PATH (cmp);
#   --fs ext4|xfs    the restored filesystem checks clean: e2fsck -fn; for
#                    XFS a mount replays the log first, then xfs_repair -n;
#   --mount DIR      mounts it at DIR, read-only (--rw: read-write), and
#                    leaves it mounted for the caller's checks of content;
#   --qemu-same      qemu-img convert reads IMAGE as a fresh restore to a
#                    file does (both files are removed afterwards).
# Sets RESTORED to the restored file or device.
backup_roundtrip() {
  local image=$1; shift
  local stem=${image%.qcow2} says="" loop="" onto="" force=() same="" fs="" mnt="" rw=0 qsame=0 backup=()
  while [ $# -gt 0 ]; do
    case $1 in
      --says) says=$2; shift ;;
      --loop) loop=$2; shift ;;
      --onto) onto=$2; shift ;;
      --force) force=(--force) ;;
      --same-as) same=$2; shift ;;
      --fs) fs=$2; shift ;;
      --mount) mnt=$2; shift ;;
      --rw) rw=1 ;;
      --qemu-same) qsame=1 ;;
      --) shift; backup=("$@"); break ;;
      *) lib_fail "backup_roundtrip: unknown option '$1'" ;;
    esac
    shift
  done
  local what; what=$(basename "$stem")
  if [ ${#backup[@]} -gt 0 ]; then
    expect_exit 0 "$says" --out "$stem.out" -- "${backup[@]}"
  fi
  "$HOTIMAGE" verify "$image" > "$stem.verify" 2>&1 || lib_fail "$what: verify: $(cat "$stem.verify")"
  qemu-img check "$image" > "$stem.check" 2>&1 || lib_fail "$what: qemu-img check: $(cat "$stem.check")"
  grep -q "No errors were found" "$stem.check" || lib_fail "$what: qemu-img check: $(cat "$stem.check")"
  grep -qi "leak" "$stem.check" && lib_fail "$what: qemu-img check reports leaks: $(cat "$stem.check")"
  if [ -n "$onto" ]; then RESTORED=$onto
  elif [ -n "$loop" ]; then RESTORED=$(make_loop "$stem.restored" "$loop")
  else RESTORED=$stem.raw; rm -f "$RESTORED"
  fi
  "$HOTIMAGE" restore "$image" "$RESTORED" "${force[@]}" > "$stem.restore" 2>&1 \
    || lib_fail "$what: restore to $RESTORED: $(cat "$stem.restore")"
  if [ -n "$same" ]; then cmp "$same" "$RESTORED" || lib_fail "$what: the restored image differs from $same"; fi
  # A restored XFS has the UUID of the live one, which may be mounted.
  local mopts=ro; [ $rw = 1 ] && mopts=rw
  case $fs in
    "") ;;
    ext4) e2fsck -fn "$RESTORED" > "$stem.fsck" 2>&1 || lib_fail "$what: e2fsck -fn on the restored volume: $(cat "$stem.fsck")" ;;
    xfs) mopts=$mopts,nouuid
         mkdir -p "$stem.replay" && mount -o nouuid "$RESTORED" "$stem.replay" || lib_fail "$what: mount restored (log replay)"
         umount "$stem.replay" && rmdir "$stem.replay"
         xfs_repair -n "$RESTORED" > "$stem.fsck" 2>&1 || lib_fail "$what: xfs_repair -n on the restored volume: $(cat "$stem.fsck")" ;;
    *) lib_fail "backup_roundtrip: --fs $fs: ext4 or xfs" ;;
  esac
  if [ -n "$mnt" ]; then
    mkdir -p "$mnt" && mount -o "$mopts" "$RESTORED" "$mnt" || lib_fail "$what: mount the restored volume at $mnt"
  fi
  if [ $qsame = 1 ]; then
    qemu-img convert -O raw "$image" "$stem.qemu.raw" || lib_fail "$what: qemu-img convert"
    "$HOTIMAGE" restore "$image" "$stem.fresh.raw" > /dev/null 2>&1 || lib_fail "$what: restore to a file"
    cmp "$stem.qemu.raw" "$stem.fresh.raw" || lib_fail "$what: qemu-img convert differs from our restore"
    rm -f "$stem.qemu.raw" "$stem.fresh.raw"
  fi
}
