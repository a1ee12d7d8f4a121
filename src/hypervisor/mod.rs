//! The hypervisor boundary: what the snapshot pipeline asks of libvirt.
//!
//! [`Hypervisor`] is the contract; `libvirt.rs` implements it over the `virt` crate, running
//! every libvirt call on the blocking thread pool.

pub mod libvirt;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::{Classify, Disposition};

/// Nova's power states (`nova.compute.power_state`), as libvirt reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    NoState = 0,
    Running = 1,
    Paused = 3,
    Shutdown = 4,
    Crashed = 6,
    Suspended = 7,
}

/// Where a guest's root disk lives, read from the domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `<source protocol='rbd' name='pool/image'/>`
    Rbd { pool: String, image: String },
    /// `<source file=…/>`
    File(PathBuf),
    /// `<source dev=…/>`: an LVM volume or other block device.
    Block(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    pub source: DiskSource,
    /// `<driver type=…/>`: `raw`, `qcow2`, …
    pub format: String,
    /// `<target dev=…/>`, e.g. `vda`: how libvirt names the disk in block-job calls.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub uuid: Uuid,
    pub domain_name: String,
    pub power_state: PowerState,
    pub root_disk: RootDisk,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("no guest with uuid {0}")]
    GuestNotFound(Uuid),
    #[error("guest {uuid} has no root disk novasnap can snapshot: {reason}")]
    NoRootDisk { uuid: Uuid, reason: String },
    #[error("libvirt {operation} on {uuid}: {message} (code {code})")]
    Libvirt { operation: &'static str, uuid: Uuid, code: i32, message: String },
    #[error("libvirt connection: {0}")]
    Connection(String),
    #[error("block job on {uuid} {disk} did not finish within {seconds}s")]
    BlockJobTimeout { uuid: Uuid, disk: String, seconds: u64 },
    /// The domain has no guest agent channel (libvirt's VIR_ERR_ARGUMENT_UNSUPPORTED, "QEMU
    /// guest agent is not configured"): nothing in the guest can have been frozen.
    #[error("libvirt {operation} on {uuid}: the QEMU guest agent is not configured: {message}")]
    AgentNotConfigured { operation: &'static str, uuid: Uuid, message: String },
    /// The domain has an agent channel but no agent on its guest end (libvirt's
    /// VIR_ERR_AGENT_UNRESPONSIVE, "QEMU guest agent is not connected"): libvirt refused the
    /// command without sending it, so it froze nothing. The agent may be starting, or stopped.
    #[error("libvirt {operation} on {uuid}: the QEMU guest agent is not connected: {message}")]
    AgentNotConnected { operation: &'static str, uuid: Uuid, message: String },
    /// The guest agent did not answer (unsynced, timed out) or answered with an error (the
    /// guest could not freeze a filesystem).
    #[error("libvirt {operation} on {uuid}: the QEMU guest agent failed: {message} (code {code})")]
    Agent { operation: &'static str, uuid: Uuid, code: i32, message: String },
}

impl Classify for HypervisorError {
    fn disposition(&self) -> Disposition {
        match self {
            // VIR_ERR_OPERATION_TIMEOUT (68), VIR_ERR_AGENT_UNRESPONSIVE (86),
            // VIR_ERR_OPERATION_INVALID (55) is "domain is locked"/job in progress, and
            // VIR_ERR_SYSTEM_ERROR (38) / VIR_ERR_RPC (39) / VIR_ERR_NO_CONNECT (1) are a
            // libvirtd that restarts: all clear by themselves.
            Self::Libvirt { code, message, .. } => {
                if matches!(code, 1 | 38 | 39 | 68 | 86)
                    || message.contains("is locked")
                    || message.contains("cannot acquire state change lock")
                {
                    Disposition::Transient
                } else {
                    Disposition::Permanent
                }
            }
            // VIR_ERR_AGENT_UNRESPONSIVE (86), VIR_ERR_AGENT_UNSYNCED (97) and
            // VIR_ERR_AGENT_COMMAND_TIMEOUT (112): an agent still starting, or busy. An error
            // the agent answered (VIR_ERR_AGENT_COMMAND_FAILED, 113) is the guest's answer.
            Self::Agent { code: 86 | 97 | 112, .. } | Self::AgentNotConnected { .. } => Disposition::Transient,
            Self::Connection(_) | Self::BlockJobTimeout { .. } => Disposition::Transient,
            Self::GuestNotFound(_) | Self::NoRootDisk { .. } | Self::AgentNotConfigured { .. } | Self::Agent { .. } => {
                Disposition::Permanent
            }
        }
    }
}

/// Progress of a long operation, 0–100.
pub type Progress = std::sync::Arc<dyn Fn(u8) + Send + Sync>;

#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// The guest and its root disk (the disk whose target is `root_device`, e.g. `/dev/vda`,
    /// when given), or `GuestNotFound`.
    async fn find_guest(&self, uuid: Uuid, root_device: Option<&str>) -> Result<Guest, HypervisorError>;

    async fn power_state(&self, uuid: Uuid) -> Result<PowerState, HypervisorError>;

    /// Aborts any block job on `disk`. Succeeds when there is none (a guest that is not
    /// running has none), so it is safe to call before every live block operation and on
    /// every retry.
    async fn abort_block_job(&self, uuid: Uuid, disk: &str) -> Result<(), HypervisorError>;

    /// Saves the guest's memory and stops it (libvirt managed save), for cold snapshots.
    /// Succeeds if the guest is already saved or shut off.
    async fn suspend(&self, uuid: Uuid) -> Result<(), HypervisorError>;

    /// Starts the guest again from its managed save, paused if `paused`.
    /// Succeeds if the guest is already running (or paused, when `paused`).
    async fn resume(&self, uuid: Uuid, paused: bool) -> Result<(), HypervisorError>;

    /// Copies the live disk `disk` into `dest`, an existing qcow2 delta over the same
    /// backing file that the caller created (a shallow block copy that reuses `dest`), and
    /// returns once it is in sync, the job still mirroring every write into `dest`. The
    /// caller ends it with [`abort_block_job`](Self::abort_block_job), which leaves `dest`
    /// holding the disk as it was at that moment (the copy's point in time) and the guest on
    /// its original disk.
    async fn live_copy(&self, uuid: Uuid, disk: &str, dest: &Path, progress: Progress) -> Result<(), HypervisorError>;

    /// Freezes the guest's filesystems through its QEMU guest agent, so that a disk snapshot
    /// taken now is consistent for the guest's filesystems. How many were frozen. The guest
    /// stays frozen until [`thaw_filesystems`](Self::thaw_filesystems).
    async fn freeze_filesystems(&self, uuid: Uuid) -> Result<u32, HypervisorError>;

    /// Thaws the guest's filesystems. Succeeds for a guest that is not frozen (the agent
    /// thaws nothing) and for one that is not running (nothing can be frozen), so it is safe
    /// to call before any freeze and on every retry.
    async fn thaw_filesystems(&self, uuid: Uuid) -> Result<(), HypervisorError>;
}
