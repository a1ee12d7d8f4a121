# shellcheck shell=bash
# RabbitMQ: the machine runs it (its config in /etc/rabbitmq). The stack adds listeners
# beside the machine's 127.0.0.1:5672: plain on [::1]:5672, TLS on 127.0.0.1:5671 and
# [::1]:5671 with the stack's certificate (stack.d/tls.sh), client certificates verified
# when given. A changed config restarts the broker once; otherwise `up` only starts it again
# if it stopped.

RABBITMQ_CONF=/etc/rabbitmq/rabbitmq.conf
# Where the broker (user rabbitmq) reads the stack's certificate from.
RABBITMQ_TLS_DIR=/etc/rabbitmq/novasnap-stack
RABBITMQ_BEGIN="# novasnap stack: begin"
RABBITMQ_END="# novasnap stack: end"

rabbitmq_healthy() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; }
rabbitmq_tls_healthy() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5671' 2>/dev/null; }

# The machine's own lines, then the stack's block.
write_rabbitmq_conf() {
  local machine
  machine=$(sed "/^$RABBITMQ_BEGIN\$/,/^$RABBITMQ_END\$/d" "$RABBITMQ_CONF" 2>/dev/null)
  write_if_changed "$RABBITMQ_CONF" <<EOC
$machine
$RABBITMQ_BEGIN
listeners.tcp.local6 = ::1:5672
listeners.ssl.local = 127.0.0.1:5671
listeners.ssl.local6 = ::1:5671
ssl_options.cacertfile = $RABBITMQ_TLS_DIR/ca.pem
ssl_options.certfile = $RABBITMQ_TLS_DIR/server.pem
ssl_options.keyfile = $RABBITMQ_TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
$RABBITMQ_END
EOC
}

rabbitmq_start() {
  daemon rabbitmq-server -detached
  wait_until 60 rabbitmq /var/log/rabbitmq rabbitmq_healthy
  rabbitmqctl -q await_startup >/dev/null
}

rabbitmq_up() {
  local changed=
  install -d -o rabbitmq -g rabbitmq -m 750 "$RABBITMQ_TLS_DIR"
  local f
  for f in ca.pem server.pem server.key; do
    if ! cmp -s "$TLS_DIR/$f" "$RABBITMQ_TLS_DIR/$f"; then
      install -o rabbitmq -g rabbitmq -m 640 "$TLS_DIR/$f" "$RABBITMQ_TLS_DIR/$f"
      changed=1
    fi
  done
  write_rabbitmq_conf && changed=1
  if ! rabbitmq_healthy; then
    say "rabbitmq down, starting it"
    rabbitmq_start
  elif [ -n "$changed" ]; then
    say "rabbitmq: its config or certificate changed, restarting it (clients reconnect)"
    rabbitmqctl -q stop >/dev/null
    rabbitmq_start
  fi
  wait_until 30 "rabbitmq's TLS listener" /var/log/rabbitmq rabbitmq_tls_healthy
}

rabbitmq_status() { rabbitmq_healthy && rabbitmq_tls_healthy; }

# The machine's broker: left running.
rabbitmq_stop() { :; }
