"""Declares on a broker what a stock oslo.messaging RPC server, RPC client and notifier
declare, with the given [oslo_messaging_rabbit] options, then waits (so auto-delete queues
stay while the caller reads the broker back) until its standard input closes.

- an RPC server for Target(topic=--topic, server=--host) on --control-exchange;
- one call to it from an RPC client (its reply queue);
- one notification per --notification-topic at priority info, from a notifier whose
  control exchange is --notification-exchange.

Prints "ready" on stderr once everything is declared. Run with the peer venv's python.
"""
import argparse
import os
import sys
import tempfile

import oslo_messaging
from oslo_config import cfg
from oslo_messaging._metrics import client as metrics_client
from oslo_messaging._tracing import client as tracing_client


class Echo:
    target = oslo_messaging.Target(version="1.0")

    def echo(self, ctxt, value):
        return value


def conf_with(control_exchange, options):
    f = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    f.write(f"[DEFAULT]\ncontrol_exchange = {control_exchange}\n[oslo_messaging_rabbit]\n")
    for option in options:
        f.write(option.replace("=", " = ", 1) + "\n")
    f.close()
    conf = cfg.ConfigOpts()
    # oslo.messaging 18.3.1 registers its metrics and tracing options on the global CONF
    # only; a ConfigOpts of our own needs them too.
    conf.register_opts(metrics_client.oslo_messaging_metrics, group="oslo_messaging_metrics")
    conf.register_opts(tracing_client.oslo_messaging_tracing, group="oslo_messaging_tracing")
    conf(["--config-file", f.name])
    os.unlink(f.name)
    return conf


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--transport-url", required=True)
    p.add_argument("--control-exchange", default="nova")
    p.add_argument("--notification-exchange", default="nova_notifications")
    p.add_argument("--notification-topic", action="append", default=[])
    p.add_argument("--topic", default="compute")
    p.add_argument("--host", required=True)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an [oslo_messaging_rabbit] option; repeatable")
    args = p.parse_args()

    conf = conf_with(args.control_exchange, args.option)
    transport = oslo_messaging.get_rpc_transport(conf, url=args.transport_url)
    target = oslo_messaging.Target(topic=args.topic, server=args.host)
    server = oslo_messaging.get_rpc_server(transport, target, [Echo()], executor="threading")
    server.start()
    client = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=args.topic, server=args.host))
    assert client.call({}, "echo", value="hello") == "hello"

    notify_conf = conf_with(args.notification_exchange, args.option)
    notify_transport = oslo_messaging.get_notification_transport(notify_conf, url=args.transport_url)
    for topic in args.notification_topic:
        notifier = oslo_messaging.Notifier(notify_transport, publisher_id="peer", driver="messagingv2", topics=[topic])
        notifier.info({}, "peer.declared", {"topic": topic})

    print("ready", file=sys.stderr, flush=True)
    sys.stdin.read()
    server.stop()
    server.wait()


if __name__ == "__main__":
    main()
