#!/usr/bin/python3
"""novasnap benchmarks, against the local cloud: prints tables and writes
bench/results/<date>.md plus an SVG chart of the snapshot-time table.

Run by scripts/bench (make bench). Debian's python3 (it has the rbd/rados modules); the oslo
peers run in the peer venv. Environment: the `scripts/stack env` variables, NOVASNAP_BIN
(the release binary), BENCH_RUNS (default 5), BENCH_SIZES (MiB, default "256,1024"),
BENCH_CASTS (dispatch casts, default 5000), BENCH_CALLS (forwarded RPC calls timed, default 500),
BENCH_NOVA_SIZES (root disks of the Nova-built server, MiB, default "1024,256"; 256 is the
image's own size), BENCH_HELD_SIZES (MiB, default "1024,4096"), BENCH_HELD_RUNS (default 3), BENCH_OWN_SIZES (MiB,
default "1024,4096"), BENCH_OWN_MIB (what the instance writes itself, default 64) and
BENCH_OWN_BASE_MIB (data its base image holds beyond the guest's disk, default 512),
BENCH_CONCURRENCY_ROUNDS (rounds of 1, 4 and 8 snapshots at once, default 3),
BENCH_ONLY (sections, comma-separated, default all: see SECTIONS), BENCH_OUT (the results
file, default bench/results/<date>.md: a partial or trial run can write elsewhere),
BENCH_WORKER_SET (options set in every worker's config, `section.option=value` separated by
spaces, e.g. "novasnap.concurrent_flattens=1"; named in the results).
Every wait is bounded; a peer that fails to start is reported with its output; a section
that fails is reported in the results and the others still run.
"""
import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid

import rados
import rbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = os.environ
RUNS = int(ENV.get("BENCH_RUNS", "5"))
SIZES = [int(s) for s in ENV.get("BENCH_SIZES", "256,1024").split(",")]
CASTS = int(ENV.get("BENCH_CASTS", "5000"))
CALLS = int(ENV.get("BENCH_CALLS", "500"))
NOVA_SIZES = [int(s) for s in ENV.get("BENCH_NOVA_SIZES", "1024,256").split(",")]
HELD_SIZES = [int(s) for s in ENV.get("BENCH_HELD_SIZES", "1024,4096").split(",")]
HELD_RUNS = int(ENV.get("BENCH_HELD_RUNS", "3"))
OWN_SIZES = [int(s) for s in ENV.get("BENCH_OWN_SIZES", "1024,4096").split(",")]
OWN_MIB = int(ENV.get("BENCH_OWN_MIB", "64"))
OWN_BASE_MIB = int(ENV.get("BENCH_OWN_BASE_MIB", "512"))
CONCURRENCY_ROUNDS = int(ENV.get("BENCH_CONCURRENCY_ROUNDS", "3"))
SECTIONS = ("snapshot", "concurrency", "dispatch", "forwarding", "memory", "nova", "own", "held")
ONLY = [s for s in ENV.get("BENCH_ONLY", "").split(",") if s] or list(SECTIONS)


def worker_settings(spec):
    """BENCH_WORKER_SET's `section.option=value` items as (section, option, value)."""
    settings = []
    for item in spec.split():
        m = re.fullmatch(r"([^.=]+)\.([^=]+)=(.*)", item)
        if not m:
            sys.exit(f"BENCH_WORKER_SET: {item!r} is not section.option=value")
        settings.append(m.groups())
    return settings


WORKER_SET = worker_settings(ENV.get("BENCH_WORKER_SET", ""))
PEER = ENV["NOVASNAP_PEER_PYTHON"]
GLANCE = ENV["GLANCE_URL"]
CEPH_CONF = ENV["CEPH_CONF"]
BIN = ENV["NOVASNAP_BIN"]
HOST = "bench-" + uuid.uuid4().hex[:6]
EXCHANGE = "novasnap-bench-" + uuid.uuid4().hex[:6]
MiB = 1 << 20
NOVA_COMPUTE_LOG = os.path.join(ENV["NOVASNAP_STACK_STATE"], "logs", "nova-compute.log")

cluster = rados.Rados(conffile=CEPH_CONF)
cluster.connect()
vms, images = cluster.open_ioctx("vms"), cluster.open_ioctx("images")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*cmd, timeout=600, **kw):
    """A command's output; it failing or outliving `timeout` fails the caller, with its stderr."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw).stdout
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {e.returncode}:\n{e.stderr[-2000:]}") from None


def attempt(*cmd, timeout=120):
    """A command whose failure is no one's concern (cleanup that may find nothing to clean);
    bounded all the same."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{' '.join(map(str, cmd))}: no answer within {timeout}s")
        return None


_tokens = {}


def token(admin):
    """A Keystone token of the stack's admin or demo user, renewed after 30 minutes (a bench
    run outlasts a token's hour)."""
    issued = _tokens.get(admin)
    if issued is None or time.monotonic() - issued[1] > 1800:
        who = ["--os-username", "admin", "--os-project-name", "admin", "--os-password",
               ENV["OS_ADMIN_PASSWORD"]] if admin else []
        value = sh(ENV["OPENSTACK"], *who, "token", "issue", "-f", "value", "-c", "id",
                   env=dict(ENV, PYTHONWARNINGS="ignore")).strip()
        _tokens[admin] = issued = (value, time.monotonic())
    return issued[0]


def api(url, method="GET", body=None, headers=None, admin=True, timeout=120):
    """An OpenStack API's JSON answer, with a token of the admin or the demo user; an error
    status fails the caller with the status and the start of the body."""
    data = json.dumps(body).encode() if body is not None else None
    headers = dict(headers or {}, **({"Content-Type": "application/json"} if body is not None else {}))
    headers["X-Auth-Token"] = token(admin)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:500]!r}") from None
    return json.loads(raw) if raw else None


def glance(method, path, body=None):
    return api(GLANCE + path, method, body, timeout=600)


# Images the bench asked for, until deleted: whatever ends a section (SIGTERM included), the
# run deletes what is left of them.
MADE_IMAGES = set()


def glance_delete(image_id, limit=120):
    """Deletes an image the bench made, again while Glance refuses: Glance 33 answers 500 to
    a delete that comes while its location import still hashes the image (seen right after
    novasnap's end notification), and an image left behind keeps its copy in the shared
    cluster's RAM. One that stays is logged; the results list what is left in the pool."""
    deadline = time.monotonic() + limit
    while True:
        try:
            glance("DELETE", f"/v2/images/{image_id}")
            MADE_IMAGES.discard(image_id)
            return
        except Exception as e:
            if ": 404 " in str(e):
                MADE_IMAGES.discard(image_id)
                return
            if time.monotonic() > deadline:
                log(f"image {image_id} still not deleted after {limit}s: {e}")
                return
            time.sleep(2)


def room(need_mib, what):
    """Fails a section before it would fill the shared cluster: its memstore OSD keeps data in
    RAM, and once full every client of the stack (tests included) is blocked. What the
    section writes at most must fit under Ceph's nearfull ratio."""
    df = json.loads(sh("ceph", "df", "--format", "json", timeout=60))["stats"]
    nearfull = json.loads(sh("ceph", "osd", "dump", "--format", "json", timeout=60))["nearfull_ratio"]
    free = (nearfull * df["total_bytes"] - df["total_used_raw_bytes"]) / MiB
    if need_mib > free:
        raise RuntimeError(f"{what} writes up to {need_mib} MiB, and the cluster has {free:.0f} MiB left under its "
                           f"nearfull ratio ({nearfull}): not run, so as not to fill the shared cluster")


def nova(method, path, body=None, admin=False, version="2.51"):
    """Nova's API at `version`, as the demo user (the servers' owner) or the admin. The
    bench talks to the API itself rather than through the command line client, which costs
    seconds a call: a snapshot is timed from its request."""
    return api(ENV["NOVA_URL"] + path, method, body, {"OpenStack-API-Version": f"compute {version}"}, admin)


def placement(method, path, body=None):
    """Placement's API as the admin, found in Keystone's catalog (the stack's environment
    does not name it)."""
    url = next(e["url"] for s in api(ENV["OS_AUTH_URL"] + "/auth/catalog")["catalog"] if s["type"] == "placement"
               for e in s["endpoints"] if e["interface"] == "public")
    return api(url + path, method, body, {"OpenStack-API-Version": "placement 1.26"})


def stats(xs):
    return statistics.median(xs), min(xs), max(xs)


# ---------------------------------------------------------------- guests


class Guest:
    """A libvirt guest whose disk vms/<uuid>_disk is a fully written clone of a base."""

    def __init__(self, size_mib):
        self.uuid = str(uuid.uuid4())
        self.name = "instance-b" + self.uuid[:7]
        self.disk = f"{self.uuid}_disk"
        self.base = "bench-base-" + self.uuid[:8]
        rbd.RBD().create(images, self.base, MiB, old_format=False, features=1)
        with rbd.Image(images, self.base) as b:
            b.create_snap("snap")
            b.protect_snap("snap")
        rbd.RBD().clone(images, self.base, "snap", vms, self.disk, features=1)
        with rbd.Image(vms, self.disk) as d:
            d.resize(size_mib * MiB)
            chunk = os.urandom(4 * MiB)
            for off in range(0, size_mib * MiB, 4 * MiB):
                d.write(chunk, off)
        xml = f"""<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid>
<memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>
<disk type='network' device='disk'><driver name='qemu' type='raw' cache='writeback'/>
<source protocol='rbd' name='vms/{self.disk}'><host name='127.0.0.1' port='6789'/></source>
<target dev='vda' bus='virtio'/></disk></devices></domain>"""
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
            f.write(xml)
            f.flush()
            sh("virsh", "-c", "qemu:///system", "define", f.name)
        sh("virsh", "-c", "qemu:///system", "start", self.name)

    def destroy(self):
        for args in (["destroy", self.name], ["undefine", "--managed-save", self.name]):
            attempt("virsh", "-c", "qemu:///system", *args)
        for ioctx, name in ((vms, self.disk), (images, self.base)):
            try:
                with rbd.Image(ioctx, name) as img:
                    for s in list(img.list_snaps()):
                        if img.is_protected_snap(s["name"]):
                            img.unprotect_snap(s["name"])
                        img.remove_snap(s["name"])
            except rbd.ImageNotFound:
                continue
            except rbd.ImageBusy:
                pass
            rbd.RBD().remove(ioctx, name)


# ---------------------------------------------------------------- worker and peers


def ini_set(text, section, key, value):
    """The INI `text` with `[section] key = value` set (replaced, or added to the section)."""
    lines, out, in_section, done = text.splitlines(), [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            if in_section and not done:
                out.append(f"{key} = {value}")
                done = True
            in_section = stripped == f"[{section}]"
        elif in_section and stripped.split("=")[0].strip() == key:
            if not done:
                out.append(f"{key} = {value}")
                done = True
            continue
        out.append(line)
    if not done:
        if not in_section:
            out.append(f"[{section}]")
        out.append(f"{key} = {value}")
    return "\n".join(out) + "\n"


def relay_consumers(host):
    """The consumer tags of novasnap relays on compute.<host>, whoever started them."""
    out = sh("rabbitmqctl", "-q", "list_consumers", "consumer_tag", timeout=60)
    return {t for t in out.split() if t.startswith(f"novasnap-relay-{host}-")}


class Worker:
    """novasnap from the stack's nova-cpu.conf. On a host of the bench's own it serves the
    whole host and tells Nova nothing (the bench's guests are not Nova's); `relay=True` puts
    it in front of an oslo server standing for nova-compute instead. `beside_nova=True` is
    novasnap as an operator runs it beside the stack's own nova-compute (as the tests'
    `TestConfig::beside_nova`): the file unchanged but for a notification exchange of the
    bench's own (and `image_layout`, Nova's `flattened` unless asked), so Nova's record
    follows every step (its task_state none at the end lets the next snapshot through)."""

    def __init__(self, direct=True, concurrency=8, log_level="info", host=HOST, relay=False, beside_nova=False,
                 image_layout="flattened"):
        self.dir = tempfile.mkdtemp(prefix="novasnap-bench-")
        conf = open(ENV["NOVA_CONF"]).read()
        settings = [("novasnap", "notification_exchange", EXCHANGE), ("novasnap", "image_layout", image_layout)]
        if beside_nova:
            host = ENV["NOVASNAP_HOST"]
        else:
            settings += [
                ("DEFAULT", "host", host), ("novasnap", "max_concurrent_snapshots", concurrency),
                ("novasnap", "direct_snapshot", "true" if direct else "false"),
                ("novasnap", "reclaim_interval", 86400), ("novasnap", "dead_letter_exchange", f"{EXCHANGE}-dlq"),
                ("novasnap", "dead_letter_queue", f"{EXCHANGE}-dlq"),
                ("novasnap", "serve_whole_host", "false" if relay else "true"),
                ("novasnap", "nova_writeback", "false")]
        for section, key, value in settings + WORKER_SET:
            conf = ini_set(conf, section, key, value)
        self.conf = os.path.join(self.dir, "novasnap.conf")
        open(self.conf, "w").write(conf)
        self.log = os.path.join(self.dir, "worker.log")
        # This one is ready when a relay appears that was not there before (another novasnap
        # may be in front of the same queue: a test's, beside nova-compute).
        before = relay_consumers(host)
        # Logs go to stdout (no log file in the config, as oslo.log does), panics to stderr.
        self.proc = subprocess.Popen([BIN, "serve", "--config-file", self.conf], stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT,
                                     env=dict(ENV, NOVASNAP_LOG=log_level))
        deadline = time.time() + 60
        while not relay_consumers(host) - before:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("worker did not start:\n" + self.stop()[-4000:])
            time.sleep(0.2)

    def hwm_kib(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    def rollup_kib(self):
        """/proc/<pid>/smaps_rollup's figures (KiB) by name: Rss, Pss, Anonymous, ..."""
        rollup = {}
        for line in open(f"/proc/{self.proc.pid}/smaps_rollup"):
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                rollup[name] = int(value.split()[0])
        return rollup

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """SIGTERM (snapshots in flight finish or go back to the broker), SIGKILL after 180 s;
        returns the worker's log. Once stopped, the same log again."""
        if self.proc.returncode is not None and not os.path.exists(self.dir):
            return self.text
        self.proc.terminate()
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            log("worker did not stop within 180 s of SIGTERM: killed")
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.text = open(self.log).read()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.text


def await_ready(proc, stream, what, other=None, limit=60):
    """Waits, at most `limit` s, for `proc` to print "ready" on `stream`. Threads go on
    draining `stream` and `other` (a child blocked on a full pipe would stall the bench);
    one that does not get ready is killed and reported with what it printed."""
    ready, tail = threading.Event(), collections.deque(maxlen=100)

    def drain(pipe, watch):
        for line in pipe:
            if watch and not ready.is_set() and line.strip() == "ready":
                ready.set()
            else:
                tail.append(line)

    readers = [threading.Thread(target=drain, args=(stream, True), daemon=True)]
    if other is not None:
        readers.append(threading.Thread(target=drain, args=(other, False), daemon=True))
    for r in readers:
        r.start()
    deadline = time.monotonic() + limit
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            for r in readers:
                r.join(timeout=5)
            raise RuntimeError(f"{what} did not start within {limit}s (exit status {proc.returncode}):\n"
                               + "".join(tail)[-3000:])


class Listener:
    """The stock oslo listener; records when each image's end notification arrives, and the
    hold times novasnap's legacy `compute.instance.snapshot.end` carries."""

    def __init__(self):
        self.ends, self.held, self.cond = {}, {}, threading.Condition()
        self.proc = subprocess.Popen(
            [PEER, os.path.join(ROOT, "tests/peer/listen.py"), "--exchange", EXCHANGE, "--pool", EXCHANGE,
             "--until", "-", "--timeout", "7200"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(ENV, PYTHONWARNINGS="ignore"))
        await_ready(self.proc, self.proc.stderr, "the oslo notification listener")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            n = json.loads(line)
            if n["event_type"] in ("instance.snapshot.end", "instance.snapshot.error"):
                image = n["payload"]["nova_object.data"]["snapshot_image_id"]
                with self.cond:
                    self.ends[image] = (time.monotonic(), n["event_type"])
                    self.cond.notify_all()
            elif n["event_type"] == "compute.instance.snapshot.end":
                p = n["payload"]
                with self.cond:
                    self.held[p["snapshot_image_id"]] = (p.get("frozen_ms"), p.get("suspended_ms"))
                    self.cond.notify_all()

    def wait(self, image, timeout=1800):
        with self.cond:
            if not self.cond.wait_for(lambda: image in self.ends, timeout):
                raise RuntimeError(f"no end for {image}")
            at, kind = self.ends[image]
        if kind != "instance.snapshot.end":
            raise RuntimeError(f"snapshot of {image} failed")
        return at

    def held_ms(self, image, timeout=60):
        """(frozen_ms, suspended_ms) of novasnap's end notification for `image`."""
        with self.cond:
            if not self.cond.wait_for(lambda: image in self.held, timeout):
                raise RuntimeError(f"no compute.instance.snapshot.end for {image}")
            return self.held[image]

    def stop(self):
        self.proc.kill()
        # The pool's queue outlives its listener in oslo's rabbit driver.
        attempt("rabbitmqctl", "-q", "delete_queue", EXCHANGE)


def cast(guest):
    """nova-api's part (nova's ComputeAPI); returns (image id, monotonic time the cast left)."""
    out = json.loads(nova_api(guest))
    MADE_IMAGES.add(out["image_id"])
    return out["image_id"], time.monotonic()


def cast_all(guests):
    """One nova-api casting a snapshot of each guest, one right after the other; returns
    [(image id, monotonic time its cast left)] (the peer's clock is the same CLOCK_MONOTONIC)."""
    out = json.loads(nova_api(*guests))
    MADE_IMAGES.update(out["image_ids"])
    return list(zip(out["image_ids"], out["cast_at"]))


def nova_api(*guests):
    return sh(PEER, os.path.join(ROOT, "tests/peer/nova_api.py"), "snapshot",
              *[a for g in guests for a in ("--instance", g.uuid)], "--host", HOST, "--image-ref", "",
              "--glance", GLANCE, "--name", "bench", "--token", token(admin=False),
              env=dict(ENV, PYTHONWARNINGS="ignore"))


def novasnap_snapshot(guest, listener):
    image, t0 = cast(guest)
    t = listener.wait(image) - t0
    glance_delete(image)
    return t


# ---------------------------------------------------------------- baselines


def liberty(guest):
    """Nova's Liberty path with stock tools: qemu-img convert to a file, upload the file."""
    path = f"/var/tmp/novasnap-bench-{guest.uuid}.raw"
    t0 = time.monotonic()
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", f"rbd:vms/{guest.disk}:conf={CEPH_CONF}", path)
    image = glance("POST", "/v2/images", {"name": "bench-liberty", "disk_format": "raw", "container_format": "bare"})["id"]
    MADE_IMAGES.add(image)
    sh("curl", "-sf", "-T", path, "-X", "PUT", "-H", "Content-Type: application/octet-stream",
       "-H", f"X-Auth-Token: {token(admin=True)}", f"{GLANCE}/v2/images/{image}/file")
    t = time.monotonic() - t0
    os.unlink(path)
    glance_delete(image)
    return t


def librbd_floor(guest):
    """The direct path's librbd sequence in one process: the floor novasnap cannot beat."""
    copy, snap = "bench-floor-" + uuid.uuid4().hex[:8], "floor"
    t0 = time.monotonic()
    with rbd.Image(vms, guest.disk) as d:
        d.create_snap(snap)
        d.protect_snap(snap)
    rbd.RBD().clone(vms, guest.disk, snap, images, copy, features=1)
    with rbd.Image(images, copy) as c:
        c.flatten()
    with rbd.Image(vms, guest.disk) as d:
        d.unprotect_snap(snap)
        d.remove_snap(snap)
    with rbd.Image(images, copy) as c:
        c.create_snap("snap")
        c.protect_snap("snap")
    t = time.monotonic() - t0
    with rbd.Image(images, copy) as c:
        c.unprotect_snap("snap")
        c.remove_snap("snap")
    rbd.RBD().remove(images, copy)
    return t


# ---------------------------------------------------------------- measurements


def snapshot_times(listener):
    rows = []
    # A disk, novasnap's or the floor's copy, and Liberty's upload, one size at a time.
    room(3 * max(SIZES), "the snapshot-time section")
    for size in SIZES:
        guest = Guest(size)
        try:
            results = {}
            for label, direct in (("novasnap direct", True), ("novasnap standard", False)):
                with Worker(direct=direct):
                    results[label] = [novasnap_snapshot(guest, listener) for _ in range(RUNS)]
                log(f"{size} MiB {label}: {results[label]}")
            results["Liberty: qemu-img convert + upload"] = [liberty(guest) for _ in range(RUNS)]
            results["bare librbd sequence (floor)"] = [librbd_floor(guest) for _ in range(RUNS)]
            log(f"{size} MiB baselines: {results}")
            rows.append((size, results))
        finally:
            guest.destroy()
    return rows


def concurrency(listener):
    """CONCURRENCY_ROUNDS rounds of 1, 4 and 8 snapshots at once (each round all three, so
    a drift of the machine touches each alike): per n, the totals, per-snapshot p50s and p99s
    of the rounds and the count of failures; and the worker's peak RSS."""
    room(8 * 256 * 2, "the concurrency section (8 disks and 8 copies)")
    guests, worker, peak = [], None, 0
    # Per n: the rounds' totals, p50s and p99s, and every failure.
    measured = {n: ([], [], [], []) for n in (1, 4, 8)}
    try:
        for _ in range(8):
            guests.append(Guest(256))
        worker = Worker(direct=True, concurrency=8)
        for _ in range(CONCURRENCY_ROUNDS):
            for n in (1, 4, 8):
                times, failures, ends = [], [], []
                casts = cast_all(guests[:n])
                for image, t0 in casts:
                    try:
                        ends.append(listener.wait(image))
                        times.append(ends[-1] - t0)
                    except RuntimeError as e:
                        # Reported in the table: a failed snapshot is not left out silently.
                        failures.append(str(e))
                for image, _ in casts:
                    glance_delete(image)
                totals, p50s, p99s, failed = measured[n]
                failed += failures
                if times:
                    # The cloud's time for the n snapshots: the first cast out to the last end.
                    totals.append(max(ends) - casts[0][1])
                    p50s.append(statistics.median(times))
                    p99s.append(percentile(times, 0.99))
                peak = max(peak, worker.hwm_kib())
                log(f"concurrency {n}: {times} failed {failures}")
    finally:
        if worker:
            worker.stop()
        for g in guests:
            g.destroy()
    return [(n, totals, p50s, p99s, len(failed)) for n, (totals, p50s, p99s, failed) in measured.items()], peak


def preload(method, exchange, routing_key, n):
    """Publishes n casts of `method` with oslo's RPCClient (to the queue, before anyone consumes)."""
    code = f"""
import oslo_messaging, warnings
from oslo_config import cfg
warnings.filterwarnings('ignore')
# oslo.messaging 18.3 registers its tracing options on cfg.CONF only.
conf = cfg.CONF; conf([])
t = oslo_messaging.get_rpc_transport(conf, url={ENV['TRANSPORT_URL']!r})
c = oslo_messaging.get_rpc_client(t, oslo_messaging.Target(topic='compute', server={routing_key!r}, exchange={exchange!r}, version='6.0'))
for i in range({n}):
    c.cast({{}}, {method!r}, x=i)
"""
    r = subprocess.run([PEER, "-c", code], capture_output=True, text=True, env=dict(ENV, PYTHONWARNINGS="ignore"),
                       timeout=600)
    if r.returncode:
        raise RuntimeError(f"preloading {n} casts failed:\n{r.stderr[-2000:]}")


def queue_depth(queue):
    for line in sh("rabbitmqctl", "-q", "list_queues", "name", "messages").splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    return 0


def drain_time(queues, start_consumer, limit=600):
    """Seconds from starting the consumer until `queues` are all empty (bounded by `limit`)."""
    t0 = time.monotonic()
    proc = start_consumer()
    while any(queue_depth(q) > 0 for q in queues):
        if time.monotonic() - t0 > limit:
            getattr(proc, "stop", proc.kill)()
            raise RuntimeError(f"{queues} not drained within {limit}s")
        time.sleep(0.05)
    return time.monotonic() - t0, proc


def dispatch_throughput():
    # novasnap: casts of a method it does not serve, i.e. its reject fast path (dead-letter).
    queue = f"compute.{HOST}"
    Worker().stop()  # declares the queues
    preload("reboot_instance", "nova", HOST, CASTS)
    t_nova, worker = drain_time([queue], lambda: Worker())
    worker.stop()
    attempt("rabbitmqctl", "delete_queue", f"{EXCHANGE}-dlq")
    # A stock oslo RPC server with a no-op endpoint, threading executor, 64 threads.
    server_host = HOST + "-oslo"
    code = f"""
import oslo_messaging, sys, time, warnings
from oslo_config import cfg
warnings.filterwarnings('ignore')
# oslo.messaging 18.3 registers its tracing options on cfg.CONF only.
conf = cfg.CONF; conf([])
t = oslo_messaging.get_rpc_transport(conf, url={ENV['TRANSPORT_URL']!r})
class E:
    target = oslo_messaging.Target(version='6.0')
    def noop(self, ctxt, **kw): pass
s = oslo_messaging.get_rpc_server(t, oslo_messaging.Target(topic='compute', server={server_host!r}, exchange='nova'), [E()], executor='threading')
s.start(); print('ready', flush=True)
time.sleep(3600)
"""
    oslo = start_peer(code)
    oslo.kill()
    oslo.wait()
    preload("noop", "nova", server_host, CASTS)

    def start_oslo():
        return start_peer(code)

    t_oslo, oslo = drain_time([f"compute.{server_host}"], start_oslo)
    oslo.kill()
    for q in (queue, f"compute.{server_host}"):
        attempt("rabbitmqctl", "delete_queue", q)
    return CASTS / t_nova, CASTS / t_oslo


def start_peer(code, limit=60):
    """A peer process (the peer venv's python running `code`), once it prints "ready"; one
    that does not within `limit` is reported with what it printed."""
    p = subprocess.Popen([PEER, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(ENV, PYTHONWARNINGS="ignore"))
    await_ready(p, p.stdout, "peer", other=p.stderr, limit=limit)
    return p


# nova-compute ≥ 33 as the broker sees it: RPC servers on `compute` and `compute-alt` for one
# host, with oslo.messaging's defaults (threading executor) and no-op endpoints.
NOVA_COMPUTE = """
import oslo_messaging, time, warnings
from oslo_config import cfg
warnings.filterwarnings('ignore')
conf = cfg.CONF; conf([])
t = oslo_messaging.get_rpc_transport(conf, url={url!r})
class E:
    target = oslo_messaging.Target(version='6.0')
    def noop(self, ctxt, **kw): pass
    def echo(self, ctxt, value): return value
servers = [oslo_messaging.get_rpc_server(t, oslo_messaging.Target(topic=topic, server={host!r}, exchange='nova'), [E()],
                                         executor='threading') for topic in {topics!r}]
for s in servers: s.start()
print('ready', flush=True)
time.sleep(3600)
"""

# An RPC client's calls, one after the other, each timed (a warm-up call first).
CALLER = """
import json, oslo_messaging, time, warnings
from oslo_config import cfg
warnings.filterwarnings('ignore')
conf = cfg.CONF; conf([])
t = oslo_messaging.get_rpc_transport(conf, url={url!r})
c = oslo_messaging.get_rpc_client(t, oslo_messaging.Target(topic='compute', server={host!r}, exchange='nova', version='6.0'))
c.prepare(timeout=30).call({{}}, 'echo', value=-1)
times = []
for i in range({n}):
    t0 = time.perf_counter()
    c.prepare(timeout=30).call({{}}, 'echo', value=i)
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def forwarding():
    """What novasnap in front of nova-compute costs what it forwards: the latency a call
    gains (p50/p99, the same calls against nova-compute alone), and forwards per second."""
    host = HOST + "-fwd"
    url = ENV["TRANSPORT_URL"]

    def calls():
        r = subprocess.run([PEER, "-c", CALLER.format(url=url, host=host, n=CALLS)], capture_output=True, text=True,
                           env=dict(ENV, PYTHONWARNINGS="ignore"), timeout=600)
        if r.returncode:
            raise RuntimeError(f"RPC calls failed:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout)

    stand_in = start_peer(NOVA_COMPUTE.format(url=url, host=host, topics=("compute", "compute-alt")))
    try:
        alone = calls()
        with Worker(host=host, relay=True):
            through = calls()
    finally:
        stand_in.kill()
        stand_in.wait()
    # Forwards per second: casts pre-loaded on compute.<host>, drained by novasnap into
    # compute-alt.<host>, which the stand-in for nova-compute drains in turn.
    preload("noop", "nova", host, CASTS)
    stand_in = start_peer(NOVA_COMPUTE.format(url=url, host=host, topics=("compute-alt",)))
    try:
        t, worker = drain_time([f"compute.{host}", f"compute-alt.{host}"], lambda: Worker(host=host, relay=True))
        worker.stop()
    finally:
        stand_in.kill()
    for q in (f"compute.{host}", f"compute-alt.{host}"):
        attempt("rabbitmqctl", "delete_queue", q)
    ms = lambda xs, q: 1000 * percentile(xs, q)
    return (ms(alone, 0.5), ms(alone, 0.99), ms(through, 0.5), ms(through, 0.99)), CASTS / t


def memory_and_breakdown(listener):
    room(2 * 1024, "the memory section")
    guest = Guest(1024)
    try:
        with Worker(direct=True, log_level="info,novasnap::pipeline=debug") as worker:
            time.sleep(2)
            idle = worker.rollup_kib()
            novasnap_snapshot(guest, listener)
        steps = {}
        for m in re.finditer(r'step finished step=([^=]+?) elapsed_ms=(\d+)', worker.text):
            steps[m.group(1).strip().strip('"')] = steps.get(m.group(1).strip().strip('"'), 0) + int(m.group(2))
        with Worker(direct=False) as worker:
            novasnap_snapshot(guest, listener)
            streamed = worker.hwm_kib()
        return idle, streamed, steps
    finally:
        guest.destroy()


# ---------------------------------------------------------------- Nova's servers


class NovaServer:
    """A server Nova builds for the bench as the stack builds its own (API microversion 2.37,
    no network, the stack's raw image, whose disk Nova clones) with a root disk of `size_mib`:
    a flavor of the bench's own with that disk, which Nova grows the clone to. 256 MiB is the
    image's own size: a flavor with no disk, which Nova's policy lets only an admin boot, so
    that server is the admin's. `image`: another Glance image to boot from (one that
    `large_base` made). The constructor only asks Nova (servers build side by side);
    `ready` waits for the guest's agent. `delete` removes server and flavor, whatever state
    they are in."""

    def __init__(self, size_mib, image=None):
        self.size_mib, self.admin = size_mib, size_mib < 1024
        self.id = self.flavor = None
        name = "novasnap-bench-" + uuid.uuid4().hex[:8]
        gib = size_mib // 1024 if not self.admin else 0
        self.flavor = nova("POST", "/flavors", {"flavor": {
            "name": name, "ram": 256, "vcpus": 1, "disk": gib, "os-flavor-access:is_public": True}},
            admin=True)["flavor"]["id"]
        try:
            self.id = nova("POST", "/servers", {"server": {
                "name": name, "imageRef": image or ENV["SERVER1_IMAGE"], "flavorRef": self.flavor,
                "networks": "none"}},
                admin=self.admin, version="2.37")["server"]["id"]
        except Exception:
            self.delete()
            raise
        self.disk = f"{self.id}_disk"

    def show(self):
        return nova("GET", f"/servers/{self.id}", admin=True)["server"]

    def ready(self, limit=600):
        """ACTIVE with its guest agent answering (what a snapshot that quiesces needs)."""
        deadline = time.monotonic() + limit
        while (server := self.show())["status"] != "ACTIVE":
            if server["status"] == "ERROR" or time.monotonic() > deadline:
                raise RuntimeError(f"server {self.id} is {server['status']}: {server.get('fault')}")
            time.sleep(2)
        self.domain = server["OS-EXT-SRV-ATTR:instance_name"]
        while attempt("virsh", "-c", "qemu:///system", "qemu-agent-command", self.domain,
                      '{"execute":"guest-ping"}', timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest agent of {self.domain} did not answer within {limit}s")
            time.sleep(2)
        return self

    def fill(self, mib=None):
        """Random data over the disk beyond the guest's filesystem (the image's size: the
        guest never grows it), so that the disk is fully written like the bench's other guests
        without breaking the filesystem the guest writes to; only the first `mib` MiB of that
        if given. QEMU holds the disk's exclusive lock; librbd hands it over for these writes
        and QEMU takes it back."""
        start = glance("GET", f"/v2/images/{ENV['SERVER1_IMAGE']}")["size"]
        chunk = os.urandom(8 * MiB)
        with rbd.Image(vms, self.disk) as d:
            end = d.size() if mib is None else min(d.size(), start + mib * MiB)
            for off in range(start, end, len(chunk)):
                d.write(chunk[:end - off], off)

    def wait_idle(self, limit=600):
        """Nova refuses a snapshot while another task runs: waits for task_state none."""
        deadline = time.monotonic() + limit
        while (server := self.show())["OS-EXT-STS:task_state"] is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.id} still {server['OS-EXT-STS:task_state']} after {limit}s")
            time.sleep(0.5)

    def delete(self, limit=300):
        if self.id:
            try:
                nova("DELETE", f"/servers/{self.id}", admin=True)
                deadline = time.monotonic() + limit
                while time.monotonic() < deadline:
                    self.show()
                    time.sleep(1)
                log(f"server {self.id} not gone {limit}s after its delete")
            except RuntimeError as e:
                if ": 404 " not in str(e):
                    log(f"deleting server {self.id}: {e}")
        if self.flavor:
            try:
                nova("DELETE", f"/flavors/{self.flavor}", admin=True)
            except RuntimeError as e:
                log(f"deleting flavor {self.flavor}: {e}")


@contextlib.contextmanager
def disk_overcommit(ratio):
    """Placement lets the root disks on the compute host add up to `ratio` × its Ceph
    cluster's size while the block runs, and back however it ends. Nova counts each root
    disk's whole size; the stack's memstore OSD is 6 GiB, which a 4 GiB disk beside the
    stack's own servers exceeds, though thin disks store only what is written.
    nova-compute keeps a ratio set in Placement (its file sets no disk_allocation_ratio)."""
    provider = next(p["uuid"] for p in placement("GET", "/resource_providers")["resource_providers"]
                    if "DISK_GB" in placement("GET", f"/resource_providers/{p['uuid']}/inventories")["inventories"])

    def set_ratio(value):
        for _ in range(10):  # nova-compute may update the provider in between: its generation moves
            inv = placement("GET", f"/resource_providers/{provider}/inventories/DISK_GB")
            old = inv["allocation_ratio"]
            inv["allocation_ratio"] = value
            try:
                placement("PUT", f"/resource_providers/{provider}/inventories/DISK_GB", inv)
                return old
            except RuntimeError as e:
                if ": 409 " not in str(e):
                    raise
        raise RuntimeError(f"Placement kept refusing DISK_GB's allocation ratio {value}")

    before = set_ratio(ratio)
    try:
        yield
    finally:
        set_ratio(before)


@contextlib.contextmanager
def nova_servers(sizes, fill=False, image=None):
    """Servers of `sizes` MiB built side by side, deleted however the block ends."""
    servers = []
    try:
        for size in sizes:
            servers.append(NovaServer(size, image))
        for server in servers:
            server.ready()
            if fill:
                server.fill()
        yield servers
    finally:
        for server in servers:
            server.delete()


Snap = collections.namedtuple("Snap", "image active_s end_s made_by held used_mib provisioned_mib")


def nova_snapshot(server, listener=None, timeout=1800):
    """What `openstack server image create --wait` does, timed from its API request to the
    image active (and, with `listener`, to novasnap's `instance.snapshot.end`); whoever
    serves the host makes it. The image stays: the caller looks at it, then deletes it."""
    server.wait_idle()
    t0 = time.monotonic()
    image = nova("POST", f"/servers/{server.id}/action", {"createImage": {"name": "novasnap-bench"}},
                 admin=server.admin, version="2.45")["image_id"]
    MADE_IMAGES.add(image)
    deadline = t0 + timeout
    while (shown := glance("GET", f"/v2/images/{image}"))["status"] != "active":
        if shown["status"] in ("killed", "deleted") or time.monotonic() > deadline:
            glance_delete(image)
            raise RuntimeError(f"image {image} of server {server.id} is {shown['status']}")
        time.sleep(0.2)
    active = time.monotonic() - t0
    made_by = "novasnap" if shown.get("novasnap_made_by") else "nova-compute"
    end = held = None
    if listener is not None and made_by == "novasnap":
        end = listener.wait(image, timeout=max(1, deadline - time.monotonic())) - t0
        held = listener.held_ms(image)
    used, provisioned = pool_bytes(image)
    return Snap(image, active, end, made_by, held, used / MiB, provisioned / MiB)


def nova_snapshots(server, who, listener):
    """RUNS snapshots of `server` by `who` (the `snapshotter` in front), each image deleted
    once looked at."""
    snaps = []
    for _ in range(RUNS):
        snaps.append(nova_snapshot(server, None if who == "nova-compute" else listener))
        glance_delete(snaps[-1].image)
    return snaps


def pool_bytes(image):
    """(bytes used, bytes provisioned) of Glance's copy images/<image>, its snapshots
    included, as `rbd du` counts them (the object map's view: what the cluster stores)."""
    du = json.loads(sh("rbd", "du", "--format", "json", f"images/{image}"))["images"]
    return sum(i["used_size"] for i in du), max(i["provisioned_size"] for i in du)


def others_in_front(limit=300):
    """Waits, at most `limit` s, until no novasnap is in front of the stack's compute host (a
    test's worker beside nova-compute would take the bench's snapshots); says if one stays."""
    deadline = time.monotonic() + limit
    while relay_consumers(ENV["NOVASNAP_HOST"]):
        if time.monotonic() > deadline:
            log(f"a novasnap is still in front of compute.{ENV['NOVASNAP_HOST']}: the table's 'made by' tells")
            return
        time.sleep(2)


@contextlib.contextmanager
def snapshotter(who):
    """`nova-compute` alone serves the host's snapshots, or `novasnap` beside it (`novasnap
    on_base`: with `image_layout = on_base`); yields novasnap's `Worker`, None for nova-compute."""
    if who == "nova-compute":
        others_in_front()
        yield None
        return
    with Worker(beside_nova=True, image_layout="on_base" if who.endswith("on_base") else "flattened") as worker:
        yield worker


def nova_against_novasnap(listener):
    """nova-compute's own snapshot of a server against novasnap's beside it, on the same
    Nova-built, fully written server (issue 15), with the bytes each image takes in Glance's
    pool."""
    rows = []
    for size in NOVA_SIZES:
        room(2 * size, f"the Nova section's {size} MiB server (its disk and one image at a time)")
        with nova_servers([size], fill=True) as (server,):
            for who in ("nova-compute", "novasnap"):
                with snapshotter(who):
                    snaps = nova_snapshots(server, who, listener)
                log(f"{size} MiB {who}: {snaps}")
                rows.append((size, who, snaps))
    return rows


@contextlib.contextmanager
def large_base(extra_mib):
    """A Glance image as the stack's server image (its properties, its 256 MiB disk, whose
    filesystem is the whole of it) followed by `extra_mib` MiB of random data the guest never
    reads: a base image that holds more than an instance of it writes, as a real one does.
    Uploaded through Glance's API; deleted however the block ends."""
    src = glance("GET", f"/v2/images/{ENV['SERVER1_IMAGE']}")
    props = {k: src[k] for k in ("hw_qemu_guest_agent", "kernel_id", "ramdisk_id", "os_command_line") if k in src}
    image = glance("POST", "/v2/images", dict(props, name="novasnap-bench-base-" + uuid.uuid4().hex[:6],
                                              disk_format="raw", container_format="bare", visibility="public"))["id"]
    MADE_IMAGES.add(image)
    try:
        with tempfile.TemporaryFile() as data:
            with open(os.path.join(ENV["NOVASNAP_STACK_STATE"], "guest-image", "disk.raw"), "rb") as disk:
                shutil.copyfileobj(disk, data)
            for _ in range(extra_mib):
                data.write(os.urandom(MiB))
            length = data.tell()
            data.seek(0)
            req = urllib.request.Request(f"{GLANCE}/v2/images/{image}/file", data=data, method="PUT", headers={
                "X-Auth-Token": token(True), "Content-Type": "application/octet-stream",
                "Content-Length": str(length)})
            urllib.request.urlopen(req, timeout=600).read()
        yield image
    finally:
        glance_delete(image)


def own_bytes(listener):
    """Issue 15's opt-in: images holding only the instance's own bytes. Thin Nova servers of
    OWN_SIZES booted from a base image holding OWN_BASE_MIB beyond the guest's disk, whose
    instance wrote OWN_MIB beyond its filesystem; each snapshotted by nova-compute, by
    novasnap (flattened, Nova's layout) and by novasnap with `image_layout = on_base`, RUNS
    times: time to the image active and what the image takes in Glance's pool."""
    rows = []
    base_mib = 256 + OWN_BASE_MIB
    # The base, each disk's own writes, and one flattened image at a time.
    room(base_mib + (OWN_MIB + 64) * len(OWN_SIZES) + base_mib + OWN_MIB, "the own-bytes section")
    with disk_overcommit(4.0), large_base(OWN_BASE_MIB) as base, nova_servers(OWN_SIZES, image=base) as servers:
        for server in servers:
            server.fill(OWN_MIB)
        for who in ("nova-compute", "novasnap", "novasnap on_base"):
            with snapshotter(who):
                for server in servers:
                    snaps = nova_snapshots(server, who, listener)
                    log(f"own bytes {server.size_mib} MiB {who}: {snaps}")
                    rows.append((server.size_mib, who, snaps))
    return rows


class Downtime:
    """The time a domain was not running, from its state (`virsh domstate`) polled every
    ~50 ms in a thread: a cold snapshot's suspension seen from outside, whoever makes it."""

    def __init__(self, domain):
        self.domain, self.stopped, self.samples = domain, threading.Event(), []
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stopped.is_set():
            r = attempt("virsh", "-c", "qemu:///system", "domstate", self.domain, timeout=10)
            state = r.stdout.strip().splitlines()[0] if r and r.returncode == 0 and r.stdout.strip() else "?"
            self.samples.append((time.monotonic(), state))
            self.stopped.wait(0.05)

    def stop(self):
        """Milliseconds not running: each sample not `running` counts until the next."""
        self.stopped.set()
        self.thread.join(timeout=30)
        s = self.samples
        return 1000 * sum(b[0] - a[0] for a, b in zip(s, s[1:]) if a[1] != "running")


def check_image(spec, *args):
    """`scripts/check-image`'s key=value line for `spec`."""
    r = subprocess.run([ENV["CHECK_IMAGE"], *args, spec], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        raise RuntimeError(f"check-image {spec}: {r.stderr.strip() or r.stdout[-1000:]}")
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return dict(kv.split("=", 1) for kv in last.split() if "=" in kv)


def writer_gap(server, image, limit=120):
    """(the image's filesystem clean, the writer's largest gap in ms right after the image's
    last record, measured on the live disk once the guest has written on)."""
    made = check_image(f"rbd:images/{image}")
    seq = made.get("last_record", "none")
    if not seq.isdigit():
        raise RuntimeError(f"no record in image {image}: {made}")
    deadline = time.monotonic() + limit
    while (gap := check_image(f"rbd:vms/{server.disk}", "--gap-after", seq).get("gap_after_ms", "none")) == "none":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest of {server.id} wrote nothing after record {seq} within {limit}s")
        time.sleep(2)
    return made.get("clean") == "yes", float(gap)


def nova_compute_mode(server, log_from):
    """live or cold, as nova-compute's log says it began this server's snapshot (after byte
    `log_from`): the bench's check that the setting took."""
    with open(NOVA_COMPUTE_LOG, errors="replace") as f:
        f.seek(log_from)
        text = f.read()
    modes = re.findall(rf"\[instance: {server.id}\] Beginning (live|cold) snapshot process", text)
    return modes[-1] if modes else "?"


def frozen_parts(worker, server, log_from):
    """Where a quiesced snapshot's frozen time went, from the worker's log after byte
    `log_from`: the agent's freeze, the point in time (the RBD disk snapshot, which waits for
    a monitor commit with the guest's writes held by librbd) and the agent's thaw, in ms."""
    with open(worker.log, errors="replace") as f:
        f.seek(log_from)
        lines = [line for line in f if server.id in line]
    fields = lambda message: next((dict(re.findall(r"(\w+)=(\d+)\b", line)) for line in reversed(lines)
                                   if message in line), {})
    frozen, thawed = fields("guest filesystems frozen"), fields("guest filesystems thawed")
    if "freeze_ms" not in frozen or "thaw_ms" not in thawed:
        return None
    freeze, thaw, held = int(frozen["freeze_ms"]), int(thawed["thaw_ms"]), int(thawed["frozen_ms"])
    return dict(freeze=freeze, point_in_time=held - freeze - thaw, thaw=thaw)


def held_run(server, who, listener, worker=None):
    """One snapshot of `server` by `who`, with the neutral measures of how long its guest was
    held beside novasnap's own figures (and, from novasnap's `worker` log, where its frozen
    time went)."""
    log_from = os.path.getsize(NOVA_COMPUTE_LOG)
    worker_from = os.path.getsize(worker.log) if worker else 0
    down = Downtime(server.domain)
    try:
        snap = nova_snapshot(server, listener if who == "novasnap" else None)
    finally:
        down_ms = down.stop()
    try:
        clean, gap = writer_gap(server, snap.image)
    finally:
        glance_delete(snap.image)
    if snap.made_by == "novasnap":
        mode = "cold" if snap.held and snap.held[1] else "live"
    else:
        mode = nova_compute_mode(server, log_from)
    parts = frozen_parts(worker, server, worker_from) if worker and snap.made_by == "novasnap" else None
    return dict(made_by=snap.made_by, mode=mode, active_s=snap.active_s, frozen_ms=snap.held and snap.held[0],
                suspended_ms=snap.held and snap.held[1], gap_ms=gap, down_ms=down_ms, clean=clean, parts=parts)


@contextlib.contextmanager
def cold_snapshots():
    """nova-compute, and novasnap started from the same file, with `[workarounds]
    disable_libvirt_livesnapshot = True` (the stack setting NOVASNAP_STACK_LIVE_SNAPSHOT=off,
    which restarts nova-compute), and live again however the block ends."""
    stack_nova(live=False)
    try:
        yield
    finally:
        stack_nova(live=True)


def stack_nova(live):
    env = {k: v for k, v in ENV.items() if k != "NOVASNAP_STACK_LIVE_SNAPSHOT"}
    if not live:
        env["NOVASNAP_STACK_LIVE_SNAPSHOT"] = "off"
    t0 = time.monotonic()
    sh(os.path.join(ROOT, "scripts/stack"), "up", "nova", env=env, timeout=1200)
    log(f"nova-compute with live snapshots {'on' if live else 'off'} ({time.monotonic() - t0:.0f}s)")


def held(listener):
    """How long the guest is held (issue 13): live and cold snapshots of Nova-built servers
    (thin disks) by nova-compute and by novasnap beside it; one cold window, so nova-compute
    restarts twice."""
    rows = []
    # Thin disks: the guest's filesystem each, and an image of it at a time.
    room(256 * (2 * len(HELD_SIZES) + 1), "the held section")
    with disk_overcommit(4.0), nova_servers(HELD_SIZES) as servers:
        for mode in ("live", "cold"):
            with cold_snapshots() if mode == "cold" else contextlib.nullcontext():
                for who in ("nova-compute", "novasnap"):
                    with snapshotter(who) as worker:
                        for server in servers:
                            for _ in range(HELD_RUNS):
                                row = held_run(server, who, listener, worker)
                                log(f"held {server.size_mib} MiB {mode} {who}: {row}")
                                rows.append(dict(row, size=server.size_mib, asked=mode, who=who, paxos=1.0))
        # novasnap's live snapshots again with the monitor committing every 50 ms, as the
        # test stack has it: what of the time frozen is the monitor's pace, what is the rest.
        with paxos_propose_interval(0.05), snapshotter("novasnap") as worker:
            for server in servers:
                for _ in range(HELD_RUNS):
                    row = held_run(server, "novasnap", listener, worker)
                    log(f"held {server.size_mib} MiB live novasnap, paxos_propose_interval 0.05: {row}")
                    rows.append(dict(row, size=server.size_mib, asked="live", who="novasnap", paxos=0.05))
    return rows


@contextlib.contextmanager
def paxos_propose_interval(seconds):
    """The monitor's `paxos_propose_interval` for the block, what it was after."""
    before = monitor_paxos_interval()
    sh("ceph", "tell", "mon.*", "config", "set", "paxos_propose_interval", str(seconds))
    try:
        yield
    finally:
        sh("ceph", "tell", "mon.*", "config", "set", "paxos_propose_interval", before)


def monitor_paxos_interval():
    found = re.search(r'"paxos_propose_interval":\s*"([^"]+)"',
                      sh("ceph", "tell", "mon.*", "config", "get", "paxos_propose_interval", timeout=60))
    if not found:
        raise RuntimeError("the monitor did not say its paxos_propose_interval")
    return found.group(1)


# ---------------------------------------------------------------- report


def svg(rows):
    labels = list(rows[0][1].keys())
    colors = ["#1b6ca8", "#5fa8d3", "#d1495b", "#8d8d8d"]
    top = max(stats(v)[0] for _, r in rows for v in r.values())
    w, h, bar = 720, 60 + 150 * len(rows), 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14">Snapshot wall time, median of {RUNS} (s)</text>']
    y = 40
    for size, r in rows:
        out.append(f'<text x="10" y="{y + 12}">{size} MiB</text>')
        for i, label in enumerate(labels):
            med = stats(r[label])[0]
            width = 420 * med / top
            out.append(f'<rect x="90" y="{y + i * (bar + 4)}" width="{width:.1f}" height="{bar}" fill="{colors[i % 4]}"/>')
            out.append(f'<text x="{95 + width:.1f}" y="{y + i * (bar + 4) + 16}">{med:.2f} s — {label}</text>')
        y += 150
    out.append("</svg>")
    return "\n".join(out)


def fmt(xs, spec="{:.2f}"):
    """median (min–max) of `xs`, or the one value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m, lo, hi = stats(xs)
    return spec.format(m) if len(xs) == 1 else f"{spec.format(m)} ({spec.format(lo)}–{spec.format(hi)})"


def section_snapshot(listener, shared):
    rows = snapshot_times(listener)
    shared["svg"] = svg(rows)
    md = ["## Snapshot wall time (s)", "",
          "Cast → `instance.snapshot.end` for novasnap on a host of the bench's own (its guests are not "
          "Nova's), against the same disk copied by Liberty's recipe and by the bare librbd sequence.", "",
          "| disk | " + " | ".join(rows[0][1].keys()) + " | novasnap direct / floor | Liberty / novasnap direct |",
          "|---|" + "---|" * (len(rows[0][1]) + 2)]
    for size, r in rows:
        direct = stats(r["novasnap direct"])[0]
        floor = stats(r["bare librbd sequence (floor)"])[0]
        lib = stats(r["Liberty: qemu-img convert + upload"])[0]
        md.append(f"| {size} MiB | " + " | ".join(fmt(v) for v in r.values())
                  + f" | {direct / floor:.2f}× | {lib / direct:.2f}× |")
    return md


def section_concurrency(listener, shared):
    rows, shared["peak8"] = concurrency(listener)
    total = {n: stats(t)[0] if t else float("nan") for n, t, *_ in rows}
    worst = max((p99 / p50 for _, _, p50s, p99s, _ in rows for p50, p99 in zip(p50s, p99s)), default=float("nan"))
    flattens = dict(((s, k), v) for s, k, v in WORKER_SET).get(("novasnap", "concurrent_flattens"), "8 (its default)")
    return [f"## Concurrency (256 MiB disks, direct path, max_concurrent_snapshots = 8, "
            f"concurrent_flattens = {flattens})", "",
            "One nova-api (the peer) casts the snapshots one right after the other. *total*: the first cast "
            "sent → the last `instance.snapshot.end`; *per snapshot*: its cast → its end. "
            f"{CONCURRENCY_ROUNDS} rounds of 1, 4 and 8 at once: medians of the rounds (min–max).", "",
            "| snapshots at once | total (s) | per snapshot p50 (s) | p99 (s) | failed |", "|---|---|---|---|---|"] + \
        [f"| {n} | {fmt(t)} | {fmt(p50)} | {fmt(p99)} | {f} |" for n, t, p50, p99, f in rows] + \
        ["", f"Eight at once took {total[8] / total[1]:.2f}× one, medians (issue 15's aim: at most 3×); "
         f"the largest p99 / p50 of a round: {worst:.2f} (aim: at most 2)."]


def section_dispatch(listener, shared):
    nova_rate, oslo_rate = dispatch_throughput()
    return [f"## Dispatch throughput ({CASTS} pre-loaded casts, same broker)", "",
            "| consumer | casts/s |", "|---|---|",
            f"| novasnap, reject fast path (dead-lettered) | {nova_rate:.0f} |",
            f"| oslo.messaging RPC server, no-op endpoint, 64 threads | {oslo_rate:.0f} |"]


def section_forwarding(listener, shared):
    latency, forward_rate = forwarding()
    return [f"## Beside nova-compute: forwarded RPC calls ({CALLS} calls, one at a time)", "",
            "| path | p50 (ms) | p99 (ms) |", "|---|---|---|",
            f"| nova-compute alone (oslo RPC servers on compute and compute-alt) | {latency[0]:.2f} | {latency[1]:.2f} |",
            f"| through novasnap (compute → relay → compute-alt) | {latency[2]:.2f} | {latency[3]:.2f} |",
            f"| added by novasnap | {latency[2] - latency[0]:.2f} | {latency[3] - latency[1]:.2f} |",
            "", f"Forwarded casts: {forward_rate:.0f}/s ({CASTS} pre-loaded on compute.<host>, drained through "
            "novasnap into compute-alt.<host> and by the stand-in nova-compute)."]


def section_memory(listener, shared):
    idle, streamed, steps = memory_and_breakdown(listener)
    peak8 = [f"| peak during the 8-way run | {shared['peak8']} |"] if "peak8" in shared else []
    return ["## Memory (worker RSS)", "",
            "Idle, RSS counts the pages of the shared libraries the worker maps (librados, librbd and "
            "libceph-common above all), which the host's QEMU processes and Ceph daemons map too; PSS "
            "divides those among the processes that share them.", "",
            "| state | KiB |", "|---|---|", f"| idle | {idle['Rss']} |",
            f"| idle: anonymous (the worker's own) | {idle['Anonymous']} |",
            f"| idle: mapped files (libraries) | {idle['Rss'] - idle['Anonymous']} |",
            f"| idle: PSS | {idle['Pss']} |", *peak8,
            f"| peak during a 1 GiB standard (streamed) upload | {streamed} |",
            "", "## Time breakdown of one 1 GiB direct snapshot (ms, summed per step)", "",
            "| step | ms |", "|---|---|"] + \
        [f"| {k} | {v} |" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])]


def made_by(snaps):
    """Who made the images of `snaps`, counted: `novasnap 5/5`."""
    made = collections.Counter(s.made_by for s in snaps)
    return ", ".join(f"{k} {v}/{len(snaps)}" for k, v in made.items())


def size_label(mib):
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def section_nova(listener, shared):
    rows = nova_against_novasnap(listener)
    md = ["## Against nova-compute, on the same Nova server (s)", "",
          f"`openstack server image create` of one server Nova built from the stack's raw image, its disk "
          f"written full of random data beyond the guest's filesystem: its API request → the image active in "
          f"Glance (polled every 0.2 s) and → novasnap's `instance.snapshot.end`; {RUNS} runs each, "
          "nova-compute alone (its libvirt driver's RBD direct path), then novasnap beside it. "
          "*made by*: the images carrying `novasnap_made_by`.", "",
          "| disk | snapshotter | made by | request → image active | request → instance.snapshot.end "
          "| nova-compute / novasnap (image active) |", "|---|---|---|---|---|---|"]
    active = {(size, who): stats([s.active_s for s in snaps])[0] for size, who, snaps in rows}
    for size, who, snaps in rows:
        ratio = f"{active[(size, 'nova-compute')] / active[(size, who)]:.2f}×" if who == "novasnap" else ""
        md.append(f"| {size_label(size)} | {who} | {made_by(snaps)} | {fmt([s.active_s for s in snaps])} "
                  f"| {fmt([s.end_s for s in snaps])} | {ratio} |")
    md += ["", "## Bytes written per snapshot: the new image in Glance's pool (MiB)", "",
           "`rbd du images/<image id>` right after each snapshot of the table above (its `snap` included): "
           "what the cluster stores for the image, against the disk's size.", "",
           "| disk | snapshotter | provisioned | used | used / provisioned |", "|---|---|---|---|---|"]
    for size, who, snaps in rows:
        used, prov = [s.used_mib for s in snaps], [s.provisioned_mib for s in snaps]
        md.append(f"| {size_label(size)} | {who} | {fmt(prov, '{:.0f}')} | {fmt(used, '{:.0f}')} "
                  f"| {stats(used)[0] / stats(prov)[0]:.2f} |")
    return md


def section_own(listener, shared):
    rows = own_bytes(listener)
    md = ["## Only the instance's own bytes (`image_layout = on_base`)", "",
          f"Thin Nova servers built from a base image in Glance's pool holding {256 + OWN_BASE_MIB} MiB "
          f"(the stack's 256 MiB guest disk and {OWN_BASE_MIB} MiB of random data after it; each disk a clone "
          f"of it), the instance having written {OWN_MIB} MiB of random data beyond its "
          f"filesystem; {RUNS} snapshots each through Nova's API by nova-compute alone, by novasnap beside it "
          "with Nova's flattened layout, and with `image_layout = on_base` (a clone of the same Glance image "
          "holding the disk's own extents). *used*: `rbd du images/<image id>`, what the cluster stores for "
          "the image (a clone's parent not counted).", "",
          "| disk | snapshotter | made by | request → image active (s) | used (MiB) | provisioned (MiB) |",
          "|---|---|---|---|---|---|"]
    for size, who, snaps in rows:
        md.append(f"| {size_label(size)} | {who} | {made_by(snaps)} | {fmt([s.active_s for s in snaps])} "
                  f"| {fmt([s.used_mib for s in snaps], '{:.0f}')} "
                  f"| {fmt([s.provisioned_mib for s in snaps], '{:.0f}')} |")
    md += ["", "Against the aims (issue 15):", ""]
    for size in OWN_SIZES:
        of = {who: snaps for s, who, snaps in rows if s == size}
        base, nova_ = of.get("novasnap on_base"), of.get("nova-compute")
        if base and nova_:
            active = stats([s.active_s for s in base])[0]
            used, nova_used = stats([s.used_mib for s in base])[0], stats([s.used_mib for s in nova_])[0]
            md.append(f"- {size_label(size)}: on_base image active in {active:.2f} s "
                      f"({'within' if active < 2 else 'above'} the 2 s aim), {used:.0f} MiB stored against "
                      f"nova-compute's {nova_used:.0f} MiB, the instance having written {OWN_MIB} MiB beyond its "
                      "filesystem (its own writes to the filesystem come on top)")
    return md


def section_held(listener, shared):
    rows = held(listener)
    paced = [r for r in rows if r["paxos"] == 1.0]
    cell = lambda v, spec="{:.0f}": "–" if v is None else spec.format(v)
    md = ["## How long the guest is held (ms)", "",
          f"Nova-built servers (thin disks, the guest's writer appending a record every 200 ms), snapshots asked of "
          f"Nova, {HELD_RUNS} run(s) each: nova-compute alone, then novasnap beside it; live, then cold "
          "(`[workarounds] disable_libvirt_livesnapshot = True`, nova-compute restarted). *frozen*, *suspended*: "
          "novasnap's own figures (`compute.instance.snapshot.end`). Neutral, for both: *writer gap*, the "
          "writer's largest gap right after the image's last record (`check-image --gap-after` on the live "
          "disk; 200 ms is no hold; guest time, which a managed save stops too, so a cold suspension barely "
          "shows there); *not running*, how long `virsh domstate` (polled every ~50 ms) said anything but "
          "running. *ran* is the mode seen: nova-compute's log, or novasnap's suspended time. *clean*: the "
          "image's filesystem needs no journal replay (quiesced). *freeze / point in time / thaw*: where "
          "novasnap's frozen time went, from its log: the agent's freeze, the RBD disk snapshot (librbd holds "
          "the guest's writes while it waits for the monitor to commit the snapshot's id), the agent's thaw.", "",
          "| disk | asked | snapshotter | ran | request → image active (s) | frozen | freeze / point in time / thaw "
          "| suspended | writer gap | not running | clean |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    parts = lambda p: "–" if not p else f"{p['freeze']} / {p['point_in_time']} / {p['thaw']}"
    for r in paced:
        md.append(f"| {size_label(r['size'])} | {r['asked']} | {r['who']} | {r['mode']} | {r['active_s']:.2f} "
                  f"| {cell(r['frozen_ms'])} | {parts(r['parts'])} | {cell(r['suspended_ms'])} | {r['gap_ms']:.0f} "
                  f"| {r['down_ms']:.0f} | {'yes' if r['clean'] else 'no'} |")
    md += held_by_monitor_pace(rows)
    md += ["", "Against the aims (issue 13):", ""]
    for size in HELD_SIZES:
        of = lambda who, asked, key: [r[key] for r in paced if (r["size"], r["who"], r["asked"]) == (size, who, asked)
                                      and r[key] is not None]
        frozen = of("novasnap", "live", "frozen_ms")
        if frozen:
            p50 = statistics.median(frozen)
            unpaced = [r["frozen_ms"] for r in novasnap_live(rows, size, 0.05) if r["frozen_ms"] is not None]
            md.append(f"- {size_label(size)}, live: novasnap frozen {p50:.0f} ms at p50 "
                      f"({'within' if p50 <= 100 else 'above'} the 100 ms aim)"
                      + (f"; {statistics.median(unpaced):.0f} ms with the monitor at 0.05 s" if unpaced else ""))
        suspended, active = of("novasnap", "cold", "suspended_ms"), of("novasnap", "cold", "active_s")
        nova_down = of("nova-compute", "cold", "down_ms")
        if suspended and active:
            md.append(f"- {size_label(size)}, cold: novasnap suspended {statistics.median(suspended):.0f} ms of a "
                      f"{statistics.median(active):.2f} s snapshot"
                      + (f"; nova-compute's guest not running for {statistics.median(nova_down):.0f} ms"
                         if nova_down else ""))
    return md


def novasnap_live(rows, size, paxos):
    """The held section's live snapshots by novasnap of a `size` MiB server at monitor interval `paxos`."""
    return [r for r in rows if (r["size"], r["who"], r["asked"], r["paxos"]) == (size, "novasnap", "live", paxos)]


def held_by_monitor_pace(rows):
    """novasnap's live snapshots at Ceph's default monitor pace and at the test stack's, side by
    side: medians of the frozen time and of its parts."""
    md = ["", "### novasnap's time frozen, by the monitor's pace (ms, medians)", "",
          "The monitor of this idle cluster commits every second at Ceph's default `paxos_propose_interval` "
          "(1 s): the manager's pgmap line in the cluster log and its stats report each come every 2 s, out of "
          "phase. An RBD snapshot's id waits for the next commit. The same live snapshots with the interval at "
          "0.05 s (the test stack's) show what is left when the monitor does not pace them.", "",
          "| disk | paxos_propose_interval (s) | runs | frozen | agent freeze | point in time | agent thaw |",
          "|---|---|---|---|---|---|---|"]
    for size in HELD_SIZES:
        for paxos in (1.0, 0.05):
            runs = [r for r in novasnap_live(rows, size, paxos) if r["parts"]]
            if not runs:
                continue
            p50 = lambda key: statistics.median(r["parts"][key] for r in runs)
            md.append(f"| {size_label(size)} | {paxos:g} | {len(runs)} | "
                      f"{statistics.median(r['frozen_ms'] for r in runs):.0f} | {p50('freeze'):.0f} | "
                      f"{p50('point_in_time'):.0f} | {p50('thaw'):.0f} |")
    return md


def stack_versions():
    """What the results were measured on, beside the machine."""
    venv = os.path.join(ENV["NOVASNAP_STACK_STATE"], "venv-openstack", "bin", "python")
    nova_v, glance_v = sh(venv, "-c", "import importlib.metadata as m; print(m.version('nova'), m.version('glance'))",
                          timeout=60).split()
    return {
        "Ceph": sh("ceph", "--version").split()[2],
        "QEMU": sh("qemu-system-x86_64", "--version").splitlines()[0].split()[3],
        "libvirt": sh("virsh", "--version").strip(),
        "Nova": nova_v, "Glance": glance_v,
        "paxos_propose_interval": monitor_paxos_interval(),
    }


def commit():
    """This checkout's commit, `-dirty` when tracked files differ from it."""
    head = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").strip()
    dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD"], timeout=60).returncode != 0
    return head + ("-dirty" if dirty else "")


STOPPING = threading.Event()


def on_sigterm(*_):
    """A bench stopped with SIGTERM cleans up as one that failed (guests, servers, images,
    settings), and runs no further section."""
    STOPPING.set()
    sys.exit(143)


def run_sections(shared):
    """Each chosen section in turn, timed; one that fails is reported and the next runs."""
    md, failed, times = [], [], []
    listener = Listener()
    try:
        for name in ONLY:
            t0 = time.monotonic()
            log(f"section {name}")
            try:
                md += [""] + globals()[f"section_{name}"](listener, shared)
            except Exception as e:
                if STOPPING.is_set():  # a cleanup that failed after SIGTERM
                    raise
                traceback.print_exc()
                failed.append(name)
                md += ["", f"## {name}: failed", "", "```", str(e)[-3000:], "```"]
            times.append((name, time.monotonic() - t0))
    finally:
        for image in sorted(MADE_IMAGES):
            glance_delete(image, limit=60)
        listener.stop()
    return md, failed, times


def main():
    unknown = set(ONLY) - set(SECTIONS)
    if unknown:
        sys.exit(f"BENCH_ONLY: unknown section(s) {sorted(unknown)}; the sections: {', '.join(SECTIONS)}")
    signal.signal(signal.SIGTERM, on_sigterm)
    started, t0 = commit(), time.monotonic()
    pool_before = set(rbd.RBD().list(images))
    # Benchmarks run with Ceph's default paxos_propose_interval (1 s), as production does;
    # the test stack lowers it to 0.05 s, so set it for the run and restore it after.
    shared = {}
    with paxos_propose_interval(1):
        versions = stack_versions()
        body, failed, times = run_sections(shared)
    servers_left = [s["id"] for s in nova("GET", "/servers?all_tenants=1", admin=True)["servers"]
                    if s["name"].startswith("novasnap-bench-")]
    pool_new = sorted(set(rbd.RBD().list(images)) - pool_before)
    date = datetime.date.today().isoformat()
    machine = {
        "cores": os.cpu_count(),
        "RAM": sh("free", "-g").splitlines()[1].split()[1] + " GiB",
        "kernel": os.uname().release,
    }
    md = [f"# novasnap benchmarks, {date}", "",
          f"novasnap {started}. Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ". Stack: "
          + ", ".join(f"{k} {v}" for k, v in versions.items()) + " (Ceph's default, set for the run).",
          "One-node Ceph (memstore OSD, loopback), Glance under gunicorn. Medians of "
          f"{RUNS} runs (min–max) unless a table says otherwise. Produced by `make bench`"
          + ("" if ONLY == list(SECTIONS) else f" with BENCH_ONLY={','.join(ONLY)}")
          + (f", the workers' config with {ENV['BENCH_WORKER_SET']}" if WORKER_SET else "") + "."]
    md += body
    md += ["", "## This run", "",
           "Wall time per section: " + ", ".join(f"{n} {t / 60:.1f} min" for n, t in times)
           + f"; in all {(time.monotonic() - t0) / 60:.1f} min."
           + (f" Failed: {', '.join(failed)}." if failed else ""),
           f"Left behind: servers {servers_left or 'none'}; images in Glance's pool new since the start "
           f"{pool_new or 'none'} (the stack is shared: other work may own some)."]
    path = ENV.get("BENCH_OUT") or os.path.join(ROOT, f"bench/results/{date}.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if "svg" in shared:
        chart = os.path.splitext(path)[0] + "-snapshot.svg"
        md += ["", f"![snapshot times]({os.path.basename(chart)})"]
        open(chart, "w").write(shared["svg"])
    open(path, "w").write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwritten: {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
