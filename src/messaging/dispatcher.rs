//! The dispatcher layer: an oslo message → a [`SnapshotRequest`], with oslo's checks
//! (`rpc/dispatcher.py`): the method must be one novasnap serves, the namespace none, and
//! the requested version compatible with the one it implements (same major, minor not
//! above ours; a missing version means 1.0). The `_context_*` keys become the request
//! context; the `instance` NovaObject primitive is decoded for the fields the pipeline
//! needs and kept whole for notifications.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::envelope::Rejection;
use crate::request::{AuthToken, Instance, RequestContext, SnapshotKind, SnapshotRequest};

/// The compute RPC API versions nova 34's compute service answers on: `ComputeManager`
/// (6.5) and its `_ComputeV5Proxy` endpoint (5.13), which takes casts from a nova-api pinned
/// to 5.x. Casts are checked against them as oslo's dispatcher would.
pub const SUPPORTED_VERSIONS: &[&str] = &["6.5", "5.13"];

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn version_is_compatible(requested: &str) -> bool {
    let Some((major, minor)) = parse_version(requested) else { return false };
    SUPPORTED_VERSIONS
        .iter()
        .filter_map(|v| parse_version(v))
        .any(|(our_major, our_minor)| major == our_major && minor <= our_minor)
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(String::from)
}

/// `_context_*` keys → the request context. Both oslo.context's names (`user`, `project`)
/// and Nova's (`user_id`, `project_id`) are understood.
fn context(message: &Map<String, Value>) -> Result<RequestContext, Rejection> {
    let mut ctx = RequestContext::default();
    for (key, value) in message {
        let Some(name) = key.strip_prefix("_context_") else { continue };
        if name == "auth_token" {
            ctx.auth_token = match value {
                Value::String(t) if !t.is_empty() => Some(AuthToken::new(t.clone())),
                Value::Null | Value::String(_) => None,
                _ => return Err(Rejection::BadContext("auth_token is not a string".into())),
            };
            continue;
        }
        ctx.redacted.insert(name.to_string(), value.clone());
    }
    let get = |k: &str| text(ctx.redacted.get(k));
    ctx.request_id = get("request_id");
    ctx.global_request_id = get("global_request_id");
    ctx.user_id = get("user_id").or_else(|| get("user"));
    ctx.project_id = get("project_id").or_else(|| get("project")).or_else(|| get("tenant"));
    ctx.user_name = get("user_name");
    ctx.project_name = get("project_name");
    ctx.is_admin = ctx.redacted.get("is_admin").and_then(Value::as_bool).unwrap_or(false);
    ctx.roles = match ctx.redacted.get("roles") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(roles)) => roles
            .iter()
            .map(|r| r.as_str().map(String::from).ok_or_else(|| Rejection::BadContext("roles must be strings".into())))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Rejection::BadContext("roles is not a list".into())),
    };
    Ok(ctx)
}

fn bad(name: &'static str, reason: impl Into<String>) -> Rejection {
    Rejection::BadArgument { name, reason: reason.into() }
}

fn uuid_arg(name: &'static str, v: Option<&Value>) -> Result<Uuid, Rejection> {
    let s = v.and_then(Value::as_str).ok_or_else(|| bad(name, "missing or not a string"))?;
    // Only the canonical hyphenated form: ids end up in RBD names, paths and URLs.
    if s.len() != 36 {
        return Err(bad(name, format!("{s:?} is not a UUID")));
    }
    Uuid::parse_str(s).map_err(|_| bad(name, format!("{s:?} is not a UUID")))
}

/// The `Instance` NovaObject primitive → [`Instance`].
fn instance(v: Option<&Value>) -> Result<Instance, Rejection> {
    let primitive = v.and_then(Value::as_object).ok_or_else(|| bad("instance", "missing or not an object"))?;
    match primitive.get("nova_object.name").and_then(Value::as_str) {
        Some("Instance") => {}
        other => return Err(bad("instance", format!("not an Instance primitive (nova_object.name {other:?})"))),
    }
    let data = primitive
        .get("nova_object.data")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("instance", "no nova_object.data"))?;
    let field = |k: &str| text(data.get(k));
    let system_metadata = match data.get("system_metadata") {
        Some(Value::Object(m)) => {
            m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect()
        }
        _ => BTreeMap::new(),
    };
    Ok(Instance {
        uuid: uuid_arg("instance.uuid", data.get("uuid"))?,
        display_name: field("display_name"),
        host: field("host"),
        node: field("node"),
        project_id: field("project_id"),
        user_id: field("user_id"),
        image_ref: field("image_ref"),
        vm_state: field("vm_state"),
        task_state: field("task_state"),
        power_state: data.get("power_state").and_then(Value::as_i64),
        kernel_id: field("kernel_id"),
        ramdisk_id: field("ramdisk_id"),
        os_type: field("os_type"),
        architecture: field("architecture"),
        system_metadata,
        object_version: text(primitive.get("nova_object.version")).unwrap_or_else(|| "2.8".into()),
        data: data.clone(),
    })
}

/// What the front consumer of `compute.<host>` does with one message.
#[derive(Debug)]
pub enum Route {
    /// A snapshot or backup cast novasnap takes.
    Serve(Box<SnapshotRequest>),
    /// Anything nova-compute may serve (another method, an RPC call, a version novasnap
    /// does not speak): forwarded to it unchanged.
    Forward,
    /// A snapshot or backup cast that cannot be carried out as sent: dead-lettered.
    Refuse(Rejection),
}

/// Decides who serves `message`. A call (it carries `_msg_id`) always goes to nova-compute:
/// only it answers calls.
pub fn route(message: &Map<String, Value>) -> Route {
    let ours = matches!(message.get("method").and_then(Value::as_str), Some("snapshot_instance" | "backup_instance"));
    let version = text(message.get("version")).unwrap_or_else(|| "1.0".into());
    if !ours || message.contains_key("_msg_id") || message.contains_key("namespace") || !version_is_compatible(&version)
    {
        return Route::Forward;
    }
    match dispatch(message) {
        Ok(request) => Route::Serve(Box::new(request)),
        Err(rejection) => Route::Refuse(rejection),
    }
}

/// Checks and decodes one cast.
pub fn dispatch(message: &Map<String, Value>) -> Result<SnapshotRequest, Rejection> {
    let method = message.get("method").and_then(Value::as_str).ok_or_else(|| Rejection::NoSuchMethod(String::new()))?;
    if !matches!(method, "snapshot_instance" | "backup_instance") {
        return Err(Rejection::NoSuchMethod(method.to_string()));
    }
    let namespace = text(message.get("namespace"));
    let version = text(message.get("version")).unwrap_or_else(|| "1.0".into());
    if namespace.is_some() || !version_is_compatible(&version) {
        return Err(Rejection::UnsupportedVersion {
            requested: version,
            namespace,
            supported: SUPPORTED_VERSIONS.join(", "),
        });
    }
    let args = message.get("args").and_then(Value::as_object).ok_or_else(|| bad("args", "missing or not an object"))?;
    let kind = if method == "backup_instance" {
        let backup_type = args
            .get("backup_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("backup_type", "missing or not a string"))?;
        if backup_type.is_empty() || backup_type.len() > 255 || backup_type.chars().any(char::is_control) {
            return Err(bad("backup_type", "must be 1–255 printable characters"));
        }
        let rotation = args
            .get("rotation")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("rotation", "missing or not a non-negative integer"))?;
        let rotation = u32::try_from(rotation).map_err(|_| bad("rotation", "too large"))?;
        SnapshotKind::Backup { backup_type: backup_type.to_string(), rotation }
    } else {
        SnapshotKind::Snapshot
    };
    let unique_id = match message.get("_unique_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return Err(bad("_unique_id", "not a string")),
    };
    Ok(SnapshotRequest {
        context: context(message)?,
        instance: instance(args.get("instance"))?,
        image_id: uuid_arg("image_id", args.get("image_id"))?,
        kind,
        unique_id,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::messaging::envelope::decode;
    use serde_json::json;

    /// The captured casts in `../shared/fixtures/oslo/messages`.
    pub(crate) fn fixture(name: &str) -> Value {
        let manifest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir =
            [manifest.join("../shared/fixtures/oslo/messages"), manifest.join("../../shared/fixtures/oslo/messages")]
                .into_iter()
                .find(|d| d.is_dir())
                .expect("../shared/fixtures/oslo beside the checkout");
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    }

    fn decode_fixture(name: &str) -> Map<String, Value> {
        let f = fixture(name);
        let body = f["body_raw_utf8"].as_str().unwrap();
        decode(f["properties"]["content_type"].as_str(), body.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn nova_snapshot_casts_decode_into_requests() {
        for name in ["rpc_cast.snapshot_instance.nova_minimal.json", "rpc_cast.snapshot_instance.nova_rich.json"] {
            let req = dispatch(&decode_fixture(name)).unwrap();
            assert_eq!(req.instance.uuid.to_string(), "5f5cd4b0-4b4d-4d3c-9a36-0c4c7b1a9e01", "{name}");
            assert_eq!(req.image_id.to_string(), "9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b");
            assert_eq!(req.kind, SnapshotKind::Snapshot);
            assert_eq!(req.context.request_id.as_deref(), Some("req-0b7e2c9a-3f1d-4c5e-8a6b-9d0e1f2a3b4c"));
            assert_eq!(req.context.global_request_id.as_deref(), Some("req-a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"));
            assert_eq!(req.context.user_id.as_deref(), Some("8c1f2e3d4b5a69788796a5b4c3d2e1f0"));
            assert_eq!(req.context.roles, vec!["member", "reader"]);
            assert!(req.context.auth_token.is_some());
            assert!(!req.context.redacted.contains_key("auth_token"), "the token is kept apart");
            assert!(!format!("{req:?}").contains("fixtureToken"), "the token never shows in logs");
            assert_eq!(req.instance.image_ref.as_deref(), Some("c1a5b8f2-6a5e-4f0e-9d2b-2a4a0b3f7c11"));
            assert_eq!(req.unique_id.as_ref().map(String::len), Some(32));
        }
    }

    #[test]
    fn nova_backup_casts_decode_with_type_and_rotation() {
        for name in ["rpc_cast.backup_instance.nova_minimal.json", "rpc_cast.backup_instance.nova_rich.json"] {
            let req = dispatch(&decode_fixture(name)).unwrap();
            assert!(
                matches!(req.kind, SnapshotKind::Backup { ref backup_type, .. } if !backup_type.is_empty()),
                "{name}"
            );
        }
    }

    #[test]
    fn casts_from_a_plain_oslo_client_decode_too() {
        for name in [
            "rpc_cast.snapshot_instance.oslo.json",
            "rpc_cast.snapshot_instance.oslo_quorum.json",
            "rpc_cast.backup_instance.oslo.json",
        ] {
            let req = dispatch(&decode_fixture(name)).unwrap();
            assert_eq!(req.instance.uuid.to_string(), "5f5cd4b0-4b4d-4d3c-9a36-0c4c7b1a9e01", "{name}");
            assert_eq!(
                req.context.project_id.as_deref(),
                Some("3a4b5c6d7e8f90a1b2c3d4e5f6a7b8c9"),
                "oslo.context's `project`"
            );
        }
    }

    fn cast(edit: impl FnOnce(&mut Value)) -> Result<SnapshotRequest, Rejection> {
        let mut m = Value::Object(decode_fixture("rpc_cast.snapshot_instance.nova_minimal.json"));
        edit(&mut m);
        dispatch(m.as_object().unwrap())
    }

    #[test]
    fn version_and_method_checks_follow_oslo() {
        assert!(cast(|m| m["version"] = json!("6.5")).is_ok());
        assert!(cast(|m| m["version"] = json!("6")).is_ok());
        assert!(cast(|m| m["version"] = json!("5.0")).is_ok(), "nova-api pinned to 5.x");
        assert!(cast(|m| m["version"] = json!("5.13")).is_ok());
        for v in ["6.6", "7.0", "5.14", "4.22", "x"] {
            assert!(matches!(cast(|m| m["version"] = json!(v)), Err(Rejection::UnsupportedVersion { .. })), "{v}");
        }
        assert!(matches!(
            cast(|m| {
                m.as_object_mut().unwrap().remove("version");
            }),
            Err(Rejection::UnsupportedVersion { .. })
        ));
        assert!(matches!(cast(|m| m["namespace"] = json!("baseapi")), Err(Rejection::UnsupportedVersion { .. })));
        assert_eq!(
            cast(|m| m["method"] = json!("reboot_instance")).unwrap_err(),
            Rejection::NoSuchMethod("reboot_instance".into())
        );
    }

    #[test]
    fn other_methods_calls_and_versions_go_to_nova_compute() {
        let routed = |edit: &dyn Fn(&mut Value)| {
            let mut m = Value::Object(decode_fixture("rpc_cast.snapshot_instance.nova_minimal.json"));
            edit(&mut m);
            route(m.as_object().unwrap())
        };
        assert!(matches!(routed(&|_| {}), Route::Serve(_)));
        assert!(matches!(routed(&|m| m["method"] = json!("reboot_instance")), Route::Forward));
        assert!(
            matches!(routed(&|m| m["version"] = json!("6.6")), Route::Forward),
            "a newer nova-api: nova-compute may know it"
        );
        assert!(matches!(routed(&|m| m["namespace"] = json!("baseapi")), Route::Forward));
        assert!(matches!(routed(&|m| m["_msg_id"] = json!("abc")), Route::Forward), "only nova-compute answers calls");
        assert!(matches!(
            routed(&|m| m["args"]["image_id"] = json!("x")),
            Route::Refuse(Rejection::BadArgument { .. })
        ));
        let call = decode(
            Some("application/json"),
            fixture("rpc_call.echo.oslo.json")["body_raw_utf8"].as_str().unwrap().as_bytes(),
            1 << 20,
        )
        .unwrap();
        assert!(matches!(route(&call), Route::Forward));
    }

    #[test]
    fn identifiers_must_be_uuids_so_no_cast_can_address_another_path() {
        for bad_id in ["../../images/x", "images/other@snap", "", "9e8f7a6b5c4d4e3f8a2b1c0d9e8f7a6b"] {
            let err = cast(|m| m["args"]["image_id"] = json!(bad_id)).unwrap_err();
            assert!(matches!(err, Rejection::BadArgument { name: "image_id", .. }), "{bad_id}: {err}");
            let err = cast(|m| m["args"]["instance"]["nova_object.data"]["uuid"] = json!(bad_id)).unwrap_err();
            assert!(matches!(err, Rejection::BadArgument { name: "instance.uuid", .. }), "{bad_id}: {err}");
        }
        assert!(cast(|m| m["args"]["image_id"] = json!(7)).is_err());
        assert!(cast(|m| {
            m["args"].as_object_mut().unwrap().remove("instance");
        })
        .is_err());
        assert!(cast(|m| m["args"]["instance"]["nova_object.name"] = json!("Flavor")).is_err());
        assert!(cast(|m| m["_context_roles"] = json!("admin")).is_err());
    }
}
