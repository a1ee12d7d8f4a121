"""Plays nova-api for a snapshot or backup request, with Nova's own code.

As nova-api's compute API does: creates the queued Glance image the snapshot will fill,
then casts `snapshot_instance` / `backup_instance` with `nova.compute.rpcapi.ComputeAPI`
to the compute host's topic. Given several `--instance`, does the same for each, one cast
right after the other (the benchmarks' snapshots at once). Prints as JSON on stdout
{"image_id": the first image, "image_ids": [...], "cast_at": [...]}, `cast_at` each cast's
CLOCK_MONOTONIC time once sent.

Run with the peer venv's python (scripts/venvs): nova 34, oslo.messaging 18.3.1.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid


def create_image(glance, token, name, instance_uuid, image_type, base, extra):
    # nova.compute.api.API._create_image: a queued image with the instance's identity;
    # the snapshot sets disk/container formats when it uploads or registers the data.
    body = {"name": name, "visibility": "private", "instance_uuid": instance_uuid,
            "image_type": image_type, "base_image_ref": base or ""}
    body.update(extra)
    req = urllib.request.Request(
        glance.rstrip("/") + "/v2/images", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "X-Auth-Token": token})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["id"]


def nova_conf(transport_url, host, glance, rabbit_options):
    f = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    f.write(f"[DEFAULT]\ntransport_url = {transport_url}\nhost = nova-api-peer\n"
            f"[glance]\napi_servers = {glance}\n[oslo_messaging_rabbit]\n")
    for option in rabbit_options:
        f.write(option.replace("=", " = ", 1) + "\n")
    f.close()
    return f.name


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("method", choices=["snapshot", "backup"])
    p.add_argument("--instance", required=True, action="append", help="instance UUID; repeatable")
    p.add_argument("--host", required=True, help="compute host the instance is on")
    p.add_argument("--glance", default=os.environ.get("GLANCE_URL", "http://127.0.0.1:9292"))
    p.add_argument("--transport-url", default=os.environ.get("TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/"))
    p.add_argument("--image-ref", default="", help="the instance's base image")
    p.add_argument("--name", default="novasnap-snapshot")
    p.add_argument("--backup-type", default="daily")
    p.add_argument("--rotation", type=int, default=2)
    p.add_argument("--image-id", help="cast for this existing image instead of creating one")
    p.add_argument("--system-metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="the instance's system_metadata, as nova-api copies image properties "
                        "into it (e.g. image_hw_qemu_guest_agent=yes); repeatable")
    p.add_argument("--rabbit-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an [oslo_messaging_rabbit] option of nova-api's (e.g. kombu_compression=gzip); repeatable")
    p.add_argument("--token", required=True,
                   help="the user's Keystone token: Glance's, and the cast's context's, as nova-api sends it")
    args = p.parse_args()
    if len(args.instance) > 1 and args.image_id:
        p.error("--image-id names the image of one --instance")

    import nova.conf
    from nova import config, context, objects
    from nova.compute import rpcapi
    conf = nova_conf(args.transport_url, args.host, args.glance, args.rabbit_option)
    try:
        config.parse_args(["nova-api", "--config-file", conf], configure_db=False, init_rpc=True)
    finally:
        os.unlink(conf)
    objects.register_all()

    ctxt = context.RequestContext(
        user_id="8c1f2e3d4b5a69788796a5b4c3d2e1f0", project_id="3a4b5c6d7e8f90a1b2c3d4e5f6a7b8c9",
        roles=["member", "reader"], auth_token=args.token, is_admin=False,
        request_id="req-" + str(uuid.uuid4()), user_name="demo", project_name="demo",
        remote_address="127.0.0.1")
    image_type = "snapshot" if args.method == "snapshot" else "backup"
    extra = {"backup_type": args.backup_type} if args.method == "backup" else {}
    image_ids = [args.image_id or create_image(args.glance, args.token, args.name, uuid_, image_type, args.image_ref, extra)
                 for uuid_ in args.instance]
    api = rpcapi.ComputeAPI()
    cast_at = []
    for uuid_, image_id in zip(args.instance, image_ids):
        instance = objects.Instance(
            id=1, uuid=uuid_, host=args.host, node=args.host, image_ref=args.image_ref,
            vm_state="active", display_name="novasnap-guest", hostname="novasnap-guest",
            user_id=ctxt.user_id, project_id=ctxt.project_id,
            task_state="image_snapshot_pending" if args.method == "snapshot" else "image_backup",
            system_metadata=dict(kv.split("=", 1) for kv in args.system_metadata))
        if args.method == "snapshot":
            api.snapshot_instance(ctxt, instance, image_id)
        else:
            api.backup_instance(ctxt, instance, image_id, args.backup_type, args.rotation)
        cast_at.append(time.monotonic())
    print(json.dumps({"image_id": image_ids[0], "image_ids": image_ids, "cast_at": cast_at}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
