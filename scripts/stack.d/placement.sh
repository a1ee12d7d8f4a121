# shellcheck shell=bash
# Placement: MariaDB, keystonemiddleware, under gunicorn on 127.0.0.1:8778.

PLACEMENT_DIR=$STATE/placement
PLACEMENT_URL=http://127.0.0.1:8778

placement_healthy() { curl -fsS -m 5 "$PLACEMENT_URL/" >/dev/null 2>&1; }

write_placement_conf() {
  write_if_changed "$PLACEMENT_DIR/etc/placement.conf" <<EOC
# Written by novasnap scripts/stack: Placement of the local test stack.
[DEFAULT]
log_file = $LOGS/placement.log
use_stderr = False

[placement_database]
connection = $(mysql_url placement)

[api]
auth_strategy = keystone

[keystone_authtoken]
www_authenticate_uri = $KEYSTONE_URL
$(keystone_auth_section placement)
EOC
}

placement_up() {
  local t0=$SECONDS
  if write_placement_conf && pid_alive "$STATE/run/placement.pid"; then
    say "placement: placement.conf changed, restarting Placement"
    placement_stop
  fi
  if mariadb_create placement; then
    "$OPENSTACK_VENV/bin/placement-manage" --config-file "$PLACEMENT_DIR/etc/placement.conf" db sync \
      >>"$LOGS/placement-manage.log" 2>&1 || die "placement-manage db sync failed; see $LOGS/placement-manage.log"
  fi
  wsgi_start placement 8778 placement.wsgi.api:application OS_PLACEMENT_CONFIG_DIR="$PLACEMENT_DIR/etc"
  wait_until 60 placement "$LOGS/placement-gunicorn.log and $LOGS/placement.log" placement_healthy
  say "placement up ($((SECONDS - t0))s)"
}

placement_status() { pid_alive "$STATE/run/placement.pid" && placement_healthy; }

placement_stop() { stop_pidfile "$STATE/run/placement.pid"; }
