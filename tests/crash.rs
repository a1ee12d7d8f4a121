//! Crash safety (issue 5): a worker that dies at any step of a snapshot — no cleanup, no ack,
//! as under `kill -9` — and a worker started after it finish the same snapshot: one active
//! image with the right bytes, no stray disk snapshot, no stray copy, no temporary files,
//! the guest running, and the end seen by subscribers.
//!
//! Each crash point runs `NOVASNAP_CRASH_RUNS` times (default 1; `scripts/crash-matrix`
//! runs more and writes the results table). Needs the `fault-injection` feature, which
//! `make test` enables.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;

fn runs() -> usize {
    std::env::var("NOVASNAP_CRASH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(1)
}

async fn crash_then_recover(point: &str, overrides: &[(&str, &str, &str)]) {
    crash_then_recover_asked(point, overrides, Asked::ByCast(&[])).await;
}

async fn crash_then_recover_asked(point: &str, overrides: &[(&str, &str, &str)], asked: Asked<'_>) {
    for run in 1..=runs() {
        let guest = guest(1);
        let config = asked.config(overrides);
        let mut listener = Listener::start(&config).await;
        let images_before = rbd_images("images").await;

        let mut doomed = WorkerProcess::start_with(&config, &[("NOVASNAP_CRASH_AT", point)]).await;
        let image_id = asked.snapshot(&config, &guest).await;
        let status = doomed.wait_exit(Duration::from_secs(180)).await;
        assert_eq!(status.signal(), Some(libc_sigabrt()), "run {run}: worker died at {point}:\n{}", doomed.log_text());
        assert!(doomed.log_text().contains(&format!("crash injected at {point}")));

        // The cast was not acknowledged: the next worker gets it again and finishes it.
        let survivor = WorkerProcess::start(&config).await;
        listener.wait_for("instance.snapshot.end", &image_id, Duration::from_secs(300)).await;
        survivor.wait_settled(&image_id).await;
        let image = glance_image(&image_id).await.expect("image exists");
        assert_eq!(image["status"], "active", "run {run} at {point}: {image:#}\n{}", survivor.log_text());
        assert_image_holds_guest(&image_id).await;
        assert!(
            glance_images_of(&guest.uuid, "snapshot").await.iter().filter(|i| i["id"] == image_id.as_str()).count()
                == 1
        );
        let stray = novasnap_disk_snapshots(&guest).await;
        assert!(stray.is_empty(), "run {run} at {point}: disk snapshots left: {stray:?}");
        let new_images: Vec<String> =
            rbd_images("images").await.into_iter().filter(|i| !images_before.contains(i)).collect();
        // Glance's own upload also lands in its pool under the image id: either way exactly one.
        assert_eq!(new_images, vec![image_id.clone()], "run {run} at {point}: only the image itself in Glance's pool");
        assert!(temp_leftovers().is_empty(), "run {run} at {point}: temp files left: {:?}", temp_leftovers());
        assert_eq!(domain_state(&guest.domain).await, "running");
        let freeze = virsh(&["qemu-agent-command", &guest.domain, r#"{"execute":"guest-fsfreeze-status"}"#]).await;
        assert!(freeze.contains("thawed"), "run {run} at {point}: the guest's filesystems are thawed: {freeze}");
        asked.assert_nova_left_it_running(&guest).await;
        assert!(survivor.stop().await.success());
        glance_delete(&image_id).await;
    }
}

/// SIGABRT: what `std::process::abort` ends a process with.
fn libc_sigabrt() -> i32 {
    6
}

#[tokio::test]
async fn crash_after_disk_snapshot() {
    crash_then_recover("after-disk-snapshot", &[]).await;
}

#[tokio::test]
async fn crash_after_clone() {
    crash_then_recover("after-clone", &[]).await;
}

#[tokio::test]
async fn crash_mid_flatten() {
    crash_then_recover("mid-flatten", &[]).await;
}

#[tokio::test]
async fn crash_after_flatten_before_cleanup() {
    crash_then_recover("after-flatten", &[]).await;
}

#[tokio::test]
async fn crash_after_snap_before_the_location_is_registered() {
    crash_then_recover("after-image-snapshot", &[]).await;
}

#[tokio::test]
async fn crash_mid_upload_on_the_standard_path() {
    crash_then_recover("mid-upload", &[("novasnap", "direct_snapshot", "false")]).await;
}

#[tokio::test]
async fn crash_after_upload_before_cleanup() {
    crash_then_recover("after-upload", &[("novasnap", "direct_snapshot", "false")]).await;
}

/// Killed while the guest's filesystems are frozen (its image runs the guest agent): the
/// guest stays frozen until a worker comes back, which thaws it before anything else and
/// finishes the snapshot.
#[tokio::test]
async fn crash_while_the_guest_is_frozen() {
    crash_then_recover_asked(
        "while-frozen",
        &[],
        Asked::ByCast(&["--system-metadata", "image_hw_qemu_guest_agent=yes"]),
    )
    .await;
}

/// Cold snapshots (`[workarounds] disable_libvirt_livesnapshot`): the guest is in managed
/// save only while its disk snapshot is made. Killed right then, the worker leaves it
/// suspended; the next one resumes it as soon as it finds it so, and finishes. Asked of Nova,
/// whose nova-compute would otherwise stop the server it sees off (see `Asked::OfNova`).
/// (The frozen and live crash points need not be: the guest runs throughout.)
const COLD: (&str, &str, &str) = ("workarounds", "disable_libvirt_livesnapshot", "true");

#[tokio::test]
async fn crash_while_the_guest_is_suspended_on_a_cold_snapshot() {
    crash_then_recover_asked("while-suspended", &[COLD], Asked::OfNova).await;
}

#[tokio::test]
async fn crash_mid_flatten_on_a_cold_snapshot() {
    crash_then_recover_asked("mid-flatten", &[COLD], Asked::OfNova).await;
}
