//! The block-storage boundary: Ceph RBD as the direct snapshot path and the RBD standard
//! path use it, plus the qemu-img work the standard path does on files.
//!
//! [`BlockStorage`] is the contract for RBD; `rbd.rs` implements it with librados (the
//! `ceph` crate) and librbd through [`crate::ffi::rbd`], on a dedicated blocking pool. `files.rs` holds the qemu-img steps.

pub mod files;
pub mod ledger;
pub mod rbd;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Classify, Disposition};
use crate::hypervisor::Progress;
use crate::inflight::InFlight;

/// One RBD image, by pool and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct RbdImage {
    pub pool: String,
    pub name: String,
}

impl RbdImage {
    pub fn new(pool: impl Into<String>, name: impl Into<String>) -> Self {
        Self { pool: pool.into(), name: name.into() }
    }
}

impl std::fmt::Display for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.name)
    }
}

/// The snapshot an RBD clone was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneParent {
    pub image: RbdImage,
    pub snapshot: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub protected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{operation} {target}: {message} (errno {errno})")]
    Rbd {
        operation: &'static str,
        target: String,
        /// Positive errno as librados/librbd returned it negated.
        errno: i32,
        message: String,
    },
    #[error("cannot connect to the Ceph cluster: {0}")]
    Connect(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("qemu-img {operation}: {message}")]
    QemuImg { operation: &'static str, message: String },
    /// The instance lease is no longer this replica's: another may be at work.
    #[error("the instance lease is lost ({0}): another replica may be at work on the instance")]
    LeaseLost(String),
    #[error("io on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for StorageError {
    fn disposition(&self) -> Disposition {
        match self {
            // EBUSY, EAGAIN, ETIMEDOUT, EINTR, ENOTCONN, ESHUTDOWN, ECONNREFUSED: a busy
            // image, a slow or restarting OSD, a monitor election.
            Self::Rbd { errno, .. }
                if matches!(
                    *errno,
                    libc::EBUSY
                        | libc::EAGAIN
                        | libc::ETIMEDOUT
                        | libc::EINTR
                        | libc::ENOTCONN
                        | libc::ESHUTDOWN
                        | libc::ECONNREFUSED
                ) =>
            {
                Disposition::Transient
            }
            Self::Connect(_) => Disposition::Transient,
            _ => Disposition::Permanent,
        }
    }
}

/// Ceph RBD operations, each idempotent where the pipeline repeats it on a retry:
/// creating what exists, or removing what is gone, succeeds.
/// What a flatten may assume of a clone's object map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneState {
    /// Cloned by this very attempt, no flatten begun on it: its object map marks only the
    /// objects that exist (none), so Ceph 16's flatten, which skips the objects the map
    /// marks, may trust it.
    Fresh,
    /// A clone an earlier attempt may have begun to flatten: a flatten stopped mid-way can
    /// leave objects marked that were never written, so the map is not trusted.
    MaybePartlyFlattened,
}

#[async_trait]
pub trait BlockStorage: Send + Sync {
    /// The cluster's fsid, as written in `rbd://<fsid>/…` locations.
    async fn fsid(&self) -> Result<String, StorageError>;

    async fn exists(&self, image: &RbdImage) -> Result<bool, StorageError>;

    /// Virtual size in bytes.
    async fn size(&self, image: &RbdImage) -> Result<u64, StorageError>;

    /// The parent of a clone, or None for an image that is not a clone.
    async fn parent(&self, image: &RbdImage) -> Result<Option<CloneParent>, StorageError>;

    async fn list_images(&self, pool: &str) -> Result<Vec<String>, StorageError>;

    async fn list_snapshots(&self, image: &RbdImage) -> Result<Vec<SnapshotInfo>, StorageError>;

    /// Creates `snap` on `image`; succeeds if it exists.
    async fn create_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError>;

    /// Protects `snap`; succeeds if already protected.
    async fn protect_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError>;

    /// Unprotects (if protected) and removes `snap`; succeeds if it does not exist.
    async fn remove_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError>;

    /// Clones `parent@snap` as `child`; succeeds if `child` already is a clone of that
    /// snapshot (a retry after a crash mid-clone).
    async fn clone_image(&self, parent: &RbdImage, snap: &str, child: &RbdImage) -> Result<(), StorageError>;

    /// Copies the parent's data into the clone and detaches it. Reports progress;
    /// succeeds on an image that has no parent.
    async fn flatten(&self, image: &RbdImage, clone: CloneState, progress: Progress) -> Result<(), StorageError>;

    /// Sets image metadata `key` (librbd's per-image key/value store); overwriting is fine.
    async fn set_metadata(&self, image: &RbdImage, key: &str, value: &str) -> Result<(), StorageError>;

    /// Makes `copy`, a clone of the parent `disk` was cloned from, hold what `disk@snap`
    /// holds: grown to the disk's size, then every extent the disk holds itself (what the
    /// instance wrote, not read through from the parent) written into it. Reports progress;
    /// returns the bytes written. Safe to repeat.
    async fn copy_own_extents(
        &self,
        disk: &RbdImage,
        snap: &str,
        copy: &RbdImage,
        progress: Progress,
    ) -> Result<u64, StorageError>;

    /// Image metadata `key`, or None if it is not set.
    async fn metadata(&self, image: &RbdImage, key: &str) -> Result<Option<String>, StorageError>;

    /// Returns once no handle this process opened on `image` is open any more: before
    /// another service (Glance) takes the image over, and may remove it. Only for an image
    /// this process made and no other client has opened (its lock is ours alone).
    async fn release(&self, image: &RbdImage) -> Result<(), StorageError>;

    /// Removes `image` and all its snapshots (unprotecting them); succeeds if it is gone.
    async fn remove_image(&self, image: &RbdImage) -> Result<(), StorageError>;

    /// The bytes of `image` (at `snap`, if given) from offset 0 to its size, in chunks,
    /// read ahead a bounded amount: memory stays bounded whatever the disk size.
    fn read(&self, image: &RbdImage, snap: Option<&str>) -> BoxStream<'static, Result<Bytes, StorageError>>;
}

/// What novasnap replicas share about their work, kept in the cluster so it outlives any
/// one replica: which casts are finished (oslo's 16-entry `_unique_id` cache, made durable)
/// and which instance each replica is snapshotting right now.
#[async_trait]
pub trait WorkLedger: Send + Sync {
    /// Whether the cast with this `_unique_id` was already carried to its end.
    async fn is_done(&self, unique_id: &str) -> Result<bool, StorageError>;

    /// Records the cast as carried to its end (success or reported permanent failure).
    async fn mark_done(&self, unique_id: &str) -> Result<(), StorageError>;

    /// Notes, before anything is made for it, that a snapshot of `work.instance` into
    /// `work.image` may leave artefacts behind: reclamation's index, so it need not open
    /// every disk to find them. Noting again is fine.
    async fn note_work(&self, work: &NotedWork) -> Result<(), StorageError>;

    /// Forgets the note once nothing of that work is left; forgetting what is not noted is fine.
    async fn forget_work(&self, image: Uuid) -> Result<(), StorageError>;

    /// Every work noted and not forgotten.
    async fn noted_work(&self) -> Result<Vec<NotedWork>, StorageError>;

    /// Takes the instance's exclusive lease, waiting while another replica (or task) holds
    /// it, until `until`: None if it is still held elsewhere then. The lease is renewed in
    /// the background; a replica that dies loses it after its expiry.
    async fn lock_instance(&self, instance: Uuid, until: Instant) -> Result<Option<InstanceLease>, StorageError>;
}

/// A snapshot that may have left artefacts behind: all are named after `image`, the disk
/// snapshot on `disk` (when the root disk is on RBD).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NotedWork {
    pub image: Uuid,
    pub instance: Uuid,
    pub disk: Option<RbdImage>,
}

/// The ledger's side of one instance lease.
#[async_trait]
pub trait LeaseHolder: Send + Sync {
    /// Confirms, by the lease's own cookie, that the lease is still this holder's, renewing
    /// it: the fence before each change. [`StorageError::LeaseLost`] once it is not.
    async fn confirm(&self) -> Result<(), StorageError>;

    /// Gives the lease up.
    async fn release(&self);
}

/// Held while one snapshot of an instance runs. A lease found lost (taken by another
/// holder, or lapsed unrenewed) cancels [`InstanceLease::lost`]: the work must stop, and
/// change nothing more. Dropping it releases the lease, but only once every blocking call
/// made under it has returned (see [`crate::inflight`]).
pub struct InstanceLease {
    holder: Arc<dyn LeaseHolder>,
    lost: CancellationToken,
    in_flight: InFlight,
}

impl InstanceLease {
    /// `lost` is cancelled by the holder when it finds the lease lost.
    pub fn new(holder: Arc<dyn LeaseHolder>, lost: CancellationToken) -> Self {
        let in_flight = InFlight::new(lost.child_token());
        Self { holder, lost, in_flight }
    }

    /// Cancelled once the lease is lost.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// See [`LeaseHolder::confirm`].
    pub async fn confirm(&self) -> Result<(), StorageError> {
        if self.lost.is_cancelled() {
            return Err(StorageError::LeaseLost("found lost earlier".into()));
        }
        self.holder.confirm().await
    }

    /// The blocking calls made under this lease: the work runs in its scope.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl Drop for InstanceLease {
    fn drop(&mut self) {
        let (holder, in_flight) = (self.holder.clone(), self.in_flight.clone());
        let release = async move {
            in_flight.settled().await;
            holder.release().await;
        };
        // Outside a runtime (the process ending) the lease lapses by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release);
        }
    }
}
