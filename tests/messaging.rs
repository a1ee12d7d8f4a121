//! The worker on the wire (issue 3), against the real RabbitMQ: bad input of every class is
//! dead-lettered with its reason while the worker keeps consuming; a broker restart in the
//! middle of a snapshot loses nothing; SIGTERM lets the snapshot in flight finish.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn dead_letter_overrides(tag: &str) -> (String, Vec<(&'static str, &'static str, String)>) {
    let name = unique(&format!("novasnap-test-dlq-{tag}"));
    let overrides =
        vec![("novasnap", "dead_letter_exchange", name.clone()), ("novasnap", "dead_letter_queue", name.clone())];
    (name, overrides)
}

fn as_refs<'a>(o: &'a [(&'static str, &'static str, String)]) -> Vec<(&'static str, &'static str, &'a str)> {
    o.iter().map(|(s, k, v)| (*s, *k, v.as_str())).collect()
}

/// The oslo cast `good` (a JSON envelope) with its inner message changed by `edit`.
fn edited_cast(good: &str, edit: &dyn Fn(&mut serde_json::Value)) -> String {
    let envelope: serde_json::Value = serde_json::from_str(good).unwrap();
    let mut msg: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    edit(&mut msg);
    json!({"oslo.version": "2.0", "oslo.message": msg.to_string()}).to_string()
}

/// Takes dead letters from `dlq` until `count` have come, for at most 60 s.
async fn dead_letters(
    dlq: &str,
    count: usize,
    worker: &WorkerProcess,
) -> Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
    let mut letters = Vec::new();
    let start = std::time::Instant::now();
    while letters.len() < count {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} of {count} dead letters:\n{}",
            letters.len(),
            worker.log_text()
        );
        letters.extend(drain_queue(dlq).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    letters
}

#[tokio::test]
async fn every_bad_input_class_is_dead_lettered_with_its_reason_and_the_worker_goes_on() {
    let (dlq, overrides) = dead_letter_overrides("bad");
    let config = TestConfig::new(&as_refs(&overrides));
    let worker = WorkerProcess::start(&config).await;
    let key = format!("compute.{}", config.host);
    let guest = guest(1);
    let good = String::from_utf8(nova_snapshot_cast(&guest, &uuid::Uuid::new_v4().to_string(), &config.host)).unwrap();
    let inner = |edit: &dyn Fn(&mut serde_json::Value)| edited_cast(&good, edit);
    let cases: Vec<(&str, Option<&str>, String)> = vec![
        ("content_type", None, good.clone()),
        ("content_type", Some("text/plain"), good.clone()),
        ("malformed", Some("application/json"), "{not json".into()),
        ("malformed", Some("application/json"), "[1, 2]".into()),
        (
            "envelope_version",
            Some("application/json"),
            json!({"oslo.version": "3.0", "oslo.message": "{}"}).to_string(),
        ),
        ("no_such_method", Some("application/json"), inner(&|m| m["method"] = json!("reboot_instance"))),
        ("unsupported_version", Some("application/json"), inner(&|m| m["version"] = json!("7.0"))),
        ("bad_argument", Some("application/json"), inner(&|m| m["args"]["image_id"] = json!("../../images/x"))),
        (
            "bad_argument",
            Some("application/json"),
            inner(&|m| m["args"]["instance"]["nova_object.data"]["uuid"] = json!(42)),
        ),
        ("too_large", Some("application/json"), format!("{{\"pad\": \"{}\"}}", "x".repeat(2 << 20))),
    ];
    for (_, content_type, body) in &cases {
        publish_raw("nova", &key, *content_type, body.as_bytes()).await;
    }
    let letters = dead_letters(&dlq, cases.len(), &worker).await;
    let classes: Vec<&str> = letters.iter().map(|(h, _)| h["x-novasnap-reason-class"].as_str()).collect();
    let expected: Vec<&str> = cases.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(classes, expected);
    for ((headers, body), (_, _, sent)) in letters.iter().zip(&cases) {
        assert!(!headers["x-novasnap-reason"].is_empty());
        assert_eq!(headers["x-novasnap-original-routing-key"], key);
        assert_eq!(body, sent.as_bytes(), "the message is kept as it came");
    }
    assert_eq!(queue_depth(&key).await, 0, "nothing requeued in a loop");
    assert!(worker.log_text().contains("refusing a cast"));

    // Still consuming: a good MessagePack cast for a guest that is not here is handled.
    let ghost = guest.clone_with_uuid(uuid::Uuid::new_v4());
    let image = glance_create_snapshot_image(&ghost.uuid).await;
    let cast: serde_json::Value = serde_json::from_slice(&nova_snapshot_cast(&ghost, &image, &config.host)).unwrap();
    publish_raw("nova", &key, Some("application/msgpack"), &rmp_serde::to_vec_named(&cast).unwrap()).await;
    wait_until(Duration::from_secs(60), || async { glance_image(&image).await.is_none() })
        .await
        .unwrap_or_else(|| panic!("the MessagePack cast was handled:\n{}", worker.log_text()));
    assert!(worker.stop().await.success());
    delete_queue(&dlq).await;
}

#[tokio::test]
async fn a_broker_restart_mid_snapshot_loses_nothing() {
    let guest = guest(2);
    let exchange = unique("novasnap-test-durable");
    let config = TestConfig::new(&[
        ("DEFAULT", "control_exchange", &exchange),
        ("oslo_messaging_rabbit", "amqp_durable_queues", "true"),
        // Durable notification queues would clash with every non-durable listener that
        // shares their global names: this test needs no notifications.
        ("oslo_messaging_notifications", "driver", "noop"),
    ]);
    let worker = WorkerProcess::start(&config).await;
    let image = glance_create_snapshot_image(&guest.uuid).await;
    let body = nova_snapshot_cast(&guest, &image, &config.host);
    publish_raw(&exchange, &format!("compute.{}", config.host), Some("application/json"), &body).await;
    rabbitmqctl(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;

    wait_until(Duration::from_secs(180), || async {
        glance_image(&image).await.is_some_and(|i| i["status"] == "active")
    })
    .await
    .unwrap_or_else(|| panic!("snapshot finished across the restart:\n{}", worker.log_text()));
    // The durable, persistent cast survived; once back it was settled (done or duplicate).
    let queue = format!("compute.{}", config.host);
    wait_until(Duration::from_secs(120), || async { queue_depth(&queue).await == 0 })
        .await
        .unwrap_or_else(|| panic!("the cast was settled after the restart:\n{}", worker.log_text()));
    assert_image_holds_guest(&image).await;
    // And the worker consumes again: a second cast after the restart completes too.
    let second = glance_create_snapshot_image(&guest.uuid).await;
    let body = nova_snapshot_cast(&guest, &second, &config.host);
    publish_raw(&exchange, &queue, Some("application/json"), &body).await;
    wait_until(Duration::from_secs(180), || async {
        glance_image(&second).await.is_some_and(|i| i["status"] == "active")
    })
    .await
    .unwrap_or_else(|| panic!("consuming resumed after the restart:\n{}", worker.log_text()));
    assert!(worker.stop().await.success());
    for id in [&image, &second] {
        glance_delete(id).await;
    }
    for q in [queue.as_str(), "compute"] {
        delete_queue(q).await;
    }
    let _ = tokio::process::Command::new("rabbitmqadmin")
        .args(["delete", "exchange", &format!("name={exchange}")])
        .output()
        .await;
}

#[tokio::test]
async fn sigterm_lets_the_snapshot_in_flight_finish_and_exits_zero() {
    let guest = guest(1);
    let config = TestConfig::new(&[]);
    let worker = WorkerProcess::start(&config).await;
    let image = nova_api(&config, "snapshot", &guest, &[]).await;
    wait_until(Duration::from_secs(60), || async { worker.log_text().contains("beginning") })
        .await
        .unwrap_or_else(|| panic!("snapshot started:\n{}", worker.log_text()));
    let log = worker.log.clone();
    let status = worker.stop().await;
    let text = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "exit status {status}:\n{text}");
    assert!(text.contains("no longer taking casts"), "{text}");
    assert_eq!(glance_image(&image).await.unwrap()["status"], "active", "{text}");
    // The cast that finished during the grace period was acknowledged before the exit: nothing
    // of it waits to be delivered again.
    for queue in [format!("compute.{}", config.host), format!("novasnap.snapshots.{}", config.host)] {
        assert_eq!(queue_depth(&queue).await, 0, "{queue}:\n{text}");
    }
    glance_delete(&image).await;
}

/// Hostile input stays small and harmless: a 200 KB `image_id`, a version with a newline in
/// it, a token in a refused cast. Each is dead-lettered with a short reason and no token; the
/// log has no forged line; the worker keeps its one connection and goes on serving.
#[tokio::test]
async fn hostile_casts_are_dead_lettered_small_and_the_worker_goes_on() {
    let (dlq, overrides) = dead_letter_overrides("hostile");
    let config = TestConfig::new(&as_refs(&overrides));
    let worker = WorkerProcess::start(&config).await;
    let key = format!("compute.{}", config.host);
    let guest = guest(1);
    let good = String::from_utf8(nova_snapshot_cast(&guest, &uuid::Uuid::new_v4().to_string(), &config.host)).unwrap();
    let inner = |edit: &dyn Fn(&mut serde_json::Value)| edited_cast(&good, edit);
    let huge = inner(&|m| m["args"]["image_id"] = json!("x".repeat(200 * 1024)));
    let forged = inner(&|m| m["version"] = json!("7.0\nERROR novasnap: forged line"));
    let secret = inner(&|m| {
        m["args"]["image_id"] = json!("not-a-uuid");
        m["_context_auth_token"] = json!("gAAAAAsecretTokenOfAUser");
    });
    for body in [&huge, &forged, &secret] {
        publish_raw("nova", &key, Some("application/json"), body.as_bytes()).await;
    }
    let letters = dead_letters(&dlq, 3, &worker).await;
    for (headers, body) in &letters {
        let reason = &headers["x-novasnap-reason"];
        assert!(reason.len() <= 512, "a short reason: {} bytes", reason.len());
        assert!(!reason.contains('\n'));
        assert!(!String::from_utf8_lossy(body).contains("secretTokenOfAUser"), "the dead letter keeps no token");
    }
    let log = worker.log_text();
    assert!(!log.lines().any(|l| l.starts_with("ERROR novasnap: forged")), "no forged log line:\n{log}");
    assert_eq!(log.matches("name=\"novasnap:").count(), 1, "one consuming connection, never torn down:\n{log}");
    assert_eq!(queue_depth(&key).await, 0, "nothing comes back in a loop");

    // And it still serves: a cast for a guest that is not here ends with its image deleted.
    let ghost = guest.clone_with_uuid(uuid::Uuid::new_v4());
    let image = glance_create_snapshot_image(&ghost.uuid).await;
    publish_cast(&config.host, &nova_snapshot_cast(&ghost, &image, &config.host)).await;
    wait_until(Duration::from_secs(60), || async { glance_image(&image).await.is_none() })
        .await
        .unwrap_or_else(|| panic!("the next cast was served:\n{}", worker.log_text()));
    let started = std::time::Instant::now();
    assert!(worker.stop().await.success());
    assert!(started.elapsed() < Duration::from_secs(30), "SIGTERM ends an idle worker at once");
    delete_queue(&dlq).await;
}

/// A broker that blocks publishers (a memory or disk alarm) does not stall a snapshot in
/// flight: notifications wait off its path, and the snapshot finishes; they are delivered
/// once the alarm clears.
async fn an_alarm_does_not_stall_a_snapshot_in_flight(kind: Alarm) {
    let guest = guest(1);
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let image = nova_api(&config, "snapshot", &guest, &[]).await;
    wait_until(Duration::from_secs(60), || async { worker.log_text().contains("beginning") })
        .await
        .unwrap_or_else(|| panic!("snapshot started:\n{}", worker.log_text()));
    let alarm = BrokerAlarm::raise(kind).await;
    let finished = wait_until(Duration::from_secs(240), || async {
        glance_image(&image).await.is_some_and(|i| i["status"] == "active")
    })
    .await;
    drop(alarm);
    assert!(finished.is_some(), "the image went active under the {kind:?} alarm:\n{}", worker.log_text());
    listener.wait_for("instance.snapshot.end", &image, Duration::from_secs(120)).await;
    assert!(worker.stop().await.success());
    glance_delete(&image).await;
}

#[tokio::test]
async fn a_memory_alarm_does_not_stall_a_snapshot_in_flight() {
    an_alarm_does_not_stall_a_snapshot_in_flight(Alarm::Memory).await;
}

#[tokio::test]
async fn a_disk_alarm_does_not_stall_a_snapshot_in_flight() {
    an_alarm_does_not_stall_a_snapshot_in_flight(Alarm::Disk).await;
}

#[derive(Debug, Clone, Copy)]
enum Alarm {
    Memory,
    Disk,
}

impl Alarm {
    /// The `rabbitmqctl` setting that raises it, and the broker's default that clears it.
    fn setting(self, raised: bool) -> [&'static str; 2] {
        match (self, raised) {
            (Alarm::Memory, true) => ["set_vm_memory_high_watermark", "0.0000001"],
            (Alarm::Memory, false) => ["set_vm_memory_high_watermark", "0.4"],
            (Alarm::Disk, true) => ["set_disk_free_limit", "100000GB"],
            (Alarm::Disk, false) => ["set_disk_free_limit", "50MB"],
        }
    }
}

/// A RabbitMQ resource alarm, in effect once `raise` returns (the broker looks at free disk
/// every few seconds), and cleared however the test ends.
struct BrokerAlarm(Alarm);

impl BrokerAlarm {
    async fn raise(kind: Alarm) -> Self {
        rabbitmqctl(&kind.setting(true)).await;
        let alarm = Self(kind);
        let name = format!("{kind:?}").to_lowercase();
        let raised = wait_until(Duration::from_secs(60), || async {
            let out = tokio::process::Command::new("rabbitmq-diagnostics").args(["-q", "alarms"]).output().await;
            // "Memory alarm on node …", "Free disk space alarm on node …"
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).to_lowercase().contains(&name))
        });
        assert!(raised.await.is_some(), "the broker reports a {name} alarm");
        alarm
    }
}

impl Drop for BrokerAlarm {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(self.0.setting(false)).status();
    }
}
