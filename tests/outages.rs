//! Faults that are not crashes, against the real stack: Glance answering 503, Glance's
//! location import task failing or never started, the Ceph OSD unresponsive, Glance's
//! pool full, libvirtd restarted. A fault that clears within the retry bounds only delays
//! the snapshot; one that does not ends in a clean failure. (The broker restart is in
//! tests/messaging.rs.) Workers get a ceph.conf without client timeouts (see
//! `TestConfig`): a Ceph call that gives up does so by novasnap's own bounds.

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

/// The snapshot ended: its end notification seen, the image active with the disk's bytes,
/// the cast settled by `worker`.
async fn assert_completed(listener: &mut Listener, worker: &WorkerProcess, image_id: &str) {
    listener.wait_for("instance.snapshot.end", image_id, Duration::from_secs(300)).await;
    worker.wait_settled(image_id).await;
    assert_eq!(glance_image(image_id).await.unwrap()["status"], "active");
    assert_image_holds_guest(image_id).await;
}

/// The end state every outage test asserts: nothing of novasnap's left in Ceph or on disk,
/// and the guest running.
async fn assert_nothing_left(guest: &DemoGuest, images_before: &[String], worker: &WorkerProcess) {
    assert!(novasnap_disk_snapshots(guest).await.is_empty(), "disk snapshot left:\n{}", worker.log_text());
    // Nothing new: what was there before may have gone meanwhile (another test's leftover,
    // reclaimed), but no copy of this test's is left.
    let new: Vec<String> = rbd_images("images").await.into_iter().filter(|i| !images_before.contains(i)).collect();
    assert!(new.is_empty(), "copies left in Glance's pool: {new:?}");
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

    assert_completed(&mut listener, &worker, &image_id).await;
    let log = worker.log_text();
    assert!(log.contains("transient fault, retrying") && log.contains("503"), "the retries are logged:\n{log}");
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}

/// One snapshot of guest 1 whose location requests (`POST /v2/images/{id}/locations`) pass
/// a proxy in front of Glance: `edit` may edit or answer each of them, given its number
/// (from 0) and the image id. The snapshot must complete with nothing left behind. Returns
/// how many location requests the worker sent and its log.
async fn snapshot_past_location_requests<F>(edit: F) -> (usize, String)
where
    F: Fn(usize, &str, &mut ProxiedRequest) -> Option<(&'static str, &'static str)> + Send + Sync + 'static,
{
    let guest = guest(1);
    let posted = Arc::new(AtomicUsize::new(0));
    let counter = posted.clone();
    let proxy = glance_proxy(move |request| {
        let line = request.request_line().to_string();
        let image = line.strip_prefix("POST /v2/images/")?.strip_suffix(" HTTP/1.1")?.strip_suffix("/locations")?;
        edit(counter.fetch_add(1, Ordering::SeqCst), image, request)
    })
    .await;
    let config = TestConfig::new(&[("glance", "api_servers", &proxy)]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;

    assert_completed(&mut listener, &worker, &image_id).await;
    let log = worker.log_text();
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
    (posted.load(Ordering::SeqCst), log)
}

/// Glance's location import task fails, for real: the proxy forwards the worker's first
/// location request with the snapshot's name changed to one that does not exist, Glance
/// accepts it (202) and its task then fails, leaving the image queued without a location, as
/// a task failing on Glance's "database is locked" does. The worker sees the failed task
/// instead of waiting out its bound, registers the location again, and the snapshot completes.
#[tokio::test]
async fn a_failed_location_import_task_is_registered_again() {
    let (posted, log) = snapshot_past_location_requests(|n, _, request| {
        // Same length, so the Content-Length stays right.
        if n == 0 {
            request.text = request.text.replacen("/snap\"", "/snaq\"", 1);
        }
        None
    })
    .await;
    assert_eq!(posted, 2, "the location is registered a second time");
    assert!(log.contains("location import task") && log.contains("transient fault, retrying"), "{log}");
}

/// Writes into Glance's database (MariaDB) what a location request Glance accepted but never
/// started leaves behind: a pending `location_import` task holding the image's import lock.
fn leave_location_import_pending(image: &str) {
    let task = uuid::Uuid::new_v4().to_string();
    let sql = format!(
        "set @now = utc_timestamp(6);
         -- Owned as Glance owns it, by the image's project: Glance lists a task only to its owner.
         insert into tasks (id, type, status, owner, created_at, updated_at, deleted, image_id, user_id)
           select '{task}', 'location_import', 'pending', owner, @now, @now, 0, id, 'novasnap-test'
           from images where id = '{image}';
         insert into task_info (task_id, input, message) values ('{task}', '{{\"image_id\": \"{image}\"}}', '');
         insert into image_properties (image_id, name, value, created_at, deleted)
           values ('{image}', 'os_glance_import_task', '{task}', @now, 0);"
    );
    let out = std::process::Command::new("mariadb")
        .args(["-h", "127.0.0.1", "-uroot", "glance", "-e", &sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Glance accepts the location (202) but never starts its task (seen when the request met a
/// "database is locked"): the task stays pending for good and holds the image's import
/// lock, which Glance would keep for two hours. The proxy answers the worker's first
/// location request itself and leaves that state in Glance's database. The worker gives the
/// task its bound, the locations API then refuses (409, the lock), and so does the PATCH
/// form at Glance's defaults (`show_multiple_locations` off): the snapshot completes on the
/// standard path.
#[tokio::test]
async fn a_location_import_task_glance_never_starts_is_bypassed() {
    let (posted, log) = snapshot_past_location_requests(|n, image, _| {
        (n == 0).then(|| {
            leave_location_import_pending(image);
            ("202 Accepted", "")
        })
    })
    .await;
    assert_eq!(posted, 2, "the locations API is tried a second time");
    assert!(log.contains("still pending after 60s: Glance never started it"), "{log}");
    assert!(log.contains("performing standard snapshot"), "{log}");
}

/// What Glance does reverting a location import task that failed after taking the location
/// (seen with its sqlite database "locked" under concurrent snapshots): it removes the
/// location's data, the copy in Glance's pool. The proxy plays that revert, removing the
/// copy from Ceph as a location request passes, so Glance's task fails on it.
fn remove_copy_as_glance_reverts(image: &str) {
    let (copy, snap) = (format!("images/{image}"), format!("images/{image}@snap"));
    for args in [&["snap", "unprotect", &snap][..], &["snap", "purge", &copy], &["rm", &copy]] {
        let out = std::process::Command::new("rbd").args(args).output().unwrap();
        assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Glance removes the first copy: the worker finds no copy left to register again, takes
/// the direct path a second time, and registers the new copy.
#[tokio::test]
async fn a_copy_removed_by_glance_is_made_again() {
    let (posted, log) = snapshot_past_location_requests(|n, image, _| {
        if n == 0 {
            remove_copy_as_glance_reverts(image);
        }
        None
    })
    .await;
    assert_eq!(posted, 2, "one location request per copy");
    assert!(log.contains("making the direct snapshot again") && log.contains("was removed, as Glance does"), "{log}");
    assert!(log.contains("direct snapshot registered") && !log.contains("performing standard snapshot"), "{log}");
}

/// Glance removes the second copy too: the worker makes the image on the standard path.
#[tokio::test]
async fn copies_removed_by_glance_twice_fall_back_to_the_standard_path() {
    let (posted, log) = snapshot_past_location_requests(|_, image, _| {
        remove_copy_as_glance_reverts(image);
        None
    })
    .await;
    assert_eq!(posted, 2, "no third copy");
    assert!(log.contains("performing standard snapshot") && log.contains("was removed, as Glance does"), "{log}");
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

    assert_completed(&mut listener, &worker, &image_id).await;
    // The pause met the snapshot: between the cast's arrival and its end the worker waited
    // on Ceph for seconds, in a pipeline step or in the ledger lookup before the first.
    let log = worker.log_text();
    let stamps: Vec<chrono::DateTime<chrono::Utc>> = log
        .lines()
        .skip_while(|l| !l.contains("passed on"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let longest_wait = stamps.windows(2).map(|w| (w[1] - w[0]).num_milliseconds()).max();
    assert!(longest_wait >= Some(4000), "nothing waited for the OSD (longest quiet {longest_wait:?} ms):\n{log}");
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}

/// libvirtd is down when the cast arrives and is started again a few seconds later: the
/// worker reconnects and a cold snapshot (suspend, resume: libvirt calls at both ends)
/// completes with the guest running again. Asked of Nova (the guest is off meanwhile: see
/// `Asked::OfNova`).
#[tokio::test]
async fn a_libvirtd_restart_only_delays_the_snapshot() {
    let guest = guest(1);
    let asked = Asked::OfNova;
    let config = asked.config(&[PATIENT, ("workarounds", "disable_libvirt_livesnapshot", "true")]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    let libvirtd = pid_of("libvirt/libvirtd.pid");
    signal("-TERM", &libvirtd).await;
    let gone =
        wait_until(Duration::from_secs(30), || async { !std::path::Path::new("/proc").join(&libvirtd).exists() }).await;
    assert!(gone.is_some(), "libvirtd {libvirtd} did not exit");
    let image_id = asked.snapshot(&config, &guest).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // libvirtd alone: bringing the guests up too would start the guest the worker has just
    // managed-saved for its cold snapshot.
    let up = tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack"))
        .args(["up", "libvirt"])
        .output()
        .await
        .unwrap();
    assert!(up.status.success(), "scripts/stack up restarts libvirtd: {}", String::from_utf8_lossy(&up.stderr));

    assert_completed(&mut listener, &worker, &image_id).await;
    assert!(worker.log_text().contains("transient fault, retrying"), "{}", worker.log_text());
    asked.assert_nova_left_it_running(&guest).await;
    glance_delete(&image_id).await;
    assert_nothing_left(&guest, &images_before, &worker).await;
    assert!(worker.stop().await.success());
}

/// Glance's pool at its quota for as long as the guard lives; the quota is lifted again when
/// it is dropped, also when the test fails, so later tests find the pool writable.
struct FullPool(&'static str);

impl FullPool {
    async fn fill(pool: &'static str) -> Self {
        ceph(&["osd", "pool", "set-quota", pool, "max_objects", "1"]).await;
        let guard = Self(pool);
        // The monitor flags the pool full with its next look at the usage.
        let full = wait_until(Duration::from_secs(60), || async { pool_is_full(pool).await }).await;
        assert!(full.is_some(), "pool {pool} not flagged full within 60 s");
        guard
    }
}

impl Drop for FullPool {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new("ceph").args(["osd", "pool", "set-quota", self.0, "max_objects", "0"]).output();
    }
}

async fn ceph(args: &[&str]) -> String {
    let out = tokio::process::Command::new("ceph").args(args).output().await.unwrap();
    assert!(out.status.success(), "ceph {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn pool_is_full(pool: &str) -> bool {
    let detail: serde_json::Value =
        serde_json::from_str(&ceph(&["osd", "pool", "ls", "detail", "--format", "json"]).await).unwrap();
    detail.as_array().unwrap().iter().any(|p| {
        p["pool_name"] == pool && p["flags_names"].as_str().is_some_and(|f| f.split(',').any(|f| f == "full_quota"))
    })
}

/// Glance's pool full: neither the clone into it nor an upload to Glance can be written. The
/// request fails within its bounds (no hang on the blocked writes), cleans up after itself,
/// and once the quota is lifted the next snapshot of the guest completes.
#[tokio::test]
async fn a_full_glance_pool_fails_cleanly_and_the_next_snapshot_works() {
    let guest = guest(1);
    let config = TestConfig::new(&[("novasnap", "retry_max_retries", "1")]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    let images_before = rbd_images("images").await;
    {
        let _full = FullPool::fill("images").await;
        let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
        listener.wait_for("instance.snapshot.error", &image_id, Duration::from_secs(600)).await;
        assert!(glance_image(&image_id).await.is_none(), "the failed snapshot's image is deleted");
    }
    // The blocked clone gave up at novasnap's own OSD op timeout instead of hanging.
    let log = worker.log_text();
    assert!(log.contains("failed at step 'clone into image pool'") && log.contains("timed out"), "{log}");
    assert_nothing_left(&guest, &images_before, &worker).await;
    let lifted = wait_until(Duration::from_secs(60), || async { !pool_is_full("images").await }).await;
    assert!(lifted.is_some(), "quota lifted");
    let image_id = nova_api(&config, "snapshot", &guest, &[]).await;
    assert_completed(&mut listener, &worker, &image_id).await;
    glance_delete(&image_id).await;
    assert!(worker.stop().await.success());
}
