# shellcheck shell=bash
# novasnap's own part of the stack: its options, added to the nova-cpu.conf it runs from
# beside nova-compute, and the directories they name.

NOVASNAP_HOST=$COMPUTE_HOST

novasnap_conf_section() {
  mkdir -p "$STATE/snapshots" "$STATE/worker"
  cat <<EOC
[novasnap]
state_pool = novasnap
glance_pools = images
state_directory = $STATE/worker

[novasnap_service_user]
$(keystone_auth_section novasnap)
EOC
}
