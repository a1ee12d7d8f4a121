# shellcheck shell=bash
# Ceph: a one-node TEST cluster on 127.0.0.1 (monitor, manager, one memstore OSD), pools
# vms (instance disks), images (Glance) and novasnap (novasnap's own state).

CEPH_DIR=$STATE/ceph
CEPH_RUN=$CEPH_DIR/run
CEPH_CONF=/etc/ceph/ceph.conf

ceph_fsid() { cat "$STATE/fsid"; }

write_ceph_conf() {
  mkdir -p /etc/ceph
  cat >"$CEPH_CONF" <<EOF
# Written by novasnap scripts/stack: a one-node TEST cluster on 127.0.0.1, nothing in it
# is durable (the OSD keeps objects in RAM).
[global]
fsid = $(ceph_fsid)
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
# The state disk is shared with everything else on the machine; do not warn at 30% free.
mon data avail warn = 2
# Test stack only: commit monitor proposals every 50 ms instead of every second so pool
# and snapshot operations return quickly. Benchmarks run against this note it.
paxos propose interval = 0.05
# A dead monitor must give the stack's tools an error, not a hang. No OSD op timeout: the
# guests' QEMU reads this file too, and with one their writes failed while a test held the
# OSD paused, their filesystems turning read-only (no cloud sets it for its hypervisors).
# novasnap sets its own bounds on its own connection.
rados mon op timeout = 30
client mount timeout = 30
run dir = $CEPH_RUN
pid file = $CEPH_RUN/\$name.pid

[mon]
log file = $LOGS/\$name.log
admin socket = $CEPH_RUN/\$name.asok
mon cluster log file = $LOGS/ceph.log
mon data = $CEPH_DIR/mon/\$cluster-\$id

[mgr]
log file = $LOGS/\$name.log
admin socket = $CEPH_RUN/\$name.asok
mgr data = $CEPH_DIR/mgr/\$cluster-\$id
# Only the always-on modules: the dashboard and friends cost seconds and RAM.
mgr initial modules =

[osd]
log file = $LOGS/\$name.log
admin socket = $CEPH_RUN/\$name.asok
osd data = $CEPH_DIR/osd/\$cluster-\$id
osd objectstore = memstore
# RAM-backed: room for the guests, the images and what a test or the bench makes (eight
# 256 MiB disks and their copies at once) on a 24 GiB machine; RAM is taken as data comes.
memstore device bytes = 10737418240
EOF
}

ceph_healthy() { timeout 10 ceph --connect-timeout 5 health 2>/dev/null | grep -q HEALTH_OK; }
pools_usable() { timeout 10 rados -p vms ls >/dev/null 2>&1; }

ceph_mkfs() {
  say "ceph: creating cluster $(ceph_fsid)"
  rm -rf "$CEPH_DIR"
  mkdir -p "$CEPH_RUN" "$CEPH_DIR/mon" "$CEPH_DIR/mgr/ceph-x" "$CEPH_DIR/osd/ceph-0"
  monmaptool --create --fsid "$(ceph_fsid)" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' \
    "$CEPH_DIR/monmap" >/dev/null
  ceph-authtool --create-keyring "$CEPH_DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-mon --mkfs -i a --monmap "$CEPH_DIR/monmap" --keyring "$CEPH_DIR/mon.keyring" \
    >>"$LOGS/mon.a.log" 2>&1 || die "ceph-mon --mkfs failed; see $LOGS/mon.a.log"
}

ceph_up() {
  local t0=$SECONDS
  mkdir -p "$LOGS"
  [ -s "$STATE/fsid" ] || uuidgen >"$STATE/fsid"
  write_ceph_conf
  # The OSD keeps objects in RAM: once it has died its data is gone, and so is everything
  # built on it. Rebuild the cluster then (seconds), and let Glance and the guests notice.
  if [ -d "$CEPH_DIR/osd/ceph-0" ] && ! pid_alive "$CEPH_RUN/osd.0.pid"; then
    say "ceph: OSD not running, its in-memory data is lost; rebuilding the cluster"
    ceph_stop
    rm -rf "$CEPH_DIR"
  fi
  [ -f "$CEPH_DIR/mon/ceph-a/store.db/CURRENT" ] || ceph_mkfs
  mkdir -p "$CEPH_RUN"

  pid_alive "$CEPH_RUN/mon.a.pid" || daemon ceph-mon -i a >>"$LOGS/mon.a.log" 2>&1
  wait_until 30 ceph-mon "$LOGS/mon.a.log" timeout 5 ceph --connect-timeout 3 mon stat
  pid_alive "$CEPH_RUN/mgr.x.pid" || daemon ceph-mgr -i x >>"$LOGS/mgr.x.log" 2>&1

  if [ ! -f "$CEPH_DIR/osd/ceph-0/fsid" ]; then
    local osd_uuid
    osd_uuid=$(uuidgen)
    ceph osd new "$osd_uuid" 0 >/dev/null
    ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$LOGS/osd.0.log" 2>&1 ||
      die "ceph-osd --mkfs failed; see $LOGS/osd.0.log"
    # A fresh cluster: a new generation, so Glance and the guests rebuild what lived in it.
    uuidgen >"$CEPH_DIR/generation"
  fi
  # memstore keeps each object in buffers of up to 4 MiB; glibc's dynamic mmap threshold
  # then moves such sizes onto the heap, where freed ones are never given back: after a
  # bench had filled and emptied the 6 GiB store, the OSD held 17 GiB of RAM. A fixed
  # threshold keeps them mmapped, returned to the system when freed.
  pid_alive "$CEPH_RUN/osd.0.pid" || MALLOC_MMAP_THRESHOLD_=131072 daemon ceph-osd -i 0 >>"$LOGS/osd.0.log" 2>&1

  local pool
  for pool in vms images novasnap; do
    if ! ceph osd pool ls | grep -qx "$pool"; then
      ceph osd pool create "$pool" 8 8 >/dev/null 2>&1
      case $pool in
        novasnap) ceph osd pool application enable "$pool" novasnap >/dev/null 2>&1 ;;
        *) rbd pool init "$pool" ;;
      esac
    fi
  done
  wait_until 60 "ceph pools" "$LOGS/osd.0.log" pools_usable
  # HEALTH_OK follows a few seconds after the PGs peer; usable pools are what matters.
  local deadline=$((SECONDS + 15))
  until ceph_healthy || ((SECONDS >= deadline)); do sleep 0.5; done
  ceph_healthy || say "ceph: usable but $(ceph health 2>&1 | head -1)"
  say "ceph up ($((SECONDS - t0))s)"
}

ceph_status() {
  pid_alive "$CEPH_RUN/mon.a.pid" && pid_alive "$CEPH_RUN/osd.0.pid" && pools_usable
}

ceph_stop() {
  local d
  for d in osd.0 mgr.x mon.a; do stop_pidfile "$CEPH_RUN/$d.pid"; done
}

