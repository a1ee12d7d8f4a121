//! What a snapshot request is, once decoded from the wire: the caller's context, the
//! instance as Nova sent it, and the image nova-api created for the result.
//!
//! [`crate::messaging`] produces these; [`crate::pipeline`] consumes them. Neither side
//! needs to know how the other works.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A Keystone token. Sent to Glance as `X-Auth-Token`; never logged, never published.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct AuthToken(String);

impl AuthToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(***)")
    }
}

/// The oslo.context `RequestContext` carried as `_context_*` keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub global_request_id: Option<String>,
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    pub user_name: Option<String>,
    pub project_name: Option<String>,
    pub roles: Vec<String>,
    pub is_admin: bool,
    pub auth_token: Option<AuthToken>,
    /// Every `_context_*` key as received (without the prefix) except the token, so
    /// notifications can echo the context back the way oslo does (redacted).
    pub redacted: BTreeMap<String, Value>,
}

/// The fields of Nova's `Instance` object that a snapshot needs. The full primitive is
/// kept so notification payloads can copy what the worker cannot know itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub uuid: Uuid,
    pub display_name: Option<String>,
    pub host: Option<String>,
    pub node: Option<String>,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    /// Glance id of the image the instance was booted from (empty for volume-backed).
    pub image_ref: Option<String>,
    pub vm_state: Option<String>,
    pub task_state: Option<String>,
    pub power_state: Option<i64>,
    pub kernel_id: Option<String>,
    pub ramdisk_id: Option<String>,
    pub os_type: Option<String>,
    pub architecture: Option<String>,
    pub system_metadata: BTreeMap<String, String>,
    /// `nova_object.version` as received: saves go back at the same version.
    pub object_version: String,
    /// `nova_object.data` as received.
    pub data: serde_json::Map<String, Value>,
}

/// What the caller wants done with the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum SnapshotKind {
    Snapshot,
    /// `backup_instance`: a snapshot, then keep only the newest `rotation` backups of
    /// this `backup_type`.
    Backup {
        backup_type: String,
        rotation: u32,
    },
}

impl SnapshotKind {
    /// The compute RPC method that asks for it.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot_instance",
            Self::Backup { .. } => "backup_instance",
        }
    }

    /// The task_states Nova's database may hold while this kind of task runs, from the one
    /// nova-api set on.
    pub fn task_states(&self) -> &'static [crate::messaging::TaskState] {
        use crate::messaging::TaskState::*;
        match self {
            Self::Snapshot => &[ImageSnapshotPending, ImageSnapshot, ImagePendingUpload, ImageUploading],
            Self::Backup { .. } => &[ImageBackup, ImagePendingUpload, ImageUploading],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRequest {
    pub context: RequestContext,
    pub instance: Instance,
    /// The image nova-api created (status `queued`) to receive the snapshot.
    pub image_id: Uuid,
    pub kind: SnapshotKind,
    /// oslo's `_unique_id`, used to recognise a cast delivered twice.
    pub unique_id: Option<String>,
}
