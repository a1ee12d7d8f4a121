//! The shared work ledger ([`WorkLedger`]): in RADOS for every deployment with Ceph, so
//! what one replica knows outlives it and is seen by the others; in a local directory
//! where there is no Ceph (one host, file-backed disks only).
//!
//! Layout in the state pool:
//! - `novasnap.done.<unique_id>`: an empty object per cast carried to its end;
//! - `novasnap.instance.<uuid>`: holds the exclusive RADOS lock `snapshot` while a replica
//!   snapshots that instance; the lock has a duration, renewed while the work runs, so a
//!   dead holder's lock lapses by itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{debug, warn};
use uuid::Uuid;

use super::rbd::CephRbd;
use super::{InstanceLease, StorageError, WorkLedger};
use crate::ffi::rbd::Pool;

const LOCK_NAME: &str = "snapshot";
/// librados `LIBRADOS_LOCK_FLAG_MAY_RENEW`: take the lock, or extend it if we hold it.
const LOCK_FLAG_MAY_RENEW: u8 = 1;
/// How long a waiter sleeps between attempts at a held lease.
const LEASE_POLL: Duration = Duration::from_millis(500);

/// `_unique_id`s are oslo's uuid4 hex; anything else is not used as an object name.
fn valid_unique_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn rados_error(operation: &'static str, target: &str, e: ceph::error::RadosError) -> StorageError {
    let errno = match &e {
        ceph::error::RadosError::ApiError(errno) => *errno as i32,
        _ => libc::EIO,
    };
    StorageError::Rbd { operation, target: target.to_string(), errno, message: e.to_string() }
}

pub struct RadosLedger {
    ceph: CephRbd,
    pool: String,
    lease: Duration,
    /// Identifies this replica in lock descriptions (`rados lock info` shows it).
    holder: String,
}

impl RadosLedger {
    pub fn new(ceph: CephRbd, pool: &str, lease: Duration, holder: &str) -> Self {
        Self { ceph, pool: pool.to_string(), lease, holder: holder.to_string() }
    }

    async fn on_pool<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, StorageError> + Send + 'static,
    {
        let pool = self.ceph.pool(&self.pool).await?;
        tokio::task::spawn_blocking(move || f(&pool))
            .await
            .map_err(|e| StorageError::Connect(format!("blocking task failed: {e}")))?
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
    let mut duration = libc::timeval { tv_sec: lease.as_secs() as libc::time_t, tv_usec: 0 };
    match pool.0.rados_object_lock_exclusive(object, LOCK_NAME, cookie, holder, &mut duration, flags) {
        Ok(()) => Ok(true),
        Err(ceph::error::RadosError::ApiError(errno)) if matches!(errno as i32, libc::EBUSY | libc::EEXIST) => {
            Ok(false)
        }
        Err(e) => Err(rados_error("lock", object, e)),
    }
}

#[async_trait]
impl WorkLedger for RadosLedger {
    async fn is_done(&self, unique_id: &str) -> Result<bool, StorageError> {
        if !valid_unique_id(unique_id) {
            return Ok(false);
        }
        let object = format!("novasnap.done.{unique_id}");
        self.on_pool(move |pool| match pool.0.rados_object_stat(&object) {
            Ok(_) => Ok(true),
            Err(ceph::error::RadosError::ApiError(errno)) if errno as i32 == libc::ENOENT => Ok(false),
            Err(e) => Err(rados_error("stat", &object, e)),
        })
        .await
    }

    async fn mark_done(&self, unique_id: &str) -> Result<(), StorageError> {
        if !valid_unique_id(unique_id) {
            return Ok(());
        }
        let object = format!("novasnap.done.{unique_id}");
        self.on_pool(move |pool| {
            pool.0.rados_object_write_full(&object, b"").map_err(|e| rados_error("write", &object, e))
        })
        .await
    }

    async fn lock_instance(&self, instance: Uuid) -> Result<InstanceLease, StorageError> {
        let object = format!("novasnap.instance.{instance}");
        let cookie = Uuid::new_v4().simple().to_string();
        let (lease, holder) = (self.lease, self.holder.clone());
        loop {
            let (o, c, h) = (object.clone(), cookie.clone(), holder.clone());
            if self.on_pool(move |pool| try_lock(pool, &o, &c, &h, lease, 0)).await? {
                break;
            }
            debug!(%instance, "instance lease held elsewhere; waiting");
            tokio::time::sleep(LEASE_POLL).await;
        }
        let pool = self.ceph.pool(&self.pool).await?;
        let renewal = {
            let (pool, object, cookie) = (pool.clone(), object.clone(), cookie.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    let (pool, o, c, h) = (pool.clone(), object.clone(), cookie.clone(), holder.clone());
                    match tokio::task::spawn_blocking(move || try_lock(&pool, &o, &c, &h, lease, LOCK_FLAG_MAY_RENEW))
                        .await
                    {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => warn!(%instance, "instance lease lost to another holder"),
                        Ok(Err(e)) => warn!(%instance, error = %e, "instance lease not renewed; retrying"),
                        Err(e) => warn!(%instance, error = %e, "instance lease renewal task failed"),
                    }
                }
            })
        };
        Ok(InstanceLease::new(move || {
            renewal.abort();
            // Released in the background: Drop cannot wait, and an unreleased lease only
            // delays the next snapshot of this instance until it lapses.
            std::thread::spawn(move || {
                if let Err(e) = pool.0.rados_object_unlock(&object, LOCK_NAME, &cookie) {
                    warn!(object, error = %e, "instance lease not released; it lapses by itself");
                }
            });
        }))
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

    async fn lock_instance(&self, instance: Uuid) -> Result<InstanceLease, StorageError> {
        let path = self.dir.join("instances").join(instance.to_string());
        let io = |source| StorageError::Io { path: path.display().to_string(), source };
        let file =
            Arc::new(std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?);
        loop {
            let f = file.clone();
            let locked = tokio::task::spawn_blocking(move || f.try_lock())
                .await
                .map_err(|e| StorageError::Connect(format!("blocking task failed: {e}")))?;
            match locked {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => tokio::time::sleep(LEASE_POLL).await,
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        Ok(InstanceLease::new(move || {
            let _ = file.unlock();
        }))
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
        let lease = a.lock_instance(instance).await.unwrap();
        let waiting = tokio::spawn(async move { b.lock_instance(instance).await.map(drop) });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!waiting.is_finished(), "the second holder waits");
        drop(lease);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
    }
}
