//! The cloud as its users and operators reach it: the `openstack` command line client (as the
//! demo user, or as admin), Nova's servers and their task_state, novasnap beside the stack's
//! nova-compute, and the stack's image checker.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Command;

use super::env;

/// `openstack ARGS -f json` as the demo user (the OS_* variables `scripts/stack env` sets).
pub async fn openstack(args: &[&str]) -> Value {
    run_openstack(false, args).await
}

/// The same as the stack's admin.
pub async fn openstack_admin(args: &[&str]) -> Value {
    run_openstack(true, args).await
}

async fn run_openstack(admin: bool, args: &[&str]) -> Value {
    let out = openstack_command(admin, args).args(["-f", "json"]).output().await.unwrap();
    assert!(
        out.status.success(),
        "openstack {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// An `openstack` command with no output format, for the subcommands that print nothing.
pub async fn openstack_plain(args: &[&str]) {
    let out = openstack_command(false, args).output().await.unwrap();
    assert!(out.status.success(), "openstack {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn openstack_command(admin: bool, args: &[&str]) -> Command {
    let mut command = Command::new(env("OPENSTACK"));
    if admin {
        command.args([
            "--os-username",
            "admin",
            "--os-project-name",
            "admin",
            "--os-password",
            &env("OS_ADMIN_PASSWORD"),
        ]);
    }
    command.args(args).env("PYTHONWARNINGS", "ignore");
    command
}

/// A Keystone token of the demo user, or of the admin, from Keystone's API (the command line
/// client costs seconds a call).
pub async fn token(admin: bool) -> String {
    let (user, project, password) = if admin {
        ("admin".to_string(), "admin".to_string(), env("OS_ADMIN_PASSWORD"))
    } else {
        (env("OS_USERNAME"), env("OS_PROJECT_NAME"), env("OS_PASSWORD"))
    };
    let body = serde_json::json!({"auth": {
        "identity": {"methods": ["password"],
                     "password": {"user": {"name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}});
    let resp = super::http().post(format!("{}/auth/tokens", env("OS_AUTH_URL"))).json(&body).send().await.unwrap();
    assert!(resp.status().is_success(), "token of {user}: {}", resp.status());
    resp.headers()["x-subject-token"].to_str().unwrap().to_string()
}

/// GET on Nova's API as the admin (the command line client costs seconds a call).
pub async fn nova_get(path: &str) -> Value {
    let resp = super::http()
        .get(format!("{}{path}", env("NOVA_URL")))
        .header("X-Auth-Token", super::admin_token())
        .header("OpenStack-API-Version", "compute 2.51")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    resp.json().await.unwrap()
}

/// Nova-built server N (1: disk cloned from its image, 2: a full copy), as the stack made it.
pub struct Server {
    pub id: String,
    pub domain: String,
    /// `rbd:vms/<id>_disk`
    pub disk: String,
    /// The Glance image it was booted from.
    pub image: String,
}

pub fn server(n: u8) -> Server {
    Server {
        id: env(&format!("SERVER{n}_ID")),
        domain: env(&format!("SERVER{n}_DOMAIN")),
        disk: env(&format!("SERVER{n}_DISK")),
        image: env(&format!("SERVER{n}_IMAGE")),
    }
}

impl Server {
    /// The server as Nova's API shows it to the admin (domain name, task_state, host).
    pub async fn show(&self) -> Value {
        nova_get(&format!("/servers/{}", self.id)).await["server"].take()
    }

    pub async fn task_state(&self) -> Value {
        self.show().await["OS-EXT-STS:task_state"].clone()
    }

    /// The instance action of request `request_id`, with its events.
    pub async fn action(&self, request_id: &str) -> Value {
        nova_get(&format!("/servers/{}/os-instance-actions/{request_id}", self.id)).await["instanceAction"].take()
    }

    /// The request id of the newest action named `action` (e.g. `createImage`).
    pub async fn last_request(&self, action: &str) -> String {
        let actions = nova_get(&format!("/servers/{}/os-instance-actions", self.id)).await;
        let newest = actions["instanceActions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["action"] == action)
            .max_by(|a, b| a["start_time"].as_str().cmp(&b["start_time"].as_str()))
            .unwrap_or_else(|| panic!("no {action} action on {}: {actions:#}", self.id));
        newest["request_id"].as_str().unwrap().to_string()
    }

    /// Waits until Nova has no task on the server.
    pub async fn wait_idle(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let state = self.task_state().await;
            if state.is_null() {
                return;
            }
            assert!(start.elapsed() < limit, "server {} still in task_state {state} after {limit:?}", self.id);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A command to the guest agent (`virsh qemu-agent-command`, e.g. `{"execute":
    /// "guest-ping"}`): its answer, or libvirt's error.
    pub async fn agent(&self, command: &Value) -> Result<Value, String> {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "qemu-agent-command", &self.domain, &command.to_string()])
            .output()
            .await
            .unwrap();
        match out.status.success() {
            true => Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// `openstack server image create --wait`: Nova's snapshot, as a user asks for it. Returns
    /// the image's id.
    pub async fn image_create(&self, name: &str) -> String {
        let image = openstack(&["server", "image", "create", "--wait", "--name", name, &self.id]).await;
        image["id"].as_str().unwrap().to_string()
    }

    /// `openstack server image create` without waiting: the id of the image Nova has just
    /// created (queued) and asked its compute host to fill.
    pub async fn image_request(&self, name: &str) -> String {
        let image = openstack(&["server", "image", "create", "--name", name, &self.id]).await;
        image["id"].as_str().unwrap().to_string()
    }
}

/// A server Nova built for one test, deleted when dropped, however the test ends.
pub struct TestServer(Server);

impl std::ops::Deref for TestServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = openstack_command(false, &["server", "delete", "--wait", &self.0.id]).as_std_mut().output();
    }
}

/// A server Nova builds for one test (`openstack server create --wait`, no network, the
/// stack's flavor) from Glance image `image`, once its guest agent answers.
pub async fn create_server(image: &str) -> TestServer {
    let created = openstack(&[
        "--os-compute-api-version",
        "2.37",
        "server",
        "create",
        "--wait",
        "--image",
        image,
        "--flavor",
        "novasnap.tiny",
        "--nic",
        "none",
        &super::unique("test-server"),
    ])
    .await;
    assert_eq!(created["status"], "ACTIVE", "{created:#}");
    let id = created["id"].as_str().unwrap().to_string();
    let shown = openstack_admin(&["server", "show", &id]).await;
    let domain = shown["OS-EXT-SRV-ATTR:instance_name"].as_str().unwrap().to_string();
    let server = TestServer(Server { disk: format!("rbd:vms/{id}_disk"), id, domain, image: image.to_string() });
    let ping = serde_json::json!({"execute": "guest-ping"});
    let answered = super::wait_until(Duration::from_secs(120), || async { server.agent(&ping).await.is_ok() }).await;
    assert!(answered.is_some(), "the guest agent of {} answered within 120 s of ACTIVE", server.domain);
    server
}

/// The image as Glance's API shows it to the admin: custom properties at the top level.
pub async fn image_show(id: &str) -> Value {
    super::glance_image(id).await.unwrap_or_else(|| panic!("image {id} is not in Glance"))
}

/// Deletes an image as the admin; one already gone is fine.
pub async fn image_delete(id: &str) {
    let _ = openstack_command(true, &["image", "delete", id]).output().await;
}

/// What `scripts/check-image` says of an image: its last line, `key=value` pairs.
#[derive(Debug)]
pub struct Check {
    pub status: i32,
    pub fields: std::collections::BTreeMap<String, String>,
    pub output: String,
}

impl Check {
    pub fn unbroken(&self) -> bool {
        self.fields.get("unbroken").map(String::as_str) == Some("yes")
    }

    pub fn clean(&self) -> bool {
        self.fields.get("clean").map(String::as_str) == Some("yes")
    }

    pub fn last_record(&self) -> u64 {
        self.fields.get("last_record").and_then(|n| n.parse().ok()).unwrap_or(0)
    }
}

/// Runs the stack's checker on `spec` (a file, or `rbd:pool/image[@snap]`).
pub async fn check_image(spec: &str, require_clean: bool) -> Check {
    check_image_with(spec, if require_clean { &["--require-clean"] } else { &[] }).await
}

/// The same with the checker's options `args` (see `scripts/check-image --help`).
pub async fn check_image_with(spec: &str, args: &[&str]) -> Check {
    let out = Command::new(env("CHECK_IMAGE")).args(args).arg(spec).output().await.unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    let fields =
        last.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    Check { status: out.status.code().unwrap_or(-1), fields, output }
}

/// The log of one of the stack's services, `$NOVASNAP_STACK_STATE/logs/<name>.log`.
pub fn stack_log(name: &str) -> String {
    let path = PathBuf::from(env("NOVASNAP_STACK_STATE")).join("logs").join(format!("{name}.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs `scripts/stack ARGS` of this checkout.
pub async fn stack(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack");
    let out = Command::new(script).args(args).output().await.unwrap();
    assert!(out.status.success(), "scripts/stack {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
