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
    let mut stderr = wait_peer_ready(&mut child, "the oslo topology peer").await;
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
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
    let config = TestConfig::beside_other_tests(&refs);

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

/// One connection of the worker's, as the broker reports it.
#[derive(Debug)]
struct WorkerConnection {
    name: String,
    heartbeat: u64,
    /// The broker's address: 4 numbers for IPv4, 8 for IPv6.
    peer: Vec<u64>,
    auth_mechanism: String,
}

/// The worker's own connections (named after its host).
async fn worker_connections(host: &str) -> Vec<WorkerConnection> {
    rabbitmqctl_json(&["-q", "list_connections", "client_properties", "timeout", "peer_host", "auth_mechanism"])
        .await
        .iter()
        .filter_map(|c| {
            let name = c["client_properties"].as_array()?.iter().find(|p| p[0] == "connection_name")?[2].as_str()?;
            name.ends_with(&format!(":{host}")).then(|| WorkerConnection {
                name: name.to_string(),
                heartbeat: c["timeout"].as_u64().unwrap_or(0),
                peer: c["peer_host"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect(),
                auth_mechanism: c["auth_mechanism"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// A cast for a guest that is not here, by Nova's own RPC API with `rabbit_options` as
/// nova-api's: the worker takes it and reports `instance.snapshot.error`.
async fn ghost_cast_is_handled(config: &TestConfig, worker: &WorkerProcess, rabbit_options: &[&str]) {
    let mut listener = Listener::start(config).await;
    let ghost = guest(1).clone_with_uuid(uuid::Uuid::new_v4());
    let extra: Vec<&str> = rabbit_options.iter().flat_map(|o| ["--rabbit-option", o]).collect();
    let image_id = nova_api(config, "snapshot", &ghost, &extra).await;
    listener.wait_for("instance.snapshot.error", &image_id, Duration::from_secs(120)).await;
    assert!(!worker.log_text().contains("refusing a cast"), "{}", worker.log_text());
    glance_delete(&image_id).await;
}

#[tokio::test]
async fn a_broker_on_ipv6_loopback_through_an_ipv6_transport_url() {
    let config = TestConfig::beside_other_tests(&[("DEFAULT", "transport_url", "rabbit://guest:guest@[::1]:5672/")]);
    let worker = WorkerProcess::start(&config).await;
    let connections = worker_connections(&config.host).await;
    let ipv6_loopback = [0, 0, 0, 0, 0, 0, 0, 1];
    assert!(!connections.is_empty() && connections.iter().all(|c| c.peer == ipv6_loopback), "{connections:?}");
    ghost_cast_is_handled(&config, &worker, &[]).await;
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn heartbeat_timeout_threshold_0_means_no_heartbeats_and_others_are_negotiated() {
    for (threshold, expected) in [("0", 0), ("20", 20)] {
        let config =
            TestConfig::beside_other_tests(&[("oslo_messaging_rabbit", "heartbeat_timeout_threshold", threshold)]);
        let worker = WorkerProcess::start(&config).await;
        let connections = worker_connections(&config.host).await;
        let named = |prefix: &str| connections.iter().any(|c| c.name.starts_with(prefix));
        assert!(
            named("novasnap:") && named("novasnap-notifier:"),
            "the consumer's and the notifier's: {connections:?}"
        );
        assert!(connections.iter().all(|c| c.heartbeat == expected), "{threshold}: {connections:?}");
        ghost_cast_is_handled(&config, &worker, &[]).await;
        assert!(worker.stop().await.success());
    }
}

/// The prefetch counts of the channels of the worker's connection named `name`.
async fn channel_prefetch_counts(name: &str) -> Vec<u64> {
    let connections = rabbitmqctl_json(&["-q", "list_connections", "pid", "client_properties"]).await;
    let pid = connections
        .iter()
        .find(|c| {
            c["client_properties"].as_array().into_iter().flatten().any(|p| p[0] == "connection_name" && p[2] == name)
        })
        .and_then(|c| c["pid"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("no connection {name}"));
    rabbitmqctl_json(&["-q", "list_channels", "connection", "prefetch_count"])
        .await
        .iter()
        .filter(|c| c["connection"] == pid.as_str())
        .filter_map(|c| c["prefetch_count"].as_u64())
        .collect()
}

#[tokio::test]
async fn with_transient_queue_ttl_0_the_worker_consumes_and_calls_the_conductor() {
    // nova_writeback on: the ghost's task_state goes to Nova's conductor through an RPC
    // call, whose reply queue is declared with the TTL and consumed with oslo's prefetch.
    let config = TestConfig::beside_other_tests(&[
        ("oslo_messaging_rabbit", "rabbit_transient_queues_ttl", "0"),
        ("oslo_messaging_rabbit", "rabbit_qos_prefetch_count", "7"),
        ("novasnap", "nova_writeback", "true"),
    ]);
    let worker = WorkerProcess::start(&config).await;
    ghost_cast_is_handled(&config, &worker, &[]).await;
    let log = worker.log_text();
    assert!(!log.contains("x-expires"), "{log}");
    let prefetch = channel_prefetch_counts(&format!("novasnap-rpc:{}", config.host)).await;
    assert_eq!(prefetch, [7], "the reply queue's channel");
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn compressed_casts_are_read_and_notifications_compressed_as_kombu_does() {
    // In: nova-api compressing its casts (gzip, then bz2); the worker compresses nothing.
    let config = TestConfig::beside_other_tests(&[]);
    let worker = WorkerProcess::start(&config).await;
    for method in ["gzip", "bzip2"] {
        ghost_cast_is_handled(&config, &worker, &[&format!("kombu_compression={method}")]).await;
    }
    assert!(worker.stop().await.success());

    // Out: a worker with kombu_compression; a stock oslo listener reads its notifications,
    // and on the wire they carry kombu's header.
    let config = TestConfig::beside_other_tests(&[("oslo_messaging_rabbit", "kombu_compression", "gzip")]);
    let tap = unique("novasnap-test-tap");
    tap_notifications(&config.notification_exchange, &tap).await;
    let worker = WorkerProcess::start(&config).await;
    ghost_cast_is_handled(&config, &worker, &[]).await;
    let tapped = drain_queue(&tap).await;
    assert!(!tapped.is_empty());
    for (headers, body) in &tapped {
        assert_eq!(headers.get("compression").map(String::as_str), Some("application/x-gzip"));
        assert!(serde_json::from_slice::<Value>(body).is_err(), "the body is compressed");
    }
    assert!(worker.stop().await.success());
    delete_queue(&tap).await;
}

/// A queue of the test's own bound to every routing key of the notification exchange
/// (declared as oslo's notifier declares it).
async fn tap_notifications(exchange: &str, queue: &str) {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(&amqp_uri(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange,
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel.queue_declare(queue, QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    channel.queue_bind(queue, exchange, "#", QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    conn.close(200, "tapped").await.unwrap();
}

#[tokio::test]
async fn every_notification_driver_line_gets_every_notification() {
    // `driver` is a MultiStrOpt: one line each, as oslo.config reads them.
    let config = TestConfig::beside_other_tests(&[("oslo_messaging_notifications", "driver", "messagingv2")]);
    let text = std::fs::read_to_string(&config.path).unwrap();
    let three = "driver = messagingv2\ndriver = messaging\ndriver = log";
    std::fs::write(&config.path, text.replacen("driver = messagingv2", three, 1)).unwrap();
    let worker = WorkerProcess::start(&config).await;
    let mut listener = Listener::start(&config).await;
    let ghost = guest(1).clone_with_uuid(uuid::Uuid::new_v4());
    let image_id = nova_api(&config, "snapshot", &ghost, &[]).await;
    listener.wait_for("instance.snapshot.error", &image_id, Duration::from_secs(120)).await;
    // The second copy, from the other messaging driver (format 1.0), follows.
    let twice = wait_until(Duration::from_secs(30), || {
        listener.collect();
        let copies = listener
            .received
            .iter()
            .filter(|n| n["event_type"] == "instance.snapshot.error" && n["payload"].to_string().contains(&image_id))
            .count();
        async move { copies == 2 }
    })
    .await;
    assert!(twice.is_some(), "{:#?}", listener.event_types());
    let log = worker.log_text();
    assert!(log.contains("oslo.messaging.notification.instance.snapshot.error"), "the log driver: {log}");
    glance_delete(&image_id).await;
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn a_broker_that_does_not_answer_is_passed_over_for_the_next() {
    // Nothing listens on 5999: whichever comes first in the shuffled order, the worker
    // ends up on 5672.
    let url = "rabbit://guest:guest@127.0.0.1:5999,guest:guest@[::1]:5672/";
    let config = TestConfig::beside_other_tests(&[("DEFAULT", "transport_url", url)]);
    let worker = WorkerProcess::start(&config).await;
    assert!(worker.log_text().contains("connected to RabbitMQ broker=[::1]:5672"), "{}", worker.log_text());
    ghost_cast_is_handled(&config, &worker, &[]).await;
    assert!(worker.stop().await.success());
}

#[tokio::test]
async fn the_login_method_is_oslo_s_amqplain_unless_configured() {
    for (method, expected) in [(None, "AMQPLAIN"), (Some("PLAIN"), "PLAIN")] {
        let overrides: Vec<(&str, &str, &str)> =
            method.map(|m| ("oslo_messaging_rabbit", "rabbit_login_method", m)).into_iter().collect();
        let config = TestConfig::beside_other_tests(&overrides);
        let worker = WorkerProcess::start(&config).await;
        let connections = worker_connections(&config.host).await;
        assert!(connections.len() >= 2 && connections.iter().all(|c| c.auth_mechanism == expected), "{connections:?}");
        assert!(worker.stop().await.success());
    }
}

#[tokio::test]
async fn consumers_ask_for_cancel_on_ha_failover_when_enabled() {
    let config = TestConfig::beside_other_tests(&[("oslo_messaging_rabbit", "enable_cancel_on_failover", "true")]);
    let worker = WorkerProcess::start(&config).await;
    let consumers = rabbitmqctl_json(&["-q", "list_consumers", "queue_name", "arguments"]).await;
    for queue in [format!("compute.{}", config.host), format!("novasnap.snapshots.{}", config.host)] {
        let arguments = consumers
            .iter()
            .find(|c| c["queue_name"] == queue.as_str())
            .map(|c| c["arguments"].to_string())
            .unwrap_or_else(|| panic!("no consumer on {queue}"));
        assert!(arguments.contains(r#"["x-cancel-on-ha-failover","bool",true]"#), "{queue}: {arguments}");
    }
    assert!(worker.stop().await.success());
}
