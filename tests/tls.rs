//! TLS to RabbitMQ, Keystone and Glance (issue 14), against the stack's own CA and TLS
//! listeners: a snapshot with every connection of the worker over TLS, and a wrong CA that
//! fails naming the endpoint it could not trust.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const SNAPSHOT_LIMIT: Duration = Duration::from_secs(300);

/// A worker that reaches RabbitMQ at 127.0.0.1:5671 (amqps, trusting `amqp_ca`), Keystone
/// (both its service users) and Glance over https (trusting `keystone_ca` and `glance_ca`).
fn tls_overrides(amqp_ca: &str, keystone_ca: &str, glance_ca: &str) -> Vec<(&'static str, &'static str, String)> {
    let keystone = env("KEYSTONE_HTTPS_URL");
    vec![
        ("DEFAULT", "transport_url", "rabbit://guest:guest@127.0.0.1:5671/?ssl=1".into()),
        ("oslo_messaging_rabbit", "ssl_ca_file", amqp_ca.into()),
        ("service_user", "auth_url", keystone.clone()),
        ("service_user", "cafile", keystone_ca.into()),
        ("novasnap_service_user", "auth_url", keystone),
        ("novasnap_service_user", "cafile", keystone_ca.into()),
        ("glance", "endpoint_override", env("GLANCE_HTTPS_URL")),
        ("glance", "cafile", glance_ca.into()),
    ]
}

fn config_with(overrides: &[(&'static str, &'static str, String)]) -> TestConfig {
    let refs: Vec<(&str, &str, &str)> = overrides.iter().map(|(s, k, v)| (*s, *k, v.as_str())).collect();
    TestConfig::new(&refs)
}

/// A CA of its own (openssl, as the stack makes its), which signed none of the stack's
/// certificates.
fn wrong_ca(dir: &Path) -> String {
    let ca = dir.join("wrong-ca.pem");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=not the stack's CA"])
        .arg("-keyout")
        .arg(dir.join("wrong-ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    ca.display().to_string()
}

/// `client`'s certificate and key as every TLS client of the worker presents it.
fn client_certificate(cert: &str, key: &str) -> Vec<(&'static str, &'static str, String)> {
    let mut overrides = vec![
        ("oslo_messaging_rabbit", "ssl_cert_file", cert.to_string()),
        ("oslo_messaging_rabbit", "ssl_key_file", key.to_string()),
    ];
    for section in ["service_user", "novasnap_service_user", "glance"] {
        overrides.push((section, "certfile", cert.to_string()));
        overrides.push((section, "keyfile", key.to_string()));
    }
    overrides
}

/// `rabbitmqctl list_connections` of the worker's own connections (named after its host):
/// (name, whether TLS, the subject of the client certificate it presented, if any).
async fn worker_connections(host: &str) -> Vec<(String, bool, String)> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "client_properties", "ssl", "peer_cert_subject", "--formatter", "json"])
        .output()
        .await
        .unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.iter()
        .filter_map(|c| {
            let name = c["client_properties"].as_array()?.iter().find(|p| p[0] == "connection_name")?[2].as_str()?;
            let subject = c["peer_cert_subject"].as_str().unwrap_or_default().to_string();
            name.ends_with(&format!(":{host}")).then(|| (name.to_string(), c["ssl"] == true, subject))
        })
        .collect()
}

/// A snapshot through a worker of `config`: the image active with the guest's records, and
/// every connection the worker holds to RabbitMQ over TLS, with `client_subject`'s
/// certificate when given.
async fn snapshot_over_tls(config: &TestConfig, client_subject: Option<&str>) {
    let mut listener = Listener::start(config).await;
    let worker = WorkerProcess::start(config).await;
    let image_id = nova_api(config, "snapshot", &guest(1), &[]).await;
    listener.wait_for("instance.snapshot.end", &image_id, SNAPSHOT_LIMIT).await;
    let image = glance_image(&image_id).await.expect("the image exists");
    assert_eq!(image["status"], "active", "{image:#}");
    assert_image_holds_guest(&image_id).await;

    let connections = worker_connections(&config.host).await;
    let names: Vec<&str> = connections.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(names.contains(&format!("novasnap:{}", config.host).as_str()), "{connections:?}");
    assert!(names.contains(&format!("novasnap-notifier:{}", config.host).as_str()), "{connections:?}");
    assert!(connections.iter().all(|(_, tls, _)| *tls), "every connection of the worker is TLS: {connections:?}");
    if let Some(subject) = client_subject {
        assert!(connections.iter().all(|(_, _, s)| s.contains(subject)), "{connections:?}");
    }
    let log = worker.log_text();
    assert!(log.contains("tls=true") && log.contains("127.0.0.1:5671"), "{log}");
    assert!(worker.stop().await.success());
    glance_delete(&image_id).await;
}

#[tokio::test]
async fn a_snapshot_with_rabbitmq_keystone_and_glance_over_tls() {
    let ca = env("STACK_CA_FILE");
    snapshot_over_tls(&config_with(&tls_overrides(&ca, &ca, &ca)), None).await;
}

/// Without CA files: the system's CA store (which holds the stack's CA), for RabbitMQ with
/// `?ssl=1` alone as for Keystone and Glance; and `insecure` trusting any certificate, as
/// keystoneauth's `verify=False` does, even with a `cafile` that would refuse it.
#[tokio::test]
async fn the_system_ca_store_is_trusted_without_ca_files_and_insecure_trusts_anything() {
    let without_ca_files: Vec<_> = tls_overrides("", "", "")
        .into_iter()
        .filter(|(_, k, _)| !k.ends_with("cafile") && *k != "ssl_ca_file")
        .collect();
    snapshot_over_tls(&config_with(&without_ca_files), None).await;

    let dir = tempfile::tempdir().unwrap();
    let (ca, wrong) = (env("STACK_CA_FILE"), wrong_ca(dir.path()));
    let mut insecure = tls_overrides(&ca, &wrong, &wrong);
    for section in ["service_user", "novasnap_service_user", "glance"] {
        insecure.push((section, "insecure", "true".into()));
    }
    snapshot_over_tls(&config_with(&insecure), None).await;
}

#[tokio::test]
async fn a_wrong_ca_fails_naming_the_endpoint_it_could_not_trust() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, wrong) = (env("STACK_CA_FILE"), wrong_ca(dir.path()));

    // RabbitMQ: the worker does not start, and says which broker it could not trust.
    let config = config_with(&tls_overrides(&wrong, &ca, &ca));
    let mut worker = WorkerProcess::spawn(&config, &[]);
    assert!(!worker.wait_exit(Duration::from_secs(60)).await.success());
    let log = worker.log_text();
    assert!(log.contains("no broker reachable: 127.0.0.1:5671") && log.contains("UnknownIssuer"), "{log}");
    assert!(!log.contains("in front of nova-compute"), "{log}");

    // Keystone, then Glance: the snapshot fails, the error naming the https endpoint.
    for (overrides, endpoint) in [
        (tls_overrides(&ca, &wrong, &ca), env("KEYSTONE_HTTPS_URL")),
        (tls_overrides(&ca, &ca, &wrong), env("GLANCE_HTTPS_URL")),
    ] {
        snapshot_fails_naming(&config_with(&overrides), &endpoint, "UnknownIssuer").await;
    }
}

/// A snapshot with `config` fails, its worker logging `error` of `endpoint`.
async fn snapshot_fails_naming(config: &TestConfig, endpoint: &str, error: &str) {
    let worker = WorkerProcess::start(config).await;
    let image_id = nova_api(config, "snapshot", &guest(1), &[]).await;
    wait_until(Duration::from_secs(120), || async {
        worker.log_text().lines().any(|l| l.contains(endpoint) && l.contains(error))
    })
    .await
    .unwrap_or_else(|| panic!("no TLS error naming {endpoint}:\n{}", worker.log_text()));
    assert!(worker.stop().await.success());
    glance_delete(&image_id).await;
    delete_queue(&format!("novasnap.snapshots.{}", config.host)).await;
}

/// The stack's listeners verify a client certificate when one is presented (RabbitMQ's
/// `verify_peer`, gunicorn's `--cert-reqs 1`): the stack's own is accepted, one from another
/// CA refused, which shows the worker presents the certificate it is given.
#[tokio::test]
async fn client_certificates_are_presented_to_rabbitmq_keystone_and_glance() {
    let ca = env("STACK_CA_FILE");
    let mut overrides = tls_overrides(&ca, &ca, &ca);
    overrides.extend(client_certificate(&env("STACK_CLIENT_CERT_FILE"), &env("STACK_CLIENT_KEY_FILE")));
    snapshot_over_tls(&config_with(&overrides), Some("novasnap stack client")).await;

    let dir = tempfile::tempdir().unwrap();
    let stranger = wrong_ca(dir.path());
    let stranger_key = dir.path().join("wrong-ca.key").display().to_string();
    let mut overrides = tls_overrides(&ca, &ca, &ca);
    overrides.extend(client_certificate(&stranger, &stranger_key));
    let config = config_with(&overrides);
    let mut worker = WorkerProcess::spawn(&config, &[]);
    assert!(!worker.wait_exit(Duration::from_secs(60)).await.success());
    let log = worker.log_text();
    assert!(log.contains("no broker reachable: 127.0.0.1:5671"), "{log}");

    let mut overrides = tls_overrides(&ca, &ca, &ca);
    overrides.push(("glance", "certfile", stranger.clone()));
    overrides.push(("glance", "keyfile", stranger_key.clone()));
    snapshot_fails_naming(&config_with(&overrides), &env("GLANCE_HTTPS_URL"), "UnknownCA").await;
}
