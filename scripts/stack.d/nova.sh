# shellcheck shell=bash
# Nova 34: nova-api (WSGI, 127.0.0.1:8774), nova-conductor, nova-scheduler and nova-compute
# with the libvirt driver (virt_type qemu, instance disks on RBD pool `vms`), cells v2 with
# cell0 and cell1 in MariaDB. Two files, as devstack keeps them: nova.conf for the control
# services (they reach the databases) and nova-cpu.conf for nova-compute (it reaches
# everything through nova-conductor). nova-cpu.conf is what novasnap runs from beside it:
# Nova's own options, plus a [novasnap] section Nova ignores.

NOVA_DIR=$STATE/nova
NOVA_CONTROL_CONF=$NOVA_DIR/etc/nova.conf
NOVA_CONF=$NOVA_DIR/etc/nova-cpu.conf
NOVA_URL=http://127.0.0.1:8774/v2.1
# The compute host: nova-compute's `[DEFAULT] host`, and so the host novasnap serves.
COMPUTE_HOST=compute1
NOVA_DAEMONS=(nova-conductor nova-scheduler nova-compute)
# Nova's RPC queues, a stack setting: `classic` (oslo.messaging's default) on the broker's
# `/`, or `quorum` (`[oslo_messaging_rabbit] rabbit_quorum_queue`) on a vhost of its own,
# made afresh each time the setting is switched on (an exchange or queue cannot change its
# type in place: oslo's docs ask for a fresh broker). Tests switch it with
# `NOVASNAP_STACK_RABBIT_QUEUES=quorum scripts/stack up nova`, and back without it.
NOVA_RABBIT_QUEUES=${NOVASNAP_STACK_RABBIT_QUEUES:-classic}
NOVA_QUORUM_VHOST=novasnap-quorum
case $NOVA_RABBIT_QUEUES in
  classic) NOVA_TRANSPORT_URL=$TRANSPORT_URL ;;
  quorum) NOVA_TRANSPORT_URL=${TRANSPORT_URL%/}/$NOVA_QUORUM_VHOST ;;
  *) die "NOVASNAP_STACK_RABBIT_QUEUES=$NOVA_RABBIT_QUEUES: expected classic or quorum" ;;
esac
# Live snapshots, a stack setting: `on` (Nova's default), or `off` for cold ones
# (`[workarounds] disable_libvirt_livesnapshot = True` in nova-cpu.conf, which novasnap beside
# nova-compute reads too). Only nova-compute reads it: switching restarts nova-compute alone.
# The benchmark switches it with `NOVASNAP_STACK_LIVE_SNAPSHOT=off scripts/stack up nova`,
# and back without it.
NOVA_LIVE_SNAPSHOT=${NOVASNAP_STACK_LIVE_SNAPSHOT:-on}
case $NOVA_LIVE_SNAPSHOT in
  on | off) ;;
  *) die "NOVASNAP_STACK_LIVE_SNAPSHOT=$NOVA_LIVE_SNAPSHOT: expected on or off" ;;
esac

nova_manage() {
  "$OPENSTACK_VENV/bin/nova-manage" --config-file "$NOVA_CONTROL_CONF" "$@" >>"$LOGS/nova-manage.log" 2>&1
}

nova_api_healthy() { curl -fsS -m 5 "http://127.0.0.1:8774/" >/dev/null 2>&1; }

nova_rabbit_conf() {
  if [ "$NOVA_RABBIT_QUEUES" = quorum ]; then printf '\n[oslo_messaging_rabbit]\nrabbit_quorum_queue = True\n'; fi
}

nova_workarounds_conf() {
  if [ "$NOVA_LIVE_SNAPSHOT" = off ]; then printf '[workarounds]\ndisable_libvirt_livesnapshot = True\n'; fi
}

# What both files say the same way; the arguments are more [DEFAULT] lines.
nova_common_conf() {
  cat <<EOC
[DEFAULT]
transport_url = $NOVA_TRANSPORT_URL
state_path = $NOVA_DIR
my_ip = 127.0.0.1
use_stderr = False
$(printf '%s\n' "$@")

[oslo_concurrency]
lock_path = $NOVA_DIR/locks

[oslo_messaging_notifications]
driver = messagingv2
$(nova_rabbit_conf)

[notifications]
notification_format = both

[placement]
$(keystone_auth_section placement)

[neutron]
$(keystone_auth_section neutron)

[service_user]
send_service_user_token = True
$(keystone_auth_section nova)
EOC
}

# Writes both files; NOVA_CONTROL_CHANGED and NOVA_COMPUTE_CHANGED say which changed (1),
# so that a change to nova-cpu.conf alone restarts nova-compute alone.
write_nova_confs() {
  mkdir -p "$NOVA_DIR/etc" "$NOVA_DIR/locks" "$NOVA_DIR/instances"
  cp "$OPENSTACK_VENV/etc/nova/api-paste.ini" "$NOVA_DIR/etc/"
  NOVA_CONTROL_CHANGED= NOVA_COMPUTE_CHANGED=
  write_if_changed "$NOVA_CONTROL_CONF" <<EOC && NOVA_CONTROL_CHANGED=1
# Written by novasnap scripts/stack: Nova's control services of the local test stack.
$(nova_common_conf)

[api_database]
connection = $(mysql_url nova_api)

[database]
connection = $(mysql_url nova)

[api]
auth_strategy = keystone

[wsgi]
api_paste_config = $NOVA_DIR/etc/api-paste.ini

[keystone_authtoken]
www_authenticate_uri = $KEYSTONE_URL
$(keystone_auth_section nova)

[scheduler]
# Hosts are mapped to the cell by \`nova-manage cell_v2 discover_hosts\` when compute starts.
discover_hosts_in_cells_interval = -1
EOC
  write_if_changed "$NOVA_CONF" <<EOC && NOVA_COMPUTE_CHANGED=1
# Written by novasnap scripts/stack: nova-compute of the local test stack, and novasnap
# beside it (its [novasnap] section; Nova ignores it).
$(nova_common_conf "host = $COMPUTE_HOST" "compute_driver = libvirt.LibvirtDriver" \
    "instances_path = $NOVA_DIR/instances" \
    "# A stop (tests restart nova-compute) bounded to 10 s: its cleanup_host, which the" \
    "# manager's graceful shutdown ends with, was seen to hang for the whole 160 s default." \
    "manager_shutdown_timeout = 10" "graceful_shutdown_timeout = 30")

[libvirt]
virt_type = qemu
connection_uri = qemu:///system
cpu_mode = none
images_type = rbd
images_rbd_pool = vms
images_rbd_ceph_conf = $CEPH_CONF

[vnc]
enabled = False

[nova_sys_admin]
# Root already: privsep's helper needs no sudo, only its path in Nova's environment.
helper_command = $OPENSTACK_VENV/bin/privsep-helper --config-file $NOVA_CONF

$(novasnap_conf_section)

$(nova_workarounds_conf)
EOC
  return 0
}

# nova_daemon_start NAME: one of NOVA_DAEMONS, with its log and pid under the stack's state.
nova_daemon_start() {
  local name=$1 conf=$NOVA_CONTROL_CONF
  [ "$name" = nova-compute ] && conf=$NOVA_CONF
  pid_alive "$STATE/run/$name.pid" && return 0
  PATH=$OPENSTACK_VENV/bin:$PATH background "$STATE/run/$name.pid" "$LOGS/$name.log" \
    "$OPENSTACK_VENV/bin/$name" --config-file "$conf" --log-file "$LOGS/$name.log"
}

# The cell mappings and schemas, once per database set.
nova_databases() {
  local fresh=
  mariadb_create nova_api && fresh=1
  mariadb_create nova_cell0 && fresh=1
  mariadb_create nova && fresh=1
  [ -n "$fresh" ] || [ ! -f "$NOVA_DIR/cells-ready" ] || return 0
  say "nova: building its databases and cells"
  nova_manage api_db sync || die "nova-manage api_db sync failed; see $LOGS/nova-manage.log"
  nova_manage cell_v2 list_cells | grep -q ' cell0 ' ||
    nova_manage cell_v2 map_cell0 --database_connection "$(mysql_url nova_cell0)" ||
    die "nova-manage cell_v2 map_cell0 failed; see $LOGS/nova-manage.log"
  nova_manage cell_v2 list_cells | grep -q ' cell1 ' ||
    nova_manage cell_v2 create_cell --name cell1 ||
    die "nova-manage cell_v2 create_cell failed; see $LOGS/nova-manage.log"
  nova_manage db sync || die "nova-manage db sync failed; see $LOGS/nova-manage.log"
  touch "$NOVA_DIR/cells-ready"
}

# The compute service is up, and its host is mapped to cell1.
compute_registered() {
  "$PEER_VENV/bin/openstack" --os-username admin --os-password "$(password admin)" \
    --os-project-name admin compute service list --service nova-compute -f value -c Host -c State |
    grep -qx "$COMPUTE_HOST up"
}

# nova-compute serves its host: its second RPC server consumes compute-alt.<host> (novasnap
# never consumes that queue). After a restart, `compute_registered` may still see the old
# process's heartbeat; a queue's consumer goes with its process.
compute_consuming() {
  local vhost=/
  [ "$NOVA_RABBIT_QUEUES" = quorum ] && vhost=$NOVA_QUORUM_VHOST
  rabbitmqctl -q list_queues -p "$vhost" name consumers |
    awk -v q="compute-alt.$COMPUTE_HOST" '$1 == q && $2 > 0 { found = 1 } END { exit !found }'
}

# The quorum vhost, made afresh (switching to quorum queues) or removed (switching back).
nova_rabbit_vhost() {
  rabbitmqctl -q delete_vhost "$NOVA_QUORUM_VHOST" >/dev/null 2>&1 || true
  [ "$NOVA_RABBIT_QUEUES" = quorum ] || return 0
  rabbitmqctl -q add_vhost "$NOVA_QUORUM_VHOST" >/dev/null
  rabbitmqctl -q set_permissions -p "$NOVA_QUORUM_VHOST" guest '.*' '.*' '.*' >/dev/null
}

# cell1's mapping carries the transport URL nova-api and nova-conductor cast to compute hosts
# through (the one `create_cell` was given, not the config file's): it follows the setting.
nova_cell1_transport() {
  local cell1
  cell1=$("$OPENSTACK_VENV/bin/nova-manage" --config-file "$NOVA_CONTROL_CONF" cell_v2 list_cells 2>/dev/null |
    awk -F'|' '$2 ~ /^ *cell1 *$/ {gsub(/ /, "", $3); print $3}')
  [ -n "$cell1" ] || die "nova: cell1 is not mapped; see $LOGS/nova-manage.log"
  nova_manage cell_v2 update_cell --cell_uuid "$cell1" --transport-url "$NOVA_TRANSPORT_URL" ||
    die "nova-manage cell_v2 update_cell failed; see $LOGS/nova-manage.log"
}

nova_up() {
  local t0=$SECONDS d
  write_nova_confs
  if [ -n "$NOVA_CONTROL_CHANGED" ]; then
    local running=
    for d in "${NOVA_DAEMONS[@]}" nova-api; do pid_alive "$STATE/run/$d.pid" && running=1; done
    if [ -n "$running" ]; then
      say "nova: its configuration changed, restarting Nova"
      nova_stop
    fi
    nova_rabbit_vhost
  elif [ -n "$NOVA_COMPUTE_CHANGED" ] && pid_alive "$STATE/run/nova-compute.pid"; then
    say "nova: nova-cpu.conf changed, restarting nova-compute"
    stop_pidfile "$STATE/run/nova-compute.pid"
  fi
  nova_databases
  [ -z "$NOVA_CONTROL_CHANGED" ] || nova_cell1_transport
  for d in nova-conductor nova-scheduler; do nova_daemon_start "$d"; done
  # The API reads only files: its log file is set in one of its own.
  printf '[DEFAULT]\nlog_file = %s\n' "$LOGS/nova-api.log" >"$NOVA_DIR/etc/nova-api-log.conf"
  wsgi_start nova-api 8774 nova.wsgi.osapi_compute:application OS_NOVA_CONFIG_DIR="$NOVA_DIR/etc" \
    OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf;nova-api-log.conf"
  wait_until 60 nova-api "$LOGS/nova-api-gunicorn.log" nova_api_healthy
  # Registered and mapped already, unless nova-compute starts now.
  pid_alive "$STATE/run/nova-compute.pid" && { say "nova up ($((SECONDS - t0))s)"; return 0; }
  nova_daemon_start nova-compute
  OS_AUTH_URL=$KEYSTONE_URL OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default \
    wait_service 120 nova-compute "$STATE/run/nova-compute.pid" "$LOGS/nova-compute.log" compute_registered
  wait_service 120 nova-compute "$STATE/run/nova-compute.pid" "$LOGS/nova-compute.log" compute_consuming
  nova_manage cell_v2 discover_hosts || die "nova-manage cell_v2 discover_hosts failed; see $LOGS/nova-manage.log"
  say "nova up ($((SECONDS - t0))s)"
}

nova_status() {
  local d
  for d in "${NOVA_DAEMONS[@]}" nova-api; do pid_alive "$STATE/run/$d.pid" || return 1; done
  nova_api_healthy
}

nova_stop() {
  local d
  for d in nova-compute nova-api nova-scheduler nova-conductor; do stop_pidfile "$STATE/run/$d.pid"; done
}
