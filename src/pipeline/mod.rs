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
pub mod standard;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};
use uuid::Uuid;

use crate::error::Classify;
use crate::hypervisor::{DiskSource, Guest, Hypervisor, PowerState};
use crate::image::{ImageService, ImageStatus};
use crate::messaging::{Notifier, SnapshotEvent, TaskState};
use crate::nova::{Expected, InstanceRecord, NovaError};
use crate::request::{SnapshotKind, SnapshotRequest};
use crate::retry::RetryPolicy;
use crate::storage::{BlockStorage, RbdImage};

pub use error::{Fault, SnapshotError, Step};
use plan::{PlanSettings, SnapshotPlan};

/// The boundaries a snapshot talks to.
#[derive(Clone)]
pub struct Boundaries {
    pub hypervisor: Arc<dyn Hypervisor>,
    /// None where the worker runs without Ceph: RBD disks then cannot be snapshotted.
    pub storage: Option<Arc<dyn BlockStorage>>,
    pub images: Arc<dyn ImageService>,
    pub notifier: Arc<dyn Notifier>,
    /// Nova's record of the instance (task_state, power_state, action events, faults).
    pub nova: Arc<dyn InstanceRecord>,
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub plan: PlanSettings,
    /// False forces the standard path.
    pub direct_snapshot: bool,
    /// Where the standard path may write temporary files.
    pub snapshots_directory: PathBuf,
    /// Ceph config qemu-img needs to read an RBD disk (non-raw RBD snapshots).
    pub ceph_conf: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub progress_interval: std::time::Duration,
    /// The image property's value that says novasnap made the image ([`MADE_BY_PROPERTY`]).
    pub made_by: String,
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
            snapshots_directory: config.libvirt.snapshots_directory.clone(),
            ceph_conf: config.rbd.ceph_conf.clone(),
            retry: config.worker.retry.clone(),
            progress_interval: config.notifications.progress_interval,
            made_by: format!("novasnap {} on {}", env!("CARGO_PKG_VERSION"), config.host),
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
    /// The guest is in managed save because of this request and must be resumed.
    pub suspended: bool,
    /// The RBD instance disk that may carry this request's snapshot.
    pub rbd_disk: Option<crate::storage::RbdImage>,
    /// The copy in Glance's pool this request may have made.
    pub rbd_copy: Option<crate::storage::RbdImage>,
}

impl SnapshotPipeline {
    pub fn new(b: Boundaries, settings: PipelineSettings) -> Self {
        Self { b, settings }
    }

    pub async fn run(&self, req: &SnapshotRequest) -> Result<Outcome, SnapshotError> {
        let mut job = Job {
            b: &self.b,
            settings: &self.settings,
            req,
            // What nova-api set before it cast (`nova/compute/api.py` `snapshot`, `backup`).
            task_state: Some(req.kind.task_states()[0]),
            recorded: false,
            suspended: false,
            rbd_disk: None,
            rbd_copy: None,
        };
        let event = format!("compute_{}", req.kind.method());
        if let Err(e) = self.b.nova.event_start(req, &event).await {
            warn!(instance = %req.instance.uuid, error = %e, "instance action event not started in Nova");
        }
        let result = job.snapshot().await;
        if let Err(e) = &result {
            job.fail(e).await;
        }
        let failure = result.as_ref().err().map(|e| (e.to_string(), format!("{e:?}")));
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

    /// Runs one boundary call under the retry policy and names the step if it fails.
    pub async fn step<T, E, F, Fut>(&self, step: Step, op: F) -> Result<T, SnapshotError>
    where
        E: Into<Fault> + Classify + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = std::time::Instant::now();
        let result = self.settings.retry.run(&step.to_string(), op).await;
        // Per-step timings: `make bench` sums these into its time breakdown.
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(step = %step, elapsed_ms, ok = result.is_ok(), "step finished");
        result.map_err(|e| SnapshotError { step, instance: self.instance(), image: self.image(), fault: e.into() })
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

    async fn snapshot(&mut self) -> Result<Outcome, SnapshotError> {
        let (b, req) = (self.b, self.req);
        let (instance, image_id, ctx) = (req.instance.uuid, req.image_id, &req.context);

        // 1. The guest, by instance UUID; its power state saved in Nova, as nova-compute does.
        let root_device = req.instance.data.get("root_device_name").and_then(serde_json::Value::as_str);
        let guest: Guest = self.step(Step::FindGuest, || b.hypervisor.find_guest(instance, root_device)).await?;
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

        // 3. What to make: backend, format, metadata; 4. live or cold.
        let plan = SnapshotPlan::new(&guest, &req.instance, &self.settings.plan);
        self.suspended = plan.suspended_already;
        let mut metadata = plan::snapshot_metadata(&req.instance, &image, &plan.image_format);
        // Which snapshotter made it: novasnap, on which host (nova-compute's own carry none).
        metadata.insert(MADE_BY_PROPERTY.into(), self.settings.made_by.clone().into());
        info!(%instance, image = %image_id, backend = ?plan.backend, format = %plan.image_format, live = plan.live,
              "beginning {} snapshot", if plan.live { "live" } else { "cold" });
        if plan.live {
            let disk = guest.root_disk.target.as_str();
            self.step(Step::AbortBlockJob, || b.hypervisor.abort_block_job(instance, disk)).await?;
        } else {
            self.suspend_if_needed(&plan).await?;
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
            self.suspend_if_needed(&plan).await?; // cold: the new disk snapshot as the first
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

        // 8. The guest back as it was, task_state none, the end.
        self.resume_if_suspended(&plan).await?;
        self.set_task_state(None).await?;
        self.notify(SnapshotEvent::End).await;
        info!(%instance, image = %image_id, direct, "snapshot image upload complete");

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
        standard::cleanup(self.settings, req.image_id).await;
        let plan = SnapshotPlan::new(guest, &req.instance, &self.settings.plan);
        self.suspended = plan.suspended_already;
        self.resume_if_suspended(&plan).await?;
        self.task_state = Some(TaskState::ImageUploading);
        self.set_task_state(None).await?;
        self.notify(SnapshotEvent::End).await;
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

    async fn suspend_if_needed(&mut self, plan: &SnapshotPlan) -> Result<(), SnapshotError> {
        if plan.resume_after && !self.suspended {
            let (hv, instance) = (&self.b.hypervisor, self.instance());
            self.step(Step::Suspend, || hv.suspend(instance)).await?;
            self.suspended = true;
        }
        Ok(())
    }

    pub(crate) async fn resume_if_suspended(&mut self, plan: &SnapshotPlan) -> Result<(), SnapshotError> {
        if self.suspended {
            let (hv, instance) = (&self.b.hypervisor, self.instance());
            let paused = plan.original_state == PowerState::Paused;
            self.step(Step::Resume, || hv.resume(instance, paused)).await?;
            self.suspended = false;
        }
        Ok(())
    }

    /// Undoes what this request did, as Nova's compute manager and driver do on failure,
    /// but completely: artefacts removed, image deleted unless active, guest resumed,
    /// task_state reset, and the fault published.
    async fn fail(&mut self, e: &SnapshotError) {
        let (b, req) = (self.b, self.req);
        if e.is_vanished() {
            info!(instance = %self.instance(), image = %self.image(), error = %e, "instance or image vanished during snapshot; ending quietly");
        } else {
            tracing::error!(instance = %self.instance(), image = %self.image(), step = %e.step, error = %e, "snapshot failed");
        }
        let image_active =
            matches!(b.images.get(&req.context, self.image()).await, Ok(image) if image.status == ImageStatus::Active);
        if let (Some(storage), Some(disk)) = (&b.storage, &self.rbd_disk) {
            match (&self.rbd_copy, image_active) {
                (Some(copy), false) => direct::cleanup_rbd(storage.as_ref(), disk, copy, self.image()).await,
                _ => {
                    if let Err(err) = storage.remove_snapshot(disk, &direct::disk_snapshot_name(self.image())).await {
                        warn!(%disk, error = %err, "could not remove the disk snapshot");
                    }
                }
            }
        }
        standard::cleanup(self.settings, self.image()).await;
        if !image_active {
            if let Err(err) = b.images.delete(&req.context, self.image()).await {
                warn!(image = %self.image(), error = %err, "could not delete the failed snapshot's image");
            }
        }
        if self.suspended {
            let paused = req.instance.vm_state.as_deref() == Some("paused");
            if let Err(err) = b.hypervisor.resume(self.instance(), paused).await {
                warn!(instance = %self.instance(), error = %err, "could not resume the guest after a failed snapshot");
            }
            self.suspended = false;
        }
        self.revert_task_state(e).await;
        if !e.is_vanished() {
            // `wrap_instance_fault`: the failure in Nova's record of the instance.
            if let Err(err) = b.nova.add_fault(req, &e.to_string(), &format!("{e:?}")).await {
                warn!(instance = %self.instance(), error = %err, "instance fault not recorded in Nova");
            }
            self.notify(SnapshotEvent::Error { exception: e.exception_name().into(), message: e.to_string() }).await;
        }
    }

    /// `reverts_task_state`: task_state back to none, whatever Nova holds, unless the task was
    /// preempted (then it is someone else's) or the instance is gone.
    async fn revert_task_state(&mut self, e: &SnapshotError) {
        let preempted = matches!(
            e.fault,
            Fault::Nova(
                NovaError::UnexpectedTaskState { .. } | NovaError::Deleting(_) | NovaError::InstanceNotFound(_)
            )
        );
        if preempted || self.task_state.is_none() {
            return;
        }
        let (nova, req) = (&self.b.nova, self.req);
        match self.step(Step::UpdateInstance, || nova.save_task_state(req, None, Expected::Nothing)).await {
            Ok(()) => {
                let old = self.task_state.take();
                self.notify(SnapshotEvent::TaskState { old, new: None }).await;
            }
            Err(err) => warn!(instance = %self.instance(), error = %err, "could not revert the task_state in Nova"),
        }
    }
}

#[cfg(test)]
mod tests;
