# shellcheck shell=bash
# The stack's own certificate authority, the server certificate its TLS listeners share
# (RabbitMQ on 5671, Keystone and Glance on https) and a client certificate for clients to
# present (the listeners verify one when it is given): made once with openssl, kept with the
# state. The certificate names every way the tests reach the services: 127.0.0.1, ::1 and
# localhost. `scripts/stack env` gives the CA as STACK_CA_FILE. The CA also joins the
# system's CA store (as devstack's lib/tls installs its own), so clients that trust the
# system store without a CA file of their own (`ssl = true` alone, https without `cafile`)
# are tested too.

TLS_DIR=$STATE/tls
STACK_CA_FILE=$TLS_DIR/ca.pem
STACK_CERT_FILE=$TLS_DIR/server.pem
STACK_KEY_FILE=$TLS_DIR/server.key
STACK_CLIENT_CERT_FILE=$TLS_DIR/client.pem
STACK_CLIENT_KEY_FILE=$TLS_DIR/client.key
SYSTEM_CA_COPY=/usr/local/share/ca-certificates/novasnap-stack-ca.crt

tls_made() {
  [ -s "$STACK_CA_FILE" ] && [ -s "$STACK_KEY_FILE" ] &&
    openssl verify -CAfile "$STACK_CA_FILE" "$STACK_CERT_FILE" >/dev/null 2>&1
}

client_made() { openssl verify -CAfile "$STACK_CA_FILE" "$STACK_CLIENT_CERT_FILE" >/dev/null 2>&1; }

tls_healthy() { tls_made && client_made && cmp -s "$STACK_CA_FILE" "$SYSTEM_CA_COPY"; }

tls_up() {
  tls_made || tls_make
  client_made || tls_make_client
  if ! cmp -s "$STACK_CA_FILE" "$SYSTEM_CA_COPY"; then
    say "tls: adding the stack's CA to the system's CA store"
    install -m 644 "$STACK_CA_FILE" "$SYSTEM_CA_COPY"
    update-ca-certificates >>"$LOGS/tls.log" 2>&1 || die "tls: update-ca-certificates failed; see $LOGS/tls.log"
  fi
}

tls_make() {
  say "tls: making the stack's CA and server certificate"
  mkdir -p "$TLS_DIR"
  (
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=novasnap stack CA" \
      -keyout "$TLS_DIR/ca.key" -out "$STACK_CA_FILE" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$STACK_KEY_FILE" -out "$TLS_DIR/server.csr"
    openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$STACK_CA_FILE" -CAkey "$TLS_DIR/ca.key" \
      -CAcreateserial -days 3650 -out "$STACK_CERT_FILE" -extfile <(printf '%s\n' \
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" "extendedKeyUsage=serverAuth" \
        "basicConstraints=CA:FALSE")
  ) >>"$LOGS/tls.log" 2>&1 || die "tls: openssl failed; see $LOGS/tls.log"
  chmod 644 "$STACK_CA_FILE" "$STACK_CERT_FILE"
}

# A client certificate from the same CA (a certificate of its own, so the server's never
# changes: a changed one restarts RabbitMQ).
tls_make_client() {
  say "tls: making the stack's client certificate"
  (
    umask 077
    openssl req -newkey rsa:2048 -nodes -subj "/CN=novasnap stack client" -keyout "$STACK_CLIENT_KEY_FILE" \
      -out "$TLS_DIR/client.csr"
    openssl x509 -req -in "$TLS_DIR/client.csr" -CA "$STACK_CA_FILE" -CAkey "$TLS_DIR/ca.key" \
      -CAcreateserial -days 3650 -out "$STACK_CLIENT_CERT_FILE" -extfile <(printf '%s\n' \
        "extendedKeyUsage=clientAuth" "basicConstraints=CA:FALSE")
  ) >>"$LOGS/tls.log" 2>&1 || die "tls: openssl failed; see $LOGS/tls.log"
  chmod 644 "$STACK_CLIENT_CERT_FILE" "$STACK_CLIENT_KEY_FILE"
}

tls_status() { tls_healthy; }

# `down` removes the state, the CA with it: out of the system's store too.
tls_stop() {
  [ -f "$SYSTEM_CA_COPY" ] || return 0
  rm -f "$SYSTEM_CA_COPY"
  update-ca-certificates --fresh >>"$LOGS/tls.log" 2>&1 || true
}

tls_env() {
  echo "export STACK_CA_FILE=$STACK_CA_FILE"
  echo "export STACK_CLIENT_CERT_FILE=$STACK_CLIENT_CERT_FILE"
  echo "export STACK_CLIENT_KEY_FILE=$STACK_CLIENT_KEY_FILE"
}
