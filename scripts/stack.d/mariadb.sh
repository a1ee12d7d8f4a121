# shellcheck shell=bash
# MariaDB: the machine runs it (127.0.0.1:3306, root, no password). Every OpenStack
# database of the stack lives there; `down` drops them.

OPENSTACK_DATABASES=(keystone glance placement neutron nova_api nova nova_cell0)

mariadb_healthy() { mariadb -h 127.0.0.1 -uroot -e 'select 1' >/dev/null 2>&1; }

mariadb_up() {
  mariadb_healthy && return 0
  say "mariadb down, starting it"
  daemon start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_until 60 mariadb /var/log/mysql mariadb_healthy
}

mariadb_status() { mariadb_healthy; }

# mariadb_create DB: creates the database if it is missing; status 0 when it was created
# (its service must then build its schema).
mariadb_create() {
  [ -n "$(mariadb -h 127.0.0.1 -uroot -N -e "show databases like '$1'")" ] && return 1
  mariadb -h 127.0.0.1 -uroot -e "create database \`$1\` character set utf8mb4"
}

mariadb_drop() { mariadb -h 127.0.0.1 -uroot -e "drop database if exists \`$1\`"; }

# Only the stack's databases: the machine's MariaDB stays running, for whoever else uses it.
mariadb_stop() {
  local db
  mariadb_healthy || return 0
  for db in "${OPENSTACK_DATABASES[@]}"; do mariadb_drop "$db"; done
}
