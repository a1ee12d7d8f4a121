//! [`BlockStorage`] on a real Ceph cluster: one librados connection per worker, an I/O
//! context per pool, librbd through `ffi.rs`. Every call runs on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tracing::debug;

use super::{BlockStorage, CloneParent, CloneState, RbdImage, SnapshotInfo, StorageError};
use crate::config::RbdConfig;
use crate::ffi::rados::Cluster;
use crate::ffi::rbd::{self as ffi, Errno};
use crate::hypervisor::Progress;
use crate::inflight;

/// librbd's layering feature bit: a clone needs it.
const FEATURE_LAYERING: u64 = 1;
/// The object map and fast-diff feature bits, which flatten turns off for a while.
const FEATURE_OBJECT_MAP: u64 = 8;
const FEATURE_FAST_DIFF: u64 = 16;
/// Image metadata naming the object map features turned off for a flatten, to turn back on
/// after it (also by a retry after a crash).
const OBJECT_MAP_OFF_KEY: &str = "novasnap.object_map_off";
/// Bytes per read from librbd, and per chunk of [`BlockStorage::read`]'s stream.
const READ_CHUNK: usize = 4 << 20;
/// Chunks read ahead of the consumer: bounds the stream's memory to this × READ_CHUNK.
const READ_AHEAD: usize = 4;

#[derive(Clone)]
pub struct CephRbd {
    inner: Arc<Inner>,
}

struct Inner {
    // Handles are closed (the closer dropped) before the I/O contexts they were opened in
    // are destroyed; each context keeps the cluster connection up while it lives.
    closer: ffi::DeferredClose,
    pools: Mutex<HashMap<String, Arc<ffi::Pool>>>,
    cluster: Arc<Cluster>,
    /// Turns to flatten (`[novasnap] concurrent_flattens`), handed out in the order asked.
    /// librbd's flatten copies whole objects up, `rbd_concurrent_management_ops` of them
    /// (10 × 4 MiB by default) held in memory per flatten: eight at once held some 280 MiB.
    /// Taking turns keeps the worker's memory at a few flattens' worth while the cluster,
    /// not the count of flattens, bounds how fast they finish together.
    flatten_turns: Arc<tokio::sync::Semaphore>,
}

/// The error for `operation` on `target` failing with `errno`.
fn rbd_error(operation: &'static str, target: impl std::fmt::Display) -> impl Fn(Errno) -> StorageError {
    let target = target.to_string();
    move |errno: Errno| StorageError::Rbd {
        operation,
        target: target.clone(),
        errno: errno.0,
        message: errno.to_string(),
    }
}

fn open_pool(cluster: &Arc<Cluster>, name: &str, namespace: Option<&str>) -> Result<ffi::Pool, StorageError> {
    cluster.pool(name, namespace).map_err(|e| match e {
        Errno(libc::ENOENT) => StorageError::NotFound(format!("pool {name}")),
        e => rbd_error("open pool", name)(e),
    })
}

impl Inner {
    fn pool(&self, name: &str) -> Result<Arc<ffi::Pool>, StorageError> {
        let mut pools = self.pools.lock().expect("pool cache lock");
        if let Some(pool) = pools.get(name) {
            return Ok(pool.clone());
        }
        let pool = Arc::new(open_pool(&self.cluster, name, None)?);
        pools.insert(name.to_string(), pool.clone());
        Ok(pool)
    }

    fn not_found(image: &RbdImage, snap: Option<&str>, operation: &'static str) -> impl Fn(Errno) -> StorageError {
        let target = match snap {
            Some(s) => format!("{image}@{s}"),
            None => image.to_string(),
        };
        move |e| match e {
            Errno(libc::ENOENT) => StorageError::NotFound(target.clone()),
            e => rbd_error(operation, &target)(e),
        }
    }

    /// Opens `image` (at `snap`) to look at it.
    fn open_read_only(&self, image: &RbdImage, snap: Option<&str>) -> Result<ffi::Image, StorageError> {
        self.pool(&image.pool)?
            .open_read_only(&image.name, snap, &self.closer)
            .map_err(Self::not_found(image, snap, "open"))
    }

    /// Opens `image` to change it.
    fn open_writable(&self, image: &RbdImage) -> Result<ffi::Image, StorageError> {
        self.pool(&image.pool)?.open_writable(&image.name, &self.closer).map_err(Self::not_found(image, None, "open"))
    }

    /// Opens `image` to look at it, or None if it does not exist.
    fn look_if_exists(&self, image: &RbdImage) -> Result<Option<ffi::Image>, StorageError> {
        match self.open_read_only(image, None) {
            Ok(handle) => Ok(Some(handle)),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn parent(&self, handle: &ffi::Image, image: &RbdImage) -> Result<Option<CloneParent>, StorageError> {
        Ok(handle
            .parent()
            .map_err(rbd_error("get parent", image))?
            .map(|(pool, name, snapshot)| CloneParent { image: RbdImage::new(pool, name), snapshot }))
    }

    fn remove_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        let target = format!("{image}@{snap}");
        // Looked at read-only first: most calls (cleanup, reclamation) find nothing to do.
        let Some(look) = self.look_if_exists(image)? else { return Ok(()) };
        if !look.snap_exists(snap).map_err(rbd_error("stat snapshot", &target))? {
            return Ok(());
        }
        let protected = look.snap_is_protected(snap).map_err(rbd_error("stat snapshot", &target))?;
        drop(look);
        let handle = self.open_writable(image)?;
        if protected {
            match handle.snap_unprotect(snap) {
                Ok(()) | Err(Errno(libc::EINVAL)) => {} // EINVAL: not protected (any more)
                Err(e) => return Err(rbd_error("unprotect snapshot", &target)(e)),
            }
        }
        match handle.snap_remove(snap) {
            Ok(()) | Err(Errno(libc::ENOENT)) => Ok(()),
            Err(e) => Err(rbd_error("remove snapshot", &target)(e)),
        }
    }

    /// Flattens `image`, trusting its object map only when the clone is [`CloneState::Fresh`].
    ///
    /// Ceph 16's flatten skips every object the object map marks as present (fixed later
    /// by ceph PR #61129, tracker 68998). A flatten killed mid-way can leave an object
    /// marked that was never copied up; resumed, it would leave a hole of zeros there and
    /// detach the parent. A rebuild does not help, as the map may mark more than exists.
    /// So unless the clone is fresh, the map is off while flattening, recorded in the image's
    /// metadata so that a retry after any crash turns it back on, and rebuilt from the
    /// objects once all exist (the features toggled and the rebuild cost a fresh clone's
    /// flatten nothing). `progress` returns false to stop the flatten (ECANCELED).
    fn flatten(
        &self,
        image: &RbdImage,
        clone: CloneState,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<(), StorageError> {
        let look = self.open_read_only(image, None)?;
        let has_parent = self.parent(&look, image)?.is_some();
        let features = look.features().map_err(rbd_error("get features", image))?;
        let mut off = look.metadata_get(OBJECT_MAP_OFF_KEY).map_err(rbd_error("get metadata", image))?;
        drop(look);
        if !has_parent && off.is_none() {
            return Ok(());
        }
        let handle = self.open_writable(image)?;
        if has_parent {
            let map_features = features & (FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF);
            if map_features != 0 && (clone != CloneState::Fresh || off.is_some()) {
                let record = map_features.to_string();
                handle.metadata_set(OBJECT_MAP_OFF_KEY, &record).map_err(rbd_error("set metadata", image))?;
                handle.update_features(map_features, false).map_err(rbd_error("disable object map", image))?;
                off = Some(record);
            }
            handle.flatten(progress).map_err(rbd_error("flatten", image))?;
        }
        if let Some(record) = off {
            let wanted: u64 = record.parse().unwrap_or(FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF);
            let now = handle.features().map_err(rbd_error("get features", image))?;
            if wanted & !now != 0 {
                handle.update_features(wanted & !now, true).map_err(rbd_error("enable object map", image))?;
            }
            handle.rebuild_object_map().map_err(rbd_error("rebuild object map", image))?;
            handle.metadata_remove(OBJECT_MAP_OFF_KEY).map_err(rbd_error("remove metadata", image))?;
        }
        Ok(())
    }
}

impl CephRbd {
    /// Connects as `[libvirt] rbd_user` (default `admin`) with `images_rbd_ceph_conf`
    /// (default `/etc/ceph/ceph.conf`), with novasnap's own bounds on every librados call
    /// (`[novasnap] rados_osd_op_timeout`, `rados_mon_op_timeout`, `client_mount_timeout`),
    /// whatever that file says: without them an unresponsive OSD or monitor is waited for
    /// for ever. librbd's cache is off on this connection: novasnap reads each byte once and
    /// writes none through an image handle, and the cache would hold up to `rbd_cache_size`
    /// (32 MiB) per open image (eight snapshots in flight held some 400 MiB).
    pub async fn connect(config: &RbdConfig) -> Result<Self, StorageError> {
        let user = config.user.clone().unwrap_or_else(|| "admin".into());
        let conf = config.ceph_conf.clone().unwrap_or_else(|| "/etc/ceph/ceph.conf".into());
        let seconds = |d: std::time::Duration| format!("{}", d.as_secs_f64());
        let options = [
            ("rados_osd_op_timeout", seconds(config.osd_op_timeout)),
            ("rados_mon_op_timeout", seconds(config.mon_op_timeout)),
            ("client_mount_timeout", seconds(config.mount_timeout)),
            ("rbd_cache", "false".into()),
        ];
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::connect(&user, &conf, &options).map_err(|(step, e)| {
                StorageError::Connect(format!("as client.{user} with {} ({step}): {e}", conf.display()))
            })
        })
        .await
        .map_err(|e| StorageError::Connect(e.to_string()))??;
        let closer =
            ffi::DeferredClose::start().map_err(|e| StorageError::Connect(format!("starting the closer: {e}")))?;
        let flatten_turns = Arc::new(tokio::sync::Semaphore::new(config.concurrent_flattens));
        Ok(Self { inner: Arc::new(Inner { closer, pools: Mutex::default(), cluster, flatten_turns }) })
    }

    /// Runs `f` on the blocking pool with the connection, counted in flight by the request.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StorageError> + Send + 'static,
    {
        let inner = self.inner.clone();
        inflight::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::Connect(format!("blocking task failed: {e}")))?
    }

    /// A fresh I/O context on `pool` in RADOS namespace `namespace`, for the work ledger's
    /// objects, kept apart from the images in the pool.
    pub(crate) async fn namespace(&self, pool: &str, namespace: &str) -> Result<Arc<ffi::Pool>, StorageError> {
        let (pool, namespace) = (pool.to_string(), namespace.to_string());
        self.blocking(move |inner| Ok(Arc::new(open_pool(&inner.cluster, &pool, Some(&namespace))?))).await
    }

    /// A librados option as the connection uses it (to check the bounds set at connect).
    pub async fn option(&self, name: &str) -> Result<String, StorageError> {
        let name = name.to_string();
        self.blocking(move |inner| inner.cluster.conf(&name).map_err(rbd_error("get option", &name))).await
    }
}

#[async_trait]
impl BlockStorage for CephRbd {
    async fn fsid(&self) -> Result<String, StorageError> {
        self.blocking(|inner| inner.cluster.fsid().map_err(rbd_error("get fsid", "cluster"))).await
    }

    async fn exists(&self, image: &RbdImage) -> Result<bool, StorageError> {
        let image = image.clone();
        self.blocking(move |inner| Ok(inner.look_if_exists(&image)?.is_some())).await
    }

    async fn size(&self, image: &RbdImage) -> Result<u64, StorageError> {
        let image = image.clone();
        self.blocking(move |inner| inner.open_read_only(&image, None)?.size().map_err(rbd_error("get size", &image)))
            .await
    }

    async fn parent(&self, image: &RbdImage) -> Result<Option<CloneParent>, StorageError> {
        let image = image.clone();
        self.blocking(move |inner| inner.parent(&inner.open_read_only(&image, None)?, &image)).await
    }

    async fn list_images(&self, pool: &str) -> Result<Vec<String>, StorageError> {
        let pool = pool.to_string();
        self.blocking(move |inner| inner.pool(&pool)?.list().map_err(rbd_error("list images", &pool))).await
    }

    async fn list_snapshots(&self, image: &RbdImage) -> Result<Vec<SnapshotInfo>, StorageError> {
        let image = image.clone();
        self.blocking(move |inner| {
            let handle = inner.open_read_only(&image, None)?;
            let names = handle.snapshots().map_err(rbd_error("list snapshots", &image))?;
            names
                .into_iter()
                .map(|name| {
                    let protected = handle.snap_is_protected(&name).map_err(rbd_error("stat snapshot", &image))?;
                    Ok(SnapshotInfo { name, protected })
                })
                .collect()
        })
        .await
    }

    async fn create_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        let (image, snap) = (image.clone(), snap.to_string());
        self.blocking(move |inner| {
            let target = format!("{image}@{snap}");
            // Unlike protect and remove, no read-only look first: the disk snapshot is taken
            // with the guest frozen, and each open costs round trips to the OSDs (some 5 ms
            // here); an existing snapshot answers EEXIST, through QEMU's lock if it holds one.
            match inner.open_writable(&image)?.snap_create(&snap) {
                Ok(()) | Err(Errno(libc::EEXIST)) => Ok(()),
                Err(e) => Err(rbd_error("create snapshot", &target)(e)),
            }
        })
        .await
    }

    async fn protect_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        let (image, snap) = (image.clone(), snap.to_string());
        self.blocking(move |inner| {
            let target = format!("{image}@{snap}");
            let look = inner.open_read_only(&image, None)?;
            if look.snap_is_protected(&snap).map_err(rbd_error("stat snapshot", &target))? {
                return Ok(());
            }
            drop(look);
            inner.open_writable(&image)?.snap_protect(&snap).map_err(rbd_error("protect snapshot", &target))
        })
        .await
    }

    async fn remove_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        let (image, snap) = (image.clone(), snap.to_string());
        self.blocking(move |inner| inner.remove_snapshot(&image, &snap)).await
    }

    async fn clone_image(&self, parent: &RbdImage, snap: &str, child: &RbdImage) -> Result<(), StorageError> {
        let (parent, snap, child) = (parent.clone(), snap.to_string(), child.clone());
        self.blocking(move |inner| {
            if let Some(existing) = inner.look_if_exists(&child)? {
                let expected = CloneParent { image: parent.clone(), snapshot: snap.clone() };
                return match inner.parent(&existing, &child)? {
                    Some(p) if p == expected => Ok(()),
                    other => Err(StorageError::Rbd {
                        operation: "clone",
                        target: child.to_string(),
                        errno: libc::EEXIST,
                        message: format!("exists and is not a clone of {parent}@{snap} (parent: {other:?})"),
                    }),
                };
            }
            let features =
                inner.open_read_only(&parent, Some(&snap))?.features().map_err(rbd_error("get features", &parent))?;
            let (parent_pool, child_pool) = (inner.pool(&parent.pool)?, inner.pool(&child.pool)?);
            match child_pool.clone_image(&parent_pool, &parent.name, &snap, &child.name, features | FEATURE_LAYERING) {
                Ok(()) => Ok(()),
                Err(e) => Err(rbd_error("clone", format!("{parent}@{snap} → {child}"))(e)),
            }
        })
        .await
    }

    async fn flatten(&self, image: &RbdImage, clone: CloneState, progress: Progress) -> Result<(), StorageError> {
        let image = image.clone();
        let stop = inflight::stop_signal().unwrap_or_default();
        // Held by the blocking call itself: a flatten whose caller gave up runs on, in its turn.
        let turn =
            self.inner.flatten_turns.clone().acquire_owned().await.expect("the flatten semaphore is never closed");
        self.blocking(move |inner| {
            let _turn = turn;
            let mut report = |done: u64, total: u64| {
                progress((done.saturating_mul(100) / total.max(1)).min(100) as u8);
                !stop.is_cancelled()
            };
            inner.flatten(&image, clone, &mut report)?;
            progress(100);
            Ok(())
        })
        .await
    }

    async fn set_metadata(&self, image: &RbdImage, key: &str, value: &str) -> Result<(), StorageError> {
        let (image, key, value) = (image.clone(), key.to_string(), value.to_string());
        self.blocking(move |inner| {
            inner.open_writable(&image)?.metadata_set(&key, &value).map_err(rbd_error("set metadata", &image))
        })
        .await
    }

    async fn copy_own_extents(
        &self,
        disk: &RbdImage,
        snap: &str,
        copy: &RbdImage,
        progress: Progress,
    ) -> Result<u64, StorageError> {
        let (disk, snap, copy) = (disk.clone(), snap.to_string(), copy.clone());
        let stop = inflight::stop_signal().unwrap_or_default();
        self.blocking(move |inner| {
            let source_name = format!("{disk}@{snap}");
            let source = inner.open_read_only(&disk, Some(&snap))?;
            let size = source.size().map_err(rbd_error("get size", &source_name))?;
            let extents = source.own_extents().map_err(rbd_error("list own extents", &source_name))?;
            let target = inner.open_writable(&copy)?;
            if target.size().map_err(rbd_error("get size", &copy))? < size {
                target.resize(size).map_err(rbd_error("resize", &copy))?;
            }
            let total: u64 = extents.iter().map(|(_, len, _)| len).sum();
            let (mut written, mut buf) = (0u64, vec![0u8; READ_CHUNK]);
            for (offset, len, exists) in extents {
                let mut at = offset;
                while at < offset + len {
                    if stop.is_cancelled() {
                        return Err(rbd_error("copy own extents", &copy)(Errno(libc::ECANCELED)));
                    }
                    let chunk = &mut buf[..READ_CHUNK.min((offset + len - at) as usize)];
                    if exists {
                        let n = source.read(at, chunk).map_err(rbd_error("read", &source_name))?;
                        chunk[n..].fill(0);
                    } else {
                        chunk.fill(0);
                    }
                    target.write(at, chunk).map_err(rbd_error("write", &copy))?;
                    at += chunk.len() as u64;
                    written += chunk.len() as u64;
                    progress((written.saturating_mul(100) / total.max(1)).min(100) as u8);
                }
            }
            progress(100);
            Ok(written)
        })
        .await
    }

    async fn metadata(&self, image: &RbdImage, key: &str) -> Result<Option<String>, StorageError> {
        let (image, key) = (image.clone(), key.to_string());
        self.blocking(move |inner| {
            inner.open_read_only(&image, None)?.metadata_get(&key).map_err(rbd_error("get metadata", &image))
        })
        .await
    }

    async fn release(&self, image: &RbdImage) -> Result<(), StorageError> {
        let image = image.clone();
        self.blocking(move |inner| {
            inner.closer.settle_own(&*inner.pool(&image.pool)?, &image.name);
            Ok(())
        })
        .await
    }

    async fn remove_image(&self, image: &RbdImage) -> Result<(), StorageError> {
        let image = image.clone();
        self.blocking(move |inner| {
            let Some(look) = inner.look_if_exists(&image)? else { return Ok(()) };
            let snapshots = look.snapshots().map_err(rbd_error("list snapshots", &image))?;
            drop(look);
            for snap in snapshots {
                inner.remove_snapshot(&image, &snap)?;
            }
            // Our own handles still waiting to close would count as watchers (EBUSY).
            let pool = inner.pool(&image.pool)?;
            inner.closer.settle(&pool, &image.name);
            match pool.remove(&image.name) {
                Ok(()) | Err(Errno(libc::ENOENT)) => Ok(()),
                Err(e) => Err(rbd_error("remove image", &image)(e)),
            }
        })
        .await
    }

    fn read(&self, image: &RbdImage, snap: Option<&str>) -> BoxStream<'static, Result<Bytes, StorageError>> {
        let (image, snap) = (image.clone(), snap.map(String::from));
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let inner = self.inner.clone();
        inflight::spawn_blocking(move || {
            let read = || -> Result<(), StorageError> {
                let handle = inner.open_read_only(&image, snap.as_deref())?;
                let size = handle.size().map_err(rbd_error("get size", &image))?;
                let mut offset = 0u64;
                while offset < size {
                    let mut buf = vec![0u8; READ_CHUNK.min((size - offset) as usize)];
                    let n = handle.read(offset, &mut buf).map_err(rbd_error("read", &image))?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    offset += n as u64;
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        debug!(%image, "reader gone; stopping");
                        return Ok(());
                    }
                }
                Ok(())
            };
            if let Err(e) = read() {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Box::pin(tokio_stream_from(rx))
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
