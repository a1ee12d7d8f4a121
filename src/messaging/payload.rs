//! Notification payloads in Nova's shapes (nova 34): the versioned
//! `InstanceActionSnapshotPayload` 1.10 and `InstanceUpdatePayload` 2.1 primitives, and the
//! legacy `compute.instance.*` dicts. What the worker cannot know itself (flavor, IPs,
//! dates) is copied from the cast's instance primitive when present, else null.

use serde_json::{json, Map, Value};

use super::{SnapshotEvent, TaskState};
use crate::request::{SnapshotKind, SnapshotRequest};

/// One notification to publish: versioned or legacy, with its event type and priority.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub versioned: bool,
    /// Sent where nova-compute's own go (`[DEFAULT] control_exchange`) rather than on
    /// novasnap's notification exchange: what `wrap_exception` sends for a failed RPC method,
    /// which subscribers of Nova's notifications watch for.
    pub nova_exchange: bool,
    pub event_type: &'static str,
    pub priority: &'static str,
    pub payload: Value,
}

/// The instance as the cast carried it, a NovaObject primitive again.
fn instance_primitive(req: &SnapshotRequest) -> Value {
    primitive("Instance", &req.instance.object_version, Value::Object(req.instance.data.clone()))
}

fn primitive(name: &str, version: &str, data: Value) -> Value {
    json!({
        "nova_object.name": name,
        "nova_object.namespace": "nova",
        "nova_object.version": version,
        "nova_object.data": data,
    })
}

/// Nova's `power_state` names (`nova.compute.power_state.STATE_MAP`).
fn power_state_name(state: Option<i64>) -> Value {
    match state {
        Some(0) => "pending".into(),
        Some(1) => "running".into(),
        Some(3) => "paused".into(),
        Some(4) => "shutdown".into(),
        Some(6) => "crashed".into(),
        Some(7) => "suspended".into(),
        _ => Value::Null,
    }
}

fn task_state(state: Option<TaskState>) -> Value {
    state.map_or(Value::Null, |s| s.as_str().into())
}

/// `FlavorPayload` from the instance's `Flavor` primitive, if the cast carried one.
fn flavor_payload(data: &Map<String, Value>) -> Value {
    let Some(flavor) = data.get("flavor").and_then(|f| f.get("nova_object.data")) else { return Value::Null };
    let keys = [
        "flavorid",
        "memory_mb",
        "vcpus",
        "root_gb",
        "ephemeral_gb",
        "name",
        "swap",
        "rxtx_factor",
        "vcpu_weight",
        "disabled",
        "is_public",
        "extra_specs",
        "projects",
        "description",
    ];
    let data: Map<String, Value> =
        keys.iter().map(|k| (k.to_string(), flavor.get(*k).cloned().unwrap_or(Value::Null))).collect();
    primitive("FlavorPayload", "1.4", Value::Object(data))
}

/// The `InstancePayload` fields every versioned instance notification carries.
fn instance_fields(req: &SnapshotRequest, task: Option<TaskState>, progress: u8) -> Map<String, Value> {
    let i = &req.instance;
    let raw = |k: &str| i.data.get(k).cloned().unwrap_or(Value::Null);
    let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let mut m = Map::new();
    m.insert("uuid".into(), i.uuid.to_string().into());
    m.insert("user_id".into(), text(&i.user_id));
    m.insert("tenant_id".into(), text(&i.project_id));
    m.insert("reservation_id".into(), raw("reservation_id"));
    m.insert("display_name".into(), text(&i.display_name));
    m.insert("display_description".into(), raw("display_description"));
    m.insert("host_name".into(), raw("hostname"));
    m.insert("host".into(), text(&i.host));
    m.insert("node".into(), text(&i.node));
    m.insert("os_type".into(), text(&i.os_type));
    m.insert("architecture".into(), text(&i.architecture));
    m.insert("availability_zone".into(), raw("availability_zone"));
    m.insert("flavor".into(), flavor_payload(&i.data));
    m.insert("image_uuid".into(), text(&i.image_ref));
    m.insert("key_name".into(), raw("key_name"));
    m.insert("kernel_id".into(), i.kernel_id.clone().unwrap_or_default().into());
    m.insert("ramdisk_id".into(), i.ramdisk_id.clone().unwrap_or_default().into());
    for k in ["created_at", "launched_at", "terminated_at", "deleted_at", "updated_at"] {
        m.insert(k.into(), raw(k));
    }
    m.insert("state".into(), text(&i.vm_state));
    m.insert("power_state".into(), power_state_name(i.power_state));
    m.insert("task_state".into(), task_state(task));
    m.insert("progress".into(), progress.into());
    m.insert("ip_addresses".into(), json!([]));
    m.insert("block_devices".into(), Value::Null);
    m.insert("metadata".into(), i.data.get("metadata").cloned().unwrap_or_else(|| json!({})));
    m.insert("locked".into(), i.data.get("locked").cloned().unwrap_or(false.into()));
    m.insert(
        "auto_disk_config".into(),
        match i.data.get("auto_disk_config") {
            Some(Value::Bool(true)) => "AUTO".into(),
            _ => "MANUAL".into(),
        },
    );
    m.insert("request_id".into(), text(&req.context.request_id));
    m.insert("action_initiator_user".into(), text(&req.context.user_id));
    m.insert("action_initiator_project".into(), text(&req.context.project_id));
    m.insert("locked_reason".into(), raw("locked_reason"));
    m.insert("shares".into(), Value::Null);
    m
}

fn snapshot_payload(req: &SnapshotRequest, task: Option<TaskState>, fault: Value) -> Value {
    let mut data = instance_fields(req, task, 0);
    data.insert("fault".into(), fault);
    data.insert("snapshot_image_id".into(), req.image_id.to_string().into());
    primitive("InstanceActionSnapshotPayload", "1.10", Value::Object(data))
}

fn update_payload(req: &SnapshotRequest, old: Option<TaskState>, new: Option<TaskState>, progress: u8) -> Value {
    let mut data = instance_fields(req, new, progress);
    let state = req.instance.vm_state.clone().map_or(Value::Null, Value::String);
    data.insert(
        "state_update".into(),
        primitive(
            "InstanceStateUpdatePayload",
            "1.0",
            json!({"old_state": state, "state": state, "old_task_state": task_state(old), "new_task_state": task_state(new)}),
        ),
    );
    data.insert("audit_period".into(), Value::Null);
    data.insert("old_display_name".into(), Value::Null);
    data.insert(
        "tags".into(),
        req.instance.data.get("tags").filter(|t| t.is_array()).cloned().unwrap_or_else(|| json!([])),
    );
    // The image this update is about, so a subscriber can tell two snapshots apart.
    data.insert("snapshot_image_id".into(), req.image_id.to_string().into());
    primitive("InstanceUpdatePayload", "2.1", Value::Object(data))
}

/// The legacy `compute.instance.*` payload (`nova.notifications.info_from_instance`).
fn legacy_payload(req: &SnapshotRequest, task: Option<TaskState>, glance: &str) -> Value {
    let i = &req.instance;
    let raw = |k: &str| i.data.get(k).cloned().unwrap_or(Value::Null);
    let flavor = i.data.get("flavor").and_then(|f| f.get("nova_object.data"));
    let from_flavor = |k: &str| flavor.and_then(|f| f.get(k)).cloned().unwrap_or(Value::Null);
    json!({
        "tenant_id": i.project_id, "user_id": i.user_id, "instance_id": i.uuid.to_string(),
        "display_name": i.display_name, "reservation_id": raw("reservation_id"), "hostname": raw("hostname"),
        "instance_type": from_flavor("name"), "instance_type_id": from_flavor("id"),
        "instance_flavor_id": from_flavor("flavorid"), "architecture": i.architecture,
        "memory_mb": from_flavor("memory_mb"), "vcpus": from_flavor("vcpus"),
        "root_gb": from_flavor("root_gb"), "ephemeral_gb": from_flavor("ephemeral_gb"),
        "host": i.host, "node": i.node, "availability_zone": raw("availability_zone"), "cell_name": "",
        "created_at": raw("created_at"), "terminated_at": "", "deleted_at": "", "launched_at": raw("launched_at"),
        "image_ref_url": i.image_ref.as_deref().map(|r| format!("{}/images/{r}", glance.trim_end_matches('/'))),
        "os_type": i.os_type, "kernel_id": i.kernel_id.clone().unwrap_or_default(),
        "ramdisk_id": i.ramdisk_id.clone().unwrap_or_default(), "state": i.vm_state,
        "state_description": task.map(TaskState::as_str).unwrap_or(""), "progress": "",
        "access_ip_v4": raw("access_ip_v4"), "access_ip_v6": raw("access_ip_v6"),
        "image_meta": {"base_image_ref": i.image_ref},
        "metadata": i.data.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "snapshot_image_id": req.image_id.to_string(),
    })
}

/// What to publish for `event`; `glance` is the first Glance endpoint (for the legacy
/// `image_ref_url`).
pub fn notifications_for(req: &SnapshotRequest, event: &SnapshotEvent, glance: &str) -> Vec<Notification> {
    // At start the instance is in its first snapshot task_state, as Nova's manager has it.
    let task = Some(match req.kind {
        SnapshotKind::Snapshot => TaskState::ImageSnapshot,
        SnapshotKind::Backup { .. } => TaskState::ImageBackup,
    });
    let versioned = |event_type, priority, payload| Notification {
        versioned: true,
        nova_exchange: false,
        event_type,
        priority,
        payload,
    };
    let legacy = |event_type, priority, payload| Notification {
        versioned: false,
        nova_exchange: false,
        event_type,
        priority,
        payload,
    };
    match event {
        SnapshotEvent::Start => vec![
            legacy("compute.instance.snapshot.start", "INFO", legacy_payload(req, task, glance)),
            versioned("instance.snapshot.start", "INFO", snapshot_payload(req, task, Value::Null)),
        ],
        SnapshotEvent::End { held } => vec![
            legacy("compute.instance.snapshot.end", "INFO", {
                // novasnap's own figures, where Nova's legacy dict has room for more keys (the
                // versioned payload keeps Nova's schema exactly).
                let mut payload = legacy_payload(req, None, glance);
                payload["frozen_ms"] = held.frozen_ms.into();
                payload["suspended_ms"] = held.suspended_ms.into();
                payload
            }),
            versioned("instance.snapshot.end", "INFO", snapshot_payload(req, None, Value::Null)),
        ],
        SnapshotEvent::TaskState { old, new } => {
            vec![versioned("instance.update", "INFO", update_payload(req, *old, *new, 0))]
        }
        SnapshotEvent::Progress { task_state, percent } => {
            vec![versioned(
                "instance.update",
                "INFO",
                update_payload(req, Some(*task_state), Some(*task_state), *percent),
            )]
        }
        SnapshotEvent::Error { exception, message } => {
            let fault = primitive(
                "ExceptionPayload",
                "1.1",
                json!({"module_name": "novasnap.pipeline", "function_name": "snapshot", "exception": exception,
                       "exception_message": message, "traceback": ""}),
            );
            let mut legacy_error = legacy_payload(req, None, glance);
            legacy_error["exception"] = exception.clone().into();
            legacy_error["message"] = message.clone().into();
            // `nova/exception_wrapper.py` `wrap_exception`: the legacy event named after the
            // RPC method with its arguments, and the versioned `compute.exception`.
            let method = req.kind.method();
            let mut args = json!({"image_id": req.image_id.to_string(), "instance": instance_primitive(req)});
            if let SnapshotKind::Backup { backup_type, rotation } = &req.kind {
                args["backup_type"] = backup_type.clone().into();
                args["rotation"] = (*rotation).into();
            }
            let exception_payload = primitive(
                "ExceptionPayload",
                "1.1",
                json!({"module_name": "novasnap.pipeline", "function_name": method, "exception": exception,
                       "exception_message": message, "traceback": ""}),
            );
            vec![
                legacy("compute.instance.snapshot.error", "ERROR", legacy_error),
                versioned("instance.snapshot.error", "ERROR", snapshot_payload(req, None, fault)),
                Notification {
                    nova_exchange: true,
                    ..legacy(method, "ERROR", json!({"exception": message, "args": args}))
                },
                Notification { nova_exchange: true, ..versioned("compute.exception", "ERROR", exception_payload) },
            ]
        }
    }
}
