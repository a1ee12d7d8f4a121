//! `backup_instance`'s rotation: keep the newest `rotation` backups of this instance and
//! backup type, delete the rest (Nova's `_rotate_backups`).

use tracing::info;

use super::{Job, SnapshotError, Step};

pub(crate) async fn rotate(job: &Job<'_>, backup_type: &str, rotation: u32) -> Result<(), SnapshotError> {
    let (images, ctx) = (&job.b.images, &job.req.context);
    let instance = job.req.instance.uuid.to_string();
    let filters = [("instance_uuid", instance.as_str()), ("image_type", "backup"), ("backup_type", backup_type)];
    let backups = job.step(Step::RotateBackups, || images.list(ctx, &filters)).await?;
    for old in backups.iter().skip(rotation as usize) {
        info!(instance = %instance, image = %old.id, backup_type, rotation, "deleting rotated-out backup");
        job.step(Step::RotateBackups, || images.delete(ctx, old.id)).await?;
    }
    Ok(())
}
