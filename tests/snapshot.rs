//! The whole job against the real stack: Nova's own RPC API casts, `novasnap serve` snapshots
//! a libvirt guest on Ceph (or a file), Glance ends up with the image, and a stock
//! oslo.messaging listener receives the notifications.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const COLD: (&str, &str, &str) = ("workarounds", "disable_libvirt_livesnapshot", "true");
/// Raw, so the image's bytes compare with the disk's virtual contents.
const RAW: (&str, &str, &str) = ("libvirt", "snapshot_image_format", "raw");
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(300);

/// `(old, new)` task_state of each versioned instance.update that changes it.
fn task_state_transitions(notifications: &[Value]) -> Vec<(Value, Value)> {
    notifications
        .iter()
        .filter(|n| n["event_type"] == "instance.update")
        .filter_map(|n| {
            let su = &n["payload"]["nova_object.data"]["state_update"]["nova_object.data"];
            let (old, new) = (su["old_task_state"].clone(), su["new_task_state"].clone());
            (old != new).then_some((old, new))
        })
        .collect()
}

fn strs(pairs: &[(&str, Option<&str>)]) -> Vec<(Value, Value)> {
    pairs.iter().map(|(o, n)| (Value::from(*o), n.map(Value::from).unwrap_or(Value::Null))).collect()
}

struct Leftovers {
    disk_snapshots: Vec<String>,
    temp: Vec<String>,
}

async fn novasnap_leftovers(guest: &DemoGuest) -> Leftovers {
    let disk_snapshots = if guest.disk.starts_with("rbd:") { novasnap_disk_snapshots(guest).await } else { Vec::new() };
    Leftovers { disk_snapshots, temp: temp_leftovers() }
}

async fn assert_no_leftovers(guest: &DemoGuest) {
    let left = novasnap_leftovers(guest).await;
    assert!(left.disk_snapshots.is_empty(), "disk snapshots left behind: {:?}", left.disk_snapshots);
    assert!(left.temp.is_empty(), "temporary files left behind: {:?}", left.temp);
}

/// Snapshots `guest` through a fresh worker and checks everything a snapshot must leave:
/// an active image with the disk's bytes, nothing stray, the notifications in order; then
/// deletes the image.
async fn snapshot_and_check(guest_n: u8, overrides: &[(&str, &str, &str)], expect_direct: bool, asked: Asked<'_>) {
    let image_id = snapshot_checked(guest_n, overrides, expect_direct, asked).await;
    glance_delete(&image_id).await;
}

/// The same, keeping the image: its id.
async fn snapshot_checked(
    guest_n: u8,
    overrides: &[(&str, &str, &str)],
    expect_direct: bool,
    asked: Asked<'_>,
) -> String {
    let guest = guest(guest_n);
    let config = asked.config(overrides);
    let state_before = domain_state(&guest.domain).await;
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;

    let image_id = asked.snapshot(&config, &guest).await;
    listener.wait_for("instance.snapshot.end", &image_id, SNAPSHOT_LIMIT).await;
    worker.wait_settled(&image_id).await;
    let log = worker.log_text();

    let image = glance_image(&image_id).await.expect("image exists");
    assert_eq!(image["status"], "active", "{image:#}\n{log}");
    assert_eq!(image["disk_format"], "raw");
    assert_eq!(image["container_format"], "bare");
    assert_eq!(image["instance_uuid"], guest.uuid.as_str());
    assert_eq!(image["image_location"], "snapshot");
    // Glance at its defaults shows no locations, but its direct_url (which Ceph-backed clouds
    // turn on): rbd://… for the direct path's copy and for Glance's own upload alike.
    let direct_url = image["direct_url"].as_str().unwrap_or_default();
    assert!(direct_url.starts_with("rbd://") && direct_url.ends_with(&format!("/images/{image_id}/snap")), "{image:#}");
    assert!(rbd_snapshots(&format!("images/{image_id}")).await.contains(&"snap".to_string()));
    if expect_direct {
        assert!(log.contains("direct snapshot registered"), "direct path taken and logged:\n{log}");
    } else {
        assert!(log.contains("performing standard snapshot"), "standard path taken and logged:\n{log}");
    }
    assert_image_holds_guest(&image_id).await;
    assert_no_leftovers(&guest).await;
    assert_eq!(domain_state(&guest.domain).await, state_before, "guest back as it was");
    asked.assert_nova_left_it_running(&guest).await;

    // What a subscriber sees, in order.
    // This image's notifications only: queue names are global, other traffic may share them.
    let got: Vec<Value> =
        listener.received.iter().filter(|n| n["payload"].to_string().contains(&image_id)).cloned().collect();
    let types: Vec<&str> = got.iter().map(|n| n["event_type"].as_str().unwrap()).collect();
    let first = |t: &str| types.iter().position(|x| *x == t).unwrap_or_else(|| panic!("no {t} in {types:?}"));
    assert!(first("instance.snapshot.start") < first("instance.snapshot.end"), "{types:?}");
    assert!(first("compute.instance.snapshot.start") < first("compute.instance.snapshot.end"), "{types:?}");
    let expected = strs(&[
        ("image_snapshot_pending", Some("image_snapshot")),
        ("image_snapshot", Some("image_pending_upload")),
        ("image_pending_upload", Some("image_uploading")),
    ]);
    let transitions = task_state_transitions(&got);
    assert_eq!(&transitions[..3], &expected[..], "{transitions:?}");
    assert_eq!(transitions.last().unwrap(), &(Value::from("image_uploading"), Value::Null), "{transitions:?}");
    for n in &got {
        assert_notification_schema(n);
        let publisher = n["publisher_id"].as_str().unwrap();
        if n["event_type"].as_str().unwrap().starts_with("compute.") {
            assert_eq!(publisher, format!("compute.{}", config.host));
        } else {
            assert_eq!(publisher, format!("nova-compute:{}", config.host));
        }
    }

    assert!(worker.stop().await.success(), "SIGTERM ends the worker with status 0");
    image_id
}

#[tokio::test]
async fn clone_backed_rbd_guest_live_direct_snapshot() {
    snapshot_and_check(1, &[], true, Asked::ByCast(&[])).await;
}

/// Asked of Nova, as every cold snapshot of a Nova server in these tests (`Asked::OfNova`).
#[tokio::test]
async fn clone_backed_rbd_guest_cold_direct_snapshot() {
    snapshot_and_check(1, &[COLD], true, Asked::OfNova).await;
}

#[tokio::test]
async fn non_clone_rbd_guest_finds_glance_pool_through_base_image_locations() {
    snapshot_and_check(2, &[], true, Asked::ByCast(&[])).await;
}

#[tokio::test]
async fn file_backed_qcow2_guest_live_standard_snapshot() {
    snapshot_and_check(3, &[RAW], false, Asked::ByCast(&[])).await;
}

#[tokio::test]
async fn file_backed_qcow2_guest_cold_standard_snapshot() {
    snapshot_and_check(3, &[RAW, COLD], false, Asked::ByCast(&[])).await;
}

#[tokio::test]
async fn forced_standard_path_on_rbd_streams_the_disk_to_glance() {
    snapshot_and_check(1, &[("novasnap", "direct_snapshot", "false")], false, Asked::ByCast(&[])).await;
}

/// A guest whose image says it runs the QEMU guest agent (`hw_qemu_guest_agent`, which
/// nova-api copies into the instance's system_metadata) is quiesced around its disk
/// snapshot: the image's filesystem fscks clean with no journal to replay, where an
/// unquiesced snapshot of the writing guest has one. The freeze is logged with its length.
#[tokio::test]
async fn a_guest_with_the_agent_is_quiesced_and_its_image_fscks_clean() {
    let guest = guest(1);
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let image_id = nova_api(&config, "snapshot", &guest, &["--system-metadata", "image_hw_qemu_guest_agent=yes"]).await;
    listener.wait_for("instance.snapshot.end", &image_id, SNAPSHOT_LIMIT).await;
    worker.wait_settled(&image_id).await;
    let log = worker.log_text();
    assert!(log.contains("guest filesystems frozen") && log.contains("guest filesystems thawed"), "{log}");
    let check = common::openstack::check_image(&format!("rbd:images/{image_id}"), true).await;
    assert_eq!(check.status, 0, "a quiesced snapshot fscks clean: {}\n{log}", check.output);
    assert!(check.clean() && check.unbroken(), "{}", check.output);
    let end = listener.received.iter().find(|n| n["event_type"] == "compute.instance.snapshot.end").unwrap();
    let frozen_ms = end["payload"]["frozen_ms"].as_u64();
    let frozen_ms = frozen_ms.unwrap_or_else(|| panic!("time frozen on the end notification: {end:#}"));
    // The guest went on writing once thawed: right after the image's last record, no gap in
    // the live disk's records longer than the freeze it reported, the writer's own interval
    // (200 ms) and a margin for a guest under TCG on a busy host.
    let (seq, started) = (check.last_record().to_string(), std::time::Instant::now());
    let gap = loop {
        let live = common::openstack::check_image_with(&guest.disk, &["--gap-after", &seq]).await;
        if let Some(gap) = live.fields.get("gap_after_ms").and_then(|g| g.parse::<f64>().ok()) {
            break gap;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the guest wrote on after the snapshot: {}", live.output);
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(gap <= (frozen_ms + 200 + 300) as f64, "held {gap} ms, reported frozen {frozen_ms} ms:\n{log}");
    assert_no_leftovers(&guest).await;
    assert_eq!(domain_state(&guest.domain).await, "running");
    assert!(worker.stop().await.success());
    glance_delete(&image_id).await;
}

/// `[novasnap] image_layout = on_base`: the image of a Nova-built server (its disk a clone of
/// the Glance image it booted from) is a clone of that same image holding only what the
/// instance wrote: Ceph stores a fraction of the disk, and the image reads as the disk did.
#[tokio::test]
async fn on_base_the_image_holds_only_what_the_instance_wrote() {
    let image_id = snapshot_checked(1, &[("novasnap", "image_layout", "on_base")], true, Asked::ByCast(&[])).await;
    let copy = format!("images/{image_id}");
    let info = rbd_json(&["info", &copy]).await;
    let base = env("SERVER1_IMAGE");
    assert_eq!(info["parent"]["image"], base.as_str(), "a clone of the base image: {info:#}");
    assert_eq!(info["parent"]["snapshot"], "snap", "{info:#}");
    let du = rbd_json(&["du", &copy]).await;
    let used = du["images"].as_array().unwrap().iter().find(|i| i["snapshot"].is_null()).unwrap()["used_size"].as_u64();
    let provisioned = info["size"].as_u64().unwrap();
    assert!(used.is_some_and(|u| u < provisioned / 4), "only the instance's own extents: {du:#}");
    glance_delete(&image_id).await;
}
