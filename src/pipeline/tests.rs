//! The pipeline's story checked over in-memory fakes of its boundaries. These prove the
//! control flow (order, idempotency, cleanup); the integration tests in `tests/` prove the
//! same against Ceph, libvirt and Glance.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use serde_json::json;
use uuid::Uuid;

use super::direct::OWNER_METADATA_KEY;
use super::*;
use crate::config::ImageLayout;
use crate::hypervisor::{DiskSource, Guest, HypervisorError, PowerState, Progress, RootDisk};
use crate::image::{Image, ImageError, ImageProperties, ImageService, ImageStatus};
use crate::messaging::{MessagingError, Notifier, SnapshotEvent, TaskState};
use crate::nova::{Expected, InstanceRecord, NovaError};
use crate::reclaim::Scope;
use crate::request::{Instance, RequestContext, SnapshotKind, SnapshotRequest};
use crate::storage::{
    BlockStorage, CloneParent, CloneState, InstanceLease, NotedWork, RbdImage, SnapshotInfo, StorageError, WorkLedger,
};

const FSID: &str = "0a1b2c3d-0000-4000-8000-000000000001";

/// Faults a fake returns from the named method, in order, before it behaves normally again:
/// every method of every fake can be made to fail, where the pipeline's bugs would be. A
/// `None` in the queue lets one call through, so a fault can be placed at the n-th call.
struct Faults<E>(Mutex<BTreeMap<&'static str, VecDeque<Option<E>>>>);

impl<E> Default for Faults<E> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<E> Faults<E> {
    fn inject(&self, op: &'static str, times: usize, fault: impl Fn() -> E) {
        let mut faults = self.0.lock().unwrap();
        faults.entry(op).or_default().extend((0..times).map(|_| Some(fault())));
    }
    /// The next `times` calls of `op` behave normally, before any fault injected after this.
    fn pass(&self, op: &'static str, times: usize) {
        self.0.lock().unwrap().entry(op).or_default().extend((0..times).map(|_| None));
    }
    fn check(&self, op: &'static str) -> Result<(), E> {
        self.0.lock().unwrap().get_mut(op).and_then(VecDeque::pop_front).flatten().map_or(Ok(()), Err)
    }
}

/// What the fakes did, in order, across all of them: `<boundary> <method> <target>`.
type Timeline = Arc<Mutex<Vec<String>>>;

#[derive(Default)]
struct FakeHypervisor {
    guests: Mutex<BTreeMap<Uuid, Guest>>,
    /// The guest's filesystems are frozen (by this or a dead worker).
    frozen: Mutex<bool>,
    /// How long the guest agent takes to freeze.
    freeze_takes: Mutex<Duration>,
    calls: Mutex<Vec<String>>,
    faults: Faults<HypervisorError>,
    timeline: Timeline,
}

impl FakeHypervisor {
    fn record(&self, call: String) {
        self.timeline.lock().unwrap().push(format!("hypervisor {call}"));
        self.calls.lock().unwrap().push(call);
    }
    /// `times` transient libvirt errors (an operation timeout) from `op`.
    fn inject(&self, op: &'static str, times: usize) {
        self.faults.inject(op, times, || HypervisorError::Libvirt {
            operation: "injected",
            uuid: Uuid::nil(),
            code: 68,
            message: "operation timed out".into(),
        });
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn find_guest(&self, uuid: Uuid, _root_device: Option<&str>) -> Result<Guest, HypervisorError> {
        self.faults.check("find_guest")?;
        self.guests.lock().unwrap().get(&uuid).cloned().ok_or(HypervisorError::GuestNotFound(uuid))
    }
    async fn power_state(&self, uuid: Uuid) -> Result<PowerState, HypervisorError> {
        self.faults.check("power_state")?;
        Ok(self.find_guest(uuid, None).await?.power_state)
    }
    async fn abort_block_job(&self, _uuid: Uuid, disk: &str) -> Result<(), HypervisorError> {
        self.faults.check("abort_block_job")?;
        self.record(format!("abort {disk}"));
        Ok(())
    }
    async fn suspend(&self, uuid: Uuid) -> Result<(), HypervisorError> {
        self.faults.check("suspend")?;
        self.record("suspend".into());
        self.guests.lock().unwrap().get_mut(&uuid).unwrap().power_state = PowerState::Suspended;
        Ok(())
    }
    async fn resume(&self, uuid: Uuid, paused: bool) -> Result<(), HypervisorError> {
        self.faults.check("resume")?;
        self.record(format!("resume paused={paused}"));
        self.guests.lock().unwrap().get_mut(&uuid).unwrap().power_state =
            if paused { PowerState::Paused } else { PowerState::Running };
        Ok(())
    }
    async fn live_copy(&self, _: Uuid, _: &str, _: &std::path::Path, _: Progress) -> Result<(), HypervisorError> {
        self.faults.check("live_copy")?;
        unreachable!("file-backed guests are covered by the integration tests")
    }
    async fn freeze_filesystems(&self, _uuid: Uuid) -> Result<u32, HypervisorError> {
        self.record("freeze".into());
        let takes = *self.freeze_takes.lock().unwrap();
        tokio::time::sleep(takes).await;
        self.faults.check("freeze_filesystems")?;
        *self.frozen.lock().unwrap() = true;
        Ok(2)
    }
    async fn thaw_filesystems(&self, _uuid: Uuid) -> Result<(), HypervisorError> {
        self.record("thaw".into());
        self.faults.check("thaw_filesystems")?;
        *self.frozen.lock().unwrap() = false;
        Ok(())
    }
}

#[derive(Clone, Default)]
struct FakeRbd {
    data: Vec<u8>,
    parent: Option<CloneParent>,
    snaps: BTreeMap<String, (bool, Vec<u8>)>,
    metadata: BTreeMap<String, String>,
}

#[derive(Default)]
struct FakeStorage {
    images: Mutex<BTreeMap<RbdImage, FakeRbd>>,
    faults: Faults<StorageError>,
    timeline: Timeline,
}

impl FakeStorage {
    /// `times` faults with `errno` from `op`.
    fn inject(&self, op: &'static str, errno: i32, times: usize) {
        self.faults.inject(op, times, || StorageError::Rbd {
            operation: "injected",
            target: "fake".into(),
            errno,
            message: "injected".into(),
        });
    }
    /// Checks for an injected fault, then records a change.
    fn change(&self, op: &'static str, target: impl std::fmt::Display) -> Result<(), StorageError> {
        self.faults.check(op)?;
        self.timeline.lock().unwrap().push(format!("storage {op} {target}"));
        Ok(())
    }
    fn get(&self, image: &RbdImage) -> Option<FakeRbd> {
        self.images.lock().unwrap().get(image).cloned()
    }
    fn missing(image: &RbdImage) -> StorageError {
        StorageError::NotFound(image.to_string())
    }
}

#[async_trait]
impl BlockStorage for FakeStorage {
    async fn fsid(&self) -> Result<String, StorageError> {
        self.faults.check("fsid")?;
        Ok(FSID.into())
    }
    async fn exists(&self, image: &RbdImage) -> Result<bool, StorageError> {
        self.faults.check("exists")?;
        Ok(self.get(image).is_some())
    }
    async fn size(&self, image: &RbdImage) -> Result<u64, StorageError> {
        self.faults.check("size")?;
        Ok(self.get(image).ok_or_else(|| Self::missing(image))?.data.len() as u64)
    }
    async fn parent(&self, image: &RbdImage) -> Result<Option<CloneParent>, StorageError> {
        self.faults.check("parent")?;
        Ok(self.get(image).ok_or_else(|| Self::missing(image))?.parent)
    }
    async fn list_images(&self, pool: &str) -> Result<Vec<String>, StorageError> {
        self.faults.check("list_images")?;
        Ok(self.images.lock().unwrap().keys().filter(|i| i.pool == pool).map(|i| i.name.clone()).collect())
    }
    async fn list_snapshots(&self, image: &RbdImage) -> Result<Vec<SnapshotInfo>, StorageError> {
        self.faults.check("list_snapshots")?;
        let rbd = self.get(image).ok_or_else(|| Self::missing(image))?;
        Ok(rbd
            .snaps
            .iter()
            .map(|(name, (protected, _))| SnapshotInfo { name: name.clone(), protected: *protected })
            .collect())
    }
    async fn create_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        self.change("create_snapshot", format!("{image}@{snap}"))?;
        let mut images = self.images.lock().unwrap();
        let rbd = images.get_mut(image).ok_or_else(|| Self::missing(image))?;
        let data = rbd.data.clone();
        rbd.snaps.entry(snap.into()).or_insert((false, data));
        Ok(())
    }
    async fn protect_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        self.change("protect_snapshot", format!("{image}@{snap}"))?;
        let mut images = self.images.lock().unwrap();
        let rbd = images.get_mut(image).ok_or_else(|| Self::missing(image))?;
        rbd.snaps.get_mut(snap).ok_or_else(|| Self::missing(image))?.0 = true;
        Ok(())
    }
    async fn remove_snapshot(&self, image: &RbdImage, snap: &str) -> Result<(), StorageError> {
        self.change("remove_snapshot", format!("{image}@{snap}"))?;
        let mut images = self.images.lock().unwrap();
        let children =
            images.values().any(|i| i.parent.as_ref().is_some_and(|p| &p.image == image && p.snapshot == snap));
        if children {
            return Err(StorageError::Rbd {
                operation: "remove_snapshot",
                target: snap.into(),
                errno: libc::EBUSY,
                message: "has children".into(),
            });
        }
        if let Some(rbd) = images.get_mut(image) {
            rbd.snaps.remove(snap);
        }
        Ok(())
    }
    async fn clone_image(&self, parent: &RbdImage, snap: &str, child: &RbdImage) -> Result<(), StorageError> {
        self.change("clone_image", child)?;
        let mut images = self.images.lock().unwrap();
        let data = images.get(parent).and_then(|p| p.snaps.get(snap)).ok_or_else(|| Self::missing(parent))?.1.clone();
        images.entry(child.clone()).or_insert(FakeRbd {
            data,
            parent: Some(CloneParent { image: parent.clone(), snapshot: snap.into() }),
            snaps: BTreeMap::new(),
            metadata: BTreeMap::new(),
        });
        Ok(())
    }
    async fn flatten(&self, image: &RbdImage, clone: CloneState, progress: Progress) -> Result<(), StorageError> {
        self.change("flatten", format!("{image} {clone:?}"))?;
        progress(50);
        progress(100);
        self.images.lock().unwrap().get_mut(image).ok_or_else(|| Self::missing(image))?.parent = None;
        Ok(())
    }
    async fn copy_own_extents(
        &self,
        disk: &RbdImage,
        snap: &str,
        copy: &RbdImage,
        progress: Progress,
    ) -> Result<u64, StorageError> {
        self.change("copy_own_extents", copy)?;
        let mut images = self.images.lock().unwrap();
        let data = images.get(disk).and_then(|d| d.snaps.get(snap)).ok_or_else(|| Self::missing(disk))?.1.clone();
        images.get_mut(copy).ok_or_else(|| Self::missing(copy))?.data = data.clone();
        progress(100);
        Ok(data.len() as u64)
    }
    async fn set_metadata(&self, image: &RbdImage, key: &str, value: &str) -> Result<(), StorageError> {
        self.change("set_metadata", image)?;
        let mut images = self.images.lock().unwrap();
        images.get_mut(image).ok_or_else(|| Self::missing(image))?.metadata.insert(key.into(), value.into());
        Ok(())
    }
    async fn metadata(&self, image: &RbdImage, key: &str) -> Result<Option<String>, StorageError> {
        self.faults.check("metadata")?;
        Ok(self.get(image).ok_or_else(|| Self::missing(image))?.metadata.get(key).cloned())
    }
    async fn release(&self, _image: &RbdImage) -> Result<(), StorageError> {
        self.faults.check("release")?;
        Ok(()) // an in-memory image has no handles
    }
    async fn remove_image(&self, image: &RbdImage) -> Result<(), StorageError> {
        self.change("remove_image", image)?;
        self.images.lock().unwrap().remove(image);
        Ok(())
    }
    fn read(&self, image: &RbdImage, snap: Option<&str>) -> BoxStream<'static, Result<Bytes, StorageError>> {
        if let Err(e) = self.faults.check("read") {
            return futures::stream::once(async { Err(e) }).boxed();
        }
        let rbd = self.get(image).unwrap();
        let data = match snap {
            Some(s) => rbd.snaps[s].1.clone(),
            None => rbd.data,
        };
        futures::stream::iter(data.chunks(3).map(|c| Ok(Bytes::copy_from_slice(c))).collect::<Vec<_>>()).boxed()
    }
}

#[derive(Default)]
struct FakeImages {
    images: Mutex<BTreeMap<Uuid, Image>>,
    uploads: Mutex<BTreeMap<Uuid, Vec<u8>>>,
    refuse_locations: bool,
    /// Plays Glance's failing location import: run (and dropped) at the next add_location,
    /// which then fails as the import task does.
    failing_import: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    faults: Faults<ImageError>,
}

impl FakeImages {
    fn image(&self, id: Uuid) -> Option<Image> {
        self.images.lock().unwrap().get(&id).cloned()
    }
    /// `times` answers of 503 (Glance down) from `op`.
    fn inject(&self, op: &'static str, times: usize) {
        self.faults.inject(op, times, || ImageError::Http {
            operation: "injected",
            target: "fake".into(),
            status: 503,
            body: "the image service is unavailable".into(),
        });
    }
    fn set_status(&self, id: Uuid, status: ImageStatus) {
        self.images.lock().unwrap().get_mut(&id).unwrap().status = status;
    }
}

#[async_trait]
impl ImageService for FakeImages {
    async fn get(&self, _: &RequestContext, id: Uuid) -> Result<Image, ImageError> {
        self.faults.check("get")?;
        self.image(id).ok_or(ImageError::NotFound(id))
    }
    async fn update(&self, _: &RequestContext, id: Uuid, props: &ImageProperties) -> Result<Image, ImageError> {
        self.faults.check("update")?;
        let mut images = self.images.lock().unwrap();
        let image = images.get_mut(&id).ok_or(ImageError::NotFound(id))?;
        image.properties.extend(props.clone());
        Ok(image.clone())
    }
    async fn add_location(&self, _: &RequestContext, id: Uuid, url: &str) -> Result<(), ImageError> {
        self.faults.check("add_location")?;
        if self.refuse_locations {
            return Err(ImageError::LocationsRefused { id, reason: "403 Forbidden".into() });
        }
        if let Some(revert) = self.failing_import.lock().unwrap().take() {
            revert();
            return Err(ImageError::LocationImportFailed { id, message: "database is locked".into() });
        }
        let mut images = self.images.lock().unwrap();
        let image = images.get_mut(&id).ok_or(ImageError::NotFound(id))?;
        image.locations.push(url.into());
        image.status = ImageStatus::Active;
        Ok(())
    }
    async fn upload(
        &self,
        _: &RequestContext,
        id: Uuid,
        data: BoxStream<'static, Result<Bytes, std::io::Error>>,
        _size: Option<u64>,
    ) -> Result<(), ImageError> {
        self.faults.check("upload")?;
        let chunks: Vec<Bytes> =
            data.try_collect().await.map_err(|e| ImageError::Source { id, message: e.to_string() })?;
        self.uploads.lock().unwrap().insert(id, chunks.concat());
        self.images.lock().unwrap().get_mut(&id).ok_or(ImageError::NotFound(id))?.status = ImageStatus::Active;
        Ok(())
    }
    async fn delete(&self, _: &RequestContext, id: Uuid) -> Result<(), ImageError> {
        self.faults.check("delete")?;
        self.images.lock().unwrap().remove(&id);
        Ok(())
    }
    async fn list(&self, _: &RequestContext, filters: &[(&str, &str)]) -> Result<Vec<Image>, ImageError> {
        self.faults.check("list")?;
        let mut found: Vec<Image> = self
            .images
            .lock()
            .unwrap()
            .values()
            .filter(|i| filters.iter().all(|(k, v)| i.properties.get(*k).and_then(|p| p.as_str()) == Some(*v)))
            .cloned()
            .collect();
        found.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        Ok(found)
    }
}

#[derive(Default)]
struct RecordingNotifier {
    events: Mutex<Vec<SnapshotEvent>>,
}

#[async_trait]
impl Notifier for RecordingNotifier {
    async fn notify(&self, _: &SnapshotRequest, event: SnapshotEvent) -> Result<(), MessagingError> {
        self.events.lock().unwrap().push(event);
        Ok(())
    }
}

/// Nova's database as the conductor guards it: a save whose expected_task_state does not
/// match is refused, as `Instance.save` refuses it.
struct FakeNova {
    task_state: Mutex<Option<String>>,
    power_state: Mutex<Option<PowerState>>,
    events: Mutex<Vec<(String, Option<String>)>>,
    faults: Mutex<Vec<String>>,
    /// Conductor calls to answer with a timeout before answering again.
    unreachable: Mutex<usize>,
}

impl FakeNova {
    fn with_task_state(state: &str) -> Self {
        Self {
            task_state: Mutex::new(Some(state.into())),
            power_state: Mutex::default(),
            events: Mutex::default(),
            faults: Mutex::default(),
            unreachable: Mutex::new(0),
        }
    }

    fn reachable(&self) -> Result<(), NovaError> {
        let mut left = self.unreachable.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            let e = crate::messaging::rpc::RpcError::Timeout {
                method: "object_action".into(),
                topic: "conductor".into(),
                seconds: 60,
            };
            return Err(NovaError::Conductor(e));
        }
        Ok(())
    }

    fn task_state(&self) -> Option<String> {
        self.task_state.lock().unwrap().clone()
    }
}

#[async_trait]
impl InstanceRecord for FakeNova {
    async fn save_task_state(
        &self,
        req: &SnapshotRequest,
        new: Option<TaskState>,
        expected: Expected,
    ) -> Result<(), NovaError> {
        self.reachable()?;
        let mut current = self.task_state.lock().unwrap();
        if let Expected::OneOf(states) = &expected {
            let names: Vec<Option<String>> = states.iter().map(|s| s.map(|s| s.as_str().to_string())).collect();
            if !names.contains(&current) {
                if current.as_deref() == Some("deleting") {
                    return Err(NovaError::Deleting(req.instance.uuid));
                }
                return Err(NovaError::UnexpectedTaskState {
                    instance: req.instance.uuid,
                    expected: format!("{names:?}"),
                    actual: current.clone().unwrap_or_else(|| "None".into()),
                });
            }
        }
        *current = new.map(|s| s.as_str().to_string());
        Ok(())
    }

    async fn save_power_state(&self, _: &SnapshotRequest, state: PowerState) -> Result<(), NovaError> {
        self.reachable()?;
        *self.power_state.lock().unwrap() = Some(state);
        Ok(())
    }

    async fn event_start(&self, _: &SnapshotRequest, event: &str) -> Result<(), NovaError> {
        self.events.lock().unwrap().push((format!("start {event}"), None));
        Ok(())
    }

    async fn event_finish(
        &self,
        _: &SnapshotRequest,
        event: &str,
        failure: Option<(&str, &str)>,
    ) -> Result<(), NovaError> {
        self.events.lock().unwrap().push((format!("finish {event}"), failure.map(|(m, _)| m.to_string())));
        Ok(())
    }

    async fn add_fault(&self, _: &SnapshotRequest, message: &str, _: &str) -> Result<(), NovaError> {
        self.faults.lock().unwrap().push(message.into());
        Ok(())
    }
}

struct World {
    nova: Arc<FakeNova>,
    timeline: Timeline,
    /// The work ledger (a local one) and its directory.
    ledger: Arc<crate::storage::ledger::FileLedger>,
    _ledger_dir: tempfile::TempDir,
    lease: InstanceLease,
    lease_holder: Arc<FakeLease>,
    hv: Arc<FakeHypervisor>,
    storage: Arc<FakeStorage>,
    images: Arc<FakeImages>,
    notifier: Arc<RecordingNotifier>,
    req: SnapshotRequest,
    disk: RbdImage,
    base: RbdImage,
}

/// The pipeline as the worker runs it: behind the world's lease, with a deadline.
struct Runner<'w> {
    pipeline: SnapshotPipeline,
    lease: &'w InstanceLease,
    timeout: Duration,
}

impl Runner<'_> {
    async fn run(&self, req: &SnapshotRequest) -> Result<Outcome, Failure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.lease.in_flight().scope(self.pipeline.run(req, self.lease, deadline)).await
    }
}

/// An instance lease that can be made lost, as another replica taking it over would: at the
/// first confirmation once the timeline shows a given change.
#[derive(Default)]
struct FakeLease {
    lost: tokio_util::sync::CancellationToken,
    /// The change (a timeline entry's start) after which the lease is lost.
    lost_after: Mutex<Option<&'static str>>,
    timeline: Timeline,
}

#[async_trait]
impl crate::storage::LeaseHolder for FakeLease {
    async fn confirm(&self) -> Result<(), StorageError> {
        let mut timeline = self.timeline.lock().unwrap();
        let after = *self.lost_after.lock().unwrap();
        if self.lost.is_cancelled() || after.is_some_and(|after| timeline.iter().any(|t| t.starts_with(after))) {
            if !self.lost.is_cancelled() {
                timeline.push("lease lost".into());
                self.lost.cancel();
            }
            return Err(StorageError::LeaseLost("taken over".into()));
        }
        Ok(())
    }
    async fn release(&self) {}
}

const DISK_DATA: &[u8] = b"instance disk contents";

impl World {
    /// A running guest whose RBD disk is a clone of its base image in Glance's pool.
    fn clone_backed(images: FakeImages) -> Self {
        let instance = Uuid::new_v4();
        let image_id = Uuid::new_v4();
        let base_id = Uuid::new_v4();
        let disk = RbdImage::new("vms", format!("{instance}_disk"));
        let base = RbdImage::new("images", base_id.to_string());
        let timeline = Timeline::default();
        let storage = FakeStorage { timeline: timeline.clone(), ..Default::default() };
        storage.images.lock().unwrap().insert(
            base.clone(),
            FakeRbd {
                data: b"base".to_vec(),
                parent: None,
                snaps: [("snap".to_string(), (true, b"base".to_vec()))].into(),
                metadata: BTreeMap::new(),
            },
        );
        storage.images.lock().unwrap().insert(
            disk.clone(),
            FakeRbd {
                data: DISK_DATA.to_vec(),
                parent: Some(CloneParent { image: base.clone(), snapshot: "snap".into() }),
                snaps: BTreeMap::new(),
                metadata: BTreeMap::new(),
            },
        );
        let hv = FakeHypervisor { timeline: timeline.clone(), ..Default::default() };
        hv.guests.lock().unwrap().insert(
            instance,
            Guest {
                uuid: instance,
                domain_name: "instance-00000001".into(),
                power_state: PowerState::Running,
                root_disk: RootDisk {
                    source: DiskSource::Rbd { pool: disk.pool.clone(), image: disk.name.clone() },
                    format: "raw".into(),
                    target: "vda".into(),
                },
            },
        );
        images.images.lock().unwrap().insert(image_id, queued_image(image_id, "2026-11-24T12:00:00Z"));
        let req = SnapshotRequest {
            context: RequestContext::default(),
            instance: Instance {
                uuid: instance,
                display_name: Some("vm".into()),
                host: Some("host1".into()),
                node: None,
                project_id: Some("p".into()),
                user_id: None,
                image_ref: Some(base_id.to_string()),
                vm_state: Some("active".into()),
                task_state: Some("image_snapshot_pending".into()),
                power_state: Some(1),
                kernel_id: None,
                ramdisk_id: None,
                os_type: None,
                architecture: None,
                system_metadata: BTreeMap::new(),
                object_version: "2.8".into(),
                data: Default::default(),
            },
            image_id,
            kind: SnapshotKind::Snapshot,
            unique_id: None,
        };
        let lease_holder = Arc::new(FakeLease { timeline: timeline.clone(), ..Default::default() });
        let ledger_dir = tempfile::tempdir().unwrap();
        Self {
            nova: Arc::new(FakeNova::with_task_state("image_snapshot_pending")),
            ledger: Arc::new(crate::storage::ledger::FileLedger::open(ledger_dir.path()).unwrap()),
            _ledger_dir: ledger_dir,
            timeline,
            lease: InstanceLease::new(lease_holder.clone(), lease_holder.lost.clone()),
            lease_holder,
            hv: Arc::new(hv),
            storage: Arc::new(storage),
            images: Arc::new(images),
            notifier: Arc::default(),
            req,
            disk,
            base,
        }
    }

    fn pipeline(&self, settings: impl FnOnce(&mut PipelineSettings)) -> Runner<'_> {
        let mut s = PipelineSettings {
            plan: PlanSettings::default(),
            direct_snapshot: true,
            snapshots_directory: PathBuf::from("/nonexistent/novasnap-unit"),
            ceph_conf: None,
            retry: RetryPolicy {
                initial_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(2),
                max_retries: 3,
            },
            progress_interval: Duration::from_millis(1),
            snapshot_timeout: Duration::from_secs(3600),
            host: "host1".into(),
            made_by: "novasnap test".into(),
            max_freeze: Duration::from_secs(10),
            image_layout: ImageLayout::Flattened,
        };
        settings(&mut s);
        let timeout = s.snapshot_timeout;
        let boundaries = Boundaries {
            hypervisor: self.hv.clone(),
            storage: Some(self.storage.clone()),
            images: self.images.clone(),
            notifier: self.notifier.clone(),
            ledger: self.ledger.clone(),
            nova: self.nova.clone(),
        };
        Runner { pipeline: SnapshotPipeline::new(boundaries, s), lease: &self.lease, timeout }
    }

    fn copy(&self) -> RbdImage {
        RbdImage::new("images", self.req.image_id.to_string())
    }

    fn events(&self) -> Vec<SnapshotEvent> {
        self.notifier
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| !matches!(e, SnapshotEvent::Progress { .. }))
            .cloned()
            .collect()
    }

    fn reclaimer(&self, snapshots_directory: &std::path::Path) -> crate::reclaim::Reclaimer {
        crate::reclaim::Reclaimer {
            storage: Some(self.storage.clone()),
            images: self.images.clone(),
            ledger: self.ledger.clone(),
            disk_pool: "vms".into(),
            glance_pools: vec!["images".into()],
            snapshots_directory: snapshots_directory.to_owned(),
        }
    }

    /// What a worker killed mid-flatten leaves: a protected disk snapshot and a tagged clone.
    async fn leave_unflattened_copy(&self) {
        let snap = direct::disk_snapshot_name(self.req.image_id);
        self.storage.create_snapshot(&self.disk, &snap).await.unwrap();
        self.storage.protect_snapshot(&self.disk, &snap).await.unwrap();
        self.storage.clone_image(&self.disk, &snap, &self.copy()).await.unwrap();
        self.storage.set_metadata(&self.copy(), OWNER_METADATA_KEY, &self.req.image_id.to_string()).await.unwrap();
    }

    /// What a worker killed right after the flatten leaves: the same, the copy flattened.
    async fn leave_flattened_copy(&self) {
        self.leave_unflattened_copy().await;
        self.storage.images.lock().unwrap().get_mut(&self.copy()).unwrap().parent = None;
    }

    /// The request as a `backup_instance` cast with `rotation`, the image marked as a backup.
    fn backup(&self, rotation: u32) -> SnapshotRequest {
        let instance = self.req.instance.uuid.to_string();
        let props = [("instance_uuid", instance.as_str()), ("image_type", "backup"), ("backup_type", "daily")];
        self.images.images.lock().unwrap().get_mut(&self.req.image_id).unwrap().properties =
            props.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        *self.nova.task_state.lock().unwrap() = Some("image_backup".into()); // what nova-api set
        SnapshotRequest { kind: SnapshotKind::Backup { backup_type: "daily".into(), rotation }, ..self.req.clone() }
    }

    fn disk_snapshots(&self) -> Vec<String> {
        self.storage.get(&self.disk).unwrap().snaps.keys().cloned().collect()
    }
}

fn queued_image(id: Uuid, created_at: &str) -> Image {
    Image::queued(id, Some(created_at))
}

fn ts(old: Option<TaskState>, new: Option<TaskState>) -> SnapshotEvent {
    SnapshotEvent::TaskState { old, new }
}

/// `on_base`: the image is a clone of the Glance image the disk was cloned from, holding
/// what the instance wrote; nothing is flattened and the disk snapshot is never cloned from.
#[tokio::test]
async fn on_base_the_image_is_a_clone_of_the_base_with_the_instance_s_own_bytes() {
    let w = World::clone_backed(FakeImages::default());
    let outcome = w.pipeline(|s| s.image_layout = ImageLayout::OnBase).run(&w.req).await.unwrap();
    assert_eq!(outcome, Outcome::Completed { direct: true });
    let image = w.images.image(w.req.image_id).unwrap();
    assert_eq!(image.status, ImageStatus::Active);
    assert_eq!(image.locations, vec![format!("rbd://{FSID}/images/{}/snap", w.req.image_id)]);
    let copy = w.storage.get(&w.copy()).unwrap();
    assert_eq!(copy.data, DISK_DATA, "the disk's bytes as of its snapshot");
    assert_eq!(copy.parent, Some(CloneParent { image: w.base.clone(), snapshot: "snap".into() }));
    assert_eq!(copy.snaps.get("snap").map(|s| s.0), Some(true));
    let timeline = w.timeline.lock().unwrap().clone();
    assert!(!timeline
        .iter()
        .any(|t| t.starts_with("storage flatten") || t.starts_with("storage protect_snapshot vms/")));
    assert!(w.disk_snapshots().is_empty() && w.noted().await.is_empty());
}

/// A redelivery finds what a worker killed right after the clone left: the disk snapshot
/// and a clone of the base with no owner metadata yet. It is proven this snapshot's by its
/// parent, and the instance's extents are written into it.
#[tokio::test]
async fn on_base_a_redelivery_finishes_the_copy_an_earlier_try_cloned() {
    let w = World::clone_backed(FakeImages::default());
    let snap = crate::pipeline::direct::disk_snapshot_name(w.req.image_id);
    w.storage.images.lock().unwrap().get_mut(&w.disk).unwrap().snaps.insert(snap, (false, DISK_DATA.to_vec()));
    w.storage.images.lock().unwrap().insert(
        w.copy(),
        FakeRbd {
            data: b"base".to_vec(),
            parent: Some(CloneParent { image: w.base.clone(), snapshot: "snap".into() }),
            snaps: BTreeMap::new(),
            metadata: BTreeMap::new(),
        },
    );
    w.pipeline(|s| s.image_layout = ImageLayout::OnBase).run(&w.req).await.unwrap();
    assert_eq!(w.storage.get(&w.copy()).unwrap().data, DISK_DATA);
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
    let cloned = w.timeline.lock().unwrap().iter().any(|t| t.starts_with("storage clone_image"));
    assert!(!cloned, "the earlier try's clone is used");
}

/// The image's critical path is the disk snapshot, the clone, the flatten and `snap` on the
/// copy: the disk snapshot, a monitor round of its own, is removed once the image is
/// active, and a fresh clone's object map is trusted by its first flatten.
#[tokio::test]
async fn the_disk_snapshot_is_removed_after_the_image_is_made() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    let timeline = w.timeline.lock().unwrap().clone();
    let at = |what: &str| timeline.iter().position(|t| t.starts_with(what)).unwrap_or(usize::MAX);
    let copy_snap = format!("storage create_snapshot {}", w.copy());
    let removal = format!("storage remove_snapshot {}", w.disk);
    assert!(at(&copy_snap) < at(&removal) && at(&removal) < usize::MAX, "{timeline:?}");
    assert!(timeline.contains(&format!("storage flatten {} Fresh", w.copy())), "{timeline:?}");
    assert!(w.disk_snapshots().is_empty() && w.noted().await.is_empty());
}

/// A disk snapshot that cannot be removed once the image is made fails nothing: the image
/// is active and announced, and the note stays for reclamation to remove it.
#[tokio::test]
async fn a_disk_snapshot_left_after_the_image_is_made_is_left_to_reclamation() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("remove_snapshot", libc::EPERM, 100);
    let outcome = w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(outcome, Outcome::Completed { direct: true });
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
    assert!(matches!(w.events().last(), Some(SnapshotEvent::End { .. })), "{:?}", w.events());
    assert_eq!(w.disk_snapshots().len(), 1);
    assert_eq!(w.noted().await, vec![w.req.image_id], "noted for reclamation");
}

/// A retried flatten does not trust the object map: the first attempt may have stopped
/// mid-way, leaving objects marked that were never written.
#[tokio::test]
async fn a_retried_flatten_distrusts_the_object_map() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("flatten", libc::ETIMEDOUT, 1);
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    let flattens: Vec<String> =
        w.timeline.lock().unwrap().iter().filter(|t| t.starts_with("storage flatten")).cloned().collect();
    assert_eq!(
        flattens,
        [format!("storage flatten {} MaybePartlyFlattened", w.copy())],
        "the failed attempt made no change"
    );
}

#[tokio::test]
async fn direct_snapshot_of_a_clone_backed_guest_registers_an_rbd_location() {
    let w = World::clone_backed(FakeImages::default());
    let outcome = w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(outcome, Outcome::Completed { direct: true });

    let image = w.images.image(w.req.image_id).unwrap();
    assert_eq!(image.status, ImageStatus::Active);
    assert_eq!(image.locations, vec![format!("rbd://{FSID}/images/{}/snap", w.req.image_id)]);
    assert_eq!(image.properties["disk_format"], json!("raw"));
    let copy = w.storage.get(&w.copy()).unwrap();
    assert_eq!(copy.data, DISK_DATA);
    assert!(copy.parent.is_none(), "the copy is flattened");
    assert_eq!(copy.snaps.get("snap").map(|s| s.0), Some(true), "`snap` exists and is protected");
    assert!(w.disk_snapshots().is_empty(), "no disk snapshot left behind");
    assert_eq!(
        copy.metadata.get(OWNER_METADATA_KEY),
        Some(&w.req.image_id.to_string()),
        "the copy is marked as novasnap's"
    );
    assert_eq!(*w.hv.calls.lock().unwrap(), vec!["abort vda"], "live: no suspend, stale job aborted");

    use TaskState::*;
    assert_eq!(
        w.events(),
        vec![
            SnapshotEvent::Start,
            ts(Some(ImageSnapshotPending), Some(ImageSnapshot)),
            ts(Some(ImageSnapshot), Some(ImagePendingUpload)),
            ts(Some(ImagePendingUpload), Some(ImageUploading)),
            ts(Some(ImageUploading), None),
            SnapshotEvent::End { held: Default::default() },
        ]
    );
    assert!(w
        .notifier
        .events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, SnapshotEvent::Progress { percent: 100, .. })));
}

#[tokio::test]
async fn glance_refusing_locations_falls_back_to_uploading_the_bytes() {
    let w = World::clone_backed(FakeImages { refuse_locations: true, ..Default::default() });
    let outcome = w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(outcome, Outcome::Completed { direct: false });
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
    assert_eq!(w.images.uploads.lock().unwrap()[&w.req.image_id], DISK_DATA);
    assert!(w.storage.get(&w.copy()).is_none(), "the direct path's copy was removed");
    assert!(w.disk_snapshots().is_empty());
    use TaskState::*;
    let events = w.events();
    assert!(
        events.contains(&ts(Some(ImageUploading), Some(ImagePendingUpload))),
        "fallback goes back to pending upload: {events:?}"
    );
    assert_eq!(events.last(), Some(&SnapshotEvent::End { held: Default::default() }));
}

#[tokio::test]
async fn a_redelivery_after_a_crash_past_the_flatten_finishes_the_same_snapshot() {
    let w = World::clone_backed(FakeImages::default());
    // What a worker killed right after the flatten leaves: disk snapshot + flat copy.
    w.leave_flattened_copy().await;
    // Data written after the crash must not reach the image: it was snapshotted before.
    w.storage.images.lock().unwrap().get_mut(&w.disk).unwrap().data = b"later".to_vec();

    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(w.storage.get(&w.copy()).unwrap().data, DISK_DATA);
    assert!(w.disk_snapshots().is_empty());
    assert_eq!(w.storage.list_images("images").await.unwrap().len(), 2, "base + one copy");
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);

    // And a third delivery of the same cast changes nothing.
    let again = w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(again, Outcome::AlreadyDone);
}

#[tokio::test]
async fn transient_faults_are_retried_and_the_snapshot_completes() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("clone_image", libc::EBUSY, 2);
    w.storage.inject("flatten", libc::ETIMEDOUT, 1);
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
}

#[tokio::test]
async fn a_permanent_failure_cleans_up_everything_and_reports_it() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("flatten", libc::EIO, 1);
    let err = w.pipeline(|_| {}).run(&w.req).await.unwrap_err().error;
    assert_eq!(err.step, Step::Flatten);
    assert!(
        err.to_string().contains(&w.req.instance.uuid.to_string())
            && err.to_string().contains(&w.req.image_id.to_string())
    );
    assert!(w.storage.get(&w.copy()).is_none(), "partial copy removed");
    assert!(w.disk_snapshots().is_empty(), "disk snapshot removed");
    assert!(w.images.image(w.req.image_id).is_none(), "the queued image is deleted");
    assert!(w.storage.get(&w.base).is_some(), "nothing novasnap did not create is touched");
    let events = w.events();
    assert_eq!(events[events.len() - 2], ts(Some(TaskState::ImageUploading), None));
    assert!(matches!(events.last(), Some(SnapshotEvent::Error { exception, .. }) if exception == "StorageError"));
}

/// The image's metadata goes to Glance while the copy is flattened: Glance refusing it fails
/// the snapshot as cleanly, the flatten it ran beside over before anything is removed.
#[tokio::test]
async fn metadata_refused_beside_the_flatten_fails_cleanly_after_the_flatten() {
    let w = World::clone_backed(FakeImages::default());
    w.images.faults.inject("update", 1, || ImageError::Http {
        operation: "update image",
        target: "fake".into(),
        status: 400,
        body: "a property Glance refuses".into(),
    });
    let err = w.pipeline(|_| {}).run(&w.req).await.unwrap_err().error;
    assert_eq!(err.step, Step::UpdateMetadata, "{err}");
    let timeline = w.timeline.lock().unwrap().clone();
    let at =
        |op: &str| timeline.iter().position(|t| t.starts_with(op)).unwrap_or_else(|| panic!("no {op}: {timeline:?}"));
    assert!(at("storage flatten") < at("storage remove_image"), "{timeline:?}");
    assert!(w.storage.get(&w.copy()).is_none(), "the copy removed");
    assert!(w.disk_snapshots().is_empty(), "the disk snapshot removed");
    assert!(w.images.image(w.req.image_id).is_none(), "the queued image is deleted");
    assert_eq!(w.nova.task_state(), None, "reverted");
}

#[tokio::test]
async fn retries_are_bounded_then_the_failure_is_clean() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("clone_image", libc::EBUSY, 10);
    let err = w.pipeline(|_| {}).run(&w.req).await.unwrap_err().error;
    assert_eq!(err.step, Step::Clone);
    assert!(w.disk_snapshots().is_empty());
    assert!(w.images.image(w.req.image_id).is_none());
}

#[tokio::test]
async fn a_cold_snapshot_suspends_and_restores_a_paused_guest() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.guests.lock().unwrap().get_mut(&w.req.instance.uuid).unwrap().power_state = PowerState::Paused;
    let mut req = w.req.clone();
    req.instance.vm_state = Some("paused".into());
    w.pipeline(|s| s.plan.disable_live_snapshot = true).run(&req).await.unwrap();
    assert_eq!(*w.hv.calls.lock().unwrap(), vec!["suspend", "resume paused=true"]);
    assert_eq!(w.hv.find_guest(req.instance.uuid, None).await.unwrap().power_state, PowerState::Paused);
}

#[tokio::test]
async fn a_copy_glance_removed_is_made_again_with_the_guest_suspended_again() {
    let w = World::clone_backed(FakeImages::default());
    let (storage, copy) = (w.storage.clone(), w.copy());
    *w.images.failing_import.lock().unwrap() = Some(Box::new(move || {
        storage.images.lock().unwrap().remove(&copy);
    }));
    let outcome = w.pipeline(|s| s.plan.disable_live_snapshot = true).run(&w.req).await.unwrap();
    assert_eq!(outcome, Outcome::Completed { direct: true });
    let image = w.images.image(w.req.image_id).unwrap();
    assert_eq!((image.status, image.locations.len()), (ImageStatus::Active, 1));
    assert_eq!(w.storage.get(&w.copy()).unwrap().data, DISK_DATA, "the second copy holds the disk");
    assert!(w.disk_snapshots().is_empty());
    let calls = w.hv.calls.lock().unwrap().clone();
    assert_eq!(calls, vec!["suspend", "resume paused=false", "suspend", "resume paused=false"], "cold both times");
}

#[tokio::test]
async fn a_guest_left_suspended_by_a_crashed_try_is_resumed() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.guests.lock().unwrap().get_mut(&w.req.instance.uuid).unwrap().power_state = PowerState::Suspended;
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(*w.hv.calls.lock().unwrap(), vec!["resume paused=false"]);
    assert_eq!(w.hv.find_guest(w.req.instance.uuid, None).await.unwrap().power_state, PowerState::Running);
}

/// libvirt on the host Nova places the instance on does not know it: the instance is gone,
/// and as Nova does the queued image is deleted; the failure is reported.
#[tokio::test]
async fn a_vanished_guest_deletes_the_queued_image_and_is_reported() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.guests.lock().unwrap().clear();
    let failure = w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
    assert_eq!((failure.error.step, failure.unsettled), (Step::FindGuest, None));
    assert!(w.images.image(w.req.image_id).is_none());
    assert!(
        matches!(w.events().last(), Some(SnapshotEvent::Error { exception, .. }) if exception == "InstanceNotFound"),
        "{:?}",
        w.events()
    );
}

#[tokio::test]
async fn forced_standard_path_streams_the_rbd_snapshot() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|s| s.direct_snapshot = false).run(&w.req).await.unwrap();
    assert_eq!(w.images.uploads.lock().unwrap()[&w.req.image_id], DISK_DATA);
    assert!(w.storage.get(&w.copy()).is_none());
    assert!(w.disk_snapshots().is_empty());
}

#[tokio::test]
async fn backup_rotation_keeps_the_newest() {
    let w = World::clone_backed(FakeImages::default());
    let instance = w.req.instance.uuid.to_string();
    let backup_props = |_: ()| -> BTreeMap<String, serde_json::Value> {
        [("instance_uuid", instance.as_str()), ("image_type", "backup"), ("backup_type", "daily")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
    };
    let mut old_ids = vec![];
    for day in 1..=2 {
        let id = Uuid::new_v4();
        let mut image = queued_image(id, &format!("2026-11-0{day}T00:00:00Z"));
        image.status = ImageStatus::Active;
        image.properties = backup_props(());
        w.images.images.lock().unwrap().insert(id, image);
        old_ids.push(id);
    }
    w.images.images.lock().unwrap().get_mut(&w.req.image_id).unwrap().properties = backup_props(());
    let mut req = w.req.clone();
    req.kind = SnapshotKind::Backup { backup_type: "daily".into(), rotation: 2 };
    *w.nova.task_state.lock().unwrap() = Some("image_backup".into()); // what nova-api set
    w.pipeline(|_| {}).run(&req).await.unwrap();
    assert_eq!(w.nova.task_state(), None);
    assert!(w.images.image(old_ids[0]).is_none(), "oldest backup rotated out");
    assert!(w.images.image(old_ids[1]).is_some());
    assert!(w.images.image(req.image_id).is_some());
}

#[tokio::test]
async fn reclamation_keeps_resumable_work_and_removes_dead_work() {
    let w = World::clone_backed(FakeImages::default());
    w.leave_unflattened_copy().await;
    let snap = direct::disk_snapshot_name(w.req.image_id);
    let temp = tempfile::tempdir().unwrap();
    std::fs::create_dir(temp.path().join(&snap)).unwrap();
    let reclaimer = w.reclaimer(temp.path());
    use crate::reclaim::{Action, Artefact};
    let kinds = |f: &[crate::reclaim::Finding]| {
        f.iter().map(|f| (matches!(f.artefact, Artefact::Copy(_)), f.action)).collect::<Vec<_>>()
    };

    // The image is still queued: the cast will be redelivered and resume. Nothing removed.
    let found = reclaimer.run(false, Scope::Everything).await.unwrap();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found.iter().all(|f| f.action == Action::Keep), "{found:?}");
    assert_eq!(w.disk_snapshots(), vec![snap.clone()]);

    // The image is gone: the work is over. A dry run lists, then a real run removes.
    w.images.images.lock().unwrap().remove(&w.req.image_id);
    let found = reclaimer.run(true, Scope::Everything).await.unwrap();
    assert_eq!(
        kinds(&found),
        vec![(true, Action::Remove), (false, Action::Remove), (false, Action::Remove)],
        "copies first"
    );
    assert!(w.storage.get(&w.copy()).is_some(), "dry run changes nothing");
    reclaimer.run(false, Scope::Everything).await.unwrap();
    assert!(w.storage.get(&w.copy()).is_none());
    assert!(w.disk_snapshots().is_empty());
    assert!(!temp.path().join(&snap).exists());
    assert!(w.storage.get(&w.base).is_some(), "what novasnap did not make is never touched");
}

#[tokio::test]
async fn a_redelivery_after_the_image_went_active_finishes_the_tail() {
    let w = World::clone_backed(FakeImages::default());
    // A worker killed right after its upload made the image active: the disk snapshot
    // is still there and nobody has seen the end.
    let snap = direct::disk_snapshot_name(w.req.image_id);
    w.storage.create_snapshot(&w.disk, &snap).await.unwrap();
    w.images.images.lock().unwrap().get_mut(&w.req.image_id).unwrap().status = ImageStatus::Active;

    assert_eq!(w.pipeline(|_| {}).run(&w.req).await.unwrap(), Outcome::AlreadyDone);
    assert!(w.disk_snapshots().is_empty(), "the dead worker's disk snapshot is removed");
    assert_eq!(
        w.events(),
        vec![ts(Some(TaskState::ImageUploading), None), SnapshotEvent::End { held: Default::default() }]
    );
}

// Class 1 of issue 12: only what is provably novasnap's and disposable is ever removed.

/// A backup whose rotation failed while Glance was down: the snapshot itself was done and
/// registered, so neither the image nor its RBD copy may go, and Glance's silence is no
/// licence to guess. The cast goes back to the broker.
#[tokio::test]
async fn a_rotation_failing_with_glance_down_keeps_the_active_image_and_its_copy() {
    let w = World::clone_backed(FakeImages::default());
    let req = w.backup(1);
    w.images.inject("list", 4); // the first try and three retries
    w.images.faults.pass("get", 1); // the image at the start
    w.images.inject("get", 10);
    w.images.inject("delete", 10);
    let failure = w.pipeline(|_| {}).run(&req).await.unwrap_err();
    assert_eq!(failure.error.step, Step::RotateBackups);
    let image = w.images.image(req.image_id).expect("the image is kept");
    assert_eq!(image.status, ImageStatus::Active);
    assert!(w.storage.get(&w.copy()).is_some(), "the copy behind the active image is kept");
    assert!(failure.unsettled.is_some(), "handed back: Glance could not say what the image is");
}

/// Glance unreachable during cleanup: its queued image may well be this request's own, but
/// unknown is never a reason to delete.
#[tokio::test]
async fn a_failure_glance_cannot_describe_deletes_nothing_and_is_handed_back() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("flatten", libc::EIO, 1);
    w.images.faults.pass("get", 1);
    w.images.inject("get", 1);
    let failure = w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
    assert_eq!(failure.error.step, Step::Flatten);
    assert!(w.images.image(w.req.image_id).is_some(), "the image is not deleted");
    assert!(w.storage.get(&w.copy()).is_some(), "the copy is not removed");
    assert!(failure.unsettled.as_deref().is_some_and(|u| u.contains("could not tell")), "{failure:?}");
}

/// A cast for an image that is no longer queued fails, and leaves the image as it is:
/// `deactivated` and `importing` images hold, or are receiving, data.
#[tokio::test]
async fn an_image_with_data_is_never_deleted_by_a_failure() {
    for status in [ImageStatus::Deactivated, ImageStatus::Importing, ImageStatus::Other("new".into())] {
        let w = World::clone_backed(FakeImages::default());
        w.images.set_status(w.req.image_id, status.clone());
        let failure = w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
        assert_eq!((failure.error.step, failure.unsettled), (Step::GetImage, None));
        assert_eq!(w.images.image(w.req.image_id).map(|i| i.status), Some(status));
    }
}

/// Reclamation removes a copy only when its image's work is over: a `deactivated` or
/// `importing` image's copy is its data, and a Glance that does not answer removes nothing.
#[tokio::test]
async fn reclamation_keeps_the_copies_of_images_with_data_and_of_images_glance_cannot_describe() {
    for status in [Some(ImageStatus::Deactivated), Some(ImageStatus::Importing), None] {
        let w = World::clone_backed(FakeImages::default());
        w.leave_unflattened_copy().await;
        match &status {
            Some(status) => w.images.set_status(w.req.image_id, status.clone()),
            None => w.images.inject("get", 10),
        }
        let temp = tempfile::tempdir().unwrap();
        let found = w.reclaimer(temp.path()).run(false, Scope::Everything).await.unwrap();
        let copy = found.iter().find(|f| matches!(f.artefact, crate::reclaim::Artefact::Copy(_))).unwrap();
        assert_eq!(copy.action, crate::reclaim::Action::Keep, "{status:?}: {found:?}");
        assert!(w.storage.get(&w.copy()).is_some(), "{status:?}: the copy is kept");
        if status.is_none() {
            assert_eq!(w.disk_snapshots().len(), 1, "Glance silent: the disk snapshot is kept too");
        }
    }
}

/// A copy the image carries as its location is Glance's, even once the image is on its
/// way out (`pending_delete`: Glance's scrubber will remove it).
#[tokio::test]
async fn reclamation_never_removes_a_copy_registered_with_glance() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    w.images.set_status(w.req.image_id, ImageStatus::PendingDelete);
    w.storage.set_metadata(&w.copy(), OWNER_METADATA_KEY, &w.req.image_id.to_string()).await.unwrap();
    let temp = tempfile::tempdir().unwrap();
    w.reclaimer(temp.path()).run(false, Scope::Everything).await.unwrap();
    assert!(w.storage.get(&w.copy()).is_some(), "the registered copy is kept");
}

// Class 5 of issue 12: a guest is never left off or frozen.

fn cold(s: &mut PipelineSettings) {
    s.plan.disable_live_snapshot = true;
}

fn power_state(w: &World) -> PowerState {
    w.hv.guests.lock().unwrap()[&w.req.instance.uuid].power_state
}

/// A cold snapshot that fails while the guest is in managed save, and one libvirt timeout
/// on the resume: the resume is retried like every other step, and the guest runs again.
#[tokio::test]
async fn a_failed_cold_snapshot_resumes_the_guest_through_a_transient_libvirt_fault() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("create_snapshot", libc::EIO, 1);
    w.hv.inject("resume", 1);
    let failure = w.pipeline(cold).run(&w.req).await.unwrap_err();
    assert_eq!(failure.error.step, Step::DiskSnapshot);
    assert_eq!(power_state(&w), PowerState::Running, "the guest runs again");
    assert_eq!(failure.unsettled, None);
}

/// A guest that cannot be resumed at all is not acknowledged away: the cast goes back to the
/// broker, whose redelivery finds the guest in managed save and resumes it.
#[tokio::test(start_paused = true)]
async fn a_guest_that_cannot_be_resumed_hands_the_cast_back() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("create_snapshot", libc::EIO, 1);
    w.hv.inject("resume", 100);
    let ledger = tempfile::tempdir().unwrap();
    let worker = crate::worker::Worker::new(
        w.pipeline(cold).pipeline,
        Arc::new(crate::storage::ledger::FileLedger::open(ledger.path()).unwrap()),
        Duration::from_secs(3600),
    );
    use crate::messaging::{Handled, SnapshotHandler};
    assert_eq!(worker.handle(w.req.clone()).await, Handled::Requeue);
    assert_eq!(power_state(&w), PowerState::Suspended);

    // The redelivery, with libvirt well again: the guest left in managed save is resumed.
    w.hv.faults.0.lock().unwrap().clear();
    assert_eq!(worker.handle(w.req.clone()).await, Handled::Done);
    assert_eq!(power_state(&w), PowerState::Running);
}

/// A redelivered cold snapshot whose copy exists (its worker died after the flatten) needs
/// no new point in time: the guest is never suspended.
#[tokio::test]
async fn a_redelivered_cold_snapshot_whose_copy_exists_leaves_the_guest_running() {
    let w = World::clone_backed(FakeImages::default());
    w.leave_flattened_copy().await;
    w.pipeline(cold).run(&w.req).await.unwrap();
    assert!(!w.hv.calls.lock().unwrap().contains(&"suspend".to_string()), "{:?}", w.hv.calls.lock().unwrap());
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
}

/// A worker died mid-flatten of a cold snapshot with the guest still suspended: the
/// redelivery resumes the guest at once, not after the flatten it still has to do.
#[tokio::test]
async fn a_guest_left_suspended_mid_flatten_runs_again_before_the_flatten() {
    let w = World::clone_backed(FakeImages::default());
    w.leave_unflattened_copy().await;
    w.hv.guests.lock().unwrap().get_mut(&w.req.instance.uuid).unwrap().power_state = PowerState::Suspended;
    w.timeline.lock().unwrap().clear();
    w.pipeline(cold).run(&w.req).await.unwrap();
    let timeline = w.timeline.lock().unwrap().clone();
    let at = |what: &str| timeline.iter().position(|t| t.starts_with(what)).unwrap_or(usize::MAX);
    assert!(at("hypervisor resume") < at("storage flatten"), "{timeline:?}");
    assert!(!timeline.iter().any(|t| t == "hypervisor suspend"), "{timeline:?}");
}

// Class 3 of issue 12: a lease that is lost stops the work.

/// The lease is lost mid-snapshot (another replica took it over after this one stalled):
/// the work stops at once and changes nothing more, not even to clean up, since what it
/// made may now be the other replica's work; the cast goes back to the broker.
#[tokio::test]
async fn a_lost_lease_stops_the_work_and_nothing_more_is_changed() {
    let w = World::clone_backed(FakeImages::default());
    *w.lease_holder.lost_after.lock().unwrap() = Some("storage clone_image");
    let failure = w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
    assert!(failure.error.is_lease_lost(), "{failure:?}");
    assert!(failure.unsettled.as_deref().is_some_and(|u| u.contains("lease was lost")), "{failure:?}");
    let timeline = w.timeline.lock().unwrap().clone();
    let lost = timeline.iter().position(|t| t == "lease lost").expect("lost");
    assert!(timeline[..lost].iter().any(|t| t.starts_with("storage clone_image")), "{timeline:?}");
    assert_eq!(&timeline[lost + 1..], &[] as &[String], "nothing changed after the loss");
    assert!(w.storage.get(&w.copy()).is_some_and(|c| c.parent.is_some()), "the copy is left as it was");
    assert_eq!(w.disk_snapshots().len(), 1);
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Queued, "the image is not deleted");
    assert!(!w.events().iter().any(|e| matches!(e, SnapshotEvent::Error { .. })), "{:?}", w.events());
}

/// `<pool>/<image id>` exists but is not this request's copy (Glance's own upload, an
/// operator's image): it is neither used as the snapshot nor removed.
#[tokio::test]
async fn an_existing_image_not_proven_ours_is_neither_used_nor_removed() {
    let w = World::clone_backed(FakeImages::default());
    let foreign = FakeRbd { data: b"someone else's".to_vec(), ..Default::default() };
    w.storage.images.lock().unwrap().insert(w.copy(), foreign);
    let failure = w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
    assert!(matches!(failure.error.fault, Fault::NotOurs(_)), "{failure:?}");
    let left = w.storage.get(&w.copy()).expect("not removed");
    assert_eq!(left.data, b"someone else's");
    assert!(left.snaps.is_empty() && left.metadata.is_empty(), "not touched: {:?}", left.snaps);
    assert!(w.images.image(w.req.image_id).is_none_or(|i| i.locations.is_empty()), "not registered");
}

// Class 2 of issue 12: every wait has a bound, and a snapshot has a deadline.

/// Retries are bounded by count, not time: a fault that keeps coming back, with long
/// backoffs, would hold the snapshot for minutes (a block copy, for hours). The deadline
/// ends it, and it ends cleanly: artefacts removed, image deleted, guest running, reported.
#[tokio::test(start_paused = true)]
async fn a_snapshot_past_its_deadline_ends_cleanly() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("clone_image", libc::EBUSY, 100);
    let started = tokio::time::Instant::now();
    let failure = w
        .pipeline(|s| {
            cold(s);
            s.snapshot_timeout = Duration::from_secs(60);
            s.retry = RetryPolicy {
                initial_delay: Duration::from_secs(10),
                max_delay: Duration::from_secs(30),
                max_retries: 8,
            };
        })
        .run(&w.req)
        .await
        .unwrap_err();
    assert!(started.elapsed() <= Duration::from_secs(61), "ended at the deadline: {:?}", started.elapsed());
    assert!(matches!(failure.error.fault, Fault::DeadlineExceeded(_)), "{failure:?}");
    assert_eq!((failure.error.step, failure.unsettled), (Step::Clone, None));
    assert_eq!(power_state(&w), PowerState::Running);
    assert!(w.disk_snapshots().is_empty() && w.images.image(w.req.image_id).is_none());
    let events = w.events();
    assert!(matches!(events.last(), Some(SnapshotEvent::Error { exception, .. }) if exception == "SnapshotTimeout"));
}

// Class 7 of issue 12: requests are sent once, to the right place.

/// A replica whose libvirt does not know the guest, while Nova places the instance on
/// another host: no proof that the instance is gone. The image is kept, and the failure
/// is logged and reported, not acknowledged away in silence.
#[tokio::test]
async fn a_guest_unknown_here_but_placed_elsewhere_keeps_its_image_and_is_reported() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.guests.lock().unwrap().clear();
    let mut req = w.req.clone();
    req.instance.host = Some("host2".into());
    let failure = w.pipeline(|_| {}).run(&req).await.unwrap_err();
    assert!(matches!(&failure.error.fault, Fault::NotOnThisHost(why) if why.contains("host2")), "{failure:?}");
    assert_eq!(w.images.image(req.image_id).map(|i| i.status), Some(ImageStatus::Queued), "the image is kept");
    assert!(
        matches!(w.events().last(), Some(SnapshotEvent::Error { exception, .. }) if exception == "InstanceNotFound"),
        "{:?}",
        w.events()
    );
}

// Class 8 of issue 12: state stays bounded and shared correctly.

impl World {
    /// The note a worker made before its first artefact.
    async fn note_work(&self) {
        let work =
            NotedWork { image: self.req.image_id, instance: self.req.instance.uuid, disk: Some(self.disk.clone()) };
        self.ledger.note_work(&work).await.unwrap();
    }

    /// What a worker killed mid-flatten leaves, noted, once its image was deleted.
    async fn leave_dead_noted_work(&self) {
        self.note_work().await;
        self.leave_unflattened_copy().await;
        self.images.images.lock().unwrap().remove(&self.req.image_id);
    }

    async fn noted(&self) -> Vec<Uuid> {
        self.ledger.noted_work().await.unwrap().into_iter().map(|w| w.image).collect()
    }
}

/// A snapshot notes its work before making anything, and forgets it once nothing of it is
/// left: when it succeeded, when it failed and cleaned up, but not when Glance could not
/// say what may go.
#[tokio::test]
async fn noted_work_lasts_exactly_as_long_as_its_artefacts_may() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert!(w.noted().await.is_empty(), "a finished snapshot leaves no note");
    assert!(w.timeline.lock().unwrap().iter().any(|t| t.starts_with("storage create_snapshot")));

    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("flatten", libc::EIO, 1);
    w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
    assert!(w.noted().await.is_empty(), "a failure that cleaned up leaves no note");

    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("flatten", libc::EIO, 1);
    w.images.faults.pass("get", 1);
    w.images.inject("get", 1);
    w.pipeline(|_| {}).run(&w.req).await.unwrap_err();
    assert_eq!(w.noted().await, vec![w.req.image_id], "what was kept stays noted");
}

/// The periodic pass finds a dead snapshot's leftovers from its note alone: it opens no
/// other disk, lists no pool (listing fails here), and forgets the note once all is gone.
#[tokio::test]
async fn reclamation_finds_noted_work_without_opening_every_disk() {
    let w = World::clone_backed(FakeImages::default());
    w.leave_dead_noted_work().await;
    w.storage.inject("list_images", libc::EIO, 100);
    let temp = tempfile::tempdir().unwrap();
    let found = w.reclaimer(temp.path()).run(false, Scope::Noted).await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(w.storage.get(&w.copy()).is_none() && w.disk_snapshots().is_empty());
    assert!(w.noted().await.is_empty(), "nothing left: the note is forgotten");
}

/// A snapshot of the instance in flight (on any replica: it holds the instance lease):
/// reclamation leaves its artefacts alone, whatever Glance says, and takes them once the
/// lease is free.
#[tokio::test]
async fn reclamation_leaves_alone_what_a_snapshot_in_flight_holds() {
    let w = World::clone_backed(FakeImages::default());
    w.leave_dead_noted_work().await;
    let far = tokio::time::Instant::now() + Duration::from_secs(60);
    let in_flight = w.ledger.lock_instance(w.req.instance.uuid, far).await.unwrap().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let found = w.reclaimer(temp.path()).run(false, Scope::Everything).await.unwrap();
    assert!(found.iter().all(|f| f.action == crate::reclaim::Action::InFlight), "{found:?}");
    assert!(w.storage.get(&w.copy()).is_some() && w.disk_snapshots().len() == 1, "nothing removed");

    drop(in_flight);
    tokio::time::sleep(Duration::from_millis(100)).await; // the release runs in the background
    w.reclaimer(temp.path()).run(false, Scope::Noted).await.unwrap();
    assert!(w.storage.get(&w.copy()).is_none() && w.disk_snapshots().is_empty());
}

#[tokio::test]
async fn nova_learns_every_task_state_and_ends_with_none() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(w.nova.task_state(), None, "Nova's database ends with no task");
    assert_eq!(*w.nova.power_state.lock().unwrap(), Some(PowerState::Running));
    let events = w.nova.events.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![
            ("start compute_snapshot_instance".to_string(), None),
            ("finish compute_snapshot_instance".to_string(), None)
        ]
    );
    assert!(w.nova.faults.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_conductor_away_for_a_while_only_delays_the_snapshot() {
    let w = World::clone_backed(FakeImages::default());
    *w.nova.unreachable.lock().unwrap() = 2;
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(w.nova.task_state(), None);
}

#[tokio::test]
async fn a_redelivery_after_nova_saw_uploading_carries_on() {
    let w = World::clone_backed(FakeImages::default());
    *w.nova.task_state.lock().unwrap() = Some("image_uploading".into());
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(w.nova.task_state(), None);
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
}

#[tokio::test]
async fn an_instance_being_deleted_stops_the_snapshot_and_its_task_state_is_left_to_the_delete() {
    let w = World::clone_backed(FakeImages::default());
    *w.nova.task_state.lock().unwrap() = Some("deleting".into());
    let err = w.pipeline(|_| {}).run(&w.req).await.unwrap_err().error;
    assert!(matches!(err.fault, Fault::Nova(NovaError::Deleting(_))), "{err}");
    assert_eq!(w.nova.task_state().as_deref(), Some("deleting"), "not reverted: the delete owns it");
    assert!(w.images.image(w.req.image_id).is_none(), "the queued image is deleted, as Nova deletes it");
    assert!(w.disk_snapshots().is_empty());
}

#[tokio::test]
async fn a_failed_snapshot_reverts_the_task_state_and_records_a_fault() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("clone_image", libc::EIO, 10);
    let err = w.pipeline(|_| {}).run(&w.req).await.unwrap_err().error;
    assert_eq!(w.nova.task_state(), None, "reverted, as reverts_task_state does");
    assert_eq!(w.nova.faults.lock().unwrap().len(), 1, "{err}");
    let events = w.nova.events.lock().unwrap().clone();
    assert!(events[1].1.as_deref().is_some_and(|m| m.contains("clone")), "{events:?}");
}

// Quiescing (issue 13): the guest agent freezes the guest around the point in time.

/// The request for a guest whose image says it runs the QEMU guest agent, and requires
/// quiescing if `required`, as nova-api copies the image's properties into system_metadata.
fn with_agent(req: &SnapshotRequest, required: bool) -> SnapshotRequest {
    let mut req = req.clone();
    req.instance.system_metadata.insert("image_hw_qemu_guest_agent".into(), "yes".into());
    if required {
        req.instance.system_metadata.insert("image_os_require_quiesce".into(), "yes".into());
    }
    req
}

/// The guest agent took the command and did not answer in time: libvirt's
/// VIR_ERR_AGENT_COMMAND_TIMEOUT. It may have frozen the guest all the same.
fn agent_unresponsive() -> HypervisorError {
    HypervisorError::Agent {
        operation: "freeze filesystems",
        uuid: Uuid::nil(),
        code: 112,
        message: "Guest agent not available for now".into(),
    }
}

/// Nothing runs on the guest's end of the agent channel (the agent stopped inside the
/// guest): libvirt refuses every agent command at once, the thaw as well as the freeze.
fn agent_not_connected() -> HypervisorError {
    HypervisorError::AgentNotConnected {
        operation: "freeze filesystems",
        uuid: Uuid::nil(),
        message: "Guest agent is not responding: QEMU guest agent is not connected".into(),
    }
}

/// The timeline's entries from the first freeze on, without the disk's name.
fn from_the_freeze(w: &World) -> Vec<String> {
    let timeline = w.timeline.lock().unwrap().clone();
    let freeze = timeline.iter().position(|t| t == "hypervisor freeze").expect("a freeze");
    timeline[freeze..].iter().map(|t| t.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect()
}

#[tokio::test(start_paused = true)]
async fn a_guest_with_the_agent_is_frozen_just_for_the_disk_snapshot() {
    let w = World::clone_backed(FakeImages::default());
    *w.hv.freeze_takes.lock().unwrap() = Duration::from_millis(40);
    let req = with_agent(&w.req, false);
    w.pipeline(|_| {}).run(&req).await.unwrap();
    assert_eq!(
        from_the_freeze(&w)[..4],
        ["hypervisor freeze", "storage create_snapshot", "hypervisor thaw", "storage protect_snapshot"],
        "thawed right after the disk snapshot, before the clone and flatten"
    );
    assert!(!*w.hv.frozen.lock().unwrap());
    let held = w.events().into_iter().find_map(|e| match e {
        SnapshotEvent::End { held } => Some(held),
        _ => None,
    });
    assert_eq!(held, Some(crate::messaging::GuestHeld { frozen_ms: 40, suspended_ms: 0 }), "freeze asked → thaw done");
}

#[tokio::test]
async fn the_standard_path_freezes_for_its_disk_snapshot_too() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|s| s.direct_snapshot = false).run(&with_agent(&w.req, false)).await.unwrap();
    assert_eq!(from_the_freeze(&w)[..3], ["hypervisor freeze", "storage create_snapshot", "hypervisor thaw"]);
    assert_eq!(w.images.uploads.lock().unwrap()[&w.req.image_id], DISK_DATA);
}

#[tokio::test]
async fn a_failing_disk_snapshot_still_thaws_the_guest() {
    let w = World::clone_backed(FakeImages::default());
    w.storage.inject("create_snapshot", libc::EIO, 1);
    let failure = w.pipeline(|_| {}).run(&with_agent(&w.req, false)).await.unwrap_err();
    assert_eq!(failure.error.step, Step::DiskSnapshot);
    assert_eq!(from_the_freeze(&w)[..2], ["hypervisor freeze", "hypervisor thaw"]);
    assert!(!*w.hv.frozen.lock().unwrap());
    assert!(w.images.image(w.req.image_id).is_none(), "the failure is cleaned up as any other");
    assert_eq!(failure.unsettled, None);
}

#[tokio::test]
async fn a_failing_freeze_under_os_require_quiesce_fails_cleanly_as_nova_does() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.faults.inject("freeze_filesystems", 1, agent_unresponsive);
    let failure = w.pipeline(|_| {}).run(&with_agent(&w.req, true)).await.unwrap_err();
    let err = failure.error;
    assert_eq!((err.step, err.exception_name()), (Step::Quiesce, "InstanceQuiesceFailed"));
    assert!(matches!(&err.fault, Fault::QuiesceFailed(_)), "{err:?}");
    assert!(err.fault.to_string().starts_with("Failed to quiesce instance: "), "{}", err.fault);
    assert!(!crate::error::Classify::is_transient(&err), "permanent: the cast is not retried");
    // The agent may have frozen late: thawed all the same.
    assert_eq!(from_the_freeze(&w)[..2], ["hypervisor freeze", "hypervisor thaw"]);
    assert!(!from_the_freeze(&w).iter().any(|t| t == "storage create_snapshot"), "no disk snapshot is taken");
    assert!(w.disk_snapshots().is_empty() && w.storage.get(&w.copy()).is_none());
    assert!(w.images.image(w.req.image_id).is_none(), "the queued image is deleted");
    assert_eq!(w.nova.task_state(), None);
    assert!(
        matches!(w.events().last(), Some(SnapshotEvent::Error { exception, .. }) if exception == "InstanceQuiesceFailed")
    );
}

/// The agent stopped inside the guest: the freeze was never sent, so nothing is frozen and
/// nothing needs thawing (a thaw would be refused too, and the cast handed back for ever).
#[tokio::test]
async fn a_guest_whose_agent_is_stopped_fails_cleanly_under_os_require_quiesce() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.faults.pass("thaw_filesystems", 1); // the thaw before the snapshot: only logged
    w.hv.faults.inject("freeze_filesystems", 100, agent_not_connected);
    w.hv.faults.inject("thaw_filesystems", 100, agent_not_connected);
    let failure = w.pipeline(|_| {}).run(&with_agent(&w.req, true)).await.unwrap_err();
    assert_eq!((failure.error.step, failure.error.exception_name()), (Step::Quiesce, "InstanceQuiesceFailed"));
    assert_eq!(failure.unsettled, None, "settled: the cast is not handed back");
    let thawed = from_the_freeze(&w).iter().any(|t| t == "hypervisor thaw");
    assert!(!thawed, "no thaw after a freeze that was never sent: {:?}", from_the_freeze(&w));
    assert!(w.disk_snapshots().is_empty() && w.images.image(w.req.image_id).is_none());
    assert_eq!(w.nova.task_state(), None);
}

#[tokio::test]
async fn a_failing_freeze_without_os_require_quiesce_is_only_a_warning() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.faults.inject("freeze_filesystems", 1, agent_unresponsive);
    assert_eq!(w.pipeline(|_| {}).run(&with_agent(&w.req, false)).await.unwrap(), Outcome::Completed { direct: true });
    assert_eq!(from_the_freeze(&w)[..3], ["hypervisor freeze", "hypervisor thaw", "storage create_snapshot"]);
    assert_eq!(w.images.image(w.req.image_id).unwrap().status, ImageStatus::Active);
}

#[tokio::test]
async fn a_guest_without_the_agent_is_never_frozen() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(|_| {}).run(&w.req).await.unwrap();
    assert_eq!(*w.hv.calls.lock().unwrap(), vec!["abort vda"]);

    // Nova's `_can_quiesce`: an image that requires quiescing but has no agent fails.
    let w = World::clone_backed(FakeImages::default());
    let mut req = w.req.clone();
    req.instance.system_metadata.insert("image_os_require_quiesce".into(), "true".into());
    let err = w.pipeline(|_| {}).run(&req).await.unwrap_err().error;
    assert_eq!((err.step, err.exception_name()), (Step::Quiesce, "QemuGuestAgentNotEnabled"));
    assert_eq!(err.fault.to_string(), "QEMU guest agent is not enabled");
    assert!(w.disk_snapshots().is_empty() && w.images.image(w.req.image_id).is_none());
    assert!(!w.hv.calls.lock().unwrap().iter().any(|c| c == "freeze" || c == "thaw"));
}

#[tokio::test]
async fn a_guest_a_dead_worker_left_frozen_is_thawed_before_anything_else() {
    let w = World::clone_backed(FakeImages::default());
    // A worker killed at `while-frozen`: the guest frozen, nothing made yet.
    *w.hv.frozen.lock().unwrap() = true;
    w.pipeline(|_| {}).run(&with_agent(&w.req, false)).await.unwrap();
    let timeline = w.timeline.lock().unwrap().clone();
    let thaw = timeline.iter().position(|t| t == "hypervisor thaw").unwrap();
    let first_change = timeline.iter().position(|t| t.starts_with("storage")).unwrap();
    let freeze = timeline.iter().position(|t| t == "hypervisor freeze").unwrap();
    assert!(thaw < first_change && thaw < freeze, "{timeline:?}");
    assert!(!*w.hv.frozen.lock().unwrap());
}

#[tokio::test]
async fn a_cold_snapshot_suspends_and_never_freezes() {
    let w = World::clone_backed(FakeImages::default());
    w.pipeline(cold).run(&with_agent(&w.req, true)).await.unwrap();
    assert_eq!(*w.hv.calls.lock().unwrap(), vec!["suspend", "resume paused=false"]);
}

#[tokio::test(start_paused = true)]
async fn a_freeze_slower_than_max_freeze_seconds_is_undone_at_once() {
    let w = World::clone_backed(FakeImages::default());
    *w.hv.freeze_takes.lock().unwrap() = Duration::from_secs(11);
    w.pipeline(|_| {}).run(&with_agent(&w.req, false)).await.unwrap();
    assert_eq!(from_the_freeze(&w)[..3], ["hypervisor freeze", "hypervisor thaw", "storage create_snapshot"]);

    let w = World::clone_backed(FakeImages::default());
    *w.hv.freeze_takes.lock().unwrap() = Duration::from_secs(11);
    let err = w.pipeline(|_| {}).run(&with_agent(&w.req, true)).await.unwrap_err().error;
    assert_eq!(err.exception_name(), "InstanceQuiesceFailed");
    assert!(err.to_string().contains("max_freeze_seconds"), "{err}");
    assert!(w.disk_snapshots().is_empty());
}

#[tokio::test]
async fn a_guest_that_cannot_be_thawed_hands_the_cast_back() {
    let w = World::clone_backed(FakeImages::default());
    w.hv.faults.pass("thaw_filesystems", 1); // the thaw before the snapshot
    w.hv.faults.inject("thaw_filesystems", 100, || HypervisorError::Agent {
        operation: "thaw filesystems",
        uuid: Uuid::nil(),
        code: 113,
        message: "guest-fsfreeze-thaw failed".into(),
    });
    let failure = w.pipeline(|_| {}).run(&with_agent(&w.req, false)).await.unwrap_err();
    assert_eq!(failure.error.step, Step::Thaw);
    assert!(failure.unsettled.as_deref().is_some_and(|u| u.contains("could not be thawed")), "{failure:?}");
    assert!(w.disk_snapshots().is_empty(), "the snapshot is cleaned up");
}
