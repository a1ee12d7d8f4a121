//! The identity boundary against the stack's real Keystone: novasnap's service token, the
//! catalog, a revoked token renewed after the 401, bad credentials.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use novasnap::config::{AdapterConfig, Config, IdentityConfig, PasswordAuthConfig, ServiceUserConfig};
use novasnap::error::Classify;
use novasnap::identity::{Identity, PasswordAuth};
use novasnap::image::glance::GlanceClient;
use novasnap::image::ImageService;
use novasnap::request::RequestContext;
use secrecy::SecretString;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use common::env;

fn credentials(username: &str, password: &str, project: &str) -> PasswordAuthConfig {
    PasswordAuthConfig {
        section: "novasnap_service_user".into(),
        auth_url: env("OS_AUTH_URL"),
        user_id: None,
        username: Some(username.into()),
        user_domain_id: None,
        user_domain_name: Some(env("OS_USER_DOMAIN_NAME")),
        password: SecretString::from(password),
        project_id: None,
        project_name: Some(project.into()),
        project_domain_id: None,
        project_domain_name: Some(env("OS_PROJECT_DOMAIN_NAME")),
        domain_id: None,
        domain_name: None,
        system_scope: None,
        session: Default::default(),
    }
}

fn novasnap() -> PasswordAuthConfig {
    credentials("novasnap", &env("NOVASNAP_SERVICE_PASSWORD"), "service")
}

fn identity(own: PasswordAuthConfig) -> Identity {
    let config = IdentityConfig {
        service_user: ServiceUserConfig { send_service_user_token: false, auth: None },
        novasnap_service_user: Some(own),
    };
    Identity::new(&config).unwrap()
}

fn adapter(service_type: &str, interfaces: &[&str], endpoint_override: Option<String>) -> AdapterConfig {
    AdapterConfig {
        service_type: service_type.into(),
        valid_interfaces: interfaces.iter().map(|i| i.to_string()).collect(),
        region_name: Some(env("OS_REGION_NAME")),
        endpoint_override,
    }
}

/// Keystone's view of `token`, asked with `token` itself.
async fn validate(token: &str) -> reqwest::Response {
    let url = format!("{}/auth/tokens", env("OS_AUTH_URL").trim_end_matches('/'));
    common::http().get(url).header("X-Auth-Token", token).header("X-Subject-Token", token).send().await.unwrap()
}

/// A local server that answers 200 and keeps each request's `X-Auth-Token`: how a test
/// sees which token an adapter sends.
async fn token_recorder() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tokens: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = tokens.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("x-auth-token") {
                        seen.lock().unwrap().push(value.trim().to_string());
                    }
                }
            }
            let _ = write.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").await;
        }
    });
    (url, tokens)
}

#[tokio::test]
async fn novasnap_obtains_a_project_scoped_service_token_with_the_service_role() {
    let auth = PasswordAuth::new(&novasnap()).unwrap();
    let token = auth.token().await.unwrap();
    let response = validate(token.expose()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token"]["user"]["name"], "novasnap");
    assert_eq!(body["token"]["project"]["name"], "service");
    let roles: Vec<&str> =
        body["token"]["roles"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(roles.contains(&"service"), "{roles:?}");
    assert_eq!(auth.token().await.unwrap(), token, "the token is cached");
}

#[tokio::test]
async fn the_catalog_finds_glance_for_the_internal_and_the_public_interface() {
    let identity = identity(novasnap());
    let glance = env("GLANCE_URL");
    for interfaces in [&["internal"][..], &["public"], &["internal", "public"]] {
        let endpoints = identity.adapter(&adapter("image", interfaces, None), &[]).unwrap().endpoints().await.unwrap();
        assert_eq!(endpoints, std::slice::from_ref(&glance), "{interfaces:?}");
    }
    let elsewhere = AdapterConfig { region_name: Some("RegionNowhere".into()), ..adapter("image", &["public"], None) };
    let err = identity.adapter(&elsewhere, &[]).unwrap().endpoints().await.unwrap_err();
    assert!(!err.is_transient() && err.to_string().contains("RegionNowhere"), "{err}");
}

#[tokio::test]
async fn a_revoked_service_token_is_renewed_after_the_401_and_the_call_succeeds() {
    let identity = identity(novasnap());
    let (recorder, tokens) = token_recorder().await;
    let recording = identity.adapter(&adapter("image", &["public"], Some(recorder.clone())), &[]).unwrap();
    let keystone = identity.adapter(&adapter("identity", &["public"], None), &[]).unwrap();
    let ctx = RequestContext::default();
    let http = common::http();
    let catalog = || async { format!("{}/auth/catalog", keystone.endpoints().await.unwrap()[0].trim_end_matches('/')) };

    assert_eq!(keystone.send(&ctx, http.get(catalog().await)).await.unwrap().status(), 200);
    recording.send(&ctx, http.get(&recorder)).await.unwrap();
    let revoked = tokens.lock().unwrap()[0].clone();

    let admin = PasswordAuth::new(&credentials("admin", &env("OS_ADMIN_PASSWORD"), "admin")).unwrap();
    let url = format!("{}/auth/tokens", env("OS_AUTH_URL").trim_end_matches('/'));
    let revocation = http
        .delete(url)
        .header("X-Auth-Token", admin.token().await.unwrap().expose())
        .header("X-Subject-Token", &revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(revocation.status(), 204);
    assert_eq!(validate(&revoked).await.status(), 401, "Keystone refuses the revoked token");

    let response = keystone.send(&ctx, http.get(catalog().await)).await.unwrap();
    assert_eq!(response.status(), 200, "renewed after the 401, sent once more");
    let body: Value = response.json().await.unwrap();
    assert!(body["catalog"].as_array().is_some_and(|c| c.iter().any(|s| s["type"] == "image")), "{body}");

    recording.send(&ctx, http.get(&recorder)).await.unwrap();
    let renewed = tokens.lock().unwrap()[1].clone();
    assert_ne!(renewed, revoked);
    assert_eq!(validate(&renewed).await.status(), 200);
}

#[tokio::test]
async fn a_bad_password_is_a_permanent_error_naming_the_auth_url_and_the_user() {
    let auth = PasswordAuth::new(&credentials("novasnap", "not-the-password", "service")).unwrap();
    let err = auth.token().await.unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(text.contains(&env("OS_AUTH_URL")), "{text}");
    assert!(text.contains("user novasnap in domain Default"), "{text}");
    assert!(text.contains("[novasnap_service_user]") && text.contains("401"), "{text}");
}

#[tokio::test]
async fn the_stack_s_nova_conf_loads_unchanged_and_its_service_user_finds_glance() {
    let config = Config::load(Path::new(&env("NOVA_CONF"))).unwrap();
    assert!(config.glance.api_servers.is_empty() && config.identity.service_user.send_service_user_token);
    let identity = Identity::new(&config.identity).unwrap();
    let glance = identity.adapter(&config.glance.adapter, &config.glance.api_servers).unwrap();
    assert_eq!(glance.endpoints().await.unwrap(), [env("GLANCE_URL")]);
    // Nova's service user alone may not list images under Glance's default policy; with a
    // user's token it is only the service token beside it.
    let images = GlanceClient::new(&config.glance, &identity).unwrap();
    let listed = images.list(&demo_context().await, &[("visibility", "public")]).await.unwrap();
    assert!(!listed.is_empty());
}

/// The stack's demo user (project member), as a cast from nova-api carries it.
async fn demo_context() -> RequestContext {
    let demo = credentials(&env("OS_USERNAME"), &env("OS_PASSWORD"), &env("OS_PROJECT_NAME"));
    RequestContext { auth_token: Some(PasswordAuth::new(&demo).unwrap().token().await.unwrap()), ..Default::default() }
}

#[tokio::test]
async fn the_locations_api_takes_an_rbd_location_from_a_user_with_nova_s_service_token() {
    let config = Config::load(Path::new(&env("NOVA_CONF"))).unwrap();
    let identity = Identity::new(&config.identity).unwrap();
    let glance = identity.adapter(&config.glance.adapter, &[]).unwrap();
    let base = glance.endpoints().await.unwrap()[0].trim_end_matches('/').to_string();
    let ctx = demo_context().await;
    let http = common::http();
    let user_only = |request: reqwest::RequestBuilder| {
        request.header("X-Auth-Token", ctx.auth_token.as_ref().unwrap().expose()).send()
    };

    let created = user_only(http.post(format!("{base}/v2/images")).json(&serde_json::json!({
        "name": common::unique("identity-locations"), "disk_format": "raw", "container_format": "bare"
    })))
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let locations = format!("{base}/v2/images/{id}/locations");
    let location = serde_json::json!({"url": format!("rbd://00000000-0000-0000-0000-000000000000/images/{id}/snap"),
                                      "validation_data": {}});

    let refused = user_only(http.post(&locations).json(&location)).await.unwrap();
    let (status, body) = (refused.status(), refused.text().await.unwrap());
    assert_eq!(status, 403, "a user's token alone may not register non-http locations: {body}");
    let accepted = glance.send(&ctx, http.post(&locations).json(&location)).await.unwrap();
    let (status, body) = (accepted.status(), accepted.text().await.unwrap());
    assert_eq!(status, 202, "with Nova's service token (role service) beside it: {body}");

    let deleted = user_only(http.delete(format!("{base}/v2/images/{id}"))).await.unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
}
