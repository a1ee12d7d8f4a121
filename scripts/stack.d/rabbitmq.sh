# shellcheck shell=bash
# RabbitMQ: the machine runs it; `up` only starts it again if it stopped.

rabbitmq_healthy() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; }

rabbitmq_up() {
  rabbitmq_healthy && return 0
  say "rabbitmq down, starting it"
  daemon rabbitmq-server -detached
  wait_until 60 rabbitmq /var/log/rabbitmq rabbitmq_healthy
}


rabbitmq_status() { rabbitmq_healthy; }

# The machine's broker: left running.
rabbitmq_stop() { :; }
