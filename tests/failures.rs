//! Snapshots that cannot be taken as asked, against the real stack: every one ends clean —
//! nothing leaked in Ceph or on disk, the guest running, the image deleted unless active.

mod common;

use std::time::Duration;

use common::*;

/// Nova places the instance on this host and libvirt here does not know it: the instance is
/// gone, its queued image is deleted (as Nova does), and the failure is reported.
#[tokio::test]
async fn an_instance_gone_from_its_host_has_its_image_deleted_and_is_reported() {
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let mut ghost = guest(1);
    ghost.uuid = uuid::Uuid::new_v4().to_string();
    let image_id = nova_api(&config, "snapshot", &ghost, &[]).await;
    listener.wait_for("instance.snapshot.error", &image_id, Duration::from_secs(120)).await;
    worker.wait_settled(&image_id).await;
    wait_until(Duration::from_secs(60), || async { glance_image(&image_id).await.is_none() })
        .await
        .unwrap_or_else(|| panic!("queued image deleted:\n{}", worker.log_text()));
    assert!(worker.stop().await.success());
}

/// A cast whose instance Nova places on another host than this worker's `[DEFAULT] host`,
/// for a guest libvirt here does not know: nothing proves the instance gone, so its image is
/// kept; the failure is logged and reported, and the cast acknowledged.
#[tokio::test]
async fn a_guest_unknown_here_but_placed_elsewhere_keeps_its_image_and_is_reported() {
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let ghost = guest(1).clone_with_uuid(uuid::Uuid::new_v4());
    let image_id = glance_create_snapshot_image(&ghost.uuid).await;
    // Addressed to this worker's queue, while the instance says it lives elsewhere.
    publish_cast(&config.host, &nova_snapshot_cast(&ghost, &image_id, "another-host")).await;
    listener.wait_for("instance.snapshot.error", &image_id, Duration::from_secs(120)).await;
    worker.wait_settled(&image_id).await;
    assert_eq!(glance_image(&image_id).await.expect("the image is kept")["status"], "queued");
    assert!(worker.log_text().contains("does not know instance"), "{}", worker.log_text());
    glance_delete(&image_id).await;
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn an_image_deleted_right_after_the_cast_leaves_nothing_behind() {
    let guest = guest(1);
    let config = TestConfig::new(&[]);
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    glance_delete(&image_id).await;
    worker.wait_settled(&image_id).await;
    // Whatever step the deletion met, the request ends and cleans up after itself.
    wait_until(Duration::from_secs(60), || async {
        novasnap_disk_snapshots(&guest).await.is_empty() && !rbd_images("images").await.contains(&image_id)
    })
    .await
    .unwrap_or_else(|| panic!("leftovers remain:\n{}", worker.log_text()));
    assert!(glance_image(&image_id).await.is_none());
    assert_eq!(rbd_images("images").await, images_before);
    assert!(temp_leftovers().is_empty());
    assert_eq!(domain_state(&guest.domain).await, "running");
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn glance_refusing_locations_falls_back_to_the_standard_path() {
    let guest = guest(1);
    let proxy = glance_refusing_locations().await;
    let config = TestConfig::new(&[("glance", "api_servers", &proxy)]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    worker.wait_settled(&image_id).await;
    let log = worker.log_text();
    assert!(
        log.contains("performing standard snapshot") && log.contains("refuses"),
        "fallback and its reason logged:\n{log}"
    );
    let image = glance_image(&image_id).await.unwrap();
    assert_eq!(image["status"], "active");
    assert_image_holds_guest(&image_id).await;
    assert!(novasnap_disk_snapshots(&guest).await.is_empty());
    assert!(worker.stop().await.success());
    glance_delete(&image_id).await;
}

#[tokio::test]
async fn backup_with_rotation_two_keeps_the_newest_two() {
    let guest = guest(2);
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let backup_type = unique("weekly");
    let mut made = Vec::new();
    for _ in 0..3 {
        let id = nova_api(&config, "backup", &guest, &["--backup-type", &backup_type, "--rotation", "2"]).await;
        listener.wait_for("instance.snapshot.end", &id, Duration::from_secs(300)).await;
        made.push(id);
    }
    // The rotation runs after the end notification, as in Nova's `backup_instance`.
    for id in &made {
        worker.wait_settled(id).await;
    }
    let left: Vec<String> = glance_images_of(&guest.uuid, "backup")
        .await
        .into_iter()
        .filter(|i| i["backup_type"] == backup_type.as_str())
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let mut expected = vec![made[1].clone(), made[2].clone()];
    let mut got = left.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "the oldest backup rotated out:\n{}", worker.log_text());
    assert!(glance_image(&made[0]).await.is_none());
    for id in &made[1..] {
        assert_image_holds_guest(id).await;
        glance_delete(id).await;
    }
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn a_guest_stopped_right_after_the_cast_still_gets_a_clean_snapshot() {
    let guest = guest(2);
    let config = TestConfig::new(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    // The user stops the server through Nova (a guest stopped behind Nova's back would be
    // stopped again by Nova's power-state sync once restarted).
    common::openstack::openstack_plain(&["server", "stop", &guest.uuid]).await;
    let _restart = StartedAgain(guest.uuid.clone());
    wait_until(Duration::from_secs(120), || async { domain_state(&guest.domain).await == "shut off" })
        .await
        .expect("Nova stops the server");
    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    worker.wait_settled(&image_id).await;
    let state = domain_state(&guest.domain).await;
    // Wherever the stop met the pipeline, the image holds the disk and nothing is left.
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_image_holds_guest(&image_id).await;
    assert!(novasnap_disk_snapshots(&guest).await.is_empty());
    assert_eq!(state, "shut off", "a guest the user stopped is not started again");
    assert!(worker.stop().await.success());
    glance_delete(&image_id).await;
}

#[tokio::test]
async fn reclaim_lists_then_removes_only_novasnaps_own_leftovers() {
    let guest = guest(1);
    let config = TestConfig::new(&[]);
    let disk = rbd_name(&guest.disk).to_string();
    // A dead request's disk snapshot (its image is gone), and a snapshot someone else made.
    let dead = format!("novasnap-{}", uuid::Uuid::new_v4().simple());
    let foreign = unique("operator-snap");
    for snap in [&dead, &foreign] {
        let status = tokio::process::Command::new("rbd")
            .args(["snap", "create", &format!("{disk}@{snap}")])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }
    let reclaim = |dry_run: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_novasnap"));
        // --all: a snapshot made by hand was noted by no ledger.
        cmd.args(["reclaim", "--all", "--config"]).arg(&config.path);
        if dry_run {
            cmd.arg("--dry-run");
        }
        cmd.output()
    };
    let listed = reclaim(true).await.unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success() && text.contains(&dead) && text.contains("is gone"), "{text}");
    assert!(!text.contains(&foreign), "{text}");
    assert!(rbd_snapshots(&disk).await.contains(&dead), "a dry run changes nothing");
    let done = reclaim(false).await.unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let left = rbd_snapshots(&disk).await;
    assert!(!left.contains(&dead) && left.contains(&foreign), "{left:?}");
    let status =
        tokio::process::Command::new("rbd").args(["snap", "rm", &format!("{disk}@{foreign}")]).status().await.unwrap();
    assert!(status.success());
}

/// Starts the server again through Nova when the test ends, however it ends: the next tests
/// need it running.
struct StartedAgain(String);

impl Drop for StartedAgain {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env("OPENSTACK")).args(["server", "start", &self.0]).output();
    }
}
