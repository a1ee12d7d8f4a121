//! novasnap beside the stack's real nova-compute (issue 11): snapshots asked of Nova as a
//! user asks for them are made by novasnap, Nova's database follows every step, everything
//! else still reaches nova-compute, and when novasnap is gone — killed, stopped, or not
//! started yet — nova-compute serves the host as it did without it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::openstack::*;
use common::*;

const LIMIT: Duration = Duration::from_secs(300);

/// What a snapshot novasnap made looks like in Glance and in Nova, once novasnap has
/// settled its cast.
async fn assert_made_by_novasnap(server: &Server, image_id: &str, worker: &WorkerProcess) {
    worker.wait_settled(image_id).await;
    let image = image_show(image_id).await;
    let log = worker.log_text();
    assert_eq!(image["status"], "active", "{image:#}\n{log}");
    assert!(image["novasnap_made_by"].as_str().is_some_and(|m| m.starts_with("novasnap ")), "{image:#}");
    let direct_url = image["direct_url"].as_str().unwrap_or_default();
    assert!(
        direct_url.starts_with("rbd://") && direct_url.ends_with(&format!("/images/{image_id}/snap")),
        "{image:#}\n{log}"
    );
    assert!(log.contains("direct snapshot registered") && log.contains(image_id), "{log}");
    assert!(server.task_state().await.is_null(), "Nova's task_state is none at the end");
    let request = server.last_request("createImage").await;
    assert!(!stack_log("nova-compute").contains(&format!("{request} ")), "nova-compute never saw request {request}");
}

async fn assert_nothing_stray(server: &Server) {
    let disk = rbd_name(&server.disk);
    let stray: Vec<String> = rbd_snapshots(disk).await.into_iter().filter(|s| s.starts_with("novasnap-")).collect();
    assert!(stray.is_empty(), "disk snapshots left on {disk}: {stray:?}");
}

#[tokio::test]
async fn a_snapshot_asked_of_nova_is_made_by_novasnap_and_nova_follows_every_step() {
    let server = server(1);
    let config = TestConfig::beside_nova(&[]);
    let mut listener = Listener::start(&config).await;
    let worker = WorkerProcess::start(&config).await;
    server.wait_idle(LIMIT).await;

    let first = server.image_create(&unique("test-snapshot")).await;
    assert_made_by_novasnap(&server, &first, &worker).await;
    listener.wait_for("instance.snapshot.end", &first, LIMIT).await;
    let request = server.last_request("createImage").await;
    let action = server.action(&request).await;
    let event = action["events"].as_array().unwrap().iter().find(|e| e["event"] == "compute_snapshot_instance");
    assert_eq!(event.map(|e| e["result"].clone()), Some("Success".into()), "{action:#}");
    let check = check_image(&format!("rbd:images/{first}"), false).await;
    assert!(check.unbroken(), "{}", check.output);

    // Nova lets the next one through at once: nothing was left in its way.
    let second = server.image_create(&unique("test-snapshot")).await;
    assert_made_by_novasnap(&server, &second, &worker).await;
    assert_nothing_stray(&server).await;
    assert!(worker.stop().await.success());
    for id in [first, second] {
        image_delete(&id).await;
    }
}

#[tokio::test]
async fn three_backups_with_rotation_two_leave_two() {
    let server = server(1);
    let config = TestConfig::beside_nova(&[]);
    let worker = WorkerProcess::start(&config).await;
    server.wait_idle(LIMIT).await;
    for _ in 0..3 {
        // A name each: the client's --wait finds the backup by its name.
        let name = unique("test-backup");
        openstack(&[
            "server", "backup", "create", "--name", &name, "--type", "daily", "--rotate", "2", "--wait", &server.id,
        ])
        .await;
        server.wait_idle(LIMIT).await;
    }
    // The rotation follows the end of the third backup (Nova's `backup_instance`), after
    // task_state is none: waited for.
    wait_until(LIMIT, || async { glance_backups(&server.id).await.len() <= 2 }).await;
    let backups = glance_backups(&server.id).await;
    assert_eq!(backups.len(), 2, "{backups:#?}\n{}", worker.log_text());
    assert!(worker.stop().await.success());
    for id in backups {
        image_delete(&id).await;
    }
}

async fn glance_backups(instance: &str) -> Vec<String> {
    let images = openstack_admin(&[
        "image",
        "list",
        "--property",
        &format!("instance_uuid={instance}"),
        "--property",
        "image_type=backup",
    ])
    .await;
    images.as_array().unwrap().iter().map(|i| i["ID"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn what_is_not_a_snapshot_still_reaches_nova_compute() {
    let server = server(2);
    let config = TestConfig::beside_nova(&[]);
    let worker = WorkerProcess::start(&config).await;
    openstack_plain(&["server", "reboot", "--wait", &server.id]).await;
    openstack_plain(&["server", "stop", &server.id]).await;
    wait_for_status(&server, "SHUTOFF").await;
    openstack_plain(&["server", "start", &server.id]).await;
    wait_for_status(&server, "ACTIVE").await;
    // An RPC call: its reply goes from nova-compute straight to the caller.
    let out = tokio::process::Command::new(env("OPENSTACK"))
        .args(["console", "log", "show", "--lines", "5", &server.id])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = worker.log_text();
    let forwarded = log.lines().filter(|l| l.contains("passed on") && l.contains("compute-alt.")).count();
    assert!(forwarded >= 4, "reboot, stop, start and the console call went through novasnap ({forwarded}):\n{log}");
    assert!(worker.stop().await.success());
    server.wait_idle(LIMIT).await;
}

async fn wait_for_status(server: &Server, status: &str) {
    wait_until(LIMIT, || async { server.show().await["status"] == status })
        .await
        .unwrap_or_else(|| panic!("server {} not {status}", server.id));
}

#[tokio::test]
async fn novasnap_killed_mid_flatten_finishes_the_snapshot_itself_when_it_comes_back() {
    let server = server(1);
    let config = TestConfig::beside_nova(&[]);
    server.wait_idle(LIMIT).await;
    let mut doomed = WorkerProcess::start_with(&config, &[("NOVASNAP_CRASH_AT", "mid-flatten")]).await;
    let image_id = server.image_request(&unique("test-crash")).await;
    let status = doomed.wait_exit(LIMIT).await;
    assert_eq!(status.signal(), Some(6), "died mid-flatten:\n{}", doomed.log_text());
    // nova-compute, the other consumer of compute.<host>, must not get the cast meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let survivor = WorkerProcess::start(&config).await;
    wait_until(LIMIT, || async { image_show(&image_id).await["status"] == "active" })
        .await
        .unwrap_or_else(|| panic!("finished by the next novasnap:\n{}", survivor.log_text()));
    server.wait_idle(LIMIT).await;
    assert_made_by_novasnap(&server, &image_id, &survivor).await;
    assert_nothing_stray(&server).await;
    assert!(survivor.stop().await.success());
    image_delete(&image_id).await;
}

#[tokio::test]
async fn with_novasnap_stopped_nova_compute_serves_snapshots_again() {
    let server = server(1);
    let config = TestConfig::beside_nova(&[]);
    let worker = WorkerProcess::start(&config).await;
    assert!(worker.stop().await.success());
    server.wait_idle(LIMIT).await;
    let image_id = server.image_create(&unique("test-after-novasnap")).await;
    assert_eq!(image_show(&image_id).await["status"], "active");
    assert!(image_show(&image_id).await.get("novasnap_made_by").is_none(), "made by nova-compute");
    let request = server.last_request("createImage").await;
    assert!(stack_log("nova-compute").contains(&request), "served by nova-compute");
    server.wait_idle(LIMIT).await;
    image_delete(&image_id).await;
}

/// novasnap first, nova-compute after, on a broker that has none of nova-compute's queues
/// (as a fresh one): novasnap waits aside, declaring nothing that would keep nova-compute's
/// RPC servers from starting, and takes its place in front once they run.
async fn novasnap_first_then_nova_compute(nova: &StackSetting) {
    let server = server(1);
    let compute_pid = format!("{}/run/nova-compute.pid", env("NOVASNAP_STACK_STATE"));
    let pid = std::fs::read_to_string(&compute_pid).unwrap();
    tokio::process::Command::new("kill").arg(pid.trim()).status().await.unwrap();
    wait_until(LIMIT, || async { !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists() }).await.unwrap();
    let config = TestConfig::beside_nova(&[]);
    delete_nova_compute_topology(&config).await;
    let compute_log_before = stack_log("nova-compute").len();

    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_novasnap"));
    let log = config.path.with_extension("first.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = worker
        .args(["serve", "--config-file"])
        .arg(&config.path)
        .env("NOVASNAP_LOG", "info,novasnap=debug")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    nova.up().await;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(LIMIT, || async { text().contains("in front of nova-compute") })
        .await
        .unwrap_or_else(|| panic!("novasnap took its place once nova-compute was up:\n{}", text()));
    let compute_log = stack_log("nova-compute");
    let since = compute_log.get(compute_log_before..).unwrap_or(&compute_log);
    assert!(!since.contains("PRECONDITION_FAILED"), "nova-compute's RPC servers started cleanly:\n{since}");
    server.wait_idle(LIMIT).await;
    let image_id = server.image_create(&unique("test-order")).await;
    assert!(image_show(&image_id).await["novasnap_made_by"].is_string(), "{}", text());
    let _ = tokio::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status().await;
    let _ = child.wait().await;
    image_delete(&image_id).await;
}

/// What nova-compute's two RPC servers declare (`compute`, `compute-alt`: a topic queue, a
/// server queue and a fanout exchange each), deleted while it is stopped, on the broker its
/// nova-cpu.conf names.
async fn delete_nova_compute_topology(config: &TestConfig) {
    let conn = lapin::Connection::connect(&config.amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let host = env("NOVASNAP_HOST");
    for topic in ["compute", "compute-alt"] {
        for queue in [topic.to_string(), format!("{topic}.{host}")] {
            channel.queue_delete(&queue, Default::default()).await.unwrap();
        }
        channel.exchange_delete(&format!("{topic}_fanout"), Default::default()).await.unwrap();
    }
    let _ = conn.close(200, "done").await;
}

#[tokio::test]
async fn novasnap_started_before_nova_compute_waits_then_takes_the_snapshots() {
    novasnap_first_then_nova_compute(&StackSetting::unchanged("nova")).await;
}

/// The same with `[oslo_messaging_rabbit] rabbit_quorum_queue` on, on a fresh vhost: Nova's
/// exchanges durable and its queues quorum queues, novasnap's declarations equal to theirs.
#[tokio::test]
async fn with_quorum_queues_novasnap_started_first_also_takes_the_snapshots() {
    let quorum = StackSetting::set("nova", "NOVASNAP_STACK_RABBIT_QUEUES", "quorum").await;
    let conf = std::fs::read_to_string(env("NOVA_CONF")).unwrap();
    assert!(conf.contains("rabbit_quorum_queue = True"), "{conf}");
    novasnap_first_then_nova_compute(&quorum).await;
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", "novasnap-quorum", "name", "type"])
        .output()
        .await
        .unwrap();
    let queues = String::from_utf8_lossy(&out.stdout);
    let host = env("NOVASNAP_HOST");
    for queue in [format!("compute.{host}"), format!("compute-alt.{host}"), format!("novasnap.snapshots.{host}")] {
        let quorum = queues.lines().any(|l| l.split_whitespace().eq([queue.as_str(), "quorum"]));
        assert!(quorum, "{queue} is a quorum queue:\n{queues}");
    }
}

/// `os_require_quiesce=yes` on a server's image (which declares the agent) and the agent
/// stopped inside the guest: the snapshot fails cleanly, as Nova's does —
/// `InstanceQuiesceFailed`, the image deleted, task_state back to none, the action's event
/// in error, the guest running — and the cast is settled, not handed back for ever.
#[tokio::test]
async fn with_os_require_quiesce_and_the_agent_stopped_the_snapshot_fails_cleanly() {
    let base = env("SERVER1_IMAGE");
    let required = ImageProperty::set(&base, "os_require_quiesce", "yes").await;
    let server = create_server(&base).await;
    // Nova copied the image's properties into the instance's system_metadata.
    drop(required);
    // Stopped for good: init's respawn finds a binary that exits at once.
    let stop = r#"q=$(command -v qemu-ga) && mount --bind /bin/false "$q" && killall qemu-ga"#;
    let exec = serde_json::json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", stop]}});
    server.agent(&exec).await.unwrap();
    let ping = serde_json::json!({"execute": "guest-ping"});
    wait_until(LIMIT, || async { server.agent(&ping).await.is_err_and(|e| e.contains("not connected")) })
        .await
        .unwrap_or_else(|| panic!("the agent of {} stopped", server.domain));

    let config = TestConfig::beside_nova(&[]);
    let worker = WorkerProcess::start(&config).await;
    let image = openstack(&["server", "image", "create", "--name", &unique("test-require-quiesce"), &server.id]).await;
    let image_id = image["id"].as_str().unwrap().to_string();
    wait_until(LIMIT, || async { glance_image(&image_id).await.is_none() })
        .await
        .unwrap_or_else(|| panic!("the image is deleted:\n{}", worker.log_text()));
    server.wait_idle(LIMIT).await;
    let log = worker.log_text();
    let action = server.action(&server.last_request("createImage").await).await;
    let event = action["events"].as_array().unwrap().iter().find(|e| e["event"] == "compute_snapshot_instance");
    assert_eq!(event.map(|e| e["result"].clone()), Some("Error".into()), "{action:#}\n{log}");
    assert!(log.contains("Failed to quiesce instance") && log.contains("not connected"), "{log}");
    assert!(!log.contains("handing the cast back"), "the cast is settled:\n{log}");
    assert_eq!(domain_state(&server.domain).await, "running");
    assert!(worker.stop().await.success());
}

/// An image property set for one test, unset when dropped, however the test ends.
struct ImageProperty {
    image: String,
    name: &'static str,
}

impl ImageProperty {
    async fn set(image: &str, name: &'static str, value: &str) -> Self {
        assert!(glance_admin(&["image", "set", "--property", &format!("{name}={value}"), image]), "image set {name}");
        Self { image: image.to_string(), name }
    }
}

impl Drop for ImageProperty {
    fn drop(&mut self) {
        let unset = glance_admin(&["image", "unset", "--property", self.name, &self.image]);
        assert!(unset || std::thread::panicking(), "image unset {}", self.name);
    }
}

/// `openstack ARGS` as the admin, for the image commands that print nothing; whether it worked.
fn glance_admin(args: &[&str]) -> bool {
    std::process::Command::new(env("OPENSTACK"))
        .args(["--os-username", "admin", "--os-project-name", "admin", "--os-password", &env("OS_ADMIN_PASSWORD")])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// A stack setting (`NOVASNAP_STACK_*`) for one test: `scripts/stack up <component>` with it,
/// and without it again when the test ends, however it ends.
struct StackSetting {
    component: &'static str,
    setting: Option<(&'static str, String)>,
}

impl StackSetting {
    async fn set(component: &'static str, name: &'static str, value: &str) -> Self {
        let setting = Self { component, setting: Some((name, value.to_string())) };
        setting.up().await;
        setting
    }

    /// The stack as it is.
    fn unchanged(component: &'static str) -> Self {
        Self { component, setting: None }
    }

    /// `scripts/stack up <component>` with the setting: starts what is not running.
    async fn up(&self) {
        let mut command = tokio::process::Command::new(stack_script());
        command.args(["up", self.component]);
        if let Some((name, value)) = &self.setting {
            command.env(name, value);
        }
        let out = command.output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for StackSetting {
    fn drop(&mut self) {
        if self.setting.is_some() {
            let _ = std::process::Command::new(stack_script()).args(["up", self.component]).output();
        }
    }
}

fn stack_script() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack")
}

/// Keystone tokens that live 60 s, and a snapshot that takes longer (held 65 s after its
/// clone): the user's token in the cast has expired when the location is registered, and
/// the service token beside it (`[service_user] send_service_user_token`) carries it.
#[tokio::test]
async fn a_snapshot_outliving_the_users_token_still_succeeds() {
    let server = server(1);
    server.wait_idle(LIMIT).await;
    let _lifetime = StackSetting::set("keystone", "NOVASNAP_STACK_TOKEN_LIFETIME", "60").await;
    let config = TestConfig::beside_nova(&[]);
    let worker = WorkerProcess::start_with(&config, &[("NOVASNAP_DELAY_AT", "after-clone:65")]).await;
    let started = std::time::Instant::now();
    let image_id = server.image_create(&unique("test-long")).await;
    assert!(started.elapsed() > Duration::from_secs(60), "the snapshot outlived the 60 s token");
    assert_made_by_novasnap(&server, &image_id, &worker).await;
    assert!(worker.log_text().contains("delay of 65s injected at after-clone"));
    assert!(worker.stop().await.success());
    image_delete(&image_id).await;
}

/// A broker restart: nova-compute's RPC servers and novasnap both come back, novasnap in
/// front again, and both halves of the host still work — a snapshot made by novasnap, a
/// reboot served by nova-compute through it.
#[tokio::test]
async fn after_a_broker_restart_novasnap_is_in_front_again() {
    let server = server(1);
    let config = TestConfig::beside_nova(&[]);
    let worker = WorkerProcess::start(&config).await;
    server.wait_idle(LIMIT).await;
    rabbitmqctl(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;
    wait_until(LIMIT, || async { worker.log_text().matches("in front of nova-compute").count() >= 2 })
        .await
        .unwrap_or_else(|| panic!("novasnap in front again:\n{}", worker.log_text()));
    // nova-compute reports to the conductor again once its connection is back.
    wait_until(LIMIT, || async {
        let services = nova_get("/os-services?binary=nova-compute").await;
        services["services"][0]["state"] == "up"
    })
    .await
    .unwrap_or_else(|| panic!("nova-compute up again"));
    let image_id = server.image_create(&unique("test-after-restart")).await;
    assert_made_by_novasnap(&server, &image_id, &worker).await;
    openstack_plain(&["server", "reboot", "--wait", &server.id]).await;
    assert!(worker.stop().await.success());
    image_delete(&image_id).await;
}
