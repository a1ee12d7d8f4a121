//! The shared work ledger ([`WorkLedger`]): in RADOS for every deployment with Ceph, so
//! what one replica knows outlives it and is seen by the others; in a local directory
//! where there is no Ceph (one host, file-backed disks only).
//!
//! Layout in the state pool, in the RADOS namespace `novasnap` (apart from the pool's RBD
//! images, which live in the default namespace):
//! - `novasnap.done.<0-f>`: sixteen objects whose omap maps each `_unique_id` carried to its
//!   end to when (Unix seconds); entries older than `[novasnap] done_horizon` are pruned, so
//!   the ledger holds what the broker may still deliver again, not every cast ever;
//! - `novasnap.work`: whose omap notes, by image id, each snapshot that may have left
//!   artefacts (its instance and disk, as JSON), from before its first artefact until
//!   nothing of it is left: reclamation's index;
//! - `novasnap.instance.<uuid>`: holds the exclusive RADOS lock `snapshot` while a replica
//!   snapshots that instance; the lock has a duration, renewed while the work runs, so a
//!   dead holder's lock lapses by itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::rbd::CephRbd;
use super::{InstanceLease, LeaseHolder, NotedWork, StorageError, WorkLedger};
use crate::ffi::rados::Pool;
use crate::ffi::Errno;
use crate::inflight;

const LOCK_NAME: &str = "snapshot";
/// librados `LIBRADOS_LOCK_FLAG_MAY_RENEW`: take the lock, or extend it if we hold it.
const LOCK_FLAG_MAY_RENEW: u8 = 1;
/// How long a waiter sleeps between attempts at a held lease.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// `_unique_id`s are oslo's uuid4 hex; anything else is not used as an object name.
fn valid_unique_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn rados_error(operation: &'static str, target: &str, e: Errno) -> StorageError {
    StorageError::Rbd { operation, target: target.to_string(), errno: e.0, message: e.to_string() }
}

/// The RADOS namespace of novasnap's objects in the state pool.
pub const NAMESPACE: &str = "novasnap";
/// The object whose omap is the index of noted work.
const WORK_OBJECT: &str = "novasnap.work";
/// Entries read per omap listing.
const OMAP_PAGE: u64 = 1000;
/// How many objects the done-markers are spread over (each omap stays small).
const DONE_SHARDS: u32 = 16;
/// How often one replica prunes one shard of done-markers, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The done-marker object holding `unique_id` (public for tests and operators' tools).
pub fn done_object(unique_id: &str) -> String {
    let shard = unique_id.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b))) % DONE_SHARDS;
    format!("novasnap.done.{shard:x}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub struct RadosLedger {
    /// The state pool, in [`NAMESPACE`].
    pool: Arc<Pool>,
    lease: Duration,
    /// Identifies this replica in lock descriptions (`rados lock info` shows it).
    holder: String,
    /// How long a done-marker is kept: longer than any cast can wait to be delivered again.
    horizon: Duration,
    /// When this replica last pruned each shard.
    pruned: Mutex<std::collections::HashMap<String, Instant>>,
}

impl RadosLedger {
    pub async fn open(
        ceph: &CephRbd,
        pool: &str,
        lease: Duration,
        holder: &str,
        horizon: Duration,
    ) -> Result<Self, StorageError> {
        Ok(Self {
            pool: ceph.namespace(pool, NAMESPACE).await?,
            lease,
            holder: holder.to_string(),
            horizon,
            pruned: Mutex::default(),
        })
    }

    async fn on_pool<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, StorageError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(&pool))
            .await
            .map_err(|e| StorageError::Connect(format!("blocking task failed: {e}")))?
    }

    /// Removes the done-markers of `object` older than the horizon, once per
    /// [`PRUNE_EVERY`] per replica.
    async fn prune(&self, object: String) -> Result<(), StorageError> {
        {
            let mut pruned = self.pruned.lock().expect("prune times");
            if pruned.get(&object).is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
                return Ok(());
            }
            pruned.insert(object.clone(), Instant::now());
        }
        let oldest = unix_now().saturating_sub(self.horizon.as_secs());
        let expired = move |at: &[u8]| {
            std::str::from_utf8(at).ok().and_then(|t| t.parse::<u64>().ok()).is_none_or(|t| t < oldest)
        };
        self.on_pool(move |pool| {
            let mut after = String::new();
            loop {
                let page = pool.omap_list(&object, &after, OMAP_PAGE).map_err(|e| rados_error("list", &object, e))?;
                let Some(last) = page.keys().next_back().cloned() else { return Ok(()) };
                let old: Vec<&str> = page.iter().filter(|(_, at)| expired(at)).map(|(key, _)| key.as_str()).collect();
                if !old.is_empty() {
                    pool.omap_remove(&object, &old).map_err(|e| rados_error("prune", &object, e))?;
                    debug!(object, pruned = old.len(), "done-markers past the horizon removed");
                }
                after = last;
            }
        })
        .await
    }
}

/// Takes (flags 0) or renews (MAY_RENEW) the lock; Ok(false) when another holder has it.
fn try_lock(
    pool: &Pool,
    object: &str,
    cookie: &str,
    holder: &str,
    lease: Duration,
    flags: u8,
) -> Result<bool, StorageError> {
    match pool.lock_exclusive(object, LOCK_NAME, cookie, holder, lease, flags) {
        Ok(()) => Ok(true),
        Err(Errno(libc::EBUSY | libc::EEXIST)) => Ok(false),
        Err(e) => Err(rados_error("lock", object, e)),
    }
}

/// One instance lease in RADOS: the lock `snapshot` on `novasnap.instance.<uuid>` under this
/// lease's own cookie, renewed every third of its duration.
struct RadosLease {
    pool: Arc<Pool>,
    instance: Uuid,
    object: String,
    cookie: String,
    holder: String,
    lease: Duration,
    /// When the last successful renewal was asked for: the lock holds until at least a lease
    /// after that, and may have lapsed (and been taken by another) once a lease has passed.
    renewed: Mutex<Instant>,
    lost: CancellationToken,
    renewal: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RadosLease {
    fn lapses_at(&self) -> Instant {
        *self.renewed.lock().expect("lease lock") + self.lease
    }

    fn mark_lost(&self, why: &str) -> StorageError {
        if !self.lost.is_cancelled() {
            tracing::error!(instance = %self.instance, why, "instance lease lost: stopping the work on it");
            self.lost.cancel();
        }
        StorageError::LeaseLost(why.to_string())
    }

    /// Renews the lock by its cookie. A lock that may have lapsed since the last renewal is
    /// lost even if RADOS would grant it again: another holder may have had it meanwhile.
    async fn renew(&self) -> Result<(), StorageError> {
        let asked = Instant::now();
        if self.lost.is_cancelled() {
            return Err(StorageError::LeaseLost("found lost earlier".into()));
        }
        if asked >= self.lapses_at() {
            return Err(self.mark_lost("not renewed within its duration"));
        }
        let (pool, o, c, h, lease) =
            (self.pool.clone(), self.object.clone(), self.cookie.clone(), self.holder.clone(), self.lease);
        let renewed = tokio::time::timeout_at(
            self.lapses_at(),
            inflight::spawn_blocking(move || try_lock(&pool, &o, &c, &h, lease, LOCK_FLAG_MAY_RENEW)),
        )
        .await;
        match renewed {
            Ok(Ok(Ok(true))) => {
                *self.renewed.lock().expect("lease lock") = asked;
                Ok(())
            }
            Ok(Ok(Ok(false))) => Err(self.mark_lost("held by another holder")),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(e)) => Err(StorageError::Connect(format!("blocking task failed: {e}"))),
            Err(_) => Err(self.mark_lost("renewal did not return within its duration")),
        }
    }

    /// Renews until released or lost.
    async fn keep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.lease / 3).await;
            match self.renew().await {
                Ok(()) => {}
                Err(StorageError::LeaseLost(_)) => return,
                Err(e) => warn!(instance = %self.instance, error = %e, "instance lease not renewed; retrying"),
            }
        }
    }
}

#[async_trait]
impl LeaseHolder for RadosLease {
    async fn confirm(&self) -> Result<(), StorageError> {
        self.renew().await
    }

    async fn release(&self) {
        if let Some(renewal) = self.renewal.lock().expect("lease lock").take() {
            renewal.abort();
        }
        if self.lost.is_cancelled() {
            return; // not ours to unlock any more
        }
        let (pool, object, cookie) = (self.pool.clone(), self.object.clone(), self.cookie.clone());
        let unlocked = tokio::task::spawn_blocking(move || pool.unlock(&object, LOCK_NAME, &cookie)).await;
        if let Ok(Err(e)) = unlocked {
            warn!(object = %self.object, error = %e, "instance lease not released; it lapses by itself");
        }
    }
}

#[async_trait]
impl WorkLedger for RadosLedger {
    async fn is_done(&self, unique_id: &str) -> Result<bool, StorageError> {
        if !valid_unique_id(unique_id) {
            return Ok(false);
        }
        let (object, id) = (done_object(unique_id), unique_id.to_string());
        self.on_pool(move |pool| {
            let found = pool.omap_get(&object, &[&id]).map_err(|e| rados_error("read", &object, e))?;
            Ok(found.contains_key(&id))
        })
        .await
    }

    async fn mark_done(&self, unique_id: &str) -> Result<(), StorageError> {
        if !valid_unique_id(unique_id) {
            return Ok(());
        }
        let (object, id) = (done_object(unique_id), unique_id.to_string());
        let at = unix_now().to_string();
        let o = object.clone();
        self.on_pool(move |pool| pool.omap_set(&o, &[(&id, at.as_bytes())]).map_err(|e| rados_error("write", &o, e)))
            .await?;
        if let Err(e) = self.prune(object).await {
            warn!(error = %e, "old done-markers not pruned; trying again later");
        }
        Ok(())
    }

    async fn note_work(&self, work: &NotedWork) -> Result<(), StorageError> {
        let (key, value) = (work.image.to_string(), serde_json::to_vec(work).expect("a NotedWork serialises"));
        self.on_pool(move |pool| {
            pool.omap_set(WORK_OBJECT, &[(&key, &value)]).map_err(|e| rados_error("write", WORK_OBJECT, e))
        })
        .await
    }

    async fn forget_work(&self, image: Uuid) -> Result<(), StorageError> {
        let key = image.to_string();
        self.on_pool(move |pool| {
            pool.omap_remove(WORK_OBJECT, &[&key]).map_err(|e| rados_error("write", WORK_OBJECT, e))
        })
        .await
    }

    async fn noted_work(&self) -> Result<Vec<NotedWork>, StorageError> {
        self.on_pool(|pool| {
            let (mut noted, mut after) = (Vec::new(), String::new());
            loop {
                let page =
                    pool.omap_list(WORK_OBJECT, &after, OMAP_PAGE).map_err(|e| rados_error("list", WORK_OBJECT, e))?;
                let Some(last) = page.keys().next_back().cloned() else { return Ok(noted) };
                noted.extend(page.values().filter_map(|v| serde_json::from_slice(v).ok()));
                after = last;
            }
        })
        .await
    }

    async fn lock_instance(&self, instance: Uuid, until: Instant) -> Result<Option<InstanceLease>, StorageError> {
        let object = format!("novasnap.instance.{instance}");
        let cookie = Uuid::new_v4().simple().to_string();
        let (lease, holder) = (self.lease, self.holder.clone());
        let asked = loop {
            let (o, c, h) = (object.clone(), cookie.clone(), holder.clone());
            let asked = Instant::now();
            if self.on_pool(move |pool| try_lock(pool, &o, &c, &h, lease, 0)).await? {
                break asked;
            }
            if asked + LEASE_POLL >= until {
                return Ok(None);
            }
            debug!(%instance, "instance lease held elsewhere; waiting");
            tokio::time::sleep(LEASE_POLL).await;
        };
        let lost = CancellationToken::new();
        let held = Arc::new(RadosLease {
            pool: self.pool.clone(),
            instance,
            object,
            cookie,
            holder,
            lease,
            renewed: Mutex::new(asked),
            lost: lost.clone(),
            renewal: Mutex::new(None),
        });
        *held.renewal.lock().expect("lease lock") = Some(tokio::spawn(held.clone().keep()));
        Ok(Some(InstanceLease::new(held, lost)))
    }
}

/// The same contract on one host, in a directory: done-markers as files, leases as
/// `flock`s (released by the kernel when the holder dies).
pub struct FileLedger {
    dir: PathBuf,
}

impl FileLedger {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir.join("done"))
            .and_then(|()| std::fs::create_dir_all(dir.join("instances")))
            .and_then(|()| std::fs::create_dir_all(dir.join("work")))
            .map_err(|source| StorageError::Io { path: dir.display().to_string(), source })?;
        Ok(Self { dir: dir.to_owned() })
    }
}

#[async_trait]
impl WorkLedger for FileLedger {
    async fn is_done(&self, unique_id: &str) -> Result<bool, StorageError> {
        Ok(valid_unique_id(unique_id) && self.dir.join("done").join(unique_id).exists())
    }

    async fn mark_done(&self, unique_id: &str) -> Result<(), StorageError> {
        if !valid_unique_id(unique_id) {
            return Ok(());
        }
        let path = self.dir.join("done").join(unique_id);
        tokio::fs::write(&path, b"")
            .await
            .map_err(|source| StorageError::Io { path: path.display().to_string(), source })
    }

    async fn note_work(&self, work: &NotedWork) -> Result<(), StorageError> {
        let path = self.dir.join("work").join(work.image.to_string());
        let json = serde_json::to_vec(work).expect("a NotedWork serialises");
        tokio::fs::write(&path, json)
            .await
            .map_err(|source| StorageError::Io { path: path.display().to_string(), source })
    }

    async fn forget_work(&self, image: Uuid) -> Result<(), StorageError> {
        let path = self.dir.join("work").join(image.to_string());
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StorageError::Io { path: path.display().to_string(), source: e })
            }
            _ => Ok(()),
        }
    }

    async fn noted_work(&self) -> Result<Vec<NotedWork>, StorageError> {
        let dir = self.dir.join("work");
        let io = |source| StorageError::Io { path: dir.display().to_string(), source };
        let mut entries = tokio::fs::read_dir(&dir).await.map_err(io)?;
        let mut noted = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io)? {
            if let Ok(json) = tokio::fs::read(entry.path()).await {
                noted.extend(serde_json::from_slice(&json).ok());
            }
        }
        Ok(noted)
    }

    async fn lock_instance(&self, instance: Uuid, until: Instant) -> Result<Option<InstanceLease>, StorageError> {
        let path = self.dir.join("instances").join(instance.to_string());
        let io = |source| StorageError::Io { path: path.display().to_string(), source };
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
        let file = Arc::new(file);
        loop {
            let f = file.clone();
            let locked = tokio::task::spawn_blocking(move || f.try_lock())
                .await
                .map_err(|e| StorageError::Connect(format!("blocking task failed: {e}")))?;
            match locked {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() + LEASE_POLL < until => {
                    tokio::time::sleep(LEASE_POLL).await
                }
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        Ok(Some(InstanceLease::new(Arc::new(FileLease(file)), CancellationToken::new())))
    }
}

/// A `flock` on the instance's file: never lost while the file is open.
struct FileLease(Arc<std::fs::File>);

#[async_trait]
impl LeaseHolder for FileLease {
    async fn confirm(&self) -> Result<(), StorageError> {
        Ok(())
    }

    async fn release(&self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_become_object_names() {
        assert!(valid_unique_id("cd669a8718404d69a91ffb1406f35688"));
        assert!(!valid_unique_id("../../etc"));
        assert!(!valid_unique_id("a/b"));
        assert!(!valid_unique_id(""));
    }

    #[tokio::test]
    async fn file_ledger_records_done_casts_and_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (FileLedger::open(dir.path()).unwrap(), FileLedger::open(dir.path()).unwrap());
        assert!(!a.is_done("abc123").await.unwrap());
        a.mark_done("abc123").await.unwrap();
        assert!(b.is_done("abc123").await.unwrap(), "seen by another ledger on the same directory");

        let instance = Uuid::new_v4();
        let far = Instant::now() + Duration::from_secs(3600);
        let lease = a.lock_instance(instance, far).await.unwrap().unwrap();
        let b = Arc::new(b);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.lock_instance(instance, far).await.map(|l| l.is_some()) }
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!waiting.is_finished(), "the second holder waits");
        drop(lease);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap());
    }

    /// The wait for a held lease has a bound: past it, the caller hears so.
    #[tokio::test]
    async fn the_wait_for_a_held_lease_gives_up_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (FileLedger::open(dir.path()).unwrap(), FileLedger::open(dir.path()).unwrap());
        let instance = Uuid::new_v4();
        let _held = a.lock_instance(instance, Instant::now()).await.unwrap().unwrap();
        let started = Instant::now();
        let until = started + Duration::from_secs(2);
        assert!(b.lock_instance(instance, until).await.unwrap().is_none());
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    /// A lease whose work was dropped while one of its blocking calls still runs (a step
    /// cancelled, a shutdown) is released only once that call has returned.
    #[tokio::test]
    async fn a_lease_is_held_until_its_blocking_calls_have_returned() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (FileLedger::open(dir.path()).unwrap(), FileLedger::open(dir.path()).unwrap());
        let instance = Uuid::new_v4();
        let far = Instant::now() + Duration::from_secs(60);
        let lease = a.lock_instance(instance, far).await.unwrap().unwrap();
        let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = returned.clone();
        let work = lease.in_flight().scope(async move {
            inflight::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(1500));
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .await
        });
        // The work is given up on at once, and its lease dropped.
        assert!(tokio::time::timeout(Duration::from_millis(50), work).await.is_err());
        drop(lease);
        let taken = b.lock_instance(instance, far).await.unwrap().unwrap();
        assert!(returned.load(std::sync::atomic::Ordering::SeqCst), "taken while a call made under it still ran");
        drop(taken);
    }
}
