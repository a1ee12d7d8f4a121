"""A stock oslo.messaging notification listener: prints each notification it accepts as one
JSON line {"priority", "publisher_id", "event_type", "payload", "metadata"} on stdout.

Exits after `--until` event types have been seen for `--image` (or at `--timeout`, status 1).
Prints "ready" on stderr once its queues are bound, so a caller can start work then.
"""
import argparse
import json
import os
import sys
import threading
import time

import oslo_messaging
from oslo_config import cfg


class Printer:
    def __init__(self, image, until, done):
        self.image, self.until, self.done = image, set(until), done
        # One line at a time, should the executor ever run endpoints concurrently.
        self.lock = threading.Lock()

    def _emit(self, priority, ctxt, publisher_id, event_type, payload, metadata):
        line = json.dumps({"priority": priority, "publisher_id": publisher_id, "event_type": event_type,
                           "payload": payload, "metadata": metadata, "context": ctxt})
        with self.lock:
            print(line, flush=True)
        if event_type in self.until and (not self.image or self.image in json.dumps(payload)):
            self.done.set()
        return oslo_messaging.NotificationResult.HANDLED

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        return self._emit("INFO", ctxt, publisher_id, event_type, payload, metadata)

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        return self._emit("ERROR", ctxt, publisher_id, event_type, payload, metadata)


def exit_with_parent(parent):
    """A listener orphaned by a killed caller would go on taking a share of the queue's
    notifications from every later listener on it: it ends with its caller instead."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--transport-url", default="rabbit://guest:guest@127.0.0.1:5672/")
    p.add_argument("--exchange", default="nova_notifications")
    p.add_argument("--topics", default="versioned_notifications,notifications")
    p.add_argument("--pool", default=None, help="listener pool (its own queue), as a second subscriber would use")
    p.add_argument("--image", default="")
    p.add_argument("--until", default="instance.snapshot.end,instance.snapshot.error")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()

    conf = cfg.ConfigOpts()
    conf([])
    transport = oslo_messaging.get_notification_transport(conf, url=args.transport_url)
    targets = [oslo_messaging.Target(topic=t, exchange=args.exchange) for t in args.topics.split(",")]
    done = threading.Event()
    listener = oslo_messaging.get_notification_listener(
        transport, targets, [Printer(args.image, args.until.split(","), done)],
        executor="threading", pool=args.pool)
    # One worker thread: oslo's threading executor hands each message to a pool
    # (`executor_thread_pool_size`, 64 by default), whose threads may print two notifications
    # in the opposite order to the one they were published and delivered in. Subscribers and
    # tests compare that order (task_state transitions), so it is kept.
    listener.start(override_pool_size=1)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    print("ready", file=sys.stderr, flush=True)
    ok = done.wait(args.timeout)
    listener.stop()
    listener.wait()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
