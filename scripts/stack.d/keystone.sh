# shellcheck shell=bash
# Keystone: fernet tokens, MariaDB, under gunicorn on 127.0.0.1:5000. Bootstrapped with an
# admin; project `service` whose users glance, nova, placement, neutron and novasnap hold
# the `service` role, as a deployment has them; project `demo` whose user `demo` is a member.

KEYSTONE_DIR=$STATE/keystone
KEYSTONE_URL=http://127.0.0.1:5000/v3
# The same Keystone over https (its own gunicorn with the stack's certificate), for clients
# that reach Keystone through TLS.
KEYSTONE_HTTPS_URL=https://127.0.0.1:5001/v3
REGION=RegionOne
# How long a token lives, in seconds: a stack setting (`NOVASNAP_STACK_TOKEN_LIFETIME=60
# scripts/stack up keystone` restarts Keystone with it; tests shorten it).
KEYSTONE_TOKEN_LIFETIME=${NOVASNAP_STACK_TOKEN_LIFETIME:-3600}
SERVICE_USERS=(glance nova placement neutron novasnap)

# password NAME: the stack's password for user NAME, made once and kept with the state.
password() {
  local file=$KEYSTONE_DIR/passwords/$1
  if [ ! -s "$file" ]; then
    mkdir -p "$KEYSTONE_DIR/passwords"
    (umask 077; openssl rand -hex 12 >"$file")
  fi
  cat "$file"
}

keystone_healthy() { curl -fsS -m 5 "$KEYSTONE_URL" >/dev/null 2>&1; }

write_keystone_conf() {
  write_if_changed "$KEYSTONE_DIR/etc/keystone.conf" <<EOC
# Written by novasnap scripts/stack: Keystone of the local test stack.
[DEFAULT]
log_file = $LOGS/keystone.log
use_stderr = False

[database]
connection = $(mysql_url keystone)

[identity]
# Cheap password hashes (bcrypt, 2^4 rounds; Keystone's default is 2^12): every test worker
# and every service authenticates by password, and Keystone checks the hash each time.
password_hash_rounds = 4

[token]
provider = fernet
expiration = $KEYSTONE_TOKEN_LIFETIME

[fernet_tokens]
key_repository = $KEYSTONE_DIR/fernet-keys

[fernet_receipts]
key_repository = $KEYSTONE_DIR/fernet-keys

[credential]
key_repository = $KEYSTONE_DIR/credential-keys
EOC
}

keystone_manage() {
  "$OPENSTACK_VENV/bin/keystone-manage" --config-file "$KEYSTONE_DIR/etc/keystone.conf" "$@" \
    >>"$LOGS/keystone-manage.log" 2>&1 || die "keystone-manage $1 failed; see $LOGS/keystone-manage.log"
}

# The projects, roles, users and catalog beyond what `bootstrap` makes; idempotent.
keystone_populate() {
  KEYSTONE_URL=$KEYSTONE_URL ADMIN_PASSWORD=$(password admin) DEMO_PASSWORD=$(password demo) \
    SERVICE_USERS="${SERVICE_USERS[*]}" REGION=$REGION PASSWORDS=$KEYSTONE_DIR/passwords \
    "$OPENSTACK_VENV/bin/python" - >>"$LOGS/keystone-manage.log" 2>&1 <<'PY' ||
import os
from keystoneauth1 import session
from keystoneauth1.identity import v3
from keystoneclient.v3 import client

env = os.environ
auth = v3.Password(auth_url=env["KEYSTONE_URL"], username="admin", password=env["ADMIN_PASSWORD"],
                   project_name="admin", user_domain_id="default", project_domain_id="default")
ks = client.Client(session=session.Session(auth=auth))

def one(manager, name, **create):
    found = [x for x in manager.list() if x.name == name]
    return found[0] if found else manager.create(name=name, **create)

service_role = one(ks.roles, "service")
member_role = one(ks.roles, "member")
service_project = one(ks.projects, "service", domain="default")
demo_project = one(ks.projects, "demo", domain="default")

def user(name, password, project, role):
    u = [x for x in ks.users.list(domain="default") if x.name == name]
    u = u[0] if u else ks.users.create(name=name, domain="default", password=password, default_project=project)
    ks.users.update(u, password=password)
    ks.roles.grant(role, user=u, project=project)

for name in env["SERVICE_USERS"].split():
    user(name, open(os.path.join(env["PASSWORDS"], name)).read().strip(), service_project, service_role)
# Reclamation looks up images of every project, which Glance's default policy shows to
# admins only: to a service-role token another project's image is "not found".
novasnap = [x for x in ks.users.list(domain="default") if x.name == "novasnap"][0]
ks.roles.grant(one(ks.roles, "admin"), user=novasnap, project=service_project)
user("demo", env["DEMO_PASSWORD"], demo_project, member_role)

catalog = {
    "image": ("glance", "http://127.0.0.1:9292"),
    "placement": ("placement", "http://127.0.0.1:8778"),
    "compute": ("nova", "http://127.0.0.1:8774/v2.1"),
    "network": ("neutron", "http://127.0.0.1:9696"),
}
for kind, (name, url) in catalog.items():
    svc = [s for s in ks.services.list(type=kind)]
    svc = svc[0] if svc else ks.services.create(name=name, type=kind)
    have = {e.interface: e for e in ks.endpoints.list(service=svc)}
    for interface in ("public", "internal", "admin"):
        if interface not in have:
            ks.endpoints.create(service=svc, url=url, interface=interface, region=env["REGION"])
        elif have[interface].url != url:
            ks.endpoints.update(have[interface], url=url)
print("keystone populated")
PY
    die "keystone: creating projects, users and the catalog failed; see $LOGS/keystone-manage.log"
}

keystone_up() {
  local t0=$SECONDS fresh=
  mkdir -p "$KEYSTONE_DIR/etc"
  if write_keystone_conf && pid_alive "$STATE/run/keystone.pid"; then
    say "keystone: keystone.conf changed, restarting Keystone"
    keystone_stop
  fi
  local p
  for p in admin demo "${SERVICE_USERS[@]}"; do password "$p" >/dev/null; done
  if mariadb_create keystone || [ ! -f "$KEYSTONE_DIR/bootstrapped" ]; then
    fresh=1
    keystone_manage db_sync
    keystone_manage fernet_setup --keystone-user root --keystone-group root
    keystone_manage credential_setup --keystone-user root --keystone-group root
    keystone_manage bootstrap --bootstrap-password "$(password admin)" --bootstrap-region-id "$REGION" \
      --bootstrap-admin-url "$KEYSTONE_URL" --bootstrap-internal-url "$KEYSTONE_URL" \
      --bootstrap-public-url "$KEYSTONE_URL"
  fi
  wsgi_start keystone 5000 keystone.wsgi.api:application OS_KEYSTONE_CONFIG_DIR="$KEYSTONE_DIR/etc"
  wait_until 60 keystone "$LOGS/keystone-gunicorn.log and $LOGS/keystone.log" keystone_healthy
  WSGI_WORKERS=1 WSGI_TLS=1 wsgi_start keystone-tls 5001 keystone.wsgi.api:application \
    OS_KEYSTONE_CONFIG_DIR="$KEYSTONE_DIR/etc"
  wait_until 60 "keystone over https" "$LOGS/keystone-tls-gunicorn.log" https_healthy "$KEYSTONE_HTTPS_URL"
  # What was populated, so that a changed population (users, roles) runs again.
  local population
  population="${SERVICE_USERS[*]} novasnap-admin"
  if [ -n "$fresh" ] || [ "$(cat "$KEYSTONE_DIR/bootstrapped" 2>/dev/null)" != "$population" ]; then
    keystone_populate
    echo "$population" >"$KEYSTONE_DIR/bootstrapped"
  fi
  say "keystone up ($((SECONDS - t0))s)"
}

keystone_status() {
  pid_alive "$STATE/run/keystone.pid" && keystone_healthy && https_healthy "$KEYSTONE_HTTPS_URL"
}

keystone_stop() {
  stop_pidfile "$STATE/run/keystone-tls.pid"
  stop_pidfile "$STATE/run/keystone.pid"
}

# keystone_auth_section USER: the keystoneauth options a service uses to reach the others.
keystone_auth_section() {
  cat <<EOC
auth_type = password
auth_url = $KEYSTONE_URL
username = $1
password = $(password "$1")
project_name = service
user_domain_name = Default
project_domain_name = Default
region_name = $REGION
EOC
}

keystone_env() {
  echo "export OS_AUTH_URL=$KEYSTONE_URL"
  echo "export KEYSTONE_HTTPS_URL=$KEYSTONE_HTTPS_URL"
  echo "export OS_IDENTITY_API_VERSION=3"
  echo "export OS_USERNAME=demo"
  echo "export OS_PASSWORD=$(cat "$KEYSTONE_DIR/passwords/demo" 2>/dev/null)"
  echo "export OS_PROJECT_NAME=demo"
  echo "export OS_USER_DOMAIN_NAME=Default"
  echo "export OS_PROJECT_DOMAIN_NAME=Default"
  echo "export OS_REGION_NAME=$REGION"
  echo "export OS_ADMIN_PASSWORD=$(cat "$KEYSTONE_DIR/passwords/admin" 2>/dev/null)"
  echo "export NOVASNAP_SERVICE_PASSWORD=$(cat "$KEYSTONE_DIR/passwords/novasnap" 2>/dev/null)"
  echo "export OPENSTACK=$PEER_VENV/bin/openstack"
}

# openstack_as USER PROJECT ARGS...: the openstack client as a user of the stack.
openstack_as() {
  local user=$1 project=$2; shift 2
  "$PEER_VENV/bin/openstack" --os-auth-url "$KEYSTONE_URL" --os-identity-api-version 3 \
    --os-username "$user" --os-password "$(password "$user")" --os-project-name "$project" \
    --os-user-domain-name Default --os-project-domain-name Default --os-region-name "$REGION" "$@"
}
os_admin() { openstack_as admin admin "$@"; }
os_demo() { openstack_as demo demo "$@"; }
