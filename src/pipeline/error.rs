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
    Quiesce,
    Thaw,
    DiskSnapshot,
    Clone,
    Flatten,
    CopyOwnExtents,
    RemoveDiskSnapshot,
    ImageSnapshot,
    RegisterLocation,
    Extract,
    Upload,
    UpdateMetadata,
    Resume,
    RotateBackups,
    NoteWork,
    UpdateInstance,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::FindGuest => "find guest",
            Self::GetImage => "get image",
            Self::AbortBlockJob => "abort stale block job",
            Self::Suspend => "suspend guest",
            Self::Quiesce => "quiesce guest",
            Self::Thaw => "thaw guest filesystems",
            Self::DiskSnapshot => "snapshot disk",
            Self::Clone => "clone into image pool",
            Self::Flatten => "flatten clone",
            Self::CopyOwnExtents => "copy the instance's own extents",
            Self::RemoveDiskSnapshot => "remove disk snapshot",
            Self::ImageSnapshot => "snapshot image",
            Self::RegisterLocation => "register location",
            Self::Extract => "extract disk",
            Self::Upload => "upload image",
            Self::UpdateMetadata => "update image metadata",
            Self::Resume => "resume guest",
            Self::RotateBackups => "rotate backups",
            Self::NoteWork => "note the work for reclamation",
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
    /// `<pool>/<image id>` exists, and nothing proves it the copy novasnap made for the image.
    #[error("{0}")]
    NotOurs(String),
    /// libvirt here does not know the guest, and Nova places the instance on another host:
    /// not proof that the instance is gone.
    #[error("{0}")]
    NotOnThisHost(String),
    #[error("the snapshot did not end within its deadline ({0:?}, [novasnap] snapshot_timeout)")]
    DeadlineExceeded(std::time::Duration),
    /// The image requires quiescing (`os_require_quiesce`) and the guest could not be
    /// quiesced: Nova's `InstanceQuiesceFailed`, with its message.
    #[error("Failed to quiesce instance: {0}")]
    QuiesceFailed(String),
    /// The image requires quiescing and does not say its guest runs the agent
    /// (`hw_qemu_guest_agent`): Nova's `QemuGuestAgentNotEnabled`, with its message.
    #[error("QEMU guest agent is not enabled")]
    AgentNotEnabled,
}

impl Classify for Fault {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Hypervisor(e) => e.disposition(),
            Self::Storage(e) => e.disposition(),
            Self::Image(e) => e.disposition(),
            Self::Nova(e) => e.disposition(),
            Self::Unsupported(_)
            | Self::CopyLost(_)
            | Self::NotOurs(_)
            | Self::NotOnThisHost(_)
            | Self::DeadlineExceeded(_)
            | Self::QuiesceFailed(_)
            | Self::AgentNotEnabled => Disposition::Permanent,
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
            Fault::Hypervisor(HypervisorError::GuestNotFound(_)) | Fault::NotOnThisHost(_) => "InstanceNotFound",
            Fault::Image(ImageError::NotFound(_)) => "ImageNotFound",
            Fault::Nova(NovaError::InstanceNotFound(_)) => "InstanceNotFound",
            Fault::Nova(NovaError::Deleting(_)) => "UnexpectedDeletingTaskStateError",
            Fault::Nova(NovaError::UnexpectedTaskState { .. }) => "UnexpectedTaskStateError",
            Fault::Nova(NovaError::Conductor(_)) => "MessagingTimeout",
            Fault::Hypervisor(_) => "HypervisorError",
            Fault::Storage(_) | Fault::CopyLost(_) | Fault::NotOurs(_) => "StorageError",
            Fault::DeadlineExceeded(_) => "SnapshotTimeout",
            Fault::QuiesceFailed(_) => "InstanceQuiesceFailed",
            Fault::AgentNotEnabled => "QemuGuestAgentNotEnabled",
            Fault::Image(_) => "ImageError",
            Fault::Unsupported(_) => "ImageUnacceptable",
        }
    }

    /// The instance lease was lost: another replica may be at work on the instance.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self.fault, Fault::Storage(StorageError::LeaseLost(_)))
    }

    /// The image vanished under us (deleted meanwhile), or Nova says the instance is gone or
    /// being deleted: the request ends quietly, as Nova ends it ("Instance disappeared
    /// during snapshot"), after cleanup. A guest libvirt does not know is reported: an
    /// operator must hear of a snapshot that could not be taken.
    pub fn is_vanished(&self) -> bool {
        matches!(
            self.fault,
            Fault::Image(ImageError::NotFound(_))
                | Fault::Nova(NovaError::InstanceNotFound(_) | NovaError::Deleting(_))
        )
    }

    /// The task is no longer this request's to revert: preempted by another, or the instance
    /// is gone (`reverts_task_state` leaves an `UnexpectedTaskStateError` alone).
    pub fn task_preempted(&self) -> bool {
        matches!(
            self.fault,
            Fault::Nova(
                NovaError::UnexpectedTaskState { .. } | NovaError::Deleting(_) | NovaError::InstanceNotFound(_)
            )
        )
    }

    /// Nothing proves that the image's instance is gone: the image is left for it.
    pub fn keeps_image(&self) -> bool {
        matches!(self.fault, Fault::NotOnThisHost(_))
    }
}

/// A request that failed: the error, and whether its failure is settled.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    #[source]
    pub error: SnapshotError,
    /// What the cleanup could not put right and only another delivery of the cast can (a
    /// guest still in managed save, an image whose state Glance could not tell): the cast
    /// must go back to the broker. None once the failure is cleaned up and reported.
    pub unsettled: Option<String>,
}

impl Classify for SnapshotError {
    fn disposition(&self) -> Disposition {
        self.fault.disposition()
    }
}
