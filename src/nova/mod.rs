//! Nova's own record of the instance: its task_state and power_state in Nova's database, its
//! instance action events and faults, kept through nova-conductor exactly as nova-compute
//! keeps them (`nova/compute/manager.py` `_snapshot_instance`, `reverts_task_state`,
//! `wrap_instance_event`, `wrap_instance_fault`), so the API never sees a stuck instance.
//!
//! [`InstanceRecord`] is the contract; [`conductor`] implements it with oslo RPC calls.
//! [`Unrecorded`] keeps nothing, for a deployment without Nova's conductor
//! (`[novasnap] nova_writeback = false`).

pub mod conductor;

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::{Classify, Disposition};
use crate::hypervisor::PowerState;
use crate::messaging::rpc::RpcError;
use crate::messaging::TaskState;
use crate::request::SnapshotRequest;

/// `Instance.save(expected_task_state=...)`: what Nova's database must hold for the save to
/// happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// No expectation (`save()`), as a revert on failure saves.
    Nothing,
    /// One of these (None is Nova's `None`).
    OneOf(Vec<Option<TaskState>>),
}

impl Expected {
    pub fn exactly(state: Option<TaskState>) -> Self {
        Self::OneOf(vec![state])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    /// `UnexpectedTaskStateError`: someone else changed the task (the snapshot was preempted).
    #[error("Nova has instance {instance} in task_state {actual}, not {expected}: the task was preempted")]
    UnexpectedTaskState { instance: Uuid, expected: String, actual: String },
    /// `UnexpectedDeletingTaskStateError`: the instance is being deleted.
    #[error("instance {0} is being deleted")]
    Deleting(Uuid),
    /// `InstanceNotFound`.
    #[error("Nova has no instance {0}")]
    InstanceNotFound(Uuid),
    #[error("nova-conductor: {0}")]
    Conductor(#[from] RpcError),
}

impl Classify for NovaError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Conductor(e) => e.disposition(),
            _ => Disposition::Permanent,
        }
    }
}

#[async_trait]
pub trait InstanceRecord: Send + Sync {
    /// Saves `new` as the instance's task_state, if Nova has what `expected` says.
    async fn save_task_state(
        &self,
        req: &SnapshotRequest,
        new: Option<TaskState>,
        expected: Expected,
    ) -> Result<(), NovaError>;

    /// Saves the power state the hypervisor reports.
    async fn save_power_state(&self, req: &SnapshotRequest, state: PowerState) -> Result<(), NovaError>;

    /// `InstanceActionEvent.event_start` of `event` on the request's instance action.
    async fn event_start(&self, req: &SnapshotRequest, event: &str) -> Result<(), NovaError>;

    /// `InstanceActionEvent.event_finish_with_failure`: `failure` is the error's message and
    /// details, None for success.
    async fn event_finish(
        &self,
        req: &SnapshotRequest,
        event: &str,
        failure: Option<(&str, &str)>,
    ) -> Result<(), NovaError>;

    /// `InstanceFault.create`, as `add_instance_fault_from_exc` records a failure.
    async fn add_fault(&self, req: &SnapshotRequest, message: &str, details: &str) -> Result<(), NovaError>;
}

/// Keeps nothing: novasnap without Nova's conductor beside it.
pub struct Unrecorded;

#[async_trait]
impl InstanceRecord for Unrecorded {
    async fn save_task_state(&self, _: &SnapshotRequest, _: Option<TaskState>, _: Expected) -> Result<(), NovaError> {
        Ok(())
    }

    async fn save_power_state(&self, _: &SnapshotRequest, _: PowerState) -> Result<(), NovaError> {
        Ok(())
    }

    async fn event_start(&self, _: &SnapshotRequest, _: &str) -> Result<(), NovaError> {
        Ok(())
    }

    async fn event_finish(&self, _: &SnapshotRequest, _: &str, _: Option<(&str, &str)>) -> Result<(), NovaError> {
        Ok(())
    }

    async fn add_fault(&self, _: &SnapshotRequest, _: &str, _: &str) -> Result<(), NovaError> {
        Ok(())
    }
}
