# shellcheck shell=bash
# Neutron's API server only (ML2, no agents, no networks): servers are created without a
# network, but nova-api still asks Neutron for their ports on every `server show` and
# `server list` (nova/api/openstack/compute/views/servers.py `_add_security_grps`), and
# answers 500 when the catalog has no network endpoint. A real Neutron answering "no ports"
# is the smallest true answer; the stack runs no network agents and builds no networks.

NEUTRON_DIR=$STATE/neutron
NEUTRON_URL=http://127.0.0.1:9696

neutron_healthy() { curl -fsS -m 5 "$NEUTRON_URL/" >/dev/null 2>&1; }

write_neutron_conf() {
  local changed=1
  write_if_changed "$NEUTRON_DIR/etc/neutron.conf" <<EOC && changed=0
# Written by novasnap scripts/stack: Neutron's API of the local test stack.
[DEFAULT]
core_plugin = ml2
# Not used, but Neutron's port queries join the port-forwarding table its plugin defines.
service_plugins = router,port_forwarding
auth_strategy = keystone
transport_url = $TRANSPORT_URL
log_file = $LOGS/neutron-api.log
use_stderr = False
notify_nova_on_port_status_changes = False
notify_nova_on_port_data_changes = False
api_paste_config = $NEUTRON_DIR/etc/api-paste.ini

[database]
connection = $(mysql_url neutron)

[keystone_authtoken]
www_authenticate_uri = $KEYSTONE_URL
$(keystone_auth_section neutron)

[oslo_concurrency]
lock_path = $NEUTRON_DIR/locks
EOC
  write_if_changed "$NEUTRON_DIR/etc/ml2_conf.ini" <<EOC && changed=0
[ml2]
type_drivers = flat
tenant_network_types =
mechanism_drivers =

[ml2_type_flat]
flat_networks =
EOC
  return $changed
}

neutron_up() {
  local t0=$SECONDS
  mkdir -p "$NEUTRON_DIR/etc" "$NEUTRON_DIR/locks"
  cp "$OPENSTACK_VENV/etc/neutron/api-paste.ini" "$NEUTRON_DIR/etc/"
  if write_neutron_conf && pid_alive "$STATE/run/neutron-api.pid"; then
    say "neutron: its configuration changed, restarting it"
    neutron_stop
  fi
  if mariadb_create neutron; then
    "$OPENSTACK_VENV/bin/neutron-db-manage" --config-file "$NEUTRON_DIR/etc/neutron.conf" \
      --config-file "$NEUTRON_DIR/etc/ml2_conf.ini" upgrade heads >>"$LOGS/neutron-manage.log" 2>&1 ||
      die "neutron-db-manage upgrade failed; see $LOGS/neutron-manage.log"
  fi
  # One worker, given a first query: Neutron's port listing reads an ORM relationship that
  # SQLAlchemy only sets up once the process has queried the database (a deployment's
  # agents always have by then; here the first request would be Nova's port listing).
  pid_alive "$STATE/run/neutron-api.pid" && neutron_healthy && { say "neutron up ($((SECONDS - t0))s)"; return 0; }
  WSGI_WORKERS=1 wsgi_start neutron-api 9696 neutron.wsgi.api:application \
    OS_NEUTRON_CONFIG_DIR="$NEUTRON_DIR/etc" OS_NEUTRON_CONFIG_FILES="neutron.conf;ml2_conf.ini"
  wait_until 60 neutron "$LOGS/neutron-api-gunicorn.log and $LOGS/neutron-api.log" neutron_healthy
  wait_until 30 "neutron's first query" "$LOGS/neutron-api.log" neutron_query
  say "neutron up ($((SECONDS - t0))s)"
}

neutron_query() {
  curl -fsS -m 10 -H "X-Auth-Token: $(os_admin token issue -f value -c id)" "$NEUTRON_URL/v2.0/networks" >/dev/null
}

neutron_status() { pid_alive "$STATE/run/neutron-api.pid" && neutron_healthy; }

neutron_stop() { stop_pidfile "$STATE/run/neutron-api.pid"; }
