# Shared by Scripts/vm-test, Scripts/bench (cow) and the Vagrantfile's
# provisioning: the Debian kernel, the busybox initramfs and the qemu command
# line of the test VM. Sourced after Scripts/lib.sh.

VM_CACHE=${HOTIMAGE_VM_CACHE:-/var/cache/hotimage-vm}
VM_APT_PACKAGES="qemu-system-x86 busybox-static"
# Modules the guest loads, in this order after their dependencies.
VM_MODULES="virtio_pci virtio_blk 9pnet_virtio 9p overlay loop crc32c_generic ext4 xfs dm-mod dm-bufio dm-snapshot nbd fuse"

vm_packages() {
  local missing=()
  for p in $VM_APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return 0
  echo "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || { echo "error: apt-get install ${missing[*]} failed" >&2; return 1; }
}

# Sets VM_KVER, VM_KERNEL (vmlinuz) and VM_MODDIR (lib/modules/VER).
# The package name is read from linux-image-amd64's dependency and downloaded
# by that exact name (a wildcard would fetch every version).
vm_kernel() {
  local pkg deb
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null 2>&1
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "error: apt-cache names no kernel for linux-image-amd64" >&2; return 1; }
  case "$pkg" in linux-image-[0-9]*-amd64) ;; *) echo "error: unexpected kernel package '$pkg'" >&2; return 1 ;; esac
  VM_KVER=${pkg#linux-image-}
  mkdir -p "$VM_CACHE"
  deb=$(ls "$VM_CACHE/${pkg}_"*.deb 2>/dev/null | head -1)
  if [ -z "$deb" ]; then
    echo "downloading $pkg"
    (cd "$VM_CACHE" && apt-get download "$pkg" >/dev/null 2>&1) \
      || { apt-get update -qq >/dev/null 2>&1; (cd "$VM_CACHE" && apt-get download "$pkg" >/dev/null 2>&1); } \
      || { echo "error: apt-get download $pkg failed" >&2; return 1; }
    deb=$(ls "$VM_CACHE/${pkg}_"*.deb | head -1)
  fi
  local x="$VM_CACHE/$VM_KVER"
  if [ ! -f "$x/lib/modules/$VM_KVER/modules.dep" ]; then
    rm -rf "$x"; mkdir -p "$x"
    dpkg-deb -x "$deb" "$x" || { echo "error: cannot unpack $deb" >&2; return 1; }
    busybox depmod -b "$x" "$VM_KVER" || { echo "error: depmod failed" >&2; return 1; }
  fi
  VM_KERNEL="$x/boot/vmlinuz-$VM_KVER"
  VM_MODDIR="$x/lib/modules/$VM_KVER"
  [ -f "$VM_KERNEL" ] || { echo "error: $VM_KERNEL missing" >&2; return 1; }
}

# Sets VM_QEMU_GA to a qemu-ga for a guest: the Debian package's binary,
# downloaded and unpacked into the cache like the kernel (not installed: the
# host needs no agent service; its libraries are qemu-system-x86's).
vm_guest_agent() {
  local x="$VM_CACHE/qemu-ga" deb
  VM_QEMU_GA="$x/usr/sbin/qemu-ga"
  [ -x "$VM_QEMU_GA" ] && return 0
  deb=$(ls "$VM_CACHE"/qemu-guest-agent_*.deb 2>/dev/null | head -1)
  if [ -z "$deb" ]; then
    (cd "$VM_CACHE" && apt-get download qemu-guest-agent >/dev/null 2>&1) \
      || { apt-get update -qq >/dev/null 2>&1; (cd "$VM_CACHE" && apt-get download qemu-guest-agent >/dev/null 2>&1); } \
      || { echo "error: apt-get download qemu-guest-agent failed" >&2; return 1; }
    deb=$(ls "$VM_CACHE"/qemu-guest-agent_*.deb | head -1)
  fi
  rm -rf "$x"; mkdir -p "$x"
  dpkg-deb -x "$deb" "$x" && [ -x "$VM_QEMU_GA" ] || { echo "error: no qemu-ga in $deb" >&2; return 1; }
}

# Prints the module files (relative to VM_MODDIR) needed for VM_MODULES,
# dependencies first, each once.
vm_module_closure() {
  local seen="" out=()
  add() {  # relpath
    case " $seen " in *" $1 "*) return ;; esac
    local deps
    deps=$(awk -F': *' -v m="$1" '$1 == m {print $2; exit}' "$VM_MODDIR/modules.dep")
    for d in $deps; do add "$d"; done
    seen="$seen $1"; out+=("$1")
  }
  local m rel
  for m in $VM_MODULES; do
    rel=$(grep -E "(^|/)${m}\.ko:" "$VM_MODDIR/modules.dep" | head -1 | cut -d: -f1)
    [ -n "$rel" ] || { echo "error: module $m not in $VM_KVER" >&2; return 1; }
    add "$rel"
  done
  printf '%s\n' "${out[@]}"
}

# vm_initramfs [INIT]: builds VM_INITRD with INIT as /init (default the test
# VM's), the modules of VM_MODULES and the host programs of VM_EXTRA_BINS
# (with the libraries ldd names, at their host paths), cached by kernel,
# module list, init and programs.
vm_initramfs() {
  local init="${1:-$ROOT/Tests/VM/initramfs-init}"
  local key
  key=$( (echo "$VM_KVER $VM_MODULES ${VM_EXTRA_BINS:-}"; cat "$init" ${VM_EXTRA_BINS:-}; busybox 2>&1 | head -1) | md5sum | cut -c1-12)
  VM_INITRD="$VM_CACHE/initrd-$VM_KVER-$key.gz"
  [ -f "$VM_INITRD" ] && return 0
  local t; t=$(mktemp -d)
  mkdir -p "$t"/{bin,dev,proc,sys,host,ovl,newroot,mods}
  cp "$(command -v busybox)" "$t/bin/busybox"
  ln -s busybox "$t/bin/sh"
  local list; list=$(vm_module_closure) || { rm -rf "$t"; return 1; }
  : > "$t/mods/order"
  for rel in $list; do
    cp "$VM_MODDIR/$rel" "$t/mods/"
    basename "$rel" >> "$t/mods/order"
  done
  local b lib
  for b in ${VM_EXTRA_BINS:-}; do
    for lib in "$b" $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*'); do
      mkdir -p "$t$(dirname "$lib")" && cp -L "$lib" "$t$lib"
    done
  done
  cp "$init" "$t/init"; chmod +x "$t/init"
  (cd "$t" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$VM_INITRD.tmp" \
    && mv "$VM_INITRD.tmp" "$VM_INITRD"
  rm -rf "$t"
  [ -f "$VM_INITRD" ] || { echo "error: initramfs build failed" >&2; return 1; }
  echo "initramfs: $VM_INITRD ($(du -h "$VM_INITRD" | cut -f1))"
}

vm_kvm_works() {
  [ -w /dev/kvm ] || return 1
  timeout 20 qemu-system-x86_64 -accel kvm -M pc -display none -nodefaults -S \
    -monitor none -serial none -device isa-debug-exit -kernel /dev/null </dev/null >/dev/null 2>&1 &
  local p=$!; sleep 2
  if kill -0 $p 2>/dev/null; then kill $p 2>/dev/null; wait $p 2>/dev/null; return 0; fi
  wait $p 2>/dev/null; return 1
}

vm_accel() { if vm_kvm_works; then echo kvm; else echo tcg; fi; }
vm_accel_name() { echo "accel ${VM_ACCEL:=$(vm_accel)}"; }

# vm_boot WORKDIR TIMEOUT SHELL: boots the guest; it runs Tests/VM/guest.sh
# with WORKDIR/run.env and writes WORKDIR/rc and WORKDIR/log.
vm_boot() {
  local work=$1 tmo=$2 shell=$3 smp=1
  : "${VM_ACCEL:=$(vm_accel)}"
  [ "$VM_ACCEL" = kvm ] && smp=2
  local serial=(-serial "file:$work/console.log")
  local wrap=(timeout --kill-after=10 $((tmo + 120)))
  [ "$shell" = 1 ] && { serial=(-serial mon:stdio); wrap=(); }
  "${wrap[@]}" qemu-system-x86_64 -accel "$VM_ACCEL" -M pc -smp $smp -m 3072 \
    -nodefaults -display none -no-reboot "${serial[@]}" \
    -kernel "$VM_KERNEL" -initrd "$VM_INITRD" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 hotimage.work=$work" \
    -device virtio-rng-pci \
    -fsdev local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev local,id=work,path="$work",security_model=passthrough \
    -device virtio-9p-pci,fsdev=work,mount_tag=work
}
