# A private libvirt daemon and tiny TCG guests for the machine tests of the
# libvirt writer (sourced after lib.sh, in a private mount namespace: see
# t_vm_libvirt.sh). Everything is under $W/libvirt and stopped by the EXIT
# trap: our guests destroyed, our libvirtd killed, our mounts undone.

LV=$W/libvirt
V() { virsh -q -c qemu:///system "$@"; }
LIBVIRTD_PID=
LV_MADE_DIRS=()

# lv_start DEVICE: mounts DEVICE at /var/lib/libvirt and starts libvirtd with
# the test's configuration (no cgroups, no security driver, qemu as root:
# there is no systemd, and the guests are the test's own).
lv_start() {
  local dev=$1 d
  mkdir -p "$LV"/{etc,run,log,cache}
  cat > "$LV/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
CONF
  echo 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"' > "$LV/etc/libvirtd.conf"
  # libvirt's QEMU driver resolves its built-in user (libvirt-qemu) before
  # it reads qemu.conf: a passwd and group that have it, for our namespace only.
  cp /etc/passwd "$LV/passwd"; cp /etc/group "$LV/group"
  getent passwd libvirt-qemu >/dev/null || echo "libvirt-qemu:x:0:0:hotimage test:/var/lib/libvirt:/usr/sbin/nologin" >> "$LV/passwd"
  getent group libvirt-qemu >/dev/null || echo "libvirt-qemu:x:0:" >> "$LV/group"
  # Mount points: created (empty) only where the host has none, removed at the end.
  for d in /etc/libvirt /run/libvirt /var/log/libvirt /var/cache/libvirt /var/lib/libvirt; do
    [ -d "$d" ] || { mkdir -p "$d" && LV_MADE_DIRS+=("$d"); }
  done
  mount --bind "$LV/etc" /etc/libvirt && mount --bind "$LV/run" /run/libvirt \
    && mount --bind "$LV/log" /var/log/libvirt && mount --bind "$LV/cache" /var/cache/libvirt \
    && mount --bind "$LV/passwd" /etc/passwd && mount --bind "$LV/group" /etc/group \
    || fail "bind mounts for the private libvirt"
  mount "$dev" /var/lib/libvirt || fail "mount $dev at /var/lib/libvirt"
  libvirtd --pid-file "$LV/libvirtd.pid" > "$LV/libvirtd.out" 2>&1 &
  LIBVIRTD_PID=$!
  wait_until 30 V uri >/dev/null 2>&1 || fail "libvirtd does not answer: $(tail -5 "$LV/libvirtd.out" "$LV/log/libvirtd.log" 2>/dev/null)"
}

lv_stop() {
  set +e
  [ -n "$LIBVIRTD_PID" ] || return 0
  local n p
  for n in $(V list --name 2>/dev/null); do case $n in hit-vm-*) V destroy "$n" >/dev/null 2>&1 ;; esac; done
  # Guests libvirt could not destroy (the daemon hung): by their pid files.
  for p in "$LV"/run/qemu/hit-vm-*.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null; done
  kill "$LIBVIRTD_PID" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$LIBVIRTD_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$LIBVIRTD_PID" 2>/dev/null; wait "$LIBVIRTD_PID" 2>/dev/null
  LIBVIRTD_PID=
  umount /var/lib/libvirt 2>/dev/null || umount -l /var/lib/libvirt
  for d in /etc/libvirt /run/libvirt /var/log/libvirt /var/cache/libvirt /etc/passwd /etc/group; do umount "$d" 2>/dev/null; done
  for d in "${LV_MADE_DIRS[@]}"; do rmdir "$d" 2>/dev/null; done
}
trap 'lv_stop; cleanup' EXIT

# lv_xml NAME DISK FORMAT [CDROM]: a guest of 128 MiB booting the test
# kernel and libvirt-guest-init directly, its console in $W/console-NAME.log.
# LV_EXTRA: more <devices> XML (a second disk, the guest agent channel).
lv_xml() {
  local cd=""
  [ -n "${4:-}" ] && cd="<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='$4'/><target dev='hdc' bus='ide'/><readonly/></disk>"
  cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$VM_KERNEL</kernel>
    <initrd>$VM_INITRD</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='$3'/><source file='$2'/><target dev='vda' bus='virtio'/></disk>
    $cd
    ${LV_EXTRA:-}
    <serial type='file'><source path='$W/console-$1.log' append='on'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
}

lv_define() { lv_xml "$@" > "$W/$1.xml" && V define "$W/$1.xml" >/dev/null || fail "define $1"; }

# The guest's heartbeat on its console (see libvirt-guest-init).
beating() { grep -q "guest: beat" "$W/console-$1.log" 2>/dev/null; }
beat_id() { grep "guest: beat" "$W/console-$1.log" | tail -1 | sed 's/.*id=\([0-9a-f]*\).*/\1/'; }
beat_count() { grep -c "guest: beat" "$W/console-$1.log" 2>/dev/null || echo 0; }
# beats_after NAME N: N more beats than when it was first called for NAME (per call site: uses a mark file).
beats_after() {
  local mark="$W/mark-$1"
  [ -f "$mark" ] || beat_count "$1" > "$mark"
  [ $(( $(beat_count "$1") - $(cat "$mark") )) -ge "$2" ] && rm -f "$mark"
}
