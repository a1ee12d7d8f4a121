//! Faults that are not crashes, against the real stack: Glance answering 503, the Ceph OSD
//! unresponsive, libvirtd restarted. A fault that clears within the retry bounds only delays
//! the snapshot; one that does not ends in a clean failure. (The broker restart is in
//! tests/messaging.rs.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Retries enough to ride out a few seconds of outage: 100 ms doubling to 2 s, 12 times.
const PATIENT: (&str, &str, &str) = ("novasnap", "retry_max_retries", "12");

/// A Glance that answers 503 to every metadata update and location request while `down`
/// is set — the requests of the direct path's last steps, after the copy exists in Ceph.
/// Returns the proxy's URL and how many requests it refused.
async fn glance_failing_updates(down: Arc<AtomicBool>) -> (String, Arc<AtomicUsize>) {
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    let url = glance_proxy(move |request| {
        let update = request.request_line().starts_with("PATCH") || request.is_location_change();
        (update && down.load(Ordering::SeqCst)).then(|| {
            counter.fetch_add(1, Ordering::SeqCst);
            ("503 Service Unavailable", "the image service is unavailable")
        })
    })
    .await;
    (url, refused)
}

/// The end state every outage test asserts: nothing of novasnap's left in Ceph or on disk,
/// and the guest running.
async fn assert_nothing_left(guest: &DemoGuest, images_before: &[String], worker: &WorkerProcess) {
    assert!(novasnap_disk_snapshots(guest).await.is_empty(), "disk snapshot left:\n{}", worker.log_text());
    assert_eq!(rbd_images("images").await, images_before, "copies in Glance's pool");
    assert!(temp_leftovers().is_empty());
    assert_eq!(domain_state(&guest.domain).await, "running");
}

#[tokio::test]
async fn glance_answering_503_for_a_while_only_delays_the_snapshot() {
    let guest = guest(1);
    let down = Arc::new(AtomicBool::new(true));
    let (proxy, refused) = glance_failing_updates(down.clone()).await;
    let config = TestConfig::new(&[("glance", "api_servers", &proxy), PATIENT]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;

    wait_until(Duration::from_secs(120), || async { refused.load(Ordering::SeqCst) >= 2 })
        .await
        .unwrap_or_else(|| panic!("the worker never reached Glance's update:\n{}", worker.log_text()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    down.store(false, Ordering::SeqCst);

    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_eq!(glance_image_sha256(&image_id).await, guest.sha256);
    let log = worker.log_text();
    assert!(log.contains("transient fault, retrying") && log.contains("503"), "the retries are logged:\n{log}");
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn glance_down_beyond_the_retry_bounds_fails_cleanly() {
    let guest = guest(1);
    let (proxy, refused) = glance_failing_updates(Arc::new(AtomicBool::new(true))).await;
    let config = TestConfig::new(&[("glance", "api_servers", &proxy)]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;

    listener.wait_for("instance.snapshot.error", &image_id, Duration::from_secs(300)).await;
    // The first try and the configured four retries, then the failure.
    assert_eq!(refused.load(Ordering::SeqCst), 5, "{}", worker.log_text());
    assert!(glance_image(&image_id).await.is_none(), "the failed snapshot's image is deleted");
    assert!(listener.event_types().iter().all(|t| !t.ends_with(".end")), "{:?}", listener.event_types());
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}

/// The stack's pid file of a daemon, under its state directory.
fn pid_of(relative: &str) -> String {
    let path = std::path::Path::new(&env("NOVASNAP_STACK_STATE")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

async fn signal(sig: &str, pid: &str) {
    let status = tokio::process::Command::new("kill").args([sig, pid]).status().await.unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// The OSD stops answering (SIGSTOP) as the cast arrives; 8 s later it runs again and is
/// marked down, so it re-asserts itself and its PGs peer anew — what the cluster sees of an
/// OSD restart. Ceph calls wait or time out and are retried; the snapshot completes.
///
/// The OSD process itself cannot be restarted here: the stack's memstore OSD would come back
/// empty. Marking it down is also what clears the PGs a paused lone OSD otherwise leaves
/// "laggy" (blocking I/O for good, seen here).
#[tokio::test]
async fn an_unresponsive_osd_for_a_while_only_delays_the_snapshot() {
    let guest = guest(2);
    let config = TestConfig::new(&[PATIENT]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let osd = pid_of("ceph/run/osd.0.pid");
    signal("-STOP", &osd).await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal("-CONT", &osd).await;
    let marked = tokio::process::Command::new("ceph").args(["osd", "down", "0"]).output().await.unwrap();
    assert!(marked.status.success(), "ceph osd down 0: {}", String::from_utf8_lossy(&marked.stderr));

    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_eq!(glance_image_sha256(&image_id).await, guest.sha256);
    // The pause met the pipeline: some step waited for the OSD for seconds.
    let log = worker.log_text();
    let longest_step =
        log.lines().filter_map(|l| l.split("elapsed_ms=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok()).max();
    assert!(longest_step >= Some(4000), "no step waited for the OSD ({longest_step:?} ms):\n{log}");
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}

/// libvirtd is down when the cast arrives and is started again a few seconds later: the
/// worker reconnects and a cold snapshot (suspend, resume: libvirt calls at both ends)
/// completes with the guest running again.
#[tokio::test]
async fn a_libvirtd_restart_only_delays_the_snapshot() {
    let guest = guest(1);
    let config = TestConfig::new(&[PATIENT, ("workarounds", "disable_libvirt_livesnapshot", "true")]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let libvirtd = pid_of("libvirt/libvirtd.pid");
    signal("-TERM", &libvirtd).await;
    let gone =
        wait_until(Duration::from_secs(30), || async { !std::path::Path::new("/proc").join(&libvirtd).exists() }).await;
    assert!(gone.is_some(), "libvirtd {libvirtd} did not exit");
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let up = tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack"))
        .arg("up")
        .output()
        .await
        .unwrap();
    assert!(up.status.success(), "scripts/stack up restarts libvirtd: {}", String::from_utf8_lossy(&up.stderr));

    listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
    assert_eq!(glance_image(&image_id).await.unwrap()["status"], "active");
    assert_eq!(glance_image_sha256(&image_id).await, guest.sha256);
    assert!(worker.log_text().contains("transient fault, retrying"), "{}", worker.log_text());
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}
