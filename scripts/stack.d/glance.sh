# shellcheck shell=bash
# Glance: keystonemiddleware, MariaDB, the rbd store on pool `images`, under gunicorn on
# 127.0.0.1:9292. Options and policies at Glance's defaults (show_multiple_locations off,
# the locations API under its default policy, do_secure_hash on) but one that every cloud
# with Ceph behind both Glance and Nova sets, as Ceph's own guide says:
# show_image_direct_url, without which Nova cannot clone base images into its pool.

GLANCE_DIR=$STATE/glance
GLANCE_URL=http://127.0.0.1:9292
# The same Glance over https (its own gunicorn with the stack's certificate).
GLANCE_HTTPS_URL=https://127.0.0.1:9293

glance_healthy() { curl -fsS -m 5 "$GLANCE_URL/versions" >/dev/null 2>&1; }

write_glance_conf() {
  mkdir -p "$GLANCE_DIR/etc" "$GLANCE_DIR/staging" "$GLANCE_DIR/tasks" "$GLANCE_DIR/locks"
  cp "$OPENSTACK_VENV/etc/glance/glance-api-paste.ini" "$GLANCE_DIR/etc/"
  write_if_changed "$GLANCE_DIR/etc/glance-api.conf" <<EOC
# Written by novasnap scripts/stack: Glance of the local test stack.
[DEFAULT]
enabled_backends = ceph:rbd
show_image_direct_url = True
worker_self_reference_url = $GLANCE_URL
log_file = $LOGS/glance-api.log
use_stderr = False

[database]
connection = $(mysql_url glance)

[paste_deploy]
flavor = keystone

[keystone_authtoken]
www_authenticate_uri = $KEYSTONE_URL
$(keystone_auth_section glance)

[glance_store]
default_backend = ceph

[ceph]
rbd_store_pool = images
rbd_store_ceph_conf = $CEPH_CONF

[os_glance_staging_store]
filesystem_store_datadir = $GLANCE_DIR/staging

[os_glance_tasks_store]
filesystem_store_datadir = $GLANCE_DIR/tasks

[oslo_concurrency]
lock_path = $GLANCE_DIR/locks
EOC
}

glance_up() {
  local t0=$SECONDS
  # Glance's images live in Ceph: after Ceph was rebuilt its database describes nothing.
  if [ -f "$GLANCE_DIR/ceph-generation" ] &&
    [ "$(cat "$GLANCE_DIR/ceph-generation")" != "$(cat "$CEPH_DIR/generation")" ]; then
    say "glance: Ceph was rebuilt, starting with an empty image database"
    glance_stop
    mariadb_drop glance
    rm -f "$GLANCE_DIR/ceph-generation"
  fi
  if write_glance_conf && pid_alive "$STATE/run/glance.pid"; then
    say "glance: glance-api.conf changed, restarting Glance"
    glance_stop
  fi
  if mariadb_create glance || [ ! -f "$GLANCE_DIR/ceph-generation" ]; then
    OS_GLANCE_CONFIG_DIR=$GLANCE_DIR/etc "$OPENSTACK_VENV/bin/glance-manage" \
      --config-file "$GLANCE_DIR/etc/glance-api.conf" db_sync >>"$LOGS/glance-manage.log" 2>&1 ||
      die "glance-manage db_sync failed; see $LOGS/glance-manage.log"
    cp "$CEPH_DIR/generation" "$GLANCE_DIR/ceph-generation"
  fi
  wsgi_start glance 9292 glance.wsgi.api:application OS_GLANCE_CONFIG_DIR="$GLANCE_DIR/etc"
  wait_until 60 glance "$LOGS/glance-gunicorn.log and $LOGS/glance-api.log" glance_healthy
  WSGI_WORKERS=1 WSGI_TLS=1 wsgi_start glance-tls 9293 glance.wsgi.api:application \
    OS_GLANCE_CONFIG_DIR="$GLANCE_DIR/etc"
  wait_until 60 "glance over https" "$LOGS/glance-tls-gunicorn.log" https_healthy "$GLANCE_HTTPS_URL/versions"
  say "glance up ($((SECONDS - t0))s)"
}

glance_status() {
  pid_alive "$STATE/run/glance.pid" && glance_healthy && https_healthy "$GLANCE_HTTPS_URL/versions"
}

glance_stop() {
  stop_pidfile "$STATE/run/glance-tls.pid"
  stop_pidfile "$STATE/run/glance.pid"
}
