//! The snapshot, told top to bottom over the boundary traits, as Nova's libvirt driver
//! tells it in `snapshot()` — with deterministic artefact names and steps that are safe to
//! repeat, so a retry or a redelivered cast picks up where the last try stopped.
//!
//! [`SnapshotPipeline::run`] is the story; [`direct`] and [`standard`] are the two ways of
//! producing the image's bytes; [`plan`] holds the decisions; [`backup`] the rotation.

pub mod backup;
pub mod crash;
pub mod direct;
pub mod error;
pub mod plan;
pub mod progress;
pub mod quiesce;
pub mod standard;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};
use uuid::Uuid;

use crate::disposal::{Fate, OwnerImage, Remover};
use crate::hypervisor::{DiskSource, Guest, Hypervisor, HypervisorError, PowerState};
use crate::image::{ImageService, ImageStatus};
use crate::messaging::{Notifier, SnapshotEvent, TaskState};
use crate::nova::{Expected, InstanceRecord};
use crate::request::{SnapshotKind, SnapshotRequest};
use crate::retry::RetryPolicy;
use crate::storage::{BlockStorage, InstanceLease, NotedWork, RbdImage, StorageError, WorkLedger};
use tokio::time::Instant;

pub use error::{Failure, Fault, SnapshotError, Step};
use plan::{PlanSettings, SnapshotPlan};

/// The boundaries a snapshot talks to.
#[derive(Clone)]
pub struct Boundaries {
    pub hypervisor: Arc<dyn Hypervisor>,
    /// None where the worker runs without Ceph: RBD disks then cannot be snapshotted.
    pub storage: Option<Arc<dyn BlockStorage>>,
    pub images: Arc<dyn ImageService>,
    pub notifier: Arc<dyn Notifier>,
    /// Where the work is noted for reclamation (and leases taken).
    pub ledger: Arc<dyn WorkLedger>,
    /// Nova's record of the instance (task_state, power_state, action events, faults).
    pub nova: Arc<dyn InstanceRecord>,
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub plan: PlanSettings,
    /// False forces the standard path.
    pub direct_snapshot: bool,
    /// How a direct snapshot's image holds its bytes.
    pub image_layout: crate::config::ImageLayout,
    /// Where the standard path may write temporary files.
    pub snapshots_directory: PathBuf,
    /// Ceph config qemu-img needs to read an RBD disk (non-raw RBD snapshots).
    pub ceph_conf: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub progress_interval: std::time::Duration,
    /// `[DEFAULT] host`: the compute host this worker stands for.
    pub host: String,
    /// How long a cast may take, from the worker taking it to its end (`[novasnap]
    /// snapshot_timeout`): the deadline bounds every step and retry.
    pub snapshot_timeout: std::time::Duration,
    /// The image property's value that says novasnap made the image ([`MADE_BY_PROPERTY`]).
    pub made_by: String,
    /// The longest a guest's filesystems stay frozen (`[novasnap] max_freeze_seconds`).
    pub max_freeze: std::time::Duration,
}

/// The image property naming the novasnap (version and host) that made the image.
pub const MADE_BY_PROPERTY: &str = "novasnap_made_by";

impl PipelineSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            plan: PlanSettings {
                snapshot_image_format: config.libvirt.snapshot_image_format.clone(),
                disable_live_snapshot: config.libvirt.disable_live_snapshot,
                ephemeral_encryption: config.libvirt.ephemeral_encryption,
            },
            direct_snapshot: config.worker.direct_snapshot,
            image_layout: config.worker.image_layout,
            snapshots_directory: config.libvirt.snapshots_directory.clone(),
            ceph_conf: config.rbd.ceph_conf.clone(),
            retry: config.worker.retry.clone(),
            progress_interval: config.notifications.progress_interval,
            snapshot_timeout: config.worker.snapshot_timeout,
            host: config.host.clone(),
            made_by: format!("novasnap {} on {}", env!("CARGO_PKG_VERSION"), config.host),
            max_freeze: config.worker.max_freeze,
        }
    }
}

/// How a request ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The image is active with the snapshot; `location` is set on the direct path.
    Completed { direct: bool },
    /// The image was already active: an earlier delivery of the same cast finished it.
    AlreadyDone,
}

pub struct SnapshotPipeline {
    b: Boundaries,
    settings: PipelineSettings,
}

/// One request in flight: what it has changed so far, so a failure can undo exactly that.
pub(crate) struct Job<'a> {
    pub b: &'a Boundaries,
    pub settings: &'a PipelineSettings,
    pub req: &'a SnapshotRequest,
    pub task_state: Option<TaskState>,
    /// A task_state of this request's is in Nova's database: later saves expect it exactly.
    /// Until then Nova may hold any state of the task (a redelivery after a crash).
    pub recorded: bool,
    /// The guest is in managed save because of this request (or an earlier try of it) and
    /// must be brought back to this state, running or paused; since when (the suspend, or
    /// when an earlier try's was found).
    pub suspended: Option<(PowerState, Instant)>,
    /// How long the guest has been held, and whether a thaw failed.
    pub held: quiesce::HeldTimes,
    /// The RBD instance disk that may carry this request's snapshot.
    pub rbd_disk: Option<crate::storage::RbdImage>,
    /// The copy in Glance's pool this request may have made.
    pub rbd_copy: Option<crate::storage::RbdImage>,
    /// The fence around every change: the instance lease this request holds.
    pub lease: &'a InstanceLease,
    /// When the snapshot must end, failed if not done.
    pub deadline: Instant,
}

impl SnapshotPipeline {
    pub fn new(b: Boundaries, settings: PipelineSettings) -> Self {
        Self { b, settings }
    }

    /// Runs the snapshot behind `lease`, until `deadline` at the latest.
    pub async fn run(
        &self,
        req: &SnapshotRequest,
        lease: &InstanceLease,
        deadline: Instant,
    ) -> Result<Outcome, Failure> {
        let mut job = Job {
            lease,
            deadline,
            b: &self.b,
            settings: &self.settings,
            req,
            // What nova-api set before it cast (`nova/compute/api.py` `snapshot`, `backup`).
            task_state: Some(req.kind.task_states()[0]),
            recorded: false,
            suspended: None,
            held: Default::default(),
            rbd_disk: None,
            rbd_copy: None,
        };
        // `wrap_instance_event`: the step of the instance action nova-api started, in Nova.
        let event = format!("compute_{}", req.kind.method());
        if let Err(e) = self.b.nova.event_start(req, &event).await {
            warn!(instance = %req.instance.uuid, error = %e, "instance action event not started in Nova");
        }
        let result = match job.snapshot().await {
            Ok(outcome) => Ok(outcome),
            Err(error) => {
                let unsettled = job.fail(&error).await;
                Err(Failure { error, unsettled })
            }
        };
        let failure = result.as_ref().err().map(|f| (f.error.to_string(), format!("{:?}", f.error)));
        let failure = failure.as_ref().map(|(m, d)| (m.as_str(), d.as_str()));
        if let Err(e) = self.b.nova.event_finish(req, &event, failure).await {
            warn!(instance = %req.instance.uuid, error = %e, "instance action event not finished in Nova");
        }
        result
    }
}

impl Job<'_> {
    fn instance(&self) -> Uuid {
        self.req.instance.uuid
    }

    fn image(&self) -> Uuid {
        self.req.image_id
    }

    /// Runs one boundary call under the retry policy and names the step if it fails. Every
    /// attempt is fenced: the instance lease is confirmed before it, and the step ends as
    /// soon as the lease is lost or the snapshot's deadline passes, between attempts or
    /// during one.
    pub async fn step<T, E, F, Fut>(&self, step: Step, op: F) -> Result<T, SnapshotError>
    where
        E: Into<Fault>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.fenced(step, Some(self.deadline), op).await
    }

    async fn fenced<T, E, F, Fut>(&self, step: Step, deadline: Option<Instant>, op: F) -> Result<T, SnapshotError>
    where
        E: Into<Fault>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let (lease, op, name) = (self.lease, std::sync::Mutex::new(op), step.to_string());
        let attempts = self.settings.retry.run(&name, || async {
            lease.confirm().await?;
            let attempt = (op.lock().expect("step operation"))();
            attempt.await.map_err(Into::into)
        });
        let past_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            result = attempts => result,
            _ = lease.lost().cancelled() => Err(StorageError::LeaseLost("found lost during the step".into()).into()),
            _ = past_deadline => Err(Fault::DeadlineExceeded(self.settings.snapshot_timeout)),
        };
        // Per-step timings: `make bench` sums these into its time breakdown.
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(step = %step, elapsed_ms, ok = result.is_ok(), "step finished");
        result.map_err(|fault| self.fail_at(step, fault))
    }

    /// One change of a cleanup, tried once behind the lease's fence; a failure is logged,
    /// and reclamation finds what is left. Whether it was done.
    pub(crate) async fn tidy<E: std::fmt::Display>(
        &self,
        what: &str,
        target: &(dyn std::fmt::Display + Sync),
        change: impl Future<Output = Result<(), E>>,
    ) -> bool {
        if let Err(e) = self.lease.confirm().await {
            warn!(%target, error = %e, "not done: {what}: the instance lease is not confirmed");
            return false;
        }
        match change.await {
            Ok(()) => true,
            Err(e) => {
                warn!(%target, error = %e, "could not {what}");
                false
            }
        }
    }

    pub fn fail_at(&self, step: Step, fault: impl Into<Fault>) -> SnapshotError {
        SnapshotError { step, instance: self.instance(), image: self.image(), fault: fault.into() }
    }

    /// Publishes an event; a lost notification is logged, never fatal.
    pub async fn notify(&self, event: SnapshotEvent) {
        if let Err(e) = self.b.notifier.notify(self.req, event.clone()).await {
            warn!(instance = %self.instance(), image = %self.image(), ?event, error = %e, "notification not published");
        }
    }

    /// Moves the task on: saved in Nova's database (`Instance.save(expected_task_state=)`,
    /// as nova-compute's `update_task_state` does), then told to subscribers.
    pub async fn set_task_state(&mut self, new: Option<TaskState>) -> Result<(), SnapshotError> {
        let old = self.task_state;
        if old == new {
            return Ok(());
        }
        let expected = if self.recorded {
            Expected::exactly(old)
        } else {
            // The first save of a delivery: an earlier one may have got further.
            let mut states: Vec<Option<TaskState>> = self.req.kind.task_states().iter().copied().map(Some).collect();
            if new.is_none() {
                states.push(None);
            }
            Expected::OneOf(states)
        };
        let (nova, req) = (&self.b.nova, self.req);
        self.step(Step::UpdateInstance, || nova.save_task_state(req, new, expected.clone())).await?;
        self.recorded = true;
        self.task_state = new;
        self.notify(SnapshotEvent::TaskState { old, new }).await;
        Ok(())
    }

    /// `reverts_task_state`: task_state back to none, whatever Nova holds, unless the task is
    /// no longer this request's (preempted, or the instance gone). Outside the deadline: a
    /// snapshot past it must not leave its instance stuck.
    async fn revert_task_state(&mut self, e: &SnapshotError) {
        if e.task_preempted() || self.task_state.is_none() {
            return;
        }
        let (nova, req) = (&self.b.nova, self.req);
        match self.fenced(Step::UpdateInstance, None, || nova.save_task_state(req, None, Expected::Nothing)).await {
            Ok(()) => {
                let old = self.task_state.take();
                self.notify(SnapshotEvent::TaskState { old, new: None }).await;
            }
            Err(err) => warn!(instance = %self.instance(), error = %err, "could not revert the task_state in Nova"),
        }
    }

    async fn snapshot(&mut self) -> Result<Outcome, SnapshotError> {
        let (b, req) = (self.b, self.req);
        let (instance, image_id, ctx) = (req.instance.uuid, req.image_id, &req.context);

        // 1. The guest, by instance UUID. Once found, one left in managed save by an earlier
        //    try is this request's to resume, whatever happens next. A guest libvirt does not
        //    know proves the instance gone only if Nova places it on this very host.
        let root_device = req.instance.data.get("root_device_name").and_then(serde_json::Value::as_str);
        let guest = match self.step(Step::FindGuest, || b.hypervisor.find_guest(instance, root_device)).await {
            Err(e) if matches!(e.fault, Fault::Hypervisor(HypervisorError::GuestNotFound(_))) => {
                let (placed, here) = (req.instance.host.as_deref(), self.settings.host.as_str());
                if placed == Some(here) {
                    return Err(e);
                }
                let why = format!(
                    "libvirt on this host ({here}) does not know instance {instance}, which Nova places on \
                     {}: the snapshot cannot be taken here, and its image is kept",
                    placed.unwrap_or("no host")
                );
                return Err(self.fail_at(Step::FindGuest, Fault::NotOnThisHost(why)));
            }
            found => found?,
        };
        let plan = SnapshotPlan::new(&guest, &req.instance, &self.settings.plan);
        self.adopt_suspension(&plan);
        // Its power state saved in Nova, as nova-compute's `_snapshot_instance` does.
        self.step(Step::UpdateInstance, || b.nova.save_power_state(req, guest.power_state)).await?;

        // 2. The image nova-api created for the result. Active means an earlier delivery
        //    of this cast already finished it.
        let image = self.step(Step::GetImage, || b.images.get(ctx, image_id)).await?;
        if image.status == ImageStatus::Active {
            info!(%instance, image = %image_id, "image already active: snapshot was completed by an earlier delivery");
            self.finish_completed(&guest).await?;
            return Ok(Outcome::AlreadyDone);
        }
        if !matches!(image.status, ImageStatus::Queued | ImageStatus::Saving) {
            return Err(
                self.fail_at(Step::GetImage, Fault::Unsupported(format!("image is {:?}, not queued", image.status)))
            );
        }
        self.notify(SnapshotEvent::Start).await;
        if req.kind == SnapshotKind::Snapshot {
            self.set_task_state(Some(TaskState::ImageSnapshot)).await?;
        }

        // Before anything is made: what reclamation must look at if this request dies.
        let disk = match &guest.root_disk.source {
            DiskSource::Rbd { pool, image } => Some(RbdImage::new(pool.clone(), image.clone())),
            DiskSource::File(_) | DiskSource::Block(_) => None,
        };
        let work = NotedWork { image: image_id, instance, disk };
        self.step(Step::NoteWork, || b.ledger.note_work(&work)).await?;

        // 3. What to make: backend, format, metadata; 4. live or cold. A cold snapshot
        //    suspends the guest only for the step that makes its point in time, if one is
        //    needed (a redelivery may find it made), and resumes it right after.
        let mut metadata = plan::snapshot_metadata(&req.instance, &image, &plan.image_format);
        // Which snapshotter made it: novasnap, on which host (nova-compute's own carry none).
        metadata.insert(MADE_BY_PROPERTY.into(), self.settings.made_by.clone().into());
        info!(%instance, image = %image_id, backend = ?plan.backend, format = %plan.image_format, live = plan.live,
              "beginning {} snapshot", if plan.live { "live" } else { "cold" });
        if plan.live {
            let disk = guest.root_disk.target.as_str();
            self.step(Step::AbortBlockJob, || b.hypervisor.abort_block_job(instance, disk)).await?;
            self.thaw_first(&plan).await;
        }

        // 5. Nova's task_state sequence.
        self.set_task_state(Some(TaskState::ImagePendingUpload)).await?;
        self.set_task_state(Some(TaskState::ImageUploading)).await?;

        // 6. The direct path where it can be taken (a second time if Glance removed the
        // first copy: a failure of Glance's own, such as its database being locked, should
        // not cost the snapshot its direct path), 7. the standard path otherwise.
        let mut outcome = self.direct_snapshot(&guest, &plan, &metadata).await?;
        if let direct::Direct::CopyLost(reason) = &outcome {
            warn!(%instance, image = %image_id, %reason, "making the direct snapshot again");
            outcome = self.direct_snapshot(&guest, &plan, &metadata).await?;
        }
        let direct = match outcome {
            direct::Direct::Done => true,
            direct::Direct::Unavailable(reason) | direct::Direct::CopyLost(reason) => {
                warn!(%instance, image = %image_id, %reason, "performing standard snapshot: direct snapshot is not possible");
                self.set_task_state(Some(TaskState::ImagePendingUpload)).await?;
                standard::StandardSnapshot { job: self, guest: &guest, plan: &plan }.run(&metadata).await?;
                false
            }
        };

        // 8. The guest back as it was (if no step has brought it back), task_state none, the end.
        self.resume_if_suspended().await?;
        self.set_task_state(None).await?;
        let held = self.held.held();
        self.notify(SnapshotEvent::End { held }).await;
        info!(%instance, image = %image_id, direct, frozen_ms = held.frozen_ms, suspended_ms = held.suspended_ms,
              "snapshot image upload complete");
        // 9. What only the making of the image needed.
        if self.remove_disk_snapshot().await {
            self.forget_work().await;
        }

        if let SnapshotKind::Backup { backup_type, rotation } = &req.kind {
            backup::rotate(self, backup_type, *rotation).await?;
        }
        Ok(Outcome::Completed { direct })
    }

    /// The tail of a request whose image went active before its worker died: the disk
    /// snapshot and temporary files that worker had no time to remove, the guest it had
    /// not resumed, and the end its subscribers have not seen.
    async fn finish_completed(&mut self, guest: &Guest) -> Result<(), SnapshotError> {
        let (b, req) = (self.b, self.req);
        if let (Some(storage), DiskSource::Rbd { pool, image }) = (&b.storage, &guest.root_disk.source) {
            let (disk, snap) = (RbdImage::new(pool.clone(), image.clone()), direct::disk_snapshot_name(req.image_id));
            self.step(Step::RemoveDiskSnapshot, || storage.remove_snapshot(&disk, &snap)).await?;
        }
        let removed = self.remove_temp_files().await;
        if removed {
            self.forget_work().await;
        }
        self.resume_if_suspended().await?;
        self.task_state = Some(TaskState::ImageUploading);
        self.set_task_state(None).await?;
        self.notify(SnapshotEvent::End { held: self.held.held() }).await;
        if let SnapshotKind::Backup { backup_type, rotation } = &req.kind {
            backup::rotate(self, backup_type, *rotation).await?;
        }
        Ok(())
    }

    async fn direct_snapshot(
        &mut self,
        guest: &Guest,
        plan: &SnapshotPlan,
        metadata: &crate::image::ImageProperties,
    ) -> Result<direct::Direct, SnapshotError> {
        if !self.settings.direct_snapshot {
            return Ok(direct::Direct::Unavailable("direct_snapshot is disabled in [novasnap]".into()));
        }
        let Some(storage) = self.b.storage.clone() else {
            return Ok(direct::Direct::Unavailable("no Ceph cluster configured".into()));
        };
        direct::DirectSnapshot { job: self, storage: storage.as_ref(), guest, plan }.run(metadata).await
    }

    /// Removes the disk snapshot this request made its point in time with, once the image
    /// no longer needs it (flattened, or uploaded). Its removal waits on the monitors (a
    /// paxos round: up to `paxos_propose_interval`, a second by default), so it comes after
    /// the image is active and announced, before the cast is acknowledged; a worker that
    /// dies first leaves it to the redelivery, which finds the image active, or to
    /// reclamation. A failure is logged and left to reclamation. Whether it is gone.
    async fn remove_disk_snapshot(&self) -> bool {
        let (Some(storage), Some(disk)) = (&self.b.storage, &self.rbd_disk) else { return true };
        let snap = direct::disk_snapshot_name(self.image());
        match self.step(Step::RemoveDiskSnapshot, || storage.remove_snapshot(disk, &snap)).await {
            Ok(()) => true,
            Err(e) => {
                warn!(instance = %self.instance(), image = %self.image(), error = %e, "the disk snapshot is left to reclamation");
                false
            }
        }
    }

    /// Forgets the note for reclamation: nothing of this request is left. A note left behind
    /// only costs reclamation a look.
    async fn forget_work(&self) {
        let image = self.image();
        self.tidy("forget the noted work", &image, self.b.ledger.forget_work(image)).await;
    }

    /// Takes over a managed save an earlier try of this request left.
    fn adopt_suspension(&mut self, plan: &SnapshotPlan) {
        if plan.suspended_already {
            self.suspended = Some((plan.original_state, Instant::now()));
        }
    }

    /// Suspends the guest for a cold snapshot's point in time (unless it is already).
    pub(crate) async fn suspend_if_needed(&mut self, plan: &SnapshotPlan) -> Result<(), SnapshotError> {
        if plan.resume_after && self.suspended.is_none() {
            let (hv, instance) = (&self.b.hypervisor, self.instance());
            let since = Instant::now();
            self.step(Step::Suspend, || hv.suspend(instance)).await?;
            self.suspended = Some((plan.original_state, since));
        }
        Ok(())
    }

    /// Brings a guest this request suspended back, under the retry policy.
    pub(crate) async fn resume_if_suspended(&mut self) -> Result<(), SnapshotError> {
        self.resume(Some(self.deadline)).await
    }

    async fn resume(&mut self, deadline: Option<Instant>) -> Result<(), SnapshotError> {
        if let Some((state, since)) = self.suspended {
            let (hv, instance) = (&self.b.hypervisor, self.instance());
            let paused = state == PowerState::Paused;
            self.fenced(Step::Resume, deadline, || hv.resume(instance, paused)).await?;
            self.suspended = None;
            self.held.add_suspended(since.elapsed());
        }
        Ok(())
    }

    /// The disk's point in time: snapshot `snap` of `disk`, taken with the guest in managed
    /// save for a cold snapshot, quiesced for a live one, unless an earlier try of this
    /// request took it already. The guest runs (or writes) again as soon as the snapshot
    /// exists.
    pub(crate) async fn disk_snapshot(
        &mut self,
        storage: &dyn BlockStorage,
        disk: &RbdImage,
        snap: &str,
        plan: &SnapshotPlan,
    ) -> Result<(), SnapshotError> {
        let existing = self.step(Step::DiskSnapshot, || storage.list_snapshots(disk)).await?;
        if !existing.iter().any(|s| s.name == snap) {
            self.suspend_if_needed(plan).await?;
            self.at_point_in_time(plan, self.step(Step::DiskSnapshot, || storage.create_snapshot(disk, snap))).await?;
            if self.suspended.is_some() {
                crash::point("while-suspended");
            }
        }
        self.resume_if_suspended().await
    }

    /// Undoes what this request did, as Nova's compute manager and driver do on failure,
    /// but completely: artefacts removed, the image deleted, guest resumed, task_state reset,
    /// and the fault published. Only what [`crate::disposal`] finds disposable is removed: an
    /// image Glance shows in use, or cannot tell about, is kept with its copy; and nothing at
    /// all once the lease is lost, since another replica may be at work. Returns what is left
    /// unsettled, for another delivery of the cast to put right.
    async fn fail(&mut self, e: &SnapshotError) -> Option<String> {
        let (b, req) = (self.b, self.req);
        if e.is_lease_lost() {
            tracing::error!(instance = %self.instance(), image = %self.image(), step = %e.step, error = %e, "snapshot stopped: its instance lease was lost; nothing more is changed");
            return Some(format!("the instance lease was lost at step '{}'", e.step));
        }
        if e.is_vanished() {
            info!(instance = %self.instance(), image = %self.image(), error = %e, "instance or image vanished during snapshot; ending quietly");
        } else {
            tracing::error!(instance = %self.instance(), image = %self.image(), step = %e.step, error = %e, "snapshot failed");
        }
        let mut unsettled = Vec::new();
        let owner = OwnerImage::look(b.images.as_ref(), &req.context, self.image()).await;
        if owner.fate == Fate::Unknown {
            unsettled.push(format!("Glance could not tell the state of image {}: it is kept", self.image()));
        }
        // Whether nothing of this request is left for reclamation to look at.
        let mut cleaned = owner.fate != Fate::Unknown;
        if let (Some(storage), Some(disk)) = (&b.storage, &self.rbd_disk) {
            let copy = self.rbd_copy.as_ref().filter(|copy| {
                let disposable = owner.copy_disposable(copy, Remover::FailingRequest);
                if !disposable {
                    info!(%copy, image = %self.image(), image_state = %owner.state, "the copy in Glance's pool is kept");
                    cleaned &= owner.registers(copy);
                }
                disposable
            });
            cleaned &= self.remove_rbd_artefacts(storage.as_ref(), disk, copy).await;
        }
        cleaned &= self.remove_temp_files().await;
        if cleaned {
            self.forget_work().await;
        }
        if owner.image_disposable(Remover::FailingRequest) && !e.keeps_image() {
            let image = self.image();
            self.tidy("delete the failed snapshot's image", &image, b.images.delete(&req.context, image)).await;
        } else {
            info!(image = %self.image(), image_state = %owner.state, "the image is kept");
        }
        if let Err(err) = self.thaw_if_left_frozen().await {
            tracing::error!(instance = %self.instance(), error = %err, "the guest's filesystems may still be frozen after a failed snapshot");
            unsettled.push(format!("guest {} could not be thawed: {}", self.instance(), err.fault));
        }
        if let Err(err) = self.resume(None).await {
            tracing::error!(instance = %self.instance(), error = %err, "the guest is still in managed save after a failed snapshot");
            unsettled.push(format!("guest {} could not be resumed from managed save: {}", self.instance(), err.fault));
        }
        self.revert_task_state(e).await;
        if !e.is_vanished() {
            // `wrap_instance_fault`: the failure in Nova's record of the instance.
            if let Err(err) = b.nova.add_fault(req, &e.to_string(), &format!("{e:?}")).await {
                warn!(instance = %self.instance(), error = %err, "instance fault not recorded in Nova");
            }
            self.notify(SnapshotEvent::Error { exception: e.exception_name().into(), message: e.to_string() }).await;
        }
        (!unsettled.is_empty()).then(|| unsettled.join("; "))
    }
}

#[cfg(test)]
mod tests;
