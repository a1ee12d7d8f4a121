# shellcheck shell=bash
# libvirtd and virtlogd, QEMU under TCG, guests as root (no systemd, cgroups or AppArmor here).

LIBVIRT_RUN=$STATE/libvirt
QEMU_CONF=/etc/libvirt/qemu.conf
QEMU_CONF_MARK="# Written by novasnap scripts/stack"

libvirt_healthy() { timeout 10 virsh -c qemu:///system list >/dev/null 2>&1; }

libvirt_up() {
  local t0=$SECONDS
  # Debian's packaging would have made these; installing without its maintainer scripts
  # having run (no systemd) leaves libvirtd unable to start QEMU without them.
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu /run/libvirt "$LIBVIRT_RUN"
  if [ -f "$QEMU_CONF" ] && ! grep -qF "$QEMU_CONF_MARK" "$QEMU_CONF"; then
    [ -f "$QEMU_CONF.novasnap-orig" ] || cp -p "$QEMU_CONF" "$QEMU_CONF.novasnap-orig"
  fi
  local want
  want=$(cat <<EOF
$QEMU_CONF_MARK for the local test stack; \`down\` removes it.
# Guests run as root with no security driver, cgroups or namespaces: this machine has no
# systemd, no cgroup delegation and no AppArmor/SELinux to set them up.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
EOF
)
  local restart=
  if [ "$(cat "$QEMU_CONF" 2>/dev/null)" != "$want" ]; then
    echo "$want" >"$QEMU_CONF"
    restart=1
  fi
  if [ -n "$restart" ] && pid_alive "$LIBVIRT_RUN/libvirtd.pid"; then
    say "libvirt: qemu.conf changed, restarting libvirtd"
    stop_pidfile "$LIBVIRT_RUN/libvirtd.pid"
  fi
  pid_alive "$LIBVIRT_RUN/virtlogd.pid" ||
    LIBVIRT_LOG_OUTPUTS="3:file:$LOGS/virtlogd.log" daemon virtlogd -d -p "$LIBVIRT_RUN/virtlogd.pid"
  pid_alive "$LIBVIRT_RUN/libvirtd.pid" ||
    LIBVIRT_LOG_OUTPUTS="3:file:$LOGS/libvirtd.log" daemon libvirtd -d -p "$LIBVIRT_RUN/libvirtd.pid"
  wait_until 30 libvirtd "$LOGS/libvirtd.log" libvirt_healthy
  say "libvirt up ($((SECONDS - t0))s)"
}

libvirt_status() { pid_alive "$LIBVIRT_RUN/libvirtd.pid" && libvirt_healthy; }

libvirt_stop() {
  stop_pidfile "$LIBVIRT_RUN/libvirtd.pid"
  stop_pidfile "$LIBVIRT_RUN/virtlogd.pid"
  if grep -qsF "$QEMU_CONF_MARK" "$QEMU_CONF"; then
    rm -f "$QEMU_CONF"
    [ -f "$QEMU_CONF.novasnap-orig" ] && mv "$QEMU_CONF.novasnap-orig" "$QEMU_CONF"
  fi
  return 0
}

