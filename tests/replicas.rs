//! Several `novasnap serve` replicas on the same queues (issue 5): a cast delivered twice
//! makes one snapshot, and two casts for one instance never run at the same time.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_cast_published_twice_makes_one_snapshot_across_two_replicas() {
    let guest = guest(2);
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let (a, b) = (WorkerProcess::start(&config).await, WorkerProcess::start(&config).await);

    let image_id = glance_create_snapshot_image(&guest.uuid).await;
    let body = nova_snapshot_cast(&guest, &image_id, &config.host);
    publish_cast(&config.host, &body).await;
    publish_cast(&config.host, &body).await;

    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    // The second delivery handled too: recognised as a duplicate (the relay's queue being
    // empty says only that both were passed on). Then what the listener has in flight.
    let logs = || a.log_text() + &b.log_text();
    wait_until(Duration::from_secs(120), || async { logs().contains("duplicate cast") })
        .await
        .unwrap_or_else(|| panic!("the second delivery was recognised:\n{}", logs()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    listener.collect();

    let starts = listener
        .received
        .iter()
        .filter(|n| n["event_type"] == "instance.snapshot.start" && n["payload"].to_string().contains(&image_id))
        .count();
    assert_eq!(starts, 1, "one snapshot for two deliveries: {:?}", listener.event_types());
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_image_holds_guest(&image_id).await;
    assert!(a.stop().await.success() && b.stop().await.success());
    glance_delete(&image_id).await;
}

#[tokio::test]
async fn two_casts_for_one_instance_run_one_after_the_other() {
    let guest = guest(1);
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let (a, b) = (WorkerProcess::start(&config).await, WorkerProcess::start(&config).await);

    let first = nova_api(&config, "snapshot", &guest, &[]).await;
    let second = nova_api(&config, "snapshot", &guest, &[]).await;
    listener.wait_for("instance.snapshot.end", &first, Duration::from_secs(300)).await;
    listener.wait_for("instance.snapshot.end", &second, Duration::from_secs(300)).await;

    // start/end of each image, in arrival order: never interleaved.
    let sequence: Vec<(String, &str)> = listener
        .received
        .iter()
        .filter_map(|n| {
            let kind = match n["event_type"].as_str()? {
                "instance.snapshot.start" => "start",
                "instance.snapshot.end" => "end",
                _ => return None,
            };
            let payload = n["payload"].to_string();
            let image = [&first, &second].into_iter().find(|id| payload.contains(id.as_str()))?;
            Some((image.clone(), kind))
        })
        .collect();
    assert_eq!(sequence.len(), 4, "{sequence:?}");
    assert_eq!(sequence[0].0, sequence[1].0, "the first snapshot ends before the second starts: {sequence:?}");
    assert_eq!((sequence[0].1, sequence[1].1, sequence[2].1, sequence[3].1), ("start", "end", "start", "end"));
    for id in [&first, &second] {
        assert_eq!(glance_image(id).await.unwrap()["status"], "active");
        assert_image_holds_guest(id).await;
        glance_delete(id).await;
    }
    assert!(a.stop().await.success() && b.stop().await.success());
}

/// The `rados` CLI on novasnap's namespace of the state pool (the tests' `vms`).
async fn rados(args: &[&str]) -> std::process::Output {
    // The stack's [novasnap] state_pool, in the ledger's namespace.
    tokio::process::Command::new("rados").args(["-p", "novasnap", "-N", "novasnap"]).args(args).output().await.unwrap()
}

/// Whether the process is stopped (state `T` in /proc/<pid>/stat).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// The lease holder stalls (it stops itself with SIGSTOP right after its clone) for longer
/// than its lease, and another holder takes the instance lease meanwhile (here the test,
/// through the rados CLI, as another replica would). Resumed, the worker finds its lease
/// lost and changes nothing more while the other holds it: no `snap` on the copy, no end.
/// The cast goes back to the broker, and once the lease is free again the redelivery
/// completes the snapshot.
#[tokio::test]
async fn a_worker_paused_past_its_lease_stops_and_changes_nothing_more() {
    let guest = guest(1);
    let config = TestConfig::new(&[]); // a 6 s lease
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start_with(&config, &[("NOVASNAP_PAUSE_AT", "after-clone")]).await;
    let pid = worker.child.id().unwrap();
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    wait_until(Duration::from_secs(120), || async move { stopped(pid) })
        .await
        .unwrap_or_else(|| panic!("the worker did not pause after its clone:\n{}", worker.log_text()));
    tokio::time::sleep(Duration::from_secs(10)).await; // its lease lapses
    let object = format!("novasnap.instance.{}", guest.uuid);
    let taken =
        rados(&["lock", "get", &object, "snapshot", "--lock-cookie", "other-replica", "--lock-duration", "40"]).await;
    let resume = || std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status();
    if !taken.status.success() {
        let _ = resume();
        panic!("the lapsed lease could not be taken: {}", String::from_utf8_lossy(&taken.stderr));
    }
    resume().unwrap();

    tokio::time::sleep(Duration::from_secs(15)).await;
    listener.collect();
    assert!(
        !listener.received.iter().any(|n| n["event_type"] == "instance.snapshot.end"),
        "no end while another holds the lease: {:?}",
        listener.event_types()
    );
    let copy = format!("images/{image_id}");
    assert!(!rbd_snapshots(&copy).await.contains(&"snap".to_string()), "nothing changed after the loss");
    let log = worker.log_text();
    assert!(log.contains("instance lease lost") && log.contains("handing the cast back"), "{log}");

    // The other holder is done: the redelivery takes the lease and finishes.
    let _ =
        rados(&["lock", "break", &object, "snapshot", &rados_locker(&object).await, "--lock-cookie", "other-replica"])
            .await;
    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    worker.wait_settled(&image_id).await;
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_image_holds_guest(&image_id).await;
    assert!(novasnap_disk_snapshots(&guest).await.is_empty());
    assert!(worker.stop().await.success());
    glance_delete(&image_id).await;
}

/// The name of the locker of `object`'s `snapshot` lock.
async fn rados_locker(object: &str) -> String {
    let out = rados(&["lock", "info", object, "snapshot", "--format", "json"]).await;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    info["lockers"][0]["name"].as_str().unwrap_or_default().to_string()
}
