# shellcheck shell=bash
# The stack's bootable guest image, built from Debian packages only. Sourced by
# scripts/stack, which provides say, die, $STATE and $LOGS.
#
#   guest_image_build    builds $GUEST_IMAGE_DIR/{vmlinuz,initrd.img,disk.raw} unless they
#                        match the recipe already (then it takes well under a second)
#   guest_image_status   0 when the three files are there and match the recipe
#
# What is in it:
#   vmlinuz     the kernel of linux-image-amd64 (its versioned package), uncompressed: the
#               ELF vmlinux out of Debian's bzImage, which QEMU boots through its PVH
#               entry. Under TCG the bzImage's own XZ decompression takes 10-15 s before
#               the kernel even starts (guest-ping after 21-30 s in all); the ELF reaches
#               guest-ping in 10-16 s. The price: 63 MiB instead of 8 MiB.
#   initrd.img  gzip'd cpio: busybox-static, the modules below with their dependencies,
#               and guest/init as /init, which loads them, mounts root= (ext4) and
#               switch_roots to busybox init on it
#   disk.raw    raw, $GUEST_IMAGE_SIZE_MIB MiB, one ext4 filesystem (no partition table)
#               made by `mkfs.ext4 -d` (no mount, no loop device): busybox, qemu-ga with
#               the shared libraries it needs (read from the ELF files themselves, out of
#               the packages `apt-cache depends --recurse qemu-guest-agent` names),
#               guest/init as /sbin/novasnap-init, and guest/writer.c built static as
#               /usr/sbin/novasnap-writer, which appends a record to $GUEST_IMAGE_RECORDS
#               every 200 ms (scripts/check-image reads them back from a snapshot)
#
# For Nova (direct kernel boot, see nova/virt/libvirt/driver.py), upload to Glance:
#   vmlinuz     disk_format=aki container_format=aki
#   initrd.img  disk_format=ari container_format=ari
#   disk.raw    disk_format=raw container_format=bare, with the properties
#               kernel_id=<vmlinuz's id> ramdisk_id=<initrd.img's id>
#               os_command_line="$GUEST_IMAGE_CMDLINE" hw_qemu_guest_agent=yes
# It boots on machine types pc and q35 (virtio-pci behind PCIe root ports), under TCG
# with 256 MiB.
#
# The recipe is a hash of the Debian packages' versions (as apt would fetch them now),
# this file, guest/init, guest/writer.c and the versions of the build tools. Finding the
# package versions takes apt-cache seconds here, so recipe.quick beside the marker keeps
# a quick key (the same sources plus a fingerprint of apt's lists and config): while that
# matches, the versions cannot have changed. The marker `recipe` itself changes only with
# a build, so whatever derives from the image (its Glance uploads) may key on it.

GUEST_IMAGE_DIR=${GUEST_IMAGE_DIR:-${STATE:-/var/lib/novasnap-stack}/guest-image}
GUEST_IMAGE_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
GUEST_IMAGE_SRC=$(dirname "$GUEST_IMAGE_LIB")/guest
GUEST_IMAGE_SIZE_MIB=256
GUEST_IMAGE_CMDLINE="root=/dev/vda rw console=ttyS0,115200 no_timer_check"
GUEST_IMAGE_RECORDS=/var/lib/novasnap/records
# What the build runs: mkfs.ext4 -d, gcc -static (libc6-dev has libc.a), readelf and
# objcopy, gzip, xz, dpkg-deb and apt-get download (always there); python3 and qemu-img
# for scripts/check-image.
GUEST_IMAGE_BUILD_PACKAGES=(e2fsprogs gcc libc6-dev binutils gzip xz-utils python3 qemu-utils)
# Drivers that Debian's kernel builds as modules (see its modules.builtin): the virtio
# PCI transport, disk and console (the agent's channel), ext4 (crc32c_generic first:
# ext4 and jbd2 only name crc32c as a soft dependency), and the ACPI power button with
# evdev, so that busybox acpid sees `virsh shutdown`. 8250, PCIe ports, devtmpfs and
# unix sockets are built in.
GUEST_IMAGE_MODULES=(virtio_pci virtio_blk virtio_console crc32c_generic ext4 button evdev)

_gi_apt() { apt-get -q -o APT::Sandbox::User=root "$@"; }

# _gi_sources: what besides the packages goes into the image, one line each.
_gi_sources() {
  sha256sum "$GUEST_IMAGE_LIB" "$GUEST_IMAGE_SRC/init" "$GUEST_IMAGE_SRC/writer.c" | cut -d' ' -f1
  dpkg-query -W -f '${Package}=${Version}\n' gcc libc6-dev e2fsprogs 2>/dev/null
  echo "size=$GUEST_IMAGE_SIZE_MIB modules=${GUEST_IMAGE_MODULES[*]}"
}

# _gi_quick_key: the sources and a fingerprint of what apt-cache's answers depend on.
_gi_quick_key() {
  {
    _gi_sources
    find /var/lib/apt/lists /etc/apt -maxdepth 2 -type f ! -path '*/partial/*' \
      -printf '%p %s %T@\n' 2>/dev/null | LC_ALL=C sort
  } | sha256sum | cut -d' ' -f1
}

# _gi_resolve: sets _GI_PACKAGES (once) to PACKAGE=VERSION lines, sorted: the kernel
# linux-image-amd64 points at, busybox-static, qemu-guest-agent and the libraries it
# depends on, recursively. In the calling shell, not a $(...), so that it is done once.
_GI_PACKAGES=
_gi_resolve() {
  [ -z "$_GI_PACKAGES" ] || return 0
  if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    _gi_apt update -qq >>"$LOGS/guest-image.log" 2>&1 || die "apt-get update failed; see $LOGS/guest-image.log"
  fi
  local kernel names
  kernel=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
  [ -n "$kernel" ] || die "guest image: cannot tell which kernel linux-image-amd64 depends on"
  # No pre-depends: qemu-guest-agent's init-system-helpers is for its Debian service.
  names=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances --no-pre-depends qemu-guest-agent | grep -v '^[ <]')
  # shellcheck disable=SC2086
  _GI_PACKAGES=$(apt-cache show --no-all-versions "$kernel" busybox-static $names |
    awk '/^Package:/ {p = $2} /^Version:/ {print p "=" $2}' | LC_ALL=C sort -u)
  [ -n "$_GI_PACKAGES" ] || die "guest image: apt-cache found none of the packages"
}

# _gi_recipe: the recipe's hash (after _gi_resolve).
_gi_recipe() { { _gi_sources; echo "$_GI_PACKAGES"; } | sha256sum | cut -d' ' -f1; }

_gi_marker() { sed -n "s/^$1=//p" "$GUEST_IMAGE_DIR/recipe" 2>/dev/null; }

guest_image_status() {
  local f
  for f in vmlinuz initrd.img disk.raw recipe; do
    [ -s "$GUEST_IMAGE_DIR/$f" ] || return 1
  done
  local quick
  quick=$(_gi_quick_key)
  [ "$(cat "$GUEST_IMAGE_DIR/recipe.quick" 2>/dev/null)" = "$quick" ] && return 0
  # apt's lists changed: the packages may not have. Remember the new lists if they did not.
  _gi_resolve
  [ "$(_gi_marker recipe)" = "$(_gi_recipe)" ] || return 1
  echo "$quick" >"$GUEST_IMAGE_DIR/recipe.quick"
}

# _gi_deb PACKAGE=VERSION: the cached .deb's path (apt-get download's file name).
_gi_deb() {
  local pv=$1 ver
  ver=${pv#*=}
  compgen -G "$GUEST_IMAGE_DIR/debs/${pv%%=*}_${ver//:/%3a}_*.deb" | head -1
}

# _gi_download: every package of the recipe into the cache, old versions out of it.
_gi_download() {
  local pv want=() keep=() f
  mkdir -p "$GUEST_IMAGE_DIR/debs"
  for pv in $_GI_PACKAGES; do
    f=$(_gi_deb "$pv") && keep+=("$f") || want+=("$pv")
  done
  if [ ${#want[@]} -gt 0 ]; then
    say "guest image: downloading ${#want[@]} Debian packages"
    # Lists older than the archive name versions it no longer has: update once and retry.
    (cd "$GUEST_IMAGE_DIR/debs" && _gi_apt download "${want[@]}") >>"$LOGS/guest-image.log" 2>&1 ||
      { _gi_apt update -qq && (cd "$GUEST_IMAGE_DIR/debs" && _gi_apt download "${want[@]}"); } \
        >>"$LOGS/guest-image.log" 2>&1 ||
      die "guest image: apt-get download failed; see $LOGS/guest-image.log"
    for pv in "${want[@]}"; do
      f=$(_gi_deb "$pv") || die "guest image: no .deb for $pv after download"
      keep+=("$f")
    done
  fi
  for f in "$GUEST_IMAGE_DIR"/debs/*.deb; do
    [[ " ${keep[*]} " == *" $f "* ]] || rm -f "$f"
  done
}

# _gi_in_root ROOT PATH: the regular file PATH is inside the tree ROOT, following its
# symlinks there (absolute ones too, as they would resolve on the guest).
_gi_in_root() {
  local root=$1 p=$2 t i
  for i in 1 2 3 4 5 6 7 8; do
    [ -L "$root$p" ] || break
    t=$(readlink "$root$p")
    case $t in /*) p=$t ;; *) p=$(dirname "$p")/$t ;; esac
  done
  [ -f "$root$p" ] && echo "$root$p"
}

# _gi_copy_libs SYSROOT DEST ELF...: the ELF files' shared libraries (transitively) and
# their loader, from SYSROOT into DEST's /lib/x86_64-linux-gnu and /lib64.
_gi_copy_libs() {
  local sys=$1 dest=$2 queue lib f d found
  shift 2
  declare -A seen=()
  queue=("$@")
  mkdir -p "$dest/lib/x86_64-linux-gnu" "$dest/lib64"
  while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}
    queue=("${queue[@]:1}")
    for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -n "${seen[$lib]:-}" ] && continue
      seen[$lib]=1
      found=
      for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
        found=$(_gi_in_root "$sys" "$d/$lib") && break
      done
      [ -n "$found" ] || die "guest image: $lib (needed by ${f##*/}) is in none of the packages"
      cp "$found" "$dest/lib/x86_64-linux-gnu/$lib"
      queue+=("$found")
    done
  done
  found=$(_gi_in_root "$sys" /lib64/ld-linux-x86-64.so.2) || die "guest image: no ld-linux-x86-64.so.2 in libc6"
  cp "$found" "$dest/lib64/ld-linux-x86-64.so.2"
}

# _gi_modules MODDIR: the .ko paths (relative to MODDIR) of $GUEST_IMAGE_MODULES and what
# they depend on (the depends= of their .modinfo), each after its dependencies.
_gi_modules() {
  local dir=$1 f n
  declare -A path=() loaded=()
  while read -r f; do
    n=${f##*/}
    n=${n%.ko}
    path[${n//-/_}]=${f#"$dir"/}
  done < <(find "$dir/kernel" -name '*.ko')
  _gi_module() {
    local m=${1//-/_} d
    [ -n "${loaded[$m]:-}" ] && return 0
    [ -n "${path[$m]:-}" ] || die "guest image: no module $m in the kernel package"
    loaded[$m]=1
    for d in $(objcopy -O binary --only-section=.modinfo "$dir/${path[$m]}" /dev/stdout |
      tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
      _gi_module "$d"
    done
    echo "${path[$m]}"
  }
  for n in "${GUEST_IMAGE_MODULES[@]}"; do _gi_module "$n"; done
}

# _gi_busybox ROOT: busybox in ROOT/bin with a link at each applet's usual place.
_gi_busybox() {
  local root=$1 bb=$2 a
  mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
  cp "$bb" "$root/bin/busybox"
  for a in $("$bb" --list-full); do
    [ -e "$root/$a" ] || ln -s /bin/busybox "$root/$a"
  done
}

# _gi_etc ROOT: the root filesystem's configuration.
_gi_etc() {
  local root=$1
  mkdir -p "$root"/{etc/acpi/PWRF,dev,proc,sys,run,tmp,root,var/log,var/lib/novasnap}
  ln -s ../run "$root/var/run"
  echo novasnap-guest >"$root/etc/hostname"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  printf '127.0.0.1 localhost\n127.0.1.1 novasnap-guest\n' >"$root/etc/hosts"
  # busybox init; every service is a mode of novasnap-init (see guest/init).
  cat >"$root/etc/inittab" <<'EOF'
::sysinit:/sbin/novasnap-init boot
::respawn:/sbin/novasnap-init agent
::respawn:/sbin/novasnap-init writer
::respawn:/sbin/novasnap-init acpid
ttyS0::askfirst:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/sbin/novasnap-init shutdown
EOF
  printf '#!/bin/sh\nexec poweroff\n' >"$root/etc/acpi/PWRF/00000080"
  # qemu-ga's guest-shutdown runs `shutdown -P|-r|-H +0 MESSAGE` (libvirt may use it for
  # `virsh shutdown` when the agent answers); busybox has no shutdown.
  cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
case " $* " in
  *" -r "*) exec reboot ;;
  *" -H "*) exec halt ;;
  *) exec poweroff ;;
esac
EOF
  chmod 755 "$root/etc/acpi/PWRF/00000080" "$root/sbin/shutdown"
}

# _gi_vmlinux BZIMAGE OUT: the ELF kernel inside an x86 bzImage. Its setup header says
# where the compressed payload is: setup_sects at 0x1f1, payload_offset and
# payload_length at 0x248 (offsets from the end of the real-mode setup). Debian's is an
# XZ stream followed by the 4-byte uncompressed size, which xz must not see.
_gi_vmlinux() {
  local bz=$1 out=$2 sects off len start magic
  sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
  off=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
  len=$(($(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ') - 4))
  start=$(((sects + 1) * 512 + off))
  magic=$(od -An -tx1 -j "$start" -N6 "$bz" | tr -d ' ')
  [ "$magic" = fd377a585a00 ] || die "guest image: the kernel's payload is not XZ (magic $magic)"
  # head, then tail: no reader in the pipe stops early (and kills a writer by SIGPIPE).
  head -c $((start + len)) "$bz" | tail -c "$len" | xz -dc >"$out"
  [ "$(od -An -c -j1 -N3 "$out" | tr -d ' ')" = ELF ] || die "guest image: no ELF kernel in $bz"
  readelf -n "$out" | grep -q Xen || die "guest image: the kernel has no PVH entry note"
}

# _gi_assemble WORK: extracts the packages and writes WORK/out/{vmlinuz,initrd.img,disk.raw}.
_gi_assemble() {
  local w=$1 pv deb kver moddir bb m root=$1/root initrd=$1/initrd
  mkdir -p "$w/sys" "$w/kernel" "$w/out" "$root" "$initrd"
  for pv in $_GI_PACKAGES; do
    deb=$(_gi_deb "$pv")
    case ${pv%%=*} in
      linux-image-*) dpkg-deb -x "$deb" "$w/kernel" ;;
      *) dpkg-deb -x "$deb" "$w/sys" ;;
    esac
  done
  kver=$(basename "$(compgen -G "$w/kernel/lib/modules/*" | head -1)")
  moddir=$w/kernel/lib/modules/$kver
  [ -d "$moddir" ] || die "guest image: no modules in the kernel package"
  _gi_vmlinux "$w/kernel/boot/vmlinuz-$kver" "$w/out/vmlinuz"
  bb=$w/sys/bin/busybox

  # The initramfs: busybox, the modules in load order, /init; /dev/console so that the
  # kernel gives /init a console before devtmpfs is mounted.
  _gi_busybox "$initrd" "$bb"
  mkdir -p "$initrd"/{dev,proc,sys,newroot,lib/modules/"$kver"}
  mknod "$initrd/dev/console" c 5 1
  _gi_modules "$moddir" >"$initrd/lib/modules/$kver/load"
  while read -r m; do
    mkdir -p "$initrd/lib/modules/$kver/$(dirname "$m")"
    cp "$moddir/$m" "$initrd/lib/modules/$kver/$m"
  done <"$initrd/lib/modules/$kver/load"
  install -m 755 "$GUEST_IMAGE_SRC/init" "$initrd/init"
  (cd "$initrd" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) | gzip -9n >"$w/out/initrd.img"

  # The root filesystem.
  _gi_busybox "$root" "$bb"
  _gi_etc "$root"
  install -m 755 "$GUEST_IMAGE_SRC/init" "$root/sbin/novasnap-init"
  install -m 755 "$w/sys/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
  gcc -static -O2 -Wall -Wextra -o "$root/usr/sbin/novasnap-writer" "$GUEST_IMAGE_SRC/writer.c"
  strip "$root/usr/sbin/novasnap-writer"
  _gi_copy_libs "$w/sys" "$root" "$root/usr/sbin/qemu-ga"
  # The recipe names the filesystem: the same recipe, the same UUID.
  local uuid
  uuid=$(_gi_recipe | sed 's/^\(.\{8\}\)\(.\{4\}\)\(.\{4\}\)\(.\{4\}\)\(.\{12\}\).*/\1-\2-\3-\4-\5/')
  mkfs.ext4 -q -F -T default -L novasnap-root -U "$uuid" -E root_owner=0:0 \
    -d "$root" "$w/out/disk.raw" "${GUEST_IMAGE_SIZE_MIB}M"
  e2fsck -fn "$w/out/disk.raw" >/dev/null
}

_gi_mib() { echo $(($(stat -c %s "$GUEST_IMAGE_DIR/$1") >> 20)); }

guest_image_build() {
  local t0=$SECONDS w lockfd
  mkdir -p "$GUEST_IMAGE_DIR" "$LOGS"
  if guest_image_status; then
    say "guest image up to date ($((SECONDS - t0))s): $GUEST_IMAGE_DIR"
    return 0
  fi
  # One build at a time (two stacks or a test and a person): the second waits, then
  # finds the first one's result.
  exec {lockfd}>"$GUEST_IMAGE_DIR/lock"
  flock "$lockfd"
  if guest_image_status; then
    exec {lockfd}>&-
    say "guest image built meanwhile ($((SECONDS - t0))s): $GUEST_IMAGE_DIR"
    return 0
  fi
  say "guest image: building in $GUEST_IMAGE_DIR"
  _gi_resolve
  _gi_download
  w=$GUEST_IMAGE_DIR/work
  rm -rf "$w" "$GUEST_IMAGE_DIR/recipe" "$GUEST_IMAGE_DIR/recipe.quick"
  echo "=== build $(date -Is)" >>"$LOGS/guest-image.log"
  # In the background and waited for, so that errexit holds inside (it does not on the
  # left of ||): the first failing step ends the build.
  (set -Eeuo pipefail; _gi_assemble "$w") >>"$LOGS/guest-image.log" 2>&1 &
  wait $! || die "guest image: build failed; see $LOGS/guest-image.log"
  mv -f "$w/out/vmlinuz" "$w/out/initrd.img" "$w/out/disk.raw" "$GUEST_IMAGE_DIR/"
  rm -rf "$w"
  # The marker last: until it is there, the files count as not built.
  {
    echo "recipe=$(_gi_recipe)"
    echo "built=$(date -Is) seconds=$((SECONDS - t0))"
    echo "$_GI_PACKAGES" | sed 's/^/package=/'
  } >"$GUEST_IMAGE_DIR/recipe.tmp"
  mv "$GUEST_IMAGE_DIR/recipe.tmp" "$GUEST_IMAGE_DIR/recipe"
  _gi_quick_key >"$GUEST_IMAGE_DIR/recipe.quick"
  exec {lockfd}>&-
  say "guest image built ($((SECONDS - t0))s): vmlinuz $(_gi_mib vmlinuz) MiB," \
    "initrd.img $(_gi_mib initrd.img) MiB, disk.raw $(_gi_mib disk.raw) MiB" \
    "($(du -m "$GUEST_IMAGE_DIR/disk.raw" | cut -f1) MiB allocated) in $GUEST_IMAGE_DIR"
}
