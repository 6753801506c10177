# Shared shell functions of Scripts/ and Tests/Machine/: packages, build,
# and loop devices that are created and removed by name, never anything
# the project did not create.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/opt/swift/usr/bin:$PATH
# postgresql, postgresql-contrib: t_pg_writer's server, pgbench and pg_amcheck (Debian starts
# a 15/main cluster on install; the test makes its own and ignores that one).
APT_PACKAGES="libnbd-dev libnbd-bin nbdkit libzstd-dev libext2fs-dev libdevmapper-dev qemu-utils fuse3 fio xfsprogs e2fsprogs util-linux fdisk python3 psmisc bc procps postgresql postgresql-contrib"
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

# Builds the release binaries once; sets HOTIMAGE and STAMP.
build_release() {
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
