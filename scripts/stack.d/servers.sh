# shellcheck shell=bash
# The guests tests snapshot. Servers 1 and 2 are made by Nova (`openstack server create
# --wait` as the demo user, no network): server 1 from the raw image, so its disk is an RBD
# clone of the Glance image, as Nova makes it; server 2 from the qcow2 image, so its disk is a
# full copy Nova imported. Guest 3 is file-backed (qcow2 over a raw base), which a second
# images_type would need and one nova-compute cannot have: the stack defines it itself, from
# the domain XML Nova wrote for server 1 with only its identity and disk changed.

SERVERS_ENV=$STATE/servers.env
FLAVOR=novasnap.tiny
FILE_GUEST_DIR=$STATE/file-guest
FILE_GUEST_UUID=6e6f7661-736e-4170-8000-000000000003
FILE_GUEST_NAME=novasnap-file-guest
# Every time a guest takes to boot under TCG to its agent answering.
GUEST_BOOT_LIMIT=120

server_name() { echo "novasnap-server-$1"; }
server_image() { case $1 in 1) image_field IMAGE_ID ;; 2) image_field QCOW2_IMAGE_ID ;; esac; }

# agent_answers DOMAIN: the guest agent inside answers guest-ping.
agent_answers() {
  timeout 5 virsh -c qemu:///system qemu-agent-command "$1" '{"execute":"guest-ping"}' >/dev/null 2>&1
}

wait_for_agent() { # DOMAIN
  wait_until "$GUEST_BOOT_LIMIT" "the guest agent of $1" "/var/log/libvirt/qemu/$1.log" agent_answers "$1"
}

# server_field N FIELD: as `openstack server show` tells it; the servers are the demo user's,
# found by name in its project, and shown to the admin, who also sees the domain name.
server_field() {
  local id
  id=$(os_demo server show "$(server_name "$1")" -f value -c id 2>/dev/null) || return 1
  os_admin server show "$id" -f value -c "$2" 2>/dev/null
}

# server_up N: an ACTIVE server of ours on the current Ceph cluster, agent answering.
server_up() {
  local n=$1 name status id
  name=$(server_name "$n")
  status=$(server_field "$n" status || true)
  id=$(server_field "$n" id || true)
  if [ -n "$id" ] && [ "$(sed -n "s/^GENERATION=//p" "$SERVERS_ENV" 2>/dev/null)" != "$(cat "$CEPH_DIR/generation")" ]; then
    status=GONE # its disk was in a Ceph cluster that is no more
  fi
  case $status in
    ACTIVE) ;;
    SHUTOFF) os_demo server start "$name" && os_demo server show "$name" >/dev/null ;;
    PAUSED) os_demo server unpause "$name" ;;
    SUSPENDED) os_demo server resume "$name" ;;
    "") ;;
    *)
      say "servers: $name is $status; making it again"
      server_delete "$name" || die "cannot delete $name; see $LOGS/nova-compute.log"
      status=
      ;;
  esac
  if [ -z "$status" ] || [ "$status" = GONE ]; then
    say "servers: creating $name"
    os_demo --os-compute-api-version 2.37 server create --image "$(server_image "$n")" --flavor "$FLAVOR" \
      --nic none --wait "$name" >/dev/null || die "cannot create $name; see $LOGS/nova-compute.log"
  fi
  wait_until 60 "$name ACTIVE" "$LOGS/nova-compute.log" test "$(server_field "$n" status)" = ACTIVE
  wait_for_agent "$(server_field "$n" OS-EXT-SRV-ATTR:instance_name)"
}

# The file-backed guest: server 1's domain as Nova wrote it, with a name, a uuid and a disk
# of its own (qcow2 over a raw base), and its own copies of the kernel and initramfs.
file_guest_define() {
  local source_domain=$1 server_dir=$NOVA_DIR/instances/$2
  mkdir -p "$FILE_GUEST_DIR"
  cp "$server_dir/kernel" "$server_dir/ramdisk" "$FILE_GUEST_DIR/"
  [ -f "$FILE_GUEST_DIR/base.raw" ] || cp --sparse=always "$GUEST_IMAGE_DIR/disk.raw" "$FILE_GUEST_DIR/base.raw"
  [ -f "$FILE_GUEST_DIR/disk" ] ||
    qemu-img create -q -f qcow2 -F raw -b "$FILE_GUEST_DIR/base.raw" "$FILE_GUEST_DIR/disk"
  virsh -c qemu:///system dumpxml --inactive "$source_domain" |
    python3 "$(dirname "${BASH_SOURCE[0]}")/file_guest_xml.py" --name "$FILE_GUEST_NAME" --uuid "$FILE_GUEST_UUID" \
      --dir "$FILE_GUEST_DIR" --server-dir "$server_dir" >"$FILE_GUEST_DIR/domain.xml"
  virsh -c qemu:///system define "$FILE_GUEST_DIR/domain.xml" >/dev/null
}

file_guest_state() { virsh -c qemu:///system domstate "$FILE_GUEST_UUID" 2>/dev/null | head -1 || true; }

file_guest_up() {
  local state
  if [ -z "$(file_guest_state)" ]; then
    file_guest_define "$(server_field 1 OS-EXT-SRV-ATTR:instance_name)" "$(server_field 1 id)"
  fi
  state=$(file_guest_state)
  case $state in
    running) ;;
    paused) virsh -c qemu:///system resume "$FILE_GUEST_UUID" >/dev/null ;;
    *)
      # A test may have left it shut off or managed-saved; start it fresh.
      virsh -c qemu:///system managedsave-remove "$FILE_GUEST_UUID" >/dev/null 2>&1 || true
      virsh -c qemu:///system start "$FILE_GUEST_UUID" >/dev/null ||
        die "cannot start $FILE_GUEST_NAME; see /var/log/libvirt/qemu/$FILE_GUEST_NAME.log"
      ;;
  esac
  wait_for_agent "$FILE_GUEST_NAME"
}

file_guest_remove() {
  if virsh -c qemu:///system dominfo "$FILE_GUEST_UUID" >/dev/null 2>&1; then
    virsh -c qemu:///system destroy "$FILE_GUEST_UUID" >/dev/null 2>&1 || true
    virsh -c qemu:///system undefine "$FILE_GUEST_UUID" --managed-save --snapshots-metadata >/dev/null 2>&1 || true
  fi
  rm -rf "$FILE_GUEST_DIR"
}

# The servers of servers.env are this cluster's and running, their agents answering: a
# quick look through libvirt, no Nova call (the openstack client costs seconds a call).
servers_current() {
  local n domain
  [ "$(sed -n "s/^GENERATION=//p" "$SERVERS_ENV" 2>/dev/null)" = "$(cat "$CEPH_DIR/generation")" ] || return 1
  images_current || return 1
  for n in 1 2; do
    domain=$(sed -n "s/^SERVER${n}_DOMAIN=//p" "$SERVERS_ENV")
    [ "$(virsh -c qemu:///system domstate "$domain" 2>/dev/null | head -1)" = running ] && agent_answers "$domain" || return 1
  done
  [ "$(file_guest_state)" = running ] && agent_answers "$FILE_GUEST_NAME"
}

servers_up() {
  local t0=$SECONDS n
  servers_current && return 0
  os_admin flavor show "$FLAVOR" >/dev/null 2>&1 ||
    os_admin flavor create --public --ram 256 --disk 1 --vcpus 1 "$FLAVOR" >/dev/null
  # A Ceph cluster rebuilt took the file guest's Nova-made twin with it: start it afresh.
  if [ "$(sed -n "s/^GENERATION=//p" "$SERVERS_ENV" 2>/dev/null)" != "$(cat "$CEPH_DIR/generation")" ]; then
    file_guest_remove
  fi
  # Side by side: each spends most of a minute in Nova's build and the guest's boot.
  local pids=()
  for n in 1 2; do server_up "$n" & pids+=($!); done
  for n in 1 2; do wait "${pids[n - 1]}" || die "server $n did not come up"; done
  {
    echo "GENERATION=$(cat "$CEPH_DIR/generation")"
    for n in 1 2; do
      local id
      id=$(server_field "$n" id)
      echo "SERVER${n}_ID=$id"
      echo "SERVER${n}_DOMAIN=$(server_field "$n" OS-EXT-SRV-ATTR:instance_name)"
      echo "SERVER${n}_DISK=rbd:vms/${id}_disk"
      echo "SERVER${n}_IMAGE=$(server_image "$n")"
    done
  } >"$SERVERS_ENV"
  file_guest_up
  say "servers up ($((SECONDS - t0))s)"
}

servers_status() {
  local n
  for n in 1 2; do [ "$(server_field "$n" status)" = ACTIVE ] || return 1; done
  [ "$(file_guest_state)" = running ]
}

# Deletes server NAME and waits until it is gone. Asked again when the client fails: nova-api
# once closed the connection of a `delete --wait` whose delete had been accepted.
server_delete() {
  local name=$1 _
  for _ in 1 2 3; do
    os_demo server delete --wait "$name" && return 0
    os_demo server show "$name" >/dev/null 2>&1 || return 0
    sleep 5
  done
  return 1
}

servers_stop() {
  local n
  file_guest_remove
  if nova_api_healthy && keystone_healthy; then
    for n in 1 2; do
      if os_demo server show "$(server_name "$n")" >/dev/null 2>&1; then
        server_delete "$(server_name "$n")" || die "cannot delete $(server_name "$n"); see $LOGS/nova-api.log"
      fi
    done
  fi
  rm -f "$SERVERS_ENV"
}

# SERVERN_* for the Nova-made servers; GUESTN_* for the roles tests give them: 1 a disk
# cloned from its base image, 2 a disk that is not a clone, 3 a file-backed disk.
servers_env() {
  [ -f "$SERVERS_ENV" ] || return 0
  local key value n
  while IFS='=' read -r key value; do
    [ "$key" = GENERATION ] || echo "export $key=$value"
  done <"$SERVERS_ENV"
  for n in 1 2; do
    echo "export GUEST${n}_UUID=$(sed -n "s/^SERVER${n}_ID=//p" "$SERVERS_ENV")"
    echo "export GUEST${n}_DOMAIN=$(sed -n "s/^SERVER${n}_DOMAIN=//p" "$SERVERS_ENV")"
    echo "export GUEST${n}_DISK=$(sed -n "s/^SERVER${n}_DISK=//p" "$SERVERS_ENV")"
    echo "export GUEST${n}_BASE_IMAGE=$(sed -n "s/^SERVER${n}_IMAGE=//p" "$SERVERS_ENV")"
  done
  echo "export GUEST3_UUID=$FILE_GUEST_UUID"
  echo "export GUEST3_DOMAIN=$FILE_GUEST_NAME"
  echo "export GUEST3_DISK=$FILE_GUEST_DIR/disk"
  echo "export GUEST3_BASE_IMAGE=$(sed -n "s/^SERVER1_IMAGE=//p" "$SERVERS_ENV")"
}
