//! `schemas/` against real traffic: the captured Nova casts and notifications, and every
//! notification novasnap's notifier builds (the end-to-end tests validate what a real
//! oslo listener receives, through `common::assert_schema`).

mod common;

use common::*;
use novasnap::messaging::dispatcher::dispatch;
use novasnap::messaging::envelope::decode;
use novasnap::messaging::notifier::message_body;
use novasnap::messaging::payload::notifications_for;
use novasnap::messaging::{GuestHeld, SnapshotEvent, TaskState};
use serde_json::Value;

fn fixture_message(name: &str) -> Value {
    let f = shared_fixture(&format!("messages/{name}"));
    f["decoded"]["oslo.message"].clone()
}

#[test]
fn nova_casts_match_the_cast_schemas() {
    for (fixture, schema) in [
        ("rpc_cast.snapshot_instance.nova_minimal.json", "cast/snapshot_instance.json"),
        ("rpc_cast.snapshot_instance.nova_rich.json", "cast/snapshot_instance.json"),
        ("rpc_cast.backup_instance.nova_minimal.json", "cast/backup_instance.json"),
        ("rpc_cast.backup_instance.nova_rich.json", "cast/backup_instance.json"),
    ] {
        assert_schema(schema, &fixture_message(fixture));
    }
}

#[test]
fn nova_notifications_match_the_notification_schemas() {
    for (fixture, schema) in [
        ("notification.versioned.instance.snapshot.start.nova.json", "notification/instance.snapshot.start.json"),
        ("notification.versioned.instance.snapshot.end.nova.json", "notification/instance.snapshot.end.json"),
        (
            "notification.legacy.compute.instance.snapshot.start.nova.json",
            "notification/compute.instance.snapshot.start.json",
        ),
    ] {
        assert_schema(schema, &fixture_message(fixture));
    }
}

#[test]
fn every_notification_novasnap_builds_matches_its_schema_and_hides_the_token() {
    let f = shared_fixture("messages/rpc_cast.snapshot_instance.nova_rich.json");
    let body = f["body_raw_utf8"].as_str().unwrap();
    let req = dispatch(&decode(Some("application/json"), body.as_bytes(), 1 << 20).unwrap()).unwrap();
    let events = [
        SnapshotEvent::Start,
        SnapshotEvent::TaskState { old: Some(TaskState::ImageSnapshot), new: Some(TaskState::ImagePendingUpload) },
        SnapshotEvent::TaskState { old: Some(TaskState::ImageUploading), new: None },
        SnapshotEvent::Progress { task_state: TaskState::ImageUploading, percent: 42 },
        SnapshotEvent::End { held: GuestHeld { frozen_ms: 120, suspended_ms: 0 } },
        SnapshotEvent::Error { exception: "ImageNotFound".into(), message: "gone".into() },
    ];
    let mut seen = std::collections::BTreeSet::new();
    for event in &events {
        for n in notifications_for(&req, event, "http://127.0.0.1:9292") {
            let publisher = if n.versioned { "nova-compute:host1" } else { "compute.host1" };
            let raw = message_body(&req, &n, publisher, true);
            let text = String::from_utf8(raw.clone()).unwrap();
            assert!(!text.contains("fixtureToken"), "the token is never published");
            let envelope: Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(envelope["oslo.version"], "2.0");
            let message: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
            assert_schema(&format!("notification/{}.json", n.event_type), &message);
            seen.insert(n.event_type);
        }
    }
    assert_eq!(seen.len(), 9, "{seen:?}");
}
