//! The pipeline's one error type: which step failed, on which instance and image, and
//! the boundary fault underneath (whose classification decides retry or give up).

use uuid::Uuid;

use crate::error::{Classify, Disposition};
use crate::hypervisor::HypervisorError;
use crate::image::ImageError;
use crate::nova::NovaError;
use crate::storage::StorageError;

/// The steps of a snapshot, named as operators read them in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    FindGuest,
    GetImage,
    AbortBlockJob,
    Suspend,
    DiskSnapshot,
    Clone,
    Flatten,
    RemoveDiskSnapshot,
    ImageSnapshot,
    RegisterLocation,
    Extract,
    Upload,
    UpdateMetadata,
    Resume,
    RotateBackups,
    UpdateInstance,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::FindGuest => "find guest",
            Self::GetImage => "get image",
            Self::AbortBlockJob => "abort stale block job",
            Self::Suspend => "suspend guest",
            Self::DiskSnapshot => "snapshot disk",
            Self::Clone => "clone into image pool",
            Self::Flatten => "flatten clone",
            Self::RemoveDiskSnapshot => "remove disk snapshot",
            Self::ImageSnapshot => "snapshot image",
            Self::RegisterLocation => "register location",
            Self::Extract => "extract disk",
            Self::Upload => "upload image",
            Self::UpdateMetadata => "update image metadata",
            Self::Resume => "resume guest",
            Self::RotateBackups => "rotate backups",
            Self::UpdateInstance => "update the instance in Nova",
        };
        f.write_str(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Nova(#[from] NovaError),
    #[error("{0}")]
    Unsupported(String),
    /// The direct path's copy in Glance's pool vanished before it was registered.
    #[error("{0}")]
    CopyLost(String),
}

impl Classify for Fault {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Hypervisor(e) => e.disposition(),
            Self::Storage(e) => e.disposition(),
            Self::Image(e) => e.disposition(),
            Self::Nova(e) => e.disposition(),
            Self::Unsupported(_) | Self::CopyLost(_) => Disposition::Permanent,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot of instance {instance} into image {image} failed at step '{step}': {fault}")]
pub struct SnapshotError {
    pub step: Step,
    pub instance: Uuid,
    pub image: Uuid,
    #[source]
    pub fault: Fault,
}

impl SnapshotError {
    /// Nova-style exception name for the error notification's fault.
    pub fn exception_name(&self) -> &'static str {
        match &self.fault {
            Fault::Hypervisor(HypervisorError::GuestNotFound(_)) => "InstanceNotFound",
            Fault::Image(ImageError::NotFound(_)) => "ImageNotFound",
            Fault::Nova(NovaError::InstanceNotFound(_)) => "InstanceNotFound",
            Fault::Nova(NovaError::Deleting(_)) => "UnexpectedDeletingTaskStateError",
            Fault::Nova(NovaError::UnexpectedTaskState { .. }) => "UnexpectedTaskStateError",
            Fault::Nova(NovaError::Conductor(_)) => "MessagingTimeout",
            Fault::Hypervisor(_) => "HypervisorError",
            Fault::Storage(_) | Fault::CopyLost(_) => "StorageError",
            Fault::Image(_) => "ImageError",
            Fault::Unsupported(_) => "ImageUnacceptable",
        }
    }

    /// The instance or the image vanished under us: the request ends quietly, as Nova ends
    /// it (no error state), after cleanup.
    pub fn is_vanished(&self) -> bool {
        matches!(
            self.fault,
            Fault::Hypervisor(HypervisorError::GuestNotFound(_))
                | Fault::Image(ImageError::NotFound(_))
                | Fault::Nova(NovaError::InstanceNotFound(_) | NovaError::Deleting(_))
        )
    }
}

impl Classify for SnapshotError {
    fn disposition(&self) -> Disposition {
        self.fault.disposition()
    }
}
