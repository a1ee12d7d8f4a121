//! The RBD direct snapshot (Nova's `Rbd.direct_snapshot`): the image's bytes never leave
//! Ceph. Snapshot the disk, clone it into Glance's pool as `<image_id>`, flatten, drop the
//! disk snapshot, snapshot the copy as `snap`, and register `rbd://fsid/pool/image/snap`.
//!
//! Unlike Nova, the disk snapshot's name is derived from the image id, so a retry finds
//! what an earlier try made, and every step checks what already exists.

use tracing::{info, warn};
use uuid::Uuid;

use super::plan::SnapshotPlan;
use super::{crash, Fault, Job, SnapshotError, Step};
use crate::config::ImageLayout;
use crate::hypervisor::{DiskSource, Guest};
use crate::image::{parse_rbd_url, ImageError, ImageProperties};
use crate::storage::{BlockStorage, CloneParent, CloneState, RbdImage, StorageError};

/// The snapshot novasnap keeps on the instance disk while it copies it. Deterministic, so a
/// retry finds it and reclamation recognises it as novasnap's.
pub fn disk_snapshot_name(image_id: Uuid) -> String {
    format!("{DISK_SNAPSHOT_PREFIX}{}", image_id.simple())
}

pub const DISK_SNAPSHOT_PREFIX: &str = "novasnap-";

/// RBD image metadata on the copy in Glance's pool naming the image it was made for, so
/// reclamation can tell novasnap's copies from the images Glance stored itself.
pub const OWNER_METADATA_KEY: &str = "novasnap.image_id";

/// The snapshot Glance's RBD store expects on every image it serves.
pub const IMAGE_SNAPSHOT: &str = "snap";

pub(crate) enum Direct {
    Done,
    /// The direct path cannot be taken; the standard path must produce the bytes.
    Unavailable(String),
    /// Glance removed the copy (reverting its failed location import): everything this try
    /// made is gone, and the direct path may be taken again from the start.
    CopyLost(String),
}

pub(crate) struct DirectSnapshot<'j, 'a> {
    pub job: &'j mut Job<'a>,
    pub storage: &'j dyn BlockStorage,
    pub guest: &'j Guest,
    pub plan: &'j SnapshotPlan,
}

impl DirectSnapshot<'_, '_> {
    pub async fn run(self, metadata: &ImageProperties) -> Result<Direct, SnapshotError> {
        let DirectSnapshot { job, storage, guest, plan } = self;
        let DiskSource::Rbd { pool, image } = &guest.root_disk.source else {
            return Ok(Direct::Unavailable("the root disk is not on RBD".into()));
        };
        if plan.image_format != "raw" {
            return Ok(Direct::Unavailable(format!("images from RBD are raw, {} was asked for", plan.image_format)));
        }
        let disk = RbdImage::new(pool.clone(), image.clone());
        let image_id = job.req.image_id;
        let fsid = job.step(Step::DiskSnapshot, || storage.fsid()).await?;
        let disk_parent = job.step(Step::DiskSnapshot, || storage.parent(&disk)).await?;
        let Some(image_pool) = image_pool(job, disk_parent.as_ref(), &fsid).await? else {
            return Ok(Direct::Unavailable("cannot tell which pool Glance stores images in".into()));
        };
        let copy = RbdImage::new(image_pool.clone(), image_id.to_string());
        let snap = disk_snapshot_name(image_id);
        job.rbd_disk = Some(disk.clone());
        // `on_base`: the copy is a clone of the Glance image the disk was cloned from, and
        // gets only what the instance wrote; a disk with no such parent is copied whole.
        let base = match job.settings.image_layout {
            ImageLayout::OnBase => disk_parent.filter(|parent| parent.image.pool == image_pool),
            ImageLayout::Flattened => None,
        };
        if job.settings.image_layout == ImageLayout::OnBase && base.is_none() {
            info!(instance = %job.req.instance.uuid, image = %image_id, %disk,
                  "the disk is not a clone of an image in Glance's pool: its image is flattened");
        }

        // An earlier try may have got as far as the clone, or past the flatten: an image of
        // that name is used, and ever removed, only once proven to be that copy (an image
        // named after this snapshot's new image id, cloned from what this try clones).
        let copy_exists = job.step(Step::Clone, || storage.exists(&copy)).await?;
        let needs_flatten = if copy_exists {
            let parent = job.step(Step::Clone, || storage.parent(&copy)).await?;
            let owner = job.step(Step::Clone, || storage.metadata(&copy, OWNER_METADATA_KEY)).await?;
            let ours = base.clone().unwrap_or(CloneParent { image: disk.clone(), snapshot: snap.clone() });
            if owner.as_deref() != Some(image_id.to_string().as_str()) && parent.as_ref() != Some(&ours) {
                return Err(job.fail_at(
                    Step::Clone,
                    Fault::NotOurs(format!(
                        "{copy} exists but is not novasnap's copy for this image \
                         ({OWNER_METADATA_KEY} {owner:?}, parent {parent:?}): it is left alone"
                    )),
                ));
            }
            job.rbd_copy = Some(copy.clone());
            // The point in time exists already: a guest an earlier try left suspended runs
            // again before the rest of the work.
            job.resume_if_suspended().await?;
            parent.is_some() && base.is_none()
        } else {
            job.disk_snapshot(storage, &disk, &snap, plan).await?;
            let (parent, parent_snap) = match &base {
                Some(base) => (&base.image, base.snapshot.as_str()),
                // Cloned from: protected, as librbd wants a clone's parent snapshot.
                None => {
                    job.step(Step::DiskSnapshot, || storage.protect_snapshot(&disk, &snap)).await?;
                    (&disk, snap.as_str())
                }
            };
            crash::point("after-disk-snapshot");
            match job.step(Step::Clone, || storage.clone_image(parent, parent_snap, &copy)).await {
                Ok(()) => {
                    job.rbd_copy = Some(copy.clone());
                    crash::point("after-clone");
                    base.is_none()
                }
                // librbd removes a clone it could not finish: there is no copy to remove.
                Err(e) if is_refused(&e.fault) => {
                    job.remove_rbd_artefacts(storage, &disk, None).await;
                    return Ok(Direct::Unavailable(format!("Ceph refused the clone into {image_pool}: {}", e.fault)));
                }
                Err(e) => return Err(e),
            }
        };
        let owner = image_id.to_string();
        job.step(Step::Clone, || storage.set_metadata(&copy, OWNER_METADATA_KEY, &owner)).await?;
        let fill = match (&base, needs_flatten) {
            (Some(_), _) => Fill::OwnExtents,
            // Only the first attempt on a clone this try made may trust its object map.
            (None, true) if copy_exists => Fill::Flatten(CloneState::MaybePartlyFlattened),
            (None, true) => Fill::Flatten(CloneState::Fresh),
            (None, false) => Fill::Nothing,
        };
        // The image's metadata goes to Glance while librbd fills the copy: neither waits for
        // the other, and the fill is the direct path's longest step.
        let (images, ctx) = (&job.b.images, &job.req.context);
        let (filled, updated) = tokio::join!(
            fill_copy(job, storage, fill, &disk, &snap, &copy),
            job.step(Step::UpdateMetadata, || images.update(ctx, image_id, metadata)),
        );
        filled?;
        updated?;
        // The disk snapshot is no longer the copy's parent; it is removed once the image is
        // active and announced (`Job::remove_disk_snapshot`), off the image's critical path.
        job.step(Step::ImageSnapshot, || storage.create_snapshot(&copy, IMAGE_SNAPSHOT)).await?;
        job.step(Step::ImageSnapshot, || storage.protect_snapshot(&copy, IMAGE_SNAPSHOT)).await?;
        // Glance owns the copy from here: reverting a failed location import, it removes the
        // copy, which a handle of ours still open would keep busy.
        job.step(Step::ImageSnapshot, || storage.release(&copy)).await?;
        crash::point("after-image-snapshot");

        let location = format!("rbd://{fsid}/{image_pool}/{image_id}/{IMAGE_SNAPSHOT}");
        let register = || async {
            // Glance reverts a failed location_import task by removing the location, and with
            // it the data: a retry after that finds no copy to register.
            if !storage.exists(&copy).await? {
                return Err(Fault::CopyLost(format!(
                    "{copy} was removed, as Glance does when its location import fails"
                )));
            }
            images.add_location(ctx, image_id, &location).await.map_err(Fault::from)
        };
        match job.step(Step::RegisterLocation, register).await {
            // The copy is the image's data now: Glance's, never novasnap's to remove.
            Ok(()) => job.rbd_copy = None,
            Err(SnapshotError { fault: Fault::Image(ImageError::LocationsRefused { reason, .. }), .. }) => {
                job.remove_rbd_artefacts(storage, &disk, Some(&copy)).await;
                return Ok(Direct::Unavailable(format!("Glance refuses image locations: {reason}")));
            }
            Err(SnapshotError { fault: Fault::CopyLost(reason), .. }) => {
                job.remove_rbd_artefacts(storage, &disk, Some(&copy)).await;
                return Ok(Direct::CopyLost(reason));
            }
            Err(e) => return Err(e),
        }
        info!(instance = %job.req.instance.uuid, image = %image_id, %location, "direct snapshot registered");
        Ok(Direct::Done)
    }
}

/// What the copy still needs before its `snap`.
enum Fill {
    /// `on_base`: the instance's own extents written onto the clone of its base image.
    OwnExtents,
    /// Nova's layout: the clone of the disk snapshot flattened.
    Flatten(CloneState),
    /// An earlier try got past it.
    Nothing,
}

async fn fill_copy(
    job: &Job<'_>,
    storage: &dyn BlockStorage,
    fill: Fill,
    disk: &RbdImage,
    snap: &str,
    copy: &RbdImage,
) -> Result<(), SnapshotError> {
    match fill {
        Fill::OwnExtents => {
            // Written again by a redelivery, whatever an earlier try wrote: the same bytes.
            let reporter = job.progress_reporter("copy");
            let progress = reporter.callback();
            let copied =
                job.step(Step::CopyOwnExtents, || storage.copy_own_extents(disk, snap, copy, progress.clone())).await;
            reporter.finish().await;
            let written = copied?;
            info!(instance = %job.req.instance.uuid, image = %job.req.image_id, written,
                  "the instance's own extents copied onto its base");
        }
        Fill::Flatten(first_state) => {
            let reporter = job.progress_reporter("flatten");
            let report = reporter.callback();
            let progress: crate::hypervisor::Progress = std::sync::Arc::new(move |percent| {
                if percent >= 50 {
                    crash::point("mid-flatten");
                }
                report(percent)
            });
            // A retry of the step may find the flatten begun.
            let mut clone = first_state;
            let flattened = job
                .step(Step::Flatten, || {
                    let state = std::mem::replace(&mut clone, CloneState::MaybePartlyFlattened);
                    storage.flatten(copy, state, progress.clone())
                })
                .await;
            reporter.finish().await;
            flattened?;
            crash::point("after-flatten");
        }
        Fill::Nothing => {}
    }
    Ok(())
}

/// Glance's pool: the pool the instance disk was cloned from, else the pool of the first
/// location of the base image that lives in this cluster.
async fn image_pool(
    job: &Job<'_>,
    disk_parent: Option<&CloneParent>,
    fsid: &str,
) -> Result<Option<String>, SnapshotError> {
    if let Some(parent) = disk_parent {
        return Ok(Some(parent.image.pool.clone()));
    }
    let Some(base) = job.req.instance.image_ref.as_deref().and_then(|r| Uuid::parse_str(r).ok()) else {
        return Ok(None);
    };
    let (images, ctx) = (&job.b.images, &job.req.context);
    let base_image = match images.get(ctx, base).await {
        Ok(image) => image,
        Err(e) => {
            warn!(base = %base, error = %e, "base image unreadable; cannot find Glance's pool");
            return Ok(None);
        }
    };
    Ok(base_image.locations.iter().find_map(|url| parse_rbd_url(url).filter(|l| l.0 == fsid).map(|l| l.1)))
}

/// Ceph said no for good (permissions, read-only pool): the standard path may still work.
fn is_refused(fault: &Fault) -> bool {
    matches!(fault, Fault::Storage(StorageError::Rbd { errno, .. }) if matches!(*errno, libc::EPERM | libc::EACCES | libc::EROFS | libc::EDQUOT))
}

impl Job<'_> {
    /// Removes the disk snapshot and, if given, the copy in Glance's pool that this request
    /// made (the copy first: a clone not yet flattened keeps its parent snapshot busy).
    /// Whether all was removed.
    pub(crate) async fn remove_rbd_artefacts(
        &self,
        storage: &dyn BlockStorage,
        disk: &RbdImage,
        copy: Option<&RbdImage>,
    ) -> bool {
        let copy_removed = match copy {
            Some(copy) => self.tidy("remove the partial copy in Glance's pool", copy, storage.remove_image(copy)).await,
            None => true,
        };
        let snap = disk_snapshot_name(self.req.image_id);
        copy_removed & self.tidy("remove the disk snapshot", disk, storage.remove_snapshot(disk, &snap)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_snapshot_names_are_derived_from_the_image() {
        let id = Uuid::parse_str("9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b").unwrap();
        assert_eq!(disk_snapshot_name(id), "novasnap-9e8f7a6b5c4d4e3f8a2b1c0d9e8f7a6b");
    }
}
