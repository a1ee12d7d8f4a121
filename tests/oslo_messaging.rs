//! RabbitMQ as oslo.messaging uses it (issue 14), against the real broker: what novasnap
//! declares equals what oslo.messaging's RPC server, RPC client and notifier declare, for
//! each set of `[oslo_messaging_rabbit]` options, read back from the broker; and the
//! connection options that change how novasnap reaches it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use novasnap::messaging::{dispatcher, envelope, topology::Topology, transport::Transport, Notifier, SnapshotEvent};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A vhost of the test's own, with guest allowed in it; deleted when dropped.
struct Vhost(String);

impl Vhost {
    async fn new(tag: &str) -> Self {
        let name = unique(&format!("novasnap-test-{tag}"));
        rabbitmqctl(&["-q", "add_vhost", &name]).await;
        rabbitmqctl(&["-q", "set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]).await;
        Self(name)
    }

    fn url(&self, host: &str, port: u16) -> String {
        format!("rabbit://guest:guest@{host}:{port}/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["-q", "delete_vhost", &self.0]).output();
    }
}

async fn rabbitmqctl_json(args: &[&str]) -> Vec<Value> {
    let out = Command::new("rabbitmqctl").args(args).args(["--formatter", "json"]).output().await.unwrap();
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What a vhost holds, as the broker reports it; `reply_<hex>` queues named `reply_*`,
/// arguments (an AMQP table: unordered) sorted by name.
#[derive(Debug, PartialEq)]
struct Declared {
    exchanges: BTreeMap<String, Value>,
    queues: BTreeMap<String, Value>,
    bindings: BTreeSet<(String, String, String)>,
}

fn normalised(name: &str) -> String {
    match name.strip_prefix("reply_") {
        Some(_) => "reply_*".into(),
        None => name.to_string(),
    }
}

fn sorted_arguments(mut entity: Value) -> Value {
    if let Some(arguments) = entity["arguments"].as_array_mut() {
        arguments.sort_by(|a, b| a[0].as_str().cmp(&b[0].as_str()));
    }
    entity
}

async fn declared(vhost: &Vhost) -> Declared {
    let v = vhost.0.as_str();
    let exchanges =
        rabbitmqctl_json(&["-q", "list_exchanges", "-p", v, "name", "type", "durable", "auto_delete", "arguments"])
            .await
            .into_iter()
            .filter(|e| !e["name"].as_str().unwrap().is_empty() && !e["name"].as_str().unwrap().starts_with("amq."))
            .map(|e| (e["name"].as_str().unwrap().to_string(), sorted_arguments(e)))
            .collect();
    let queues =
        rabbitmqctl_json(&["-q", "list_queues", "-p", v, "name", "type", "durable", "auto_delete", "arguments"])
            .await
            .into_iter()
            .map(|mut q| {
                let name = normalised(q["name"].as_str().unwrap());
                q["name"] = name.clone().into();
                (name, sorted_arguments(q))
            })
            .collect();
    let bindings =
        rabbitmqctl_json(&["-q", "list_bindings", "-p", v, "source_name", "destination_name", "routing_key"])
            .await
            .into_iter()
            .filter(|b| !b["source_name"].as_str().unwrap().is_empty())
            .map(|b| {
                let field = |k: &str| normalised(b[k].as_str().unwrap());
                (field("source_name"), field("destination_name"), field("routing_key"))
            })
            .collect();
    Declared { exchanges, queues, bindings }
}

const VERSIONED_TOPIC: &str = "versioned_notifications";
const LEGACY_TOPIC: &str = "notifications";

/// oslo.messaging's RPC server and client for `compute.<host>` and a notifier on the
/// notification exchange, declaring in `vhost` with `options`; the declarations stay while
/// the returned peer runs.
async fn oslo_declares(vhost: &Vhost, config: &TestConfig, options: &[(&str, &str)]) -> tokio::process::Child {
    let mut command = Command::new(peer_python());
    command
        .arg(peer_script("oslo_topology.py"))
        .args(["--transport-url", &vhost.url("127.0.0.1", 5672), "--host", &config.host])
        .args(["--notification-exchange", &config.notification_exchange])
        .args(["--notification-topic", VERSIONED_TOPIC, "--notification-topic", LEGACY_TOPIC]);
    for (key, value) in options {
        command.args(["--option", &format!("{key}={value}")]);
    }
    let mut child = command
        .env("PYTHONWARNINGS", "ignore")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        let mut said = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.trim() == "ready" {
                return Ok(());
            }
            said.push(line);
        }
        Err(said.join("\n"))
    })
    .await
    .expect("the oslo peer declared within 60 s");
    ready.unwrap_or_else(|said| panic!("the oslo peer failed:\n{said}"));
    child
}

/// A cast's request, for the notifier: the captured nova cast, for a guest of the stack.
fn request(host: &str) -> novasnap::request::SnapshotRequest {
    let body = nova_snapshot_cast(&guest(1), &uuid::Uuid::new_v4().to_string(), host);
    dispatcher::dispatch(&envelope::decode(Some("application/json"), &body, 1 << 20).unwrap()).unwrap()
}

/// What novasnap declares on the RPC side (`compute.<host>`, a reply queue) and what its
/// notifier declares when it publishes `instance.snapshot.start` (versioned and legacy).
async fn novasnap_declares(config: &TestConfig) {
    let config = novasnap::config::Config::load(&config.path).unwrap();
    let transport = Transport::new(&config.messaging.transport);
    let (connection, _) = transport.connect("novasnap-topology-test").await.unwrap();
    let mut channel = connection.create_channel().await.unwrap();
    let topology = Topology { config: &config.messaging, host: &config.host };
    topology.declare_server_queue(&mut channel, &connection).await.unwrap();
    let reply = format!("reply_{}", uuid::Uuid::new_v4().simple());
    topology.declare_reply_queue(&mut channel, &connection, &reply).await.unwrap();
    let notifier = novasnap::messaging::notifier::AmqpNotifier::connect(&config).await.unwrap();
    notifier.notify(&request(&config.host), SnapshotEvent::Start).await.unwrap();
    notifier.flush(Duration::from_secs(30)).await;
    connection.close(200, "declared").await.unwrap();
}

/// For one option set: every exchange, queue and binding novasnap declares is declared by
/// oslo with the same type, flags and arguments, and the shared set is what both roles
/// need (the server queue, a reply queue, the exchanges, the notification queues).
async fn same_topology_as_oslo(tag: &str, options: &[(&str, &str)]) {
    let (oslo_vhost, ours_vhost) = (Vhost::new(&format!("oslo-{tag}")).await, Vhost::new(&format!("ours-{tag}")).await);
    let mut overrides: Vec<(&str, &str, String)> =
        vec![("DEFAULT", "transport_url", ours_vhost.url("127.0.0.1", 5672))];
    overrides.extend(options.iter().map(|(k, v)| ("oslo_messaging_rabbit", *k, v.to_string())));
    let refs: Vec<(&str, &str, &str)> = overrides.iter().map(|(s, k, v)| (*s, *k, v.as_str())).collect();
    let config = TestConfig::new(&refs);

    let mut peer = oslo_declares(&oslo_vhost, &config, options).await;
    let oslo = declared(&oslo_vhost).await;
    drop(peer.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(30), peer.wait()).await;
    novasnap_declares(&config).await;
    let ours = declared(&ours_vhost).await;

    let host_queue = format!("compute.{}", config.host);
    let expected_queues: BTreeSet<String> =
        [host_queue.as_str(), "reply_*", "versioned_notifications.info", "notifications.info"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    assert_eq!(ours.queues.keys().cloned().collect::<BTreeSet<_>>(), expected_queues, "{tag}: {ours:#?}");
    for (name, queue) in &ours.queues {
        assert_eq!(Some(queue), oslo.queues.get(name), "{tag}: queue {name}\noslo: {:#?}", oslo.queues);
    }
    let expected_exchanges: BTreeSet<String> =
        ["nova", config.notification_exchange.as_str()].iter().map(|s| s.to_string()).collect();
    assert_eq!(ours.exchanges.keys().cloned().collect::<BTreeSet<_>>(), expected_exchanges, "{tag}");
    for (name, exchange) in &ours.exchanges {
        assert_eq!(Some(exchange), oslo.exchanges.get(name), "{tag}: exchange {name}\noslo: {:#?}", oslo.exchanges);
    }
    assert!(!ours.bindings.is_empty());
    assert!(ours.bindings.is_subset(&oslo.bindings), "{tag}: ours {:#?}\noslo {:#?}", ours.bindings, oslo.bindings);
}

#[tokio::test]
async fn novasnap_declares_what_oslo_declares_for_each_option_set() {
    let sets: &[(&str, &[(&str, &str)])] = &[
        ("defaults", &[]),
        ("durable", &[("amqp_durable_queues", "true")]),
        ("auto-delete", &[("amqp_auto_delete", "true")]),
        ("quorum", &[("rabbit_quorum_queue", "true")]),
        ("transient-quorum", &[("rabbit_quorum_queue", "true"), ("rabbit_transient_quorum_queue", "true")]),
        (
            "quorum-limits",
            &[
                ("rabbit_quorum_queue", "true"),
                ("rabbit_quorum_delivery_limit", "3"),
                ("rabbit_quorum_max_memory_length", "100"),
                ("rabbit_quorum_max_memory_bytes", "1048576"),
            ],
        ),
        ("ttl-0", &[("rabbit_transient_queues_ttl", "0")]),
        ("ttl-60", &[("rabbit_transient_queues_ttl", "60")]),
        ("ha", &[("rabbit_ha_queues", "true")]),
    ];
    for (tag, options) in sets {
        same_topology_as_oslo(tag, options).await;
    }
}
