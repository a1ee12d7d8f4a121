//! The messaging boundary: oslo.messaging's rabbit driver, reimplemented.
//!
//! Layered as oslo is: transport (connection, failover, reconnect, confirmed publishes) →
//! topology (what is declared, as oslo declares it) → routing of each delivery of
//! `compute.<host>` ([`relay`]: served, forwarded to nova-compute, or dead-lettered) → the
//! work queue's consumer ([`consumer`]: dispatcher checks, ack when the outcome is durable)
//! → the [`SnapshotHandler`] the worker provides. Notifications go the other way through
//! [`Notifier`]; calls to Nova's services through [`rpc`].

mod compression;
pub mod consumer;
pub mod deadletter;
pub mod dispatcher;
pub mod envelope;
mod heartbeatless;
pub mod notifier;
pub mod payload;
pub mod relay;
pub mod rpc;
mod tls;
pub mod topology;
pub mod transport;

use async_trait::async_trait;

use crate::request::SnapshotRequest;

/// Nova's `task_states` that a snapshot moves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    ImageSnapshotPending,
    ImageSnapshot,
    ImageBackup,
    ImagePendingUpload,
    ImageUploading,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ImageSnapshotPending => "image_snapshot_pending",
            Self::ImageSnapshot => "image_snapshot",
            Self::ImageBackup => "image_backup",
            Self::ImagePendingUpload => "image_pending_upload",
            Self::ImageUploading => "image_uploading",
        }
    }
}

/// What the pipeline tells subscribers. The notifier turns each into Nova's versioned
/// and/or legacy notifications.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotEvent {
    /// `instance.snapshot.start` / `compute.instance.snapshot.start`
    Start,
    /// `instance.update` with the old and new task_state (None is Nova's `None`).
    TaskState { old: Option<TaskState>, new: Option<TaskState> },
    /// `instance.update` carrying `progress` 0–100 during a long step.
    Progress { task_state: TaskState, percent: u8 },
    /// `instance.snapshot.end` / `compute.instance.snapshot.end`, with how long the guest
    /// was held for the snapshot.
    End { held: GuestHeld },
    /// `instance.snapshot.error`-style error event with the fault.
    Error { exception: String, message: String },
}

/// How long a snapshot held its guest, in milliseconds: filesystems frozen through the
/// guest agent (freeze asked → thaw done, live snapshots), and in managed save (suspend
/// asked → resume done, cold snapshots).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestHeld {
    pub frozen_ms: u64,
    pub suspended_ms: u64,
}

#[async_trait]
pub trait Notifier: Send + Sync {
    /// Publishes the event (with publisher confirms). Errors are the caller's to log:
    /// a lost notification must not fail a snapshot.
    async fn notify(&self, request: &SnapshotRequest, event: SnapshotEvent) -> Result<(), MessagingError>;
}

/// How the worker's handling of a cast ended, which decides ack or requeue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Finished, or failed permanently and reported: acknowledge.
    Done,
    /// Not finished (shutting down mid-way): hand it back to the broker for another replica.
    Requeue,
}

#[async_trait]
pub trait SnapshotHandler: Send + Sync {
    async fn handle(&self, request: SnapshotRequest) -> Handled;
}

#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("AMQP: {0}")]
    Amqp(String),
    #[error("publish to {exchange} with key {routing_key} was not confirmed")]
    NotConfirmed { exchange: String, routing_key: String },
    #[error("publish to {exchange} with key {routing_key} not confirmed within {seconds}s (is the broker blocking publishers under an alarm?)")]
    ConfirmTimeout { exchange: String, routing_key: String, seconds: u64 },
    /// The host's nova-compute has no `compute-alt` RPC server (Nova older than 33), so
    /// novasnap cannot sit in front of it.
    #[error("{0}")]
    NoComputeAlt(String),
    /// The `[oslo_messaging_rabbit] ssl_*` settings cannot be used (a file unreadable, no
    /// certificate in it, a key that does not fit): no broker can be reached until they
    /// are fixed.
    #[error("TLS towards RabbitMQ: {0}")]
    Tls(String),
}

pub(crate) fn amqp(e: lapin::Error) -> MessagingError {
    MessagingError::Amqp(e.to_string())
}

impl crate::error::Classify for MessagingError {
    fn disposition(&self) -> crate::error::Disposition {
        match self {
            Self::NoComputeAlt(_) | Self::Tls(_) => crate::error::Disposition::Permanent,
            _ => crate::error::Disposition::Transient,
        }
    }
}
