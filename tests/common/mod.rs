//! What the integration tests share: the stack's coordinates, a worker process, the oslo
//! peers, and looks at Ceph and Glance that tests assert on.
#![allow(dead_code)] // each test binary uses its own subset

pub mod openstack;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// An environment variable `scripts/stack env` sets; missing means the stack is not up,
/// which is a failure, never a skip.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: bring the stack up and run `eval \"$(scripts/stack env)\"` (make test does both)")
    })
}

pub struct DemoGuest {
    pub uuid: String,
    pub domain: String,
    pub base_image: String,
    pub disk: String,
}

impl DemoGuest {
    /// The same guest as the Nova server it is.
    pub fn server(&self) -> openstack::Server {
        openstack::Server {
            id: self.uuid.clone(),
            domain: self.domain.clone(),
            disk: self.disk.clone(),
            image: self.base_image.clone(),
        }
    }

    /// The same guest's details under another instance UUID (one libvirt does not know).
    pub fn clone_with_uuid(&self, uuid: uuid::Uuid) -> Self {
        Self {
            uuid: uuid.to_string(),
            domain: self.domain.clone(),
            base_image: self.base_image.clone(),
            disk: self.disk.clone(),
        }
    }
}

pub fn guest(n: u8) -> DemoGuest {
    DemoGuest {
        uuid: env(&format!("GUEST{n}_UUID")),
        domain: env(&format!("GUEST{n}_DOMAIN")),
        base_image: env(&format!("GUEST{n}_BASE_IMAGE")),
        disk: env(&format!("GUEST{n}_DISK")),
    }
}

/// How a test asks for a snapshot of one of the stack's Nova-built servers.
#[derive(Clone, Copy)]
pub enum Asked<'a> {
    /// A cast straight to a worker on a host of the test's own, with these extra arguments
    /// (`tests/peer/nova_api.py`); Nova's record of the instance is left alone.
    ByCast(&'a [&'a str]),
    /// Of Nova's API, served by a worker beside the stack's nova-compute: the instance holds
    /// a task_state until the end, as in production. Where a cold snapshot holds the guest in
    /// managed save, only this is a real test: nova-compute stops a server whose guest has
    /// been off for 15 s while its task_state is none (`ComputeManager.
    /// handle_lifecycle_event`, `_sync_instance_power_state`), and a cast that bypasses
    /// nova-api leaves it none. On a loaded host a managed save and the disk snapshot after
    /// it took 26 s.
    OfNova,
}

impl Asked<'_> {
    /// The worker's configuration for this way of asking, with `overrides`.
    pub fn config(self, overrides: &[(&str, &str, &str)]) -> TestConfig {
        match self {
            Asked::ByCast(_) => TestConfig::new(overrides),
            // A crashed worker's lease lapses quickly, so a survivor need not wait long.
            Asked::OfNova => TestConfig::beside_nova(&[overrides, &[("novasnap", "instance_lease", "6")]].concat()),
        }
    }

    /// Asks for a snapshot of `guest` (a Nova-built server), once Nova has it idle: the
    /// image's id.
    pub async fn snapshot(self, config: &TestConfig, guest: &DemoGuest) -> String {
        match self {
            Asked::ByCast(extra) => nova_api(config, "snapshot", guest, extra).await,
            Asked::OfNova => {
                let server = guest.server();
                server.wait_idle(Duration::from_secs(300)).await;
                server.image_request(&unique("test-snapshot")).await
            }
        }
    }

    /// Once the worker has settled the snapshot: Nova holds the server idle and running
    /// (when it was asked).
    pub async fn assert_nova_left_it_running(self, guest: &DemoGuest) {
        if let Asked::OfNova = self {
            let server = guest.server();
            server.wait_idle(Duration::from_secs(300)).await;
            let shown = server.show().await;
            assert_eq!(shown["status"], "ACTIVE", "Nova has the server running: {shown:#}");
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A worker config for this stack, on its own host name and notification exchange so tests
/// do not see each other's traffic, with `overrides` as (section, key, value).
pub struct TestConfig {
    pub host: String,
    pub notification_exchange: String,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// A test that fails mid-snapshot (a worker aborted, an assertion failed) leaves its image
/// queued, and with it the disk snapshot and copy its worker made, which reclamation rightly
/// keeps while the image is queued. The tests that snapshot the stack's guests run one at a
/// time, so a queued test image of one of those guests at the start of such a test is such a
/// leftover: it is deleted and reclaimed, so that one failure does not fail every later test
/// of the same guest. Images of other instances (the ghosts of the tests that run beside
/// them, see [`TestConfig::beside_other_tests`]) are theirs, and left alone.
fn clear_failed_tests_leftovers() {
    let (glance, token) = (env("GLANCE_URL"), admin_token());
    let auth = format!("X-Auth-Token: {token}");
    let out = std::process::Command::new("curl")
        .args(["-sf", "-H", &auth, &format!("{glance}/v2/images?limit=1000")])
        .output()
        .unwrap();
    let images: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let guests: Vec<String> = (1..=3).map(|n| env(&format!("GUEST{n}_UUID"))).collect();
    let mut found = false;
    for image in images["images"].as_array().into_iter().flatten() {
        let name = image["name"].as_str().unwrap_or_default();
        let of_a_guest = guests.iter().any(|g| image["instance_uuid"] == g.as_str());
        if name.starts_with("test-") && of_a_guest && image["status"] != "active" {
            let url = format!("{glance}/v2/images/{}", image["id"].as_str().unwrap());
            std::process::Command::new("curl").args(["-sf", "-H", &auth, "-X", "DELETE", &url]).status().unwrap();
            found = true;
        }
    }
    if found {
        let reclaim = std::process::Command::new(env!("CARGO_BIN_EXE_novasnap"))
            .args(["reclaim", "--config", &env("NOVASNAP_CONFIG")])
            .output()
            .unwrap();
        assert!(reclaim.status.success(), "reclaim: {}", String::from_utf8_lossy(&reclaim.stderr));
    }
}

impl TestConfig {
    /// novasnap beside the stack's nova-compute: the nova-cpu.conf it runs from (`NOVA_CONF`),
    /// unchanged but for a notification exchange of the test's own and `overrides`.
    pub fn beside_nova(overrides: &[(&str, &str, &str)]) -> Self {
        clear_failed_tests_leftovers();
        Self::from_nova_conf(&env("NOVASNAP_HOST"), overrides)
    }

    /// A worker on a host of the test's own, no nova-compute beside it: alone on the host
    /// (`serve_whole_host`) and telling Nova nothing (`nova_writeback` off: its casts name
    /// real servers nova-api never asked about). Otherwise the nova-cpu.conf the stack's
    /// novasnap runs from, with quick retries and leases, and `overrides`.
    pub fn new(overrides: &[(&str, &str, &str)]) -> Self {
        clear_failed_tests_leftovers();
        Self::beside_other_tests(overrides)
    }

    /// As [`new`](Self::new), for a test that snapshots none of the stack's guests:
    /// `scripts/test` runs such tests beside others, so this clears no leftovers (a queued
    /// test image may be another test's, in progress).
    pub fn beside_other_tests(overrides: &[(&str, &str, &str)]) -> Self {
        let host = unique("novasnap-test");
        let mut config = Self::from_nova_conf(
            &host,
            &[("novasnap", "serve_whole_host", "true"), ("novasnap", "nova_writeback", "false")],
        );
        let ceph = ceph_conf_without_client_timeouts(config._dir.path()).display().to_string();
        let (snapdir, state) = (snapshots_directory().display().to_string(), config._dir.path().display().to_string());
        let mut text = std::fs::read_to_string(&config.path).unwrap();
        let settings: Vec<(&str, &str, &str)> = vec![
            ("libvirt", "images_rbd_ceph_conf", &ceph),
            ("libvirt", "snapshots_directory", &snapdir),
            ("novasnap", "progress_interval", "1"),
            ("novasnap", "reclaim_interval", "3600"),
            ("novasnap", "retry_initial_delay_ms", "100"),
            ("novasnap", "retry_max_delay", "2"),
            ("novasnap", "retry_max_retries", "4"),
            ("novasnap", "state_directory", &state),
            // A crashed worker's lease lapses quickly, so the survivor need not wait long.
            ("novasnap", "instance_lease", "6"),
        ];
        for (section, key, value) in settings.iter().chain(overrides) {
            text = ini_set(&text, section, key, value);
        }
        std::fs::write(&config.path, text).unwrap();
        config.host = host;
        config
    }

    /// `NOVA_CONF` with `[DEFAULT] host`, a notification exchange of the test's own and
    /// `overrides` set.
    fn from_nova_conf(host: &str, overrides: &[(&str, &str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let notification_exchange = unique("novasnap-test-notifications");
        let mut text = std::fs::read_to_string(env("NOVA_CONF")).unwrap();
        let ours = [("DEFAULT", "host", host), ("novasnap", "notification_exchange", notification_exchange.as_str())];
        for (section, key, value) in ours.iter().chain(overrides) {
            text = ini_set(&text, section, key, value);
        }
        let path = dir.path().join("nova-cpu.conf");
        std::fs::write(&path, text).unwrap();
        Self { host: host.to_string(), notification_exchange, path, _dir: dir }
    }

    /// The broker of this config's `[DEFAULT] transport_url` (the stack's Nova may run on a
    /// vhost of its own), as an AMQP URI for lapin.
    pub fn amqp_uri(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap();
        let url = text
            .lines()
            .find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "transport_url").map(|(_, v)| v.trim()))
            .expect("transport_url in the config");
        amqp_uri_of(url)
    }
}

/// `text` (an INI file) with `[section] key = value` set: replaced where the key is, added to
/// the section (or a new one at the end) where it is not.
fn ini_set(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let (mut in_section, mut done) = (false, false);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_section && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            in_section = trimmed == format!("[{section}]");
        } else if in_section && trimmed.split('=').next().map(str::trim) == Some(key) {
            if !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        if !in_section {
            out.push(format!("[{section}]"));
        }
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

/// The client timeouts a ceph.conf may set, which novasnap sets itself on its connection
/// (`[novasnap] rados_osd_op_timeout`, `rados_mon_op_timeout`, `client_mount_timeout`).
pub const CEPH_CLIENT_TIMEOUTS: [&str; 3] = ["rados osd op timeout", "rados mon op timeout", "client mount timeout"];

/// A copy of the stack's ceph.conf in `dir` without [`CEPH_CLIENT_TIMEOUTS`]: a worker given
/// it is bounded by its own timeouts alone, so tests of an OSD that does not answer test
/// novasnap's bounds, not the stack's.
pub fn ceph_conf_without_client_timeouts(dir: &std::path::Path) -> PathBuf {
    let stock = std::fs::read_to_string(env("CEPH_CONF")).unwrap();
    let kept: String = stock
        .lines()
        .filter(|l| !CEPH_CLIENT_TIMEOUTS.iter().any(|o| l.trim_start().replace('_', " ").starts_with(o)))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join("ceph.conf");
    std::fs::write(&path, kept).unwrap();
    path
}

pub fn snapshots_directory() -> PathBuf {
    PathBuf::from(env("NOVASNAP_STACK_STATE")).join("snapshots")
}

/// A `novasnap serve` process; killed (SIGKILL) if the test ends without stopping it.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub async fn start(config: &TestConfig) -> Self {
        Self::start_with(config, &[]).await
    }

    /// A `novasnap serve` process, not waited for: a test of a worker that must not get
    /// in front of nova-compute looks at its log.
    pub fn spawn(config: &TestConfig, envs: &[(&str, &str)]) -> Self {
        let log = config.path.with_extension(format!("{}.log", uuid::Uuid::new_v4().simple()));
        // The stack's nova-cpu.conf sets no log file and `use_stderr = False`: novasnap logs
        // to stdout, as oslo.log does; panics go to stderr.
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_novasnap"))
            .args(["serve", "--config"])
            .arg(&config.path)
            .env("NOVASNAP_LOG", "info,novasnap=debug")
            .envs(envs.iter().copied())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// Starts a worker with extra environment, e.g. `NOVASNAP_CRASH_AT`.
    pub async fn start_with(config: &TestConfig, envs: &[(&str, &str)]) -> Self {
        let mut worker = Self::spawn(config, envs);
        // Ready once its relay consumes compute.<host>: logged right after basic.consume is
        // confirmed (src/messaging/relay.rs; rabbitmqctl would cost seconds a look).
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = worker.child.try_wait() {
                panic!("worker exited with {status} before consuming:\n{}", worker.log_text());
            }
            if worker.log_text().contains("in front of nova-compute") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "worker not in front of compute.{} within 60 s:\n{}",
                config.host,
                worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worker
    }

    /// Waits for the process to end by itself (a crash point), and its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("worker still running after {limit:?}:\n{}", self.log_text()))
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until this worker has settled the snapshot of `image_id`: what it does after
    /// the end notification (removing the disk snapshot) done, its cast acknowledged.
    pub async fn wait_settled(&self, image_id: &str) {
        const SETTLED: [&str; 3] =
            ["snapshot completed", "snapshot was already completed", "snapshot ended in failure"];
        let settled = |line: &str| line.contains(image_id) && SETTLED.iter().any(|m| line.contains(m));
        wait_until(Duration::from_secs(120), || async { self.log_text().lines().any(settled) })
            .await
            .unwrap_or_else(|| panic!("snapshot of {image_id} not settled:\n{}", self.log_text()));
    }

    /// SIGTERM, and the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("worker running") as i32;
        // Through kill(1): the tests need no unsafe for kill(2).
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().await.unwrap();
        tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .expect("worker exits within 120 s of SIGTERM")
            .unwrap()
    }
}

impl Drop for WorkerProcess {
    /// A failing test shows the worker's log, whatever assertion failed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- worker log {} ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Polls `check` every 200 ms until it returns true, for at most `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Option<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The peer venv's python (oslo.messaging 18.3.1, nova 34), for the scripts of tests/peer.
pub fn peer_python() -> String {
    env("NOVASNAP_PEER_PYTHON")
}

pub fn peer_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peer").join(name)
}

/// Waits (60 s at most) for a tests/peer script to print "ready" on its stderr, failing
/// with what it printed instead; returns the rest of its stderr.
pub async fn wait_peer_ready(
    child: &mut Child,
    peer: &str,
) -> tokio::io::Lines<BufReader<tokio::process::ChildStderr>> {
    let mut stderr = BufReader::new(child.stderr.take().expect("the peer's stderr is piped")).lines();
    let said = tokio::time::timeout(Duration::from_secs(60), async {
        let mut said = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.trim() == "ready" {
                return None;
            }
            said.push(line);
        }
        Some(said.join("\n"))
    })
    .await;
    match said {
        Ok(None) => stderr,
        Ok(Some(said)) => panic!("{peer} ended before it was ready:\n{said}"),
        Err(_) => panic!("{peer} not ready within 60 s"),
    }
}

/// A stock oslo.messaging notification listener on the config's exchange, in a listener
/// pool of its own: oslo's default queue names (`notifications.info`, …) are shared by every
/// listener on the broker, so another consumer of them (a demo, a benchmark, an operator's
/// tool) would take a share of this test's notifications, and what an earlier test left
/// queued there would be delivered here.
pub struct Listener {
    child: Child,
    queue: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    pub received: Vec<Value>,
}

impl Listener {
    pub async fn start(config: &TestConfig) -> Self {
        let mut child = Command::new(peer_python())
            .arg(peer_script("listen.py"))
            .args(["--transport-url", &env("TRANSPORT_URL"), "--exchange", &config.notification_exchange])
            .args(["--pool", &config.notification_exchange])
            // The tests decide what they wait for; the listener just keeps listening.
            .args(["--until", "-", "--timeout", "3600"])
            .env("PYTHONWARNINGS", "ignore")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = wait_peer_ready(&mut child, "oslo listener").await;
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let _ = tx.send(serde_json::from_str(&line).expect("listener prints JSON lines"));
            }
        });
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        Self { child, queue: config.notification_exchange.clone(), lines, received: Vec::new() }
    }

    /// Collects notifications until one with `event_type` mentions `image_id`.
    pub async fn wait_for(&mut self, event_type: &str, image_id: &str, limit: Duration) -> &[Value] {
        let found = tokio::time::timeout(limit, async {
            while let Some(n) = self.lines.recv().await {
                let hit = n["event_type"] == event_type && n["payload"].to_string().contains(image_id);
                self.received.push(n);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no {event_type} for {image_id}; got {:#?}", self.event_types());
        &self.received
    }

    pub fn event_types(&self) -> Vec<String> {
        self.received.iter().map(|n| n["event_type"].as_str().unwrap_or("?").to_string()).collect()
    }

    /// Drains what arrived without waiting.
    pub fn collect(&mut self) {
        while let Ok(n) = self.lines.try_recv() {
            self.received.push(n);
        }
    }
}

impl Drop for Listener {
    /// Stops the listener and removes its pool's queue, which oslo declares to outlive it.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let queue = self.queue.clone();
        // Its own thread and runtime: a Drop cannot await, and may run inside a runtime.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(delete_queue(&queue))
        })
        .join();
    }
}

/// nova-api's part, by Nova's own code: creates the queued image and casts.
/// Returns the image id.
pub async fn nova_api(config: &TestConfig, method: &str, guest: &DemoGuest, extra: &[&str]) -> String {
    let out = Command::new(peer_python())
        .arg(peer_script("nova_api.py"))
        .args([method, "--instance", &guest.uuid, "--host", &config.host, "--image-ref", &guest.base_image])
        .args([
            "--transport-url",
            &env("TRANSPORT_URL"),
            "--glance",
            &env("GLANCE_URL"),
            "--name",
            &unique("test-snapshot"),
            "--token",
            &openstack::token(false).await,
        ])
        .args(extra)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "nova_api.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["image_id"].as_str().unwrap().to_string()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// A Keystone token of the stack's admin, kept for the test binary's run (a token lives an
/// hour; a binary's tests take less).
pub fn admin_token() -> String {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN
        .get_or_init(|| {
            // Its own thread and runtime: callers may be inside a test's runtime.
            std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(openstack::token(true))
            })
            .join()
            .unwrap()
        })
        .clone()
}

/// A request to Glance as the stack's admin, who sees every project's images.
pub fn glance_request(method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    http().request(method, format!("{}{path}", env("GLANCE_URL"))).header("X-Auth-Token", admin_token())
}

/// The image as Glance shows it, or None when it is gone.
pub async fn glance_image(id: &str) -> Option<Value> {
    let resp = glance_request(reqwest::Method::GET, &format!("/v2/images/{id}")).send().await.unwrap();
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    Some(resp.error_for_status().unwrap().json().await.unwrap())
}

/// The image's data (in Glance's pool, whichever path made it) is the guest's disk at one
/// point in time: its filesystem with the writer's records an unbroken prefix, as
/// `scripts/check-image` reads them. The guests write all the time, so no byte-for-byte
/// comparison with the live disk can hold.
pub async fn assert_image_holds_guest(id: &str) {
    let check = openstack::check_image(&format!("rbd:images/{id}"), false).await;
    assert_eq!(check.status, 0, "image {id}: {}", check.output);
    assert!(check.unbroken() && check.last_record() > 0, "image {id}: {}", check.output);
}

/// Deletes the image; it being gone already is fine, any other refusal fails the test.
pub async fn glance_delete(id: &str) {
    let resp = glance_request(reqwest::Method::DELETE, &format!("/v2/images/{id}")).send().await.unwrap();
    let status = resp.status();
    assert!(
        status.is_success() || status == reqwest::StatusCode::NOT_FOUND,
        "DELETE image {id}: {status}: {}",
        resp.text().await.unwrap_or_default()
    );
}

/// Image ids of this instance's images in Glance with the given image_type.
pub async fn glance_images_of(instance: &str, image_type: &str) -> Vec<Value> {
    let path = format!("/v2/images?instance_uuid={instance}&image_type={image_type}&limit=100");
    let v: Value = glance_request(reqwest::Method::GET, &path)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    v["images"].as_array().cloned().unwrap_or_default()
}

pub async fn rbd_json(args: &[&str]) -> Value {
    let out = Command::new("rbd").args(args).args(["--format", "json"]).output().await.unwrap();
    assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Snapshot names on an RBD image (`pool/name`).
pub async fn rbd_snapshots(image: &str) -> Vec<String> {
    let v = rbd_json(&["snap", "ls", image]).await;
    v.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

pub async fn rbd_images(pool: &str) -> Vec<String> {
    let v = rbd_json(&["ls", pool]).await;
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// The snapshots novasnap made on the guest's disk (and has not removed).
pub async fn novasnap_disk_snapshots(guest: &DemoGuest) -> Vec<String> {
    rbd_snapshots(rbd_name(&guest.disk)).await.into_iter().filter(|s| s.starts_with("novasnap-")).collect()
}

/// `rbd:vms/x_disk` → `vms/x_disk`.
pub fn rbd_name(disk: &str) -> &str {
    disk.strip_prefix("rbd:").unwrap_or_else(|| panic!("{disk} is not an RBD disk"))
}

/// Entries under the snapshots directory that novasnap made.
pub fn temp_leftovers() -> Vec<String> {
    match std::fs::read_dir(snapshots_directory()) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("novasnap-"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub async fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh").args(["-c", "qemu:///system"]).args(args).output().await.unwrap();
    assert!(out.status.success(), "virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub async fn domain_state(domain: &str) -> String {
    virsh(&["domstate", domain]).await
}

/// Creates the queued image a snapshot fills, as nova-api does; returns its id.
pub async fn glance_create_snapshot_image(instance: &str) -> String {
    let body = serde_json::json!({
        "name": unique("test-snapshot"), "visibility": "private",
        "instance_uuid": instance, "image_type": "snapshot",
    });
    let v: Value = glance_request(reqwest::Method::POST, "/v2/images")
        .json(&body)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap().to_string()
}

pub fn shared_fixture(relative: &str) -> Value {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [manifest.join("../shared/fixtures/oslo"), manifest.join("../../shared/fixtures/oslo")];
    let dir = candidates.iter().find(|d| d.is_dir()).expect("../shared/fixtures/oslo beside the checkout");
    serde_json::from_str(&std::fs::read_to_string(dir.join(relative)).unwrap()).unwrap()
}

/// The captured nova `snapshot_instance` cast, re-addressed to `guest`, `image_id` and `host`,
/// with a fresh `_unique_id`: exact bytes as nova would send them.
pub fn nova_snapshot_cast(guest: &DemoGuest, image_id: &str, host: &str) -> Vec<u8> {
    let fixture = shared_fixture("messages/rpc_cast.snapshot_instance.nova_minimal.json");
    let envelope: Value = serde_json::from_str(fixture["body_raw_utf8"].as_str().unwrap()).unwrap();
    let mut msg: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    let data = &mut msg["args"]["instance"]["nova_object.data"];
    data["uuid"] = guest.uuid.as_str().into();
    data["image_ref"] = guest.base_image.as_str().into();
    data["host"] = host.into();
    msg["args"]["image_id"] = image_id.into();
    // Fresh each time: the duplicate ledger in Ceph outlives a test run, and a `_unique_id`
    // seen by an earlier run would make this cast a duplicate.
    msg["_unique_id"] = uuid::Uuid::new_v4().simple().to_string().into();
    msg["_context_auth_token"] = Value::Null;
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": msg.to_string()});
    body.to_string().into_bytes()
}

/// Publishes `body` to nova's exchange as oslo.messaging publishes a cast.
pub async fn publish_cast(host: &str, body: &[u8]) {
    publish_raw("nova", &format!("compute.{host}"), Some("application/json"), body).await
}

/// Publishes `body` with oslo's cast properties (and `content_type`, if any) to `exchange`.
pub async fn publish_raw(exchange: &str, routing_key: &str, content_type: Option<&str>, body: &[u8]) {
    use lapin::options::BasicPublishOptions;
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut props = BasicProperties::default();
    if let Some(ct) = content_type {
        props = props.with_content_type(ct.into());
    }
    let props = props
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0)
        .with_headers(FieldTable::default());
    channel
        .basic_publish(exchange, routing_key, BasicPublishOptions::default(), body, props)
        .await
        .unwrap()
        .await
        .unwrap();
    conn.close(200, "done").await.unwrap();
}

/// Ready plus unacknowledged messages in `queue`.
pub async fn queue_depth(queue: &str) -> u64 {
    let out = Command::new("rabbitmqctl").args(["-q", "list_queues", "name", "messages"]).output().await.unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A proxy in front of Glance that refuses every image-location request with 403, as a
/// Glance without location support does, and forwards everything else. Returns its URL.
pub async fn glance_refusing_locations() -> String {
    glance_proxy(|request| {
        request.is_location_change().then_some(("403 Forbidden", "location operations are not allowed"))
    })
    .await
}

/// A request as [`glance_proxy`] sees it: the head, and for PATCH and POST requests (JSON
/// bodies; uploads are PUTs) the start of the body, which names what the request changes.
/// A rule may edit `text` before it is forwarded, keeping its length (Content-Length).
pub struct ProxiedRequest {
    pub text: String,
}

impl ProxiedRequest {
    pub fn request_line(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }

    /// The locations API, or a PATCH of `/locations`.
    pub fn is_location_change(&self) -> bool {
        let line = self.request_line();
        line.contains("/locations") || (line.starts_with("PATCH") && self.text.contains("/locations"))
    }
}

/// A proxy in front of Glance: `refuse` answers a request itself with (status line, message),
/// or lets it, as it may have edited it, through to Glance (None). One request per
/// connection, so each is inspected. Returns the proxy's URL.
pub async fn glance_proxy<F>(refuse: F) -> String
where
    F: Fn(&mut ProxiedRequest) -> Option<(&'static str, &'static str)> + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let refuse = std::sync::Arc::new(refuse);
    let upstream = url::Url::parse(&env("GLANCE_URL")).unwrap();
    let upstream = format!("{}:{}", upstream.host_str().unwrap(), upstream.port_or_known_default().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (upstream, refuse) = (upstream.clone(), refuse.clone());
            tokio::spawn(async move {
                // The request head, up to the blank line; the body follows on the stream.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let has_body = text.lines().any(|l| l.starts_with("content-length:") && l[15..].trim() != "0")
                    || text.contains("transfer-encoding: chunked");
                if (text.starts_with("patch") || text.starts_with("post")) && has_body {
                    let mut body = vec![0u8; 8192];
                    let n = client.read(&mut body).await.unwrap_or(0);
                    head.extend_from_slice(&body[..n]);
                }
                let mut request = ProxiedRequest { text: String::from_utf8_lossy(&head).to_string() };
                if let Some((status, msg)) = refuse(&mut request) {
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                        msg.len()
                    );
                    let _ = client.write_all(reply.as_bytes()).await;
                    return;
                }
                let forwarded = request.text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                if server.write_all(forwarded.as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

/// The stack's broker as an AMQP URI for lapin.
pub fn amqp_uri() -> String {
    amqp_uri_of(&env("TRANSPORT_URL"))
}

/// An oslo `rabbit://` transport URL with one host as an AMQP URI for lapin.
fn amqp_uri_of(transport_url: &str) -> String {
    let uri = transport_url.replacen("rabbit://", "amqp://", 1);
    if uri.ends_with('/') {
        format!("{uri}%2f")
    } else {
        uri
    }
}

/// Takes every message from `queue`: (headers as text, body).
pub async fn drain_queue(queue: &str) -> Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let conn = lapin::Connection::connect(&amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(message)) = channel.basic_get(queue, BasicGetOptions::default()).await {
        let headers = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| {
                        let text = match v {
                            lapin::types::AMQPValue::LongString(s) => {
                                String::from_utf8_lossy(s.as_bytes()).into_owned()
                            }
                            other => format!("{other:?}"),
                        };
                        (k.to_string(), text)
                    })
                    .collect()
            })
            .unwrap_or_default();
        message.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        out.push((headers, message.delivery.data.clone()));
    }
    conn.close(200, "done").await.unwrap();
    out
}

/// Deletes `queue` over AMQP; one already gone is fine.
pub async fn delete_queue(queue: &str) {
    let conn = lapin::Connection::connect(&amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let _ = channel.queue_delete(queue, lapin::options::QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "done").await;
}

pub async fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).output().await.unwrap();
    assert!(status.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&status.stderr));
}

/// Validates `instance` against `schemas/<schema>`, failing with every error found.
pub fn assert_schema(schema: &str, instance: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas").join(schema);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema_value: Value = serde_json::from_str(&text).unwrap();
    let validator = jsonschema::validator_for(&schema_value).unwrap_or_else(|e| panic!("{schema}: {e}"));
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    assert!(errors.is_empty(), "{schema}: {errors:#?}\n{instance:#}");
}

/// A notification as the oslo listener handed it over, rebuilt as the oslo message (its
/// metadata carries message_id and timestamp) and checked against its schema.
pub fn assert_notification_schema(n: &Value) {
    let message = serde_json::json!({
        "message_id": n["metadata"]["message_id"], "timestamp": n["metadata"]["timestamp"],
        "publisher_id": n["publisher_id"], "event_type": n["event_type"], "priority": n["priority"], "payload": n["payload"],
    });
    assert_schema(&format!("notification/{}.json", n["event_type"].as_str().unwrap()), &message);
}
