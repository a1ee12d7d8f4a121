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
    // Let the second delivery be handled too (it is acknowledged as a duplicate).
    let queue = format!("compute.{}", config.host);
    wait_until(Duration::from_secs(60), || async { queue_depth(&queue).await == 0 }).await.expect("queue drained");
    tokio::time::sleep(Duration::from_secs(2)).await;
    listener.collect();

    let starts = listener
        .received
        .iter()
        .filter(|n| n["event_type"] == "instance.snapshot.start" && n["payload"].to_string().contains(&image_id))
        .count();
    assert_eq!(starts, 1, "one snapshot for two deliveries: {:?}", listener.event_types());
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_eq!(glance_image_sha256(&image_id).await, guest.sha256);
    let logs = a.log_text() + &b.log_text();
    assert!(logs.contains("duplicate cast"), "the second delivery was recognised:\n{logs}");
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
        assert_eq!(glance_image_sha256(id).await, guest.sha256);
        glance_delete(id).await;
    }
    assert!(a.stop().await.success() && b.stop().await.success());
}
