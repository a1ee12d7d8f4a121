//! [`InstanceRecord`] through nova-conductor, as nova-compute reaches it: remotable methods of
//! Nova's objects as oslo RPC calls on topic `conductor`, version 3.0
//! (`nova/conductor/rpcapi.py` `ConductorAPI.object_action`,
//! `object_class_action_versions`). The messages are what the stack's own nova-compute sends
//! for a snapshot (`tests/fixtures/nova/snapshot_conductor_calls.json`): the instance
//! primitive as the cast carried it, with `nova_object.changes` naming only the field saved,
//! and the request context of the cast.

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use super::{Expected, InstanceRecord, NovaError};
use crate::hypervisor::PowerState;
use crate::messaging::rpc::{RpcClient, RpcError};
use crate::messaging::TaskState;
use crate::request::SnapshotRequest;

const TOPIC: &str = "conductor";
/// The conductor RPC API version nova-compute 34 calls with.
const VERSION: &str = "3.0";
/// `InstanceActionEvent`'s version in nova 34 (what `object_class_action_versions` sends).
const ACTION_EVENT_VERSION: &str = "1.4";
/// `InstanceFault`'s version in nova 34.
const FAULT_VERSION: &str = "1.2";

pub struct Conductor {
    rpc: RpcClient,
    /// `[DEFAULT] host`: the compute host the events and faults are recorded for.
    host: String,
}

impl Conductor {
    pub fn new(rpc: RpcClient, host: &str) -> Self {
        Self { rpc, host: host.to_string() }
    }

    async fn call(&self, req: &SnapshotRequest, method: &str, args: Value) -> Result<Value, NovaError> {
        match self.rpc.call(&context(req), TOPIC, method, args, VERSION).await {
            Ok(result) => Ok(result),
            Err(RpcError::Remote { class, message, .. }) => Err(nova_error(req, &class, message)),
            Err(e) => Err(NovaError::Conductor(e)),
        }
    }

    /// `Instance.save()` of one field, with `expected_task_state` when given.
    async fn save(
        &self,
        req: &SnapshotRequest,
        field: &str,
        value: Value,
        expected: &Expected,
    ) -> Result<(), NovaError> {
        let mut data = req.instance.data.clone();
        data.insert(field.into(), value);
        let objinst = primitive("Instance", &req.instance.object_version, Value::Object(data), Some(&[field]));
        let mut kwargs = Map::new();
        if let Expected::OneOf(states) = expected {
            let names: Vec<Value> = states.iter().map(|s| task_state(*s)).collect();
            // A single state goes as itself, as nova-compute sends it; several as a list.
            let value = if names.len() == 1 { names[0].clone() } else { Value::Array(names) };
            kwargs.insert("expected_task_state".into(), value);
        }
        let args = json!({"objinst": objinst, "objmethod": "save", "args": [], "kwargs": kwargs});
        self.call(req, "object_action", args).await.map(drop)
    }

    async fn action_event(
        &self,
        req: &SnapshotRequest,
        method: &str,
        args: Value,
        kwargs: Value,
    ) -> Result<(), NovaError> {
        let call = json!({
            "objname": "InstanceActionEvent", "objmethod": method,
            "object_versions": {"InstanceActionEvent": ACTION_EVENT_VERSION},
            "args": args, "kwargs": kwargs,
        });
        self.call(req, "object_class_action_versions", call).await.map(drop)
    }
}

/// A NovaObject primitive; `changes` are the fields the receiver is to save.
fn primitive(name: &str, version: &str, data: Value, changes: Option<&[&str]>) -> Value {
    let mut p = json!({
        "nova_object.name": name, "nova_object.namespace": "nova", "nova_object.version": version,
        "nova_object.data": data,
    });
    if let Some(changes) = changes {
        p["nova_object.changes"] = json!(changes);
    }
    p
}

fn task_state(state: Option<TaskState>) -> Value {
    state.map_or(Value::Null, |s| s.as_str().into())
}

/// The cast's request context, as the calls nova-compute makes for it carry it.
fn context(req: &SnapshotRequest) -> Map<String, Value> {
    let mut ctx: Map<String, Value> = req.context.redacted.clone().into_iter().collect();
    let token = req.context.auth_token.as_ref().map_or(Value::Null, |t| t.expose().into());
    ctx.insert("auth_token".into(), token);
    ctx
}

/// The Nova exceptions a save answers with, by class (`nova/exception.py`).
fn nova_error(req: &SnapshotRequest, class: &str, message: String) -> NovaError {
    let instance = req.instance.uuid;
    match class {
        "UnexpectedDeletingTaskStateError" => NovaError::Deleting(instance),
        "UnexpectedTaskStateError" => {
            // "Unexpected task state: expecting [...] but the actual state is X"
            let (expected, actual) = match message.split_once(" but the actual state is ") {
                Some((head, actual)) => {
                    (head.trim_start_matches("Unexpected task state: expecting ").to_string(), actual.to_string())
                }
                None => (String::new(), message.clone()),
            };
            NovaError::UnexpectedTaskState { instance, expected, actual }
        }
        "InstanceNotFound" => NovaError::InstanceNotFound(instance),
        _ => NovaError::Conductor(RpcError::Remote {
            method: "object_action".into(),
            class: class.into(),
            module: "nova.exception".into(),
            message,
        }),
    }
}

#[async_trait]
impl InstanceRecord for Conductor {
    async fn save_task_state(
        &self,
        req: &SnapshotRequest,
        new: Option<TaskState>,
        expected: Expected,
    ) -> Result<(), NovaError> {
        match self.save(req, "task_state", task_state(new), &expected).await {
            // A retry of a save whose reply was lost: what it was to do is done.
            Err(NovaError::UnexpectedTaskState { actual, .. }) if actual == new.map_or("None", TaskState::as_str) => {
                Ok(())
            }
            other => other,
        }
    }

    async fn save_power_state(&self, req: &SnapshotRequest, state: PowerState) -> Result<(), NovaError> {
        self.save(req, "power_state", json!(state as i64), &Expected::Nothing).await
    }

    async fn event_start(&self, req: &SnapshotRequest, event: &str) -> Result<(), NovaError> {
        let uuid = req.instance.uuid.to_string();
        self.action_event(req, "event_start", json!([uuid, event]), json!({"want_result": false, "host": self.host}))
            .await
    }

    async fn event_finish(
        &self,
        req: &SnapshotRequest,
        event: &str,
        failure: Option<(&str, &str)>,
    ) -> Result<(), NovaError> {
        let uuid = req.instance.uuid.to_string();
        let (exc_val, exc_tb) = failure.map_or((Value::Null, Value::Null), |(m, d)| (m.into(), d.into()));
        let kwargs = json!({"exc_val": exc_val, "exc_tb": exc_tb, "want_result": false});
        self.action_event(req, "event_finish_with_failure", json!([uuid, event]), kwargs).await
    }

    async fn add_fault(&self, req: &SnapshotRequest, message: &str, details: &str) -> Result<(), NovaError> {
        // `exception_to_dict` gives 500 to anything that is not a NovaException with a code.
        let data = json!({
            "instance_uuid": req.instance.uuid.to_string(), "host": self.host, "code": 500,
            "message": message, "details": details,
        });
        let changes = ["instance_uuid", "host", "code", "message", "details"];
        let objinst = primitive("InstanceFault", FAULT_VERSION, data, Some(&changes));
        let args = json!({"objinst": objinst, "objmethod": "create", "args": [], "kwargs": {}});
        self.call(req, "object_action", args).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::{dispatcher, envelope};

    fn fixture() -> Value {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nova/snapshot_conductor_calls.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn request_of(f: &Value) -> SnapshotRequest {
        let message = f["cast"]["message"].to_string();
        let body = json!({"oslo.version": "2.0", "oslo.message": message}).to_string();
        let decoded = envelope::decode(Some("application/json"), body.as_bytes(), 1 << 20).unwrap();
        dispatcher::dispatch(&decoded).unwrap()
    }

    #[test]
    fn a_save_is_the_primitive_nova_compute_sends() {
        let f = fixture();
        let req = request_of(&f);
        let theirs = &f["conductor_calls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["message"]["args"]["kwargs"]["expected_task_state"] == "image_snapshot_pending")
            .unwrap()["message"];
        let mut data = req.instance.data.clone();
        data.insert("task_state".into(), "image_snapshot".into());
        let ours = primitive("Instance", &req.instance.object_version, Value::Object(data), Some(&["task_state"]));
        let theirs_inst = &theirs["args"]["objinst"];
        for key in ["nova_object.name", "nova_object.namespace", "nova_object.version", "nova_object.changes"] {
            assert_eq!(ours[key], theirs_inst[key], "{key}");
        }
        assert_eq!(ours["nova_object.data"]["task_state"], theirs_inst["nova_object.data"]["task_state"]);
        assert_eq!(theirs["version"], VERSION);
        // The context is the cast's, key for key.
        let ctx = context(&req);
        for key in theirs.as_object().unwrap().keys().filter_map(|k| k.strip_prefix("_context_")) {
            assert!(ctx.contains_key(key), "context key {key}");
        }
    }

    #[test]
    fn action_events_name_the_versions_nova_compute_names() {
        let f = fixture();
        let start = f["conductor_calls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["message"]["args"]["objmethod"] == "event_start")
            .unwrap();
        assert_eq!(start["message"]["args"]["object_versions"], json!({"InstanceActionEvent": ACTION_EVENT_VERSION}));
        assert_eq!(start["message"]["args"]["args"][1], "compute_snapshot_instance");
    }

    #[test]
    fn nova_exceptions_map_to_errors() {
        let req = request_of(&fixture());
        let e = nova_error(
            &req,
            "UnexpectedTaskStateError",
            "Unexpected task state: expecting ['image_snapshot'] but the actual state is deleting".into(),
        );
        assert!(matches!(e, NovaError::UnexpectedTaskState { ref actual, .. } if actual == "deleting"), "{e}");
        assert!(matches!(nova_error(&req, "InstanceNotFound", "x".into()), NovaError::InstanceNotFound(_)));
        assert!(matches!(nova_error(&req, "UnexpectedDeletingTaskStateError", "x".into()), NovaError::Deleting(_)));
    }
}
