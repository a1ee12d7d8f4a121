//! The standard snapshot (Nova's extract-and-upload): produce the image's bytes outside
//! Ceph's reach and upload them to Glance.
//!
//! - RBD disks: a point-in-time RBD snapshot of the disk, streamed from librbd straight into
//!   Glance when the image is raw (no temporary copy, bounded memory); converted by qemu-img
//!   into a temporary file otherwise. Reading a snapshot is safe while the guest runs, so
//!   unlike Nova's qemu-img-on-a-live-disk this needs no suspend.
//! - File disks: live, a shallow block copy onto a delta over the same backing file, ended
//!   once in sync (the guest quiesced around the end), then flattened by qemu-img; cold,
//!   qemu-img from the disk itself.
//!
//! Temporary files live in `<snapshots_directory>/novasnap-<image_id>/`, named after the
//! image so a retry or reclamation finds them, and are removed on every path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use tracing::info;
use uuid::Uuid;

use super::direct::disk_snapshot_name;
use super::plan::SnapshotPlan;
use super::progress::ProgressReporter;
use super::{crash, Fault, Job, PipelineSettings, SnapshotError, Step};
use crate::hypervisor::{DiskSource, Guest, Progress};
use crate::image::ImageProperties;
use crate::messaging::TaskState;
use crate::storage::{files, RbdImage, StorageError};

pub(crate) struct StandardSnapshot<'j, 'a> {
    pub job: &'j mut Job<'a>,
    pub guest: &'j Guest,
    pub plan: &'j SnapshotPlan,
}

/// The directory that holds one request's temporary files.
pub fn temp_dir(settings: &PipelineSettings, image_id: Uuid) -> PathBuf {
    // Named as the disk snapshot is, so reclamation recognises both the same way.
    settings.snapshots_directory.join(disk_snapshot_name(image_id))
}

impl StandardSnapshot<'_, '_> {
    pub async fn run(self, metadata: &ImageProperties) -> Result<(), SnapshotError> {
        let (images, ctx, image_id) = (&self.job.b.images, &self.job.req.context, self.job.req.image_id);
        self.job.step(Step::UpdateMetadata, || images.update(ctx, image_id, metadata)).await?;
        match &self.guest.root_disk.source {
            DiskSource::Rbd { pool, image } => self.extract_rbd(RbdImage::new(pool.clone(), image.clone())).await,
            DiskSource::File(path) | DiskSource::Block(path) => self.extract_file(path).await,
        }
    }

    async fn extract_rbd(self, disk: RbdImage) -> Result<(), SnapshotError> {
        let job = self.job;
        let Some(storage) = job.b.storage.clone() else {
            return Err(job.fail_at(
                Step::Extract,
                Fault::Unsupported("the root disk is on RBD but no Ceph cluster is configured".into()),
            ));
        };
        let snap = disk_snapshot_name(job.req.image_id);
        job.rbd_disk = Some(disk.clone());
        job.disk_snapshot(storage.as_ref(), &disk, &snap, self.plan).await?;
        job.set_task_state(Some(TaskState::ImageUploading)).await?;

        if self.plan.image_format == "raw" {
            let size = job.step(Step::Extract, || storage.size(&disk)).await?;
            let reporter = job.progress_reporter("upload");
            let progress = reporter.callback();
            let (images, ctx, image_id) = (&job.b.images, &job.req.context, job.req.image_id);
            let uploaded = job
                .step(Step::Upload, || {
                    let data = counted(storage.read(&disk, Some(&snap)), size, progress.clone());
                    images.upload(ctx, image_id, data, Some(size))
                })
                .await;
            reporter.finish().await;
            uploaded?;
        } else {
            let dir = job.make_temp_dir().await?;
            let out = dir.join(format!("{}.{}", job.req.image_id, self.plan.image_format));
            let source = files::rbd_source(&disk, &snap, job.settings.ceph_conf.as_deref());
            job.step(Step::Extract, || files::convert(Path::new(&source), "raw", &out, &self.plan.image_format))
                .await?;
            job.upload_file(&out).await?;
        }
        crash::point("after-upload");
        job.remove_temp_files().await;
        Ok(())
    }

    async fn extract_file(self, disk_path: &Path) -> Result<(), SnapshotError> {
        let (job, plan, guest) = (self.job, self.plan, self.guest);
        let dir = job.make_temp_dir().await?;
        let out = dir.join(format!("{}.{}", job.req.image_id, plan.image_format));
        if plan.live {
            let info = job.step(Step::Extract, || files::image_info(disk_path)).await?;
            let delta = dir.join("delta.qcow2");
            job.step(Step::Extract, || {
                files::create_delta(
                    &delta,
                    info.backing_file.as_deref(),
                    info.backing_format.as_deref(),
                    info.virtual_size,
                )
            })
            .await?;
            let (hv, instance, target) = (&job.b.hypervisor, job.req.instance.uuid, guest.root_disk.target.as_str());
            let reporter = job.progress_reporter("block copy");
            let progress = reporter.callback();
            let copied = job.step(Step::Extract, || hv.live_copy(instance, target, &delta, progress.clone())).await;
            reporter.finish().await;
            copied?;
            // In sync: ending the copy is its point in time, quiesced as Nova's
            // `_live_snapshot` quiesces it (after the mirroring, to keep the freeze short).
            let end_copy = job.step(Step::Extract, || hv.abort_block_job(instance, target));
            if let Err(e) = job.at_point_in_time(plan, end_copy).await {
                // A copy still mirroring would write on into the delta being removed.
                job.tidy("end the block copy", &instance, hv.abort_block_job(instance, target)).await;
                return Err(e);
            }
            job.step(Step::Extract, || files::convert(&delta, "qcow2", &out, &plan.image_format)).await?;
        } else {
            // Cold: the disk itself is the point in time while the guest is down.
            job.suspend_if_needed(plan).await?;
            job.step(Step::Extract, || files::convert(disk_path, &plan.source_format, &out, &plan.image_format))
                .await?;
        }
        info!(instance = %job.req.instance.uuid, image = %job.req.image_id, "snapshot extracted, beginning image upload");
        // As Nova does: the guest need not wait for the upload.
        job.resume_if_suspended().await?;
        job.set_task_state(Some(TaskState::ImageUploading)).await?;
        job.upload_file(&out).await?;
        crash::point("after-upload");
        job.remove_temp_files().await;
        Ok(())
    }
}

impl Job<'_> {
    pub(crate) fn progress_reporter(&self, step: &'static str) -> ProgressReporter {
        let task_state = self.task_state.unwrap_or(TaskState::ImageUploading);
        ProgressReporter::start(self.b.notifier.clone(), self.req, task_state, step, self.settings.progress_interval)
    }

    async fn make_temp_dir(&mut self) -> Result<PathBuf, SnapshotError> {
        let dir = temp_dir(self.settings, self.req.image_id);
        tokio::fs::create_dir_all(&dir).await.map_err(|source| {
            self.fail_at(Step::Extract, StorageError::Io { path: dir.display().to_string(), source })
        })?;
        Ok(dir)
    }

    async fn upload_file(&self, path: &Path) -> Result<(), SnapshotError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| {
                self.fail_at(Step::Upload, StorageError::Io { path: path.display().to_string(), source })
            })?
            .len();
        let reporter = self.progress_reporter("upload");
        let progress = reporter.callback();
        let (images, ctx, image_id) = (&self.b.images, &self.req.context, self.req.image_id);
        let uploaded = self
            .step(Step::Upload, || {
                let path = path.to_owned();
                let progress = progress.clone();
                async move {
                    let file = tokio::fs::File::open(&path).await.map_err(|e| crate::image::ImageError::Source {
                        id: image_id,
                        message: format!("{}: {e}", path.display()),
                    })?;
                    let shown = path.display().to_string();
                    let data = tokio_util::io::ReaderStream::with_capacity(file, 4 << 20)
                        .map(move |chunk| chunk.map_err(|e| StorageError::Io { path: shown.clone(), source: e }))
                        .boxed();
                    images.upload(ctx, image_id, counted(data, size, progress), Some(size)).await
                }
            })
            .await;
        reporter.finish().await;
        uploaded
    }
}

/// Turns a storage stream into an upload body that reports how much of `size` has gone.
fn counted(
    data: BoxStream<'static, Result<Bytes, StorageError>>,
    size: u64,
    progress: Progress,
) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
    let sent = Arc::new(AtomicU64::new(0));
    data.map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        let total = sent.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
        if total * 2 >= size {
            crash::point("mid-upload");
        }
        progress((total.saturating_mul(100) / size.max(1)).min(100) as u8);
        Ok(chunk)
    })
    .boxed()
}

impl Job<'_> {
    /// Removes this request's temporary directory; a missing one is fine. Whether it is gone.
    pub(crate) async fn remove_temp_files(&self) -> bool {
        let dir = temp_dir(self.settings, self.req.image_id);
        let remove = async {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {
                    info!(dir = %dir.display(), "temporary files removed");
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        self.tidy("remove temporary files", &dir.display(), remove).await
    }
}
