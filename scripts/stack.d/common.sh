# shellcheck shell=bash
# Helpers every component of scripts/stack shares. Sourced, never run.

STATE=${NOVASNAP_STACK_STATE:-/var/lib/novasnap-stack}
LOGS=$STATE/logs
# The Python environment every OpenStack service runs from (scripts/venvs openstack), and
# the isolated one the tests' oslo.messaging peers and the openstack client run from.
OPENSTACK_VENV=$STATE/venv-openstack
PEER_VENV=$STATE/venv-peer
TRANSPORT_URL=rabbit://guest:guest@127.0.0.1:5672/

say() { echo "stack: $*"; }
die() { echo "stack: error: $*" >&2; exit 1; }

# wait_until SECONDS WHAT LOG CMD...: polls CMD until it succeeds; a timeout names the log.
wait_until() {
  local limit=$1 what=$2 logfile=$3; shift 3
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "$what not ready after ${limit}s; see $logfile"
    fi
    sleep 0.2
  done
}

# wait_service SECONDS WHAT PIDFILE LOG CMD...: wait_until for a daemon we started, ending
# at once if the daemon has died instead of waiting out the limit.
wait_service() {
  local limit=$1 what=$2 pidfile=$3 logfile=$4; shift 4
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    pid_alive "$pidfile" || die "$what exited; see $logfile"
    ((SECONDS < deadline)) || die "$what not ready after ${limit}s; see $logfile"
    sleep 0.5
  done
}

# pid_alive PIDFILE: the process runs. PID 1 here does not always reap daemons at once, so a
# killed one can linger as a zombie that `kill -0` would call alive.
pid_alive() {
  local state
  [ -f "$1" ] && state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) && [ "${state:0:1}" != Z ]
}

# daemon CMD...: starts a daemon without the lock's descriptor, which it would otherwise
# hold (and so the lock) for as long as it runs.
daemon() { "$@" 9>&-; }

# background PIDFILE LOG CMD...: runs CMD (which stays in the foreground) as a daemon,
# recording its pid; for services that cannot daemonise themselves.
background() {
  local pidfile=$1 log=$2; shift 2
  setsid "$@" </dev/null >>"$log" 2>&1 9>&- &
  echo $! >"$pidfile"
}

# stop_pidfile PIDFILE: SIGTERM, then SIGKILL after 10 s, for a daemon we started.
stop_pidfile() {
  local pidfile=$1 pid
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do pid_alive "$pidfile" || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# write_if_changed FILE: writes stdin to FILE; status 0 when FILE changed (a service that
# reads it must restart), 1 when it already held exactly that.
write_if_changed() {
  local file=$1 new
  new=$(cat)
  if [ -f "$file" ] && [ "$(cat "$file")" = "$new" ]; then return 1; fi
  mkdir -p "$(dirname "$file")"
  printf '%s\n' "$new" >"$file"
}

# wsgi_start NAME PORT MODULE:ATTRIBUTE CONFIG_ENV...: a WSGI application under gunicorn on
# 127.0.0.1:PORT (gthread workers: a long request holds a thread, not the worker's
# heartbeat), loaded through stack.d/wsgi_app.py, with its pid in $STATE/run/NAME.pid and
# logs under $LOGS. CONFIG_ENV are VAR=value pairs the application reads its configuration
# location from. WSGI_WORKERS sets the number of worker processes (default 2); WSGI_TLS=1
# serves https with the stack's certificate (stack.d/tls.sh), gunicorn's own TLS, verifying a
# client certificate against the stack's CA when one is presented (`--cert-reqs 1`).
wsgi_start() {
  local name=$1 port=$2 module=$3; shift 3
  mkdir -p "$STATE/run"
  pid_alive "$STATE/run/$name.pid" && return 0
  local tls=()
  [ -n "${WSGI_TLS:-}" ] && tls=(--certfile "$STACK_CERT_FILE" --keyfile "$STACK_KEY_FILE"
    --ca-certs "$STACK_CA_FILE" --cert-reqs 1)
  env "$@" STACK_WSGI_APP="$module" "$OPENSTACK_VENV/bin/gunicorn" --daemon --pid "$STATE/run/$name.pid" \
    --bind "127.0.0.1:$port" "${tls[@]}" --workers "${WSGI_WORKERS:-2}" --worker-class gthread --threads 8 --timeout 300 \
    --error-logfile "$LOGS/$name-gunicorn.log" --access-logfile "$LOGS/$name-access.log" \
    --pythonpath "$(dirname "${BASH_SOURCE[0]}")" wsgi_app:application 9>&-
}

# https_healthy URL: answers with success over TLS, its certificate checked against the stack's CA.
https_healthy() { curl -fsS -m 5 --cacert "$STACK_CA_FILE" "$1" >/dev/null 2>&1; }

# http_up URL: something answers HTTP there (any status).
http_up() { curl -s -o /dev/null -m 5 "$1"; }

# mysql_url DB: the SQLAlchemy URL of database DB on the machine's MariaDB.
mysql_url() { echo "mysql+pymysql://root@127.0.0.1/$1?charset=utf8"; }
