//! Header and token-renewal logic against an in-process fake Keystone and fake service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::config::{PasswordAuthConfig, ServiceUserConfig, SessionConfig};
use crate::error::Classify;
use crate::request::{AuthToken, RequestContext};

/// One request as the fake server saw it: method, path, lower-cased headers.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self { status, headers: vec![], body: String::new() }
    }
}

/// An HTTP/1.1 server on 127.0.0.1 that answers every request with `answer` (given the
/// request and how many came before it) and records what it saw.
struct FakeServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeServer {
    async fn start(answer: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (record, answer) = (seen.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (record, answer) = (record.clone(), answer.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    let mut line = String::new();
                    read.read_line(&mut line).await.unwrap();
                    let mut parts = line.split_whitespace();
                    let (method, path) =
                        (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                    let mut headers = HashMap::new();
                    loop {
                        line.clear();
                        read.read_line(&mut line).await.unwrap();
                        match line.trim_end().split_once(':') {
                            Some((k, v)) => headers.insert(k.to_ascii_lowercase(), v.trim().to_string()),
                            None => break,
                        };
                    }
                    if let Some(length) = headers.get("content-length") {
                        let mut body = vec![0; length.parse().unwrap()];
                        read.read_exact(&mut body).await.unwrap();
                    } else if headers.get("transfer-encoding").is_some_and(|t| t == "chunked") {
                        while !line.starts_with("0\r") {
                            line.clear();
                            if read.read_line(&mut line).await.unwrap() == 0 {
                                break;
                            }
                        }
                    }
                    let request = Seen { method, path, headers };
                    let reply = {
                        let mut seen = record.lock().unwrap();
                        seen.push(request.clone());
                        answer(&request, seen.len() - 1)
                    };
                    let mut text = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
                    for (k, v) in &reply.headers {
                        text.push_str(&format!("{k}: {v}\r\n"));
                    }
                    text.push_str(&format!("Content-Length: {}\r\n\r\n{}", reply.body.len(), reply.body));
                    write.write_all(text.as_bytes()).await.unwrap();
                    write.shutdown().await.ok();
                });
            }
        });
        Self { url, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A Keystone whose n-th token is `<prefix>-<n>`, valid for `lifetime`.
async fn keystone(prefix: &'static str, lifetime: Duration) -> FakeServer {
    FakeServer::start(move |_, n| {
        let now = chrono::Utc::now();
        let body = json!({"token": {
            "issued_at": now, "expires_at": now + chrono::Duration::from_std(lifetime).unwrap(),
            "user": {"id": "u1", "name": "novasnap"},
            "roles": [{"id": "r1", "name": "service"}],
            "catalog": [{"type": "image", "name": "glance", "endpoints": [
                {"id": "e1", "interface": "public", "region": "RegionOne", "url": "http://glance.public:9292"},
                {"id": "e2", "interface": "internal", "region": "RegionOne", "url": "http://glance.internal:9292/v2"}]}]
        }});
        Reply { status: 201, headers: vec![("X-Subject-Token", format!("{prefix}-{}", n + 1))], body: body.to_string() }
    })
    .await
}

fn credentials(section: &str, keystone: &FakeServer) -> PasswordAuthConfig {
    PasswordAuthConfig {
        section: section.into(),
        auth_url: format!("{}/v3", keystone.url),
        user_id: None,
        username: Some("novasnap".into()),
        user_domain_id: None,
        user_domain_name: Some("Default".into()),
        password: SecretString::from("pw"),
        project_id: None,
        project_name: Some("service".into()),
        project_domain_id: None,
        project_domain_name: Some("Default".into()),
        domain_id: None,
        domain_name: None,
        system_scope: None,
        session: SessionConfig::default(),
    }
}

fn identity(
    send_service_user_token: bool,
    service_user: Option<PasswordAuthConfig>,
    own: Option<PasswordAuthConfig>,
) -> Identity {
    let service_user = ServiceUserConfig { send_service_user_token, auth: service_user };
    Identity::new(&IdentityConfig { service_user, novasnap_service_user: own }).unwrap()
}

fn adapter_config(endpoint_override: Option<String>) -> AdapterConfig {
    AdapterConfig {
        service_type: "image".into(),
        valid_interfaces: vec!["internal".into(), "public".into()],
        region_name: Some("RegionOne".into()),
        endpoint_override,
    }
}

/// Glance's side: refuses the tokens in `refused` with 401, answers 200 otherwise.
async fn service(refused: &'static [&'static str]) -> FakeServer {
    FakeServer::start(move |seen, _| {
        let tokens = ["x-auth-token", "x-service-token"].map(|h| seen.headers.get(h).cloned().unwrap_or_default());
        if tokens.iter().any(|t| refused.contains(&t.as_str())) {
            Reply::status(401)
        } else {
            Reply::status(200)
        }
    })
    .await
}

fn user_context() -> RequestContext {
    RequestContext { auth_token: Some(AuthToken::new("user-token")), ..Default::default() }
}

fn header(seen: &Seen, name: &str) -> Option<String> {
    seen.headers.get(name).cloned()
}

#[tokio::test]
async fn without_a_user_context_novasnap_s_own_token_is_sent_and_a_401_renews_it_once() {
    let own = keystone("own", Duration::from_secs(3600)).await;
    let glance = service(&["own-1"]).await;
    let ids = identity(false, None, Some(credentials("novasnap_service_user", &own)));
    let adapter = ids.adapter(&adapter_config(Some(glance.url.clone())), &[]).unwrap();
    let http = reqwest::Client::new();
    let response =
        adapter.send(&RequestContext::default(), http.get(format!("{}/v2/images", glance.url))).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = glance.seen();
    let tokens: Vec<_> = seen.iter().map(|s| header(s, "x-auth-token")).collect();
    assert_eq!(tokens, [Some("own-1".into()), Some("own-2".into())]);
    assert!(seen.iter().all(|s| header(s, "x-service-token").is_none()));
    assert_eq!(own.seen().len(), 2, "one token, then one more after the 401");
    let request = &own.seen()[0];
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/v3/auth/tokens"));

    // The renewed token is cached: the next request asks Keystone nothing.
    adapter.send(&RequestContext::default(), http.get(format!("{}/v2/images", glance.url))).await.unwrap();
    assert_eq!(own.seen().len(), 2);
    assert_eq!(header(&glance.seen()[2], "x-auth-token").as_deref(), Some("own-2"));
}

#[tokio::test]
async fn a_user_s_token_travels_with_nova_s_service_token_which_a_401_renews() {
    let nova = keystone("nova", Duration::from_secs(3600)).await;
    let glance = service(&["nova-1"]).await;
    let ids = identity(true, Some(credentials("service_user", &nova)), None);
    let adapter = ids.adapter(&adapter_config(None), std::slice::from_ref(&glance.url)).unwrap();
    let body = reqwest::Client::new().post(format!("{}/v2/images/x/locations", glance.url)).body("{}");
    assert_eq!(adapter.send(&user_context(), body).await.unwrap().status(), 200);
    let seen = glance.seen();
    assert_eq!(seen.len(), 2);
    for (request, service_token) in seen.iter().zip(["nova-1", "nova-2"]) {
        assert_eq!(header(request, "x-auth-token").as_deref(), Some("user-token"));
        assert_eq!(header(request, "x-service-token").as_deref(), Some(service_token));
    }

    // Without a user context, [service_user] serves as novasnap's own credentials.
    let http = reqwest::Client::new();
    adapter.send(&RequestContext::default(), http.get(format!("{}/v2/images", glance.url))).await.unwrap();
    let last = glance.seen().pop().unwrap();
    assert_eq!((header(&last, "x-auth-token").as_deref(), header(&last, "x-service-token")), (Some("nova-2"), None));
}

#[tokio::test]
async fn without_send_service_user_token_the_user_s_token_goes_alone_and_its_401_is_the_answer() {
    let nova = keystone("nova", Duration::from_secs(3600)).await;
    let glance = service(&["user-token"]).await;
    let ids = identity(false, Some(credentials("service_user", &nova)), None);
    let adapter = ids.adapter(&adapter_config(Some(glance.url.clone())), &[]).unwrap();
    let response = adapter.send(&user_context(), reqwest::Client::new().get(&glance.url)).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(glance.seen().len(), 1, "no service token to renew: nothing to try again with");
    assert!(header(&glance.seen()[0], "x-service-token").is_none());
    assert!(nova.seen().is_empty());
}

#[tokio::test]
async fn a_401_after_renewal_is_returned_and_a_streamed_body_is_never_sent_twice() {
    let own = keystone("own", Duration::from_secs(3600)).await;
    let glance = service(&["own-1", "own-2", "own-3"]).await;
    let ids = identity(false, None, Some(credentials("novasnap_service_user", &own)));
    let adapter = ids.adapter(&adapter_config(Some(glance.url.clone())), &[]).unwrap();
    let http = reqwest::Client::new();
    let ctx = RequestContext::default();
    let response = adapter.send(&ctx, http.get(format!("{}/v2/images", glance.url))).await.unwrap();
    assert_eq!(response.status(), 401, "refused twice: Glance's answer, for the caller to judge");
    assert_eq!(glance.seen().len(), 2);

    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"data"))]);
    let upload = http.put(format!("{}/v2/images/x/file", glance.url)).body(reqwest::Body::wrap_stream(chunks));
    let err = adapter.send(&ctx, upload).await.unwrap_err();
    let SendError::Identity(err) = err else { panic!("{err:?}") };
    assert!(matches!(err, IdentityError::Reauthenticated { .. }) && err.is_transient(), "{err}");
    assert_eq!(glance.seen().len(), 3, "the stream went once");
    // Its token was dropped: the next try has a new one.
    adapter.send(&ctx, http.get(format!("{}/v2/images", glance.url))).await.unwrap();
    assert_eq!(header(&glance.seen()[3], "x-auth-token").as_deref(), Some("own-3"));
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    // A 2 s token is renewed once half its life is gone (keystoneauth's 120 s does not fit).
    let own = keystone("own", Duration::from_secs(2)).await;
    let auth = PasswordAuth::new(&credentials("novasnap_service_user", &own)).unwrap();
    assert_eq!(auth.token().await.unwrap().expose(), "own-1");
    assert_eq!(auth.token().await.unwrap().expose(), "own-1", "cached");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(auth.token().await.unwrap().expose(), "own-2", "renewed while still valid");
}

#[tokio::test]
async fn the_catalog_gives_the_first_valid_interface_of_the_region() {
    let own = keystone("own", Duration::from_secs(3600)).await;
    let ids = identity(true, None, Some(credentials("novasnap_service_user", &own)));
    let adapter = ids.adapter(&adapter_config(None), &[]).unwrap();
    assert_eq!(adapter.endpoints().await.unwrap(), ["http://glance.internal:9292/v2"]);
    let mut public_only = adapter_config(None);
    public_only.valid_interfaces = vec!["public".into()];
    assert_eq!(ids.adapter(&public_only, &[]).unwrap().endpoints().await.unwrap(), ["http://glance.public:9292"]);
    let mut elsewhere = adapter_config(None);
    elsewhere.region_name = Some("RegionTwo".into());
    let err = ids.adapter(&elsewhere, &[]).unwrap().endpoints().await.unwrap_err();
    assert!(!err.is_transient() && err.to_string().contains("region RegionTwo"), "{err}");
    let fixed = ids.adapter(&adapter_config(Some("http://override".into())), &["http://a".into()]).unwrap();
    assert_eq!(fixed.endpoints().await.unwrap(), ["http://a"], "api_servers win over endpoint_override");

    let nothing = identity(false, None, None);
    let err = nothing.adapter(&adapter_config(None), &[]).err().unwrap();
    assert!(err.to_string().contains("api_servers"), "{err}");
}

#[tokio::test]
async fn keystone_s_refusal_is_permanent_and_its_absence_transient() {
    let refusing = FakeServer::start(|_, _| Reply {
        status: 401,
        headers: vec![("Content-Type", "application/json".into())],
        body: json!({"error": {"code": 401, "message": "The request you have made requires authentication.", "title": "Unauthorized"}}).to_string(),
    })
    .await;
    let auth = PasswordAuth::new(&credentials("novasnap_service_user", &refusing)).unwrap();
    let err = auth.token().await.unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.contains(&format!("{}/v3", refusing.url)) && text.contains("user novasnap in domain Default"),
        "{text}"
    );

    let busy = FakeServer::start(|_, _| Reply::status(503)).await;
    let err = PasswordAuth::new(&credentials("service_user", &busy)).unwrap().token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = FakeServer { url: format!("http://{}", listener.local_addr().unwrap()), seen: Arc::default() };
    drop(listener);
    let err = PasswordAuth::new(&credentials("service_user", &gone)).unwrap().token().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[test]
fn concurrent_requests_for_a_new_token_ask_keystone_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let own = keystone("own", Duration::from_secs(3600)).await;
        let auth = Arc::new(PasswordAuth::new(&credentials("novasnap_service_user", &own)).unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (auth, count) = (auth.clone(), count.clone());
                tokio::spawn(async move {
                    assert_eq!(auth.token().await.unwrap().expose(), "own-1");
                    count.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!((count.load(Ordering::Relaxed), own.seen().len()), (8, 1));
        // A 401 to an old token does not throw away a newer one.
        auth.invalidate(&AuthToken::new("own-0")).await;
        assert_eq!(auth.token().await.unwrap().expose(), "own-1");
    });
}
