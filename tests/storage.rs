//! `CephRbd` and `RadosLedger` against the real cluster: every operation the pipeline
//! repeats on a retry is idempotent, bytes read back are the bytes written, and the ledger
//! is shared by two connections as by two replicas.

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::TryStreamExt;
use novasnap::config::RbdConfig;
use novasnap::storage::ledger::{done_object, RadosLedger};
use novasnap::storage::rbd::CephRbd;
use novasnap::storage::{BlockStorage, CloneParent, CloneState, RbdImage, WorkLedger};
use tokio::process::Command;

fn rbd_config() -> RbdConfig {
    RbdConfig {
        pool: "vms".into(),
        ceph_conf: Some(env("CEPH_CONF").into()),
        user: None,
        state_pool: "vms".into(),
        glance_pools: vec!["images".into()],
        osd_op_timeout: Duration::from_secs(30),
        mon_op_timeout: Duration::from_secs(30),
        mount_timeout: Duration::from_secs(30),
        concurrent_flattens: 2,
    }
}

async fn ledger(lease: Duration, holder: &str, horizon: Duration) -> RadosLedger {
    RadosLedger::open(&connect().await, "vms", lease, holder, horizon).await.expect("ledger in the state pool")
}

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

async fn connect() -> CephRbd {
    CephRbd::connect(&rbd_config()).await.expect("connect to the stack's Ceph")
}

/// An RBD image with `data`, made with the `rbd` CLI (not the code under test).
async fn rbd_import(image: &RbdImage, data: &[u8]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let status = Command::new("rbd").arg("import").arg(file.path()).arg(image.to_string()).status().await.unwrap();
    assert!(status.success());
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test]
async fn snapshot_clone_flatten_read_and_clean_up_idempotently() {
    let rbd = connect().await;
    let disk = RbdImage::new("vms", unique("test-disk"));
    let copy = RbdImage::new("images", unique("test-copy"));
    let data = pattern(12 << 20, 7);
    rbd_import(&disk, &data).await;

    assert!(rbd.exists(&disk).await.unwrap());
    assert!(!rbd.exists(&RbdImage::new("vms", "no-such-image")).await.unwrap());
    assert_eq!(rbd.size(&disk).await.unwrap(), data.len() as u64);
    assert_eq!(rbd.parent(&disk).await.unwrap(), None);
    assert_eq!(rbd.fsid().await.unwrap().len(), 36);

    for _ in 0..2 {
        rbd.create_snapshot(&disk, "s1").await.unwrap();
        rbd.protect_snapshot(&disk, "s1").await.unwrap();
    }
    let snaps = rbd.list_snapshots(&disk).await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].protected);

    for _ in 0..2 {
        rbd.clone_image(&disk, "s1", &copy).await.unwrap();
    }
    assert_eq!(rbd.parent(&copy).await.unwrap(), Some(CloneParent { image: disk.clone(), snapshot: "s1".into() }));
    rbd.set_metadata(&copy, "novasnap.image_id", "abc").await.unwrap();
    assert_eq!(rbd.metadata(&copy, "novasnap.image_id").await.unwrap().as_deref(), Some("abc"));
    assert_eq!(rbd.metadata(&copy, "other").await.unwrap(), None);

    let last = Arc::new(AtomicU8::new(0));
    let seen = last.clone();
    // A fresh clone's object map is trusted: flattened with it on, it stays valid.
    rbd.flatten(&copy, CloneState::Fresh, Arc::new(move |p| seen.store(p, Ordering::Relaxed))).await.unwrap();
    assert_eq!(last.load(Ordering::Relaxed), 100);
    assert_eq!(rbd.parent(&copy).await.unwrap(), None);
    let info = rbd_json(&["info", &copy.to_string()]).await;
    assert_eq!(info["flags"], serde_json::json!([]), "the object map is valid: {info}");
    rbd.flatten(&copy, CloneState::MaybePartlyFlattened, Arc::new(|_| {})).await.unwrap();

    for _ in 0..2 {
        rbd.remove_snapshot(&disk, "s1").await.unwrap();
    }
    assert!(rbd.list_snapshots(&disk).await.unwrap().is_empty());

    // The copy holds the disk's bytes, read back in bounded chunks.
    let chunks: Vec<bytes::Bytes> = rbd.read(&copy, None).try_collect().await.unwrap();
    assert!(chunks.iter().all(|c| c.len() <= 4 << 20) && chunks.len() >= 3);
    assert_eq!(chunks.concat(), data);

    rbd.create_snapshot(&copy, "snap").await.unwrap();
    rbd.protect_snapshot(&copy, "snap").await.unwrap();
    let at_snap: Vec<bytes::Bytes> = rbd.read(&copy, Some("snap")).try_collect().await.unwrap();
    assert_eq!(at_snap.concat(), data);
    // Handed over (to Glance, in the pipeline): no handle of ours is left watching the copy.
    rbd.release(&copy).await.unwrap();
    let watchers = rbd_json(&["status", &copy.to_string()]).await["watchers"].clone();
    assert_eq!(watchers, serde_json::json!([]), "released");
    for image in [&copy, &disk] {
        rbd.remove_image(image).await.unwrap();
        rbd.remove_image(image).await.unwrap();
        assert!(!rbd.exists(image).await.unwrap());
    }
    assert!(!rbd_images("vms").await.contains(&disk.name));
}

/// What a flatten killed mid-way can leave behind: an object the clone's object map marks as
/// present that was never written. Reads still fall through to the parent; a resumed flatten
/// must copy it up too, not leave zeros there (Ceph 16's flatten trusts the map).
#[tokio::test]
async fn flatten_copies_up_an_object_the_object_map_wrongly_marks_present() {
    let rbd = connect().await;
    let disk = RbdImage::new("vms", unique("test-disk"));
    let copy = RbdImage::new("images", unique("test-copy"));
    let data = pattern(12 << 20, 5);
    rbd_import(&disk, &data).await;
    rbd.create_snapshot(&disk, "s1").await.unwrap();
    rbd.protect_snapshot(&disk, "s1").await.unwrap();
    rbd.clone_image(&disk, "s1", &copy).await.unwrap();

    // A write marks object 0 present in the map; removing the RADOS object undoes the write
    // but not the mark.
    let bench = ["bench", "--io-type", "write", "--io-size", "4096", "--io-total", "4096", "--io-pattern", "seq"];
    let status = Command::new("rbd").args(bench).arg(copy.to_string()).status().await.unwrap();
    assert!(status.success());
    let prefix = rbd_json(&["info", &copy.to_string()]).await["block_name_prefix"].as_str().unwrap().to_string();
    let object = format!("{prefix}.{:016x}", 0);
    let status = Command::new("rados").args(["-p", "images", "rm", &object]).status().await.unwrap();
    assert!(status.success());
    let before: Vec<bytes::Bytes> = rbd.read(&copy, None).try_collect().await.unwrap();
    assert_eq!(before.concat(), data, "before flatten the parent fills in the missing object");

    rbd.flatten(&copy, CloneState::MaybePartlyFlattened, Arc::new(|_| {})).await.unwrap();
    assert_eq!(rbd.parent(&copy).await.unwrap(), None);
    let after: Vec<bytes::Bytes> = rbd.read(&copy, None).try_collect().await.unwrap();
    assert!(after.concat() == data, "after flatten the copy holds every byte of the parent");
    // The object map, off while flattening, is back and valid.
    let info = rbd_json(&["info", &copy.to_string()]).await;
    let features: Vec<&str> = info["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(features.contains(&"object-map") && features.contains(&"fast-diff"), "{info}");
    assert_eq!(info["flags"], serde_json::json!([]), "{info}");
    assert_eq!(rbd.metadata(&copy, "novasnap.object_map_off").await.unwrap(), None);

    rbd.remove_image(&copy).await.unwrap();
    rbd.remove_snapshot(&disk, "s1").await.unwrap();
    rbd.remove_image(&disk).await.unwrap();
}

/// `[novasnap] concurrent_flattens = 1`: three flattens asked at once run one after the
/// other, in the order asked (each one's progress, to 100, before the next one's starts),
/// and each copies every byte.
#[tokio::test]
async fn flattens_take_turns() {
    let rbd = CephRbd::connect(&RbdConfig { concurrent_flattens: 1, ..rbd_config() }).await.unwrap();
    let disk = RbdImage::new("vms", unique("test-disk"));
    // 40 MiB: ten objects, so each flatten reports progress ten times.
    let data = pattern(40 << 20, 3);
    rbd_import(&disk, &data).await;
    rbd.create_snapshot(&disk, "s1").await.unwrap();
    rbd.protect_snapshot(&disk, "s1").await.unwrap();
    let copies: Vec<RbdImage> = (0..3).map(|_| RbdImage::new("images", unique("test-copy"))).collect();
    for copy in &copies {
        rbd.clone_image(&disk, "s1", copy).await.unwrap();
    }

    let seen = Arc::new(std::sync::Mutex::new(Vec::<(usize, u8)>::new()));
    let flattens = copies.iter().enumerate().map(|(i, copy)| {
        let seen = seen.clone();
        rbd.flatten(copy, CloneState::Fresh, Arc::new(move |p| seen.lock().unwrap().push((i, p))))
    });
    for done in futures::future::join_all(flattens).await {
        done.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let mut runs: Vec<usize> = seen.iter().map(|(i, _)| *i).collect();
    runs.dedup();
    assert_eq!(runs, vec![0, 1, 2], "one flatten at a time, in turn: {seen:?}");
    for i in 0..3 {
        let of_i: Vec<u8> = seen.iter().filter(|(j, _)| *j == i).map(|(_, p)| *p).collect();
        assert!(of_i.len() > 2 && of_i.last() == Some(&100), "flatten {i}: {of_i:?}");
    }
    for copy in &copies {
        assert_eq!(rbd.parent(copy).await.unwrap(), None);
        let bytes: Vec<bytes::Bytes> = rbd.read(copy, None).try_collect().await.unwrap();
        assert!(bytes.concat() == data, "{copy} holds every byte of the disk");
        rbd.remove_image(copy).await.unwrap();
    }
    rbd.remove_snapshot(&disk, "s1").await.unwrap();
    rbd.remove_image(&disk).await.unwrap();
}

#[tokio::test]
async fn missing_things_are_clear_errors() {
    let rbd = connect().await;
    let missing = RbdImage::new("vms", "no-such-image");
    let err = rbd.size(&missing).await.unwrap_err();
    assert!(err.to_string().contains("vms/no-such-image"), "{err}");
    rbd.remove_snapshot(&missing, "s").await.unwrap();
    let err = rbd.list_images("no-such-pool").await.unwrap_err();
    assert!(err.to_string().contains("no-such-pool"), "{err}");
}

#[tokio::test]
async fn the_ledger_is_shared_by_replicas_and_leases_exclude() {
    let lease = Duration::from_secs(3);
    let (a, b) = (ledger(lease, "test-a", WEEK).await, ledger(lease, "test-b", WEEK).await);
    let id = uuid::Uuid::new_v4().simple().to_string();
    assert!(!b.is_done(&id).await.unwrap());
    a.mark_done(&id).await.unwrap();
    assert!(b.is_done(&id).await.unwrap(), "what one replica finished, another sees");

    let instance = uuid::Uuid::new_v4();
    let far = tokio::time::Instant::now() + Duration::from_secs(600);
    let held = a.lock_instance(instance, far).await.unwrap().unwrap();
    let b = Arc::new(b);
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock_instance(instance, far).await.map(|l| l.is_some()) })
    };
    // Longer than the lease: the holder renews it, so the other replica keeps waiting.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished(), "a renewed lease keeps excluding");
    assert!(!held.lost().is_cancelled());
    drop(held);
    let taken = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("released lease is taken");
    assert!(taken.unwrap().unwrap());
    let rados = |args: Vec<String>| async move { Command::new("rados").args(args).status().await };
    let ns = ["-p", "vms", "-N", "novasnap"].map(String::from);
    let _ = rados([&ns[..], &["rmomapkey".into(), done_object(&id), id.clone()]].concat()).await;
    let _ = rados([&ns[..], &["rm".into(), format!("novasnap.instance.{instance}")]].concat()).await;
}

/// The lock of `object` as `rados lock info` shows it: (locker, cookie).
async fn rados_locker(object: &str) -> (String, String) {
    let args = ["-p", "vms", "-N", "novasnap", "lock", "info", object, "snapshot", "--format", "json"];
    let out = Command::new("rados").args(args).output().await.unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let locker = &info["lockers"][0];
    (locker["name"].as_str().unwrap().to_string(), locker["cookie"].as_str().unwrap().to_string())
}

/// Another replica takes the lease over (here: the lock broken, as `rados lock break` or a
/// lapse lets another holder in): the first holder finds out at its next renewal, its
/// `lost` signal fires, and it can confirm no change any more.
#[tokio::test]
async fn a_lease_taken_over_by_another_holder_is_found_lost() {
    let lease = Duration::from_secs(3);
    let (a, b) = (ledger(lease, "test-a", WEEK).await, ledger(lease, "test-b", WEEK).await);
    let instance = uuid::Uuid::new_v4();
    let object = format!("novasnap.instance.{instance}");
    let far = tokio::time::Instant::now() + Duration::from_secs(60);
    let held = a.lock_instance(instance, far).await.unwrap().unwrap();
    held.confirm().await.expect("held");
    let (locker, cookie) = rados_locker(&object).await;
    let args = ["-p", "vms", "-N", "novasnap", "lock", "break", &object, "snapshot", &locker, "--lock-cookie", &cookie];
    assert!(Command::new("rados").args(args).status().await.unwrap().success());
    let other = b.lock_instance(instance, far).await.unwrap().expect("the other holder takes it");
    // At the next renewal (every third of the lease), or once the lease would have lapsed.
    let found = tokio::time::timeout(lease + Duration::from_secs(1), held.lost().cancelled()).await;
    found.expect("the loss is found within the lease");
    let err = held.confirm().await.unwrap_err();
    assert!(err.to_string().contains("lease is lost"), "{err}");
    other.confirm().await.expect("the new holder's lease is sound");
    drop((held, other));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("rados").args(["-p", "vms", "-N", "novasnap", "rm", &object]).status().await;
}

/// Objects in the state pool's RADOS namespace `namespace` ("" = the default one, where
/// the pool's RBD images are).
async fn rados_objects(namespace: &str) -> Vec<String> {
    let out = Command::new("rados").args(["-p", "vms", "-N", namespace, "ls"]).output().await.unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// Done-markers are omap entries in a few objects of novasnap's own namespace, not one
/// object per cast among the instance pool's images, and those past the horizon are pruned.
#[tokio::test]
async fn done_markers_stay_bounded_and_out_of_the_image_namespace() {
    let horizon = Duration::from_secs(1);
    let old = uuid::Uuid::new_v4().simple().to_string();
    ledger(Duration::from_secs(3), "test-a", horizon).await.mark_done(&old).await.unwrap();
    assert!(!rados_objects("").await.contains(&done_object(&old)), "nothing in the image namespace");
    assert!(rados_objects("novasnap").await.contains(&done_object(&old)));

    tokio::time::sleep(Duration::from_secs(3)).await;
    // Another replica marks a cast of the same shard: its first write there prunes it.
    let same_shard = std::iter::repeat_with(|| uuid::Uuid::new_v4().simple().to_string())
        .find(|id| done_object(id) == done_object(&old))
        .unwrap();
    let b = ledger(Duration::from_secs(3), "test-b", horizon).await;
    b.mark_done(&same_shard).await.unwrap();
    assert!(b.is_done(&same_shard).await.unwrap());
    assert!(!b.is_done(&old).await.unwrap(), "a marker past the horizon is pruned");
    let key = ["-p", "vms", "-N", "novasnap", "rmomapkey", &done_object(&same_shard), &same_shard];
    let _ = Command::new("rados").args(key).status().await;
}

/// The ledger's pool keeps its cluster connection alive: the storage handle it was opened
/// from may go first.
#[tokio::test]
async fn the_ledger_outlives_the_storage_handle_it_came_from() {
    let ledger = ledger(Duration::from_secs(3), "test-a", WEEK).await; // the CephRbd is gone
    let id = uuid::Uuid::new_v4().simple().to_string();
    ledger.mark_done(&id).await.unwrap();
    assert!(ledger.is_done(&id).await.unwrap());
    let _ =
        Command::new("rados").args(["-p", "vms", "-N", "novasnap", "rmomapkey", &done_object(&id), &id]).status().await;
}

/// The stack's OSD, paused (SIGSTOP) while this lives; resumed and marked down when it is
/// dropped, also when the test fails, so that its placement groups peer again.
struct PausedOsd(String);

impl PausedOsd {
    async fn pause() -> Self {
        let path = std::path::Path::new(&env("NOVASNAP_STACK_STATE")).join("ceph/run/osd.0.pid");
        let pid = std::fs::read_to_string(&path).unwrap().trim().to_string();
        assert!(Command::new("kill").args(["-STOP", &pid]).status().await.unwrap().success());
        Self(pid)
    }
}

impl Drop for PausedOsd {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0]).status();
        let _ = std::process::Command::new("ceph").args(["osd", "down", "0"]).output();
    }
}

/// With a ceph.conf that sets no client timeouts at all, an unresponsive OSD still gives
/// novasnap an error (ETIMEDOUT) within its own `rados_osd_op_timeout`, not a hang.
#[tokio::test]
async fn librados_calls_are_bounded_by_novasnaps_own_timeouts_whatever_ceph_conf_says() {
    let dir = tempfile::tempdir().unwrap();
    let conf = ceph_conf_without_client_timeouts(dir.path());
    let config = RbdConfig { ceph_conf: Some(conf), osd_op_timeout: Duration::from_secs(5), ..rbd_config() };
    let rbd = CephRbd::connect(&config).await.unwrap();
    assert_eq!(rbd.option("rados_osd_op_timeout").await.unwrap().parse::<f64>().unwrap(), 5.0);
    let disk = RbdImage::new("vms", unique("test-disk"));
    rbd_import(&disk, &pattern(1 << 20, 3)).await;

    let started = std::time::Instant::now();
    let result = {
        let _paused = PausedOsd::pause().await;
        tokio::time::timeout(Duration::from_secs(30), rbd.size(&disk)).await
    };
    let err = result.expect("an error, not a hang").unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    // The OSD is back: the same connection works again (after re-peering).
    let back = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if rbd.size(&disk).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    back.await.expect("the OSD answers again");
    let _ = Command::new("rbd").args(["rm", &disk.to_string()]).output().await;
}
