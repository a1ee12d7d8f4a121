//! Glance v2 over HTTP (reqwest, rustls), reached as Nova reaches it.
//!
//! Where: `[glance] api_servers`, else `endpoint_override`, else Keystone's catalog (service
//! type, `valid_interfaces`, `region_name`, version suffix stripped as Nova does); every call
//! goes to the first server that answers, a connection error moves on to the next. With
//! what: the identity [`Adapter`]'s credentials (the user's token with a service token, or
//! novasnap's own), and the global request id as `X-OpenStack-Request-ID`; none is ever
//! logged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{Image, ImageError, ImageProperties, ImageService, ImageStatus};
use crate::config::GlanceConfig;
use crate::identity::{client_builder, http_error_text, Adapter, Identity, SendError};
use crate::request::RequestContext;

const PATCH_CONTENT_TYPE: &str = "application/openstack-images-v2.1-json-patch";
/// Error bodies are kept for the message, cut to this many bytes.
const ERROR_BODY_LIMIT: usize = 512;

pub struct GlanceClient {
    http: reqwest::Client,
    /// Uploads stream for as long as the data flows: no overall timeout.
    upload_http: reqwest::Client,
    /// Where Glance is, and the credentials every request carries.
    adapter: Adapter,
    /// Index of the server that answered last.
    current: AtomicUsize,
    /// Bound on waiting for an image to turn active.
    wait_limit: Duration,
}

impl GlanceClient {
    pub fn new(config: &GlanceConfig, identity: &Identity) -> Result<Self, ImageError> {
        let build = |timeout: Option<Duration>| {
            let builder = client_builder("glance", &config.session)?;
            let builder = match timeout {
                Some(t) => builder.timeout(t),
                None => builder.read_timeout(Duration::from_secs(300)),
            };
            builder.build().map_err(|e| ImageError::Transport { operation: "configure client", message: e.to_string() })
        };
        Ok(Self {
            http: build(Some(config.request_timeout))?,
            upload_http: build(None)?,
            adapter: identity.adapter(&config.adapter, &config.api_servers)?,
            current: AtomicUsize::new(0),
            wait_limit: config.request_timeout * 10,
        })
    }

    /// Sends the request built by `build` for `path`, trying each server in turn on
    /// connection errors.
    async fn send(
        &self,
        operation: &'static str,
        ctx: &RequestContext,
        method: Method,
        path: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
        client: &reqwest::Client,
    ) -> Result<Response, ImageError> {
        let servers: Vec<String> = self.adapter.endpoints().await?.iter().map(|s| unversioned(s)).collect();
        let start = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..servers.len() {
            let index = (start + i) % servers.len();
            let mut request = client.request(method.clone(), format!("{}{path}", servers[index]));
            if let Some(id) = ctx.global_request_id.as_deref().or(ctx.request_id.as_deref()) {
                request = request.header("X-OpenStack-Request-ID", id);
            }
            let request = build(request);
            // A streamed body is consumed by this try: it must not go to the next server empty.
            let replayable = request.try_clone().is_some();
            match self.adapter.send(ctx, request).await {
                Ok(response) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(SendError::Http(e)) if e.is_connect() && !replayable => {
                    // The retry policy tries again, with a fresh body, at the next server.
                    self.current.store((index + 1) % servers.len(), Ordering::Relaxed);
                    return Err(ImageError::Transport { operation, message: http_error_text(&e) });
                }
                Err(SendError::Http(e)) if e.is_connect() => last_error = Some(e),
                Err(SendError::Http(e)) => {
                    return Err(ImageError::Transport { operation, message: http_error_text(&e) })
                }
                Err(SendError::Identity(e)) => return Err(e.into()),
            }
        }
        let message =
            last_error.map_or_else(|| "no Glance api_servers configured".to_string(), |e| http_error_text(&e));
        Err(ImageError::Transport { operation, message })
    }

    async fn json(&self, operation: &'static str, target: Uuid, response: Response) -> Result<Value, ImageError> {
        let response = check(operation, target, response).await?;
        response.json().await.map_err(|e| ImageError::Transport { operation, message: e.to_string() })
    }

    /// Creates an image the way nova-api does before casting a snapshot: queued, no data.
    pub async fn create(&self, ctx: &RequestContext, fields: &ImageProperties) -> Result<Image, ImageError> {
        let body = Value::Object(fields.clone().into_iter().collect());
        let response =
            self.send("create image", ctx, Method::POST, "/v2/images", |r| r.json(&body), &self.http).await?;
        parse_image(&self.json("create image", Uuid::nil(), response).await?)
    }
}

/// An image endpoint without its version suffix (`…/v2`, `…/v2.1/`) or trailing slash, as
/// Nova's `get_api_servers` strips catalog endpoints: paths here start with `/v2`.
fn unversioned(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let is_version = |segment: &str| {
        segment.strip_prefix('v').is_some_and(|v| {
            let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
            [major, minor].iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    match trimmed.rsplit_once('/') {
        Some((base, last)) if is_version(last) && base.contains("://") => base.to_string(),
        _ => trimmed.to_string(),
    }
}

/// How long a `location_import` task may stay `pending`: Glance hands a task to its thread
/// pool as it accepts the request, so one still pending after this was lost (seen when the
/// request that started it met Glance's sqlite database "locked"). Its lock on the image
/// would hold for two hours.
const LOCATION_IMPORT_PENDING_LIMIT: Duration = Duration::from_secs(60);

impl GlanceClient {
    /// Waits for the image to turn `active`, bounded by the request timeout × 10 (the
    /// locations API activates asynchronously, in a `location_import` task of Glance's).
    /// A task that failed, or that Glance never started, ends the wait early as a transient
    /// fault: either leaves the image queued with no location for good, and registering the
    /// location again (see `add_location`) gets past it.
    async fn wait_until_active(&self, ctx: &RequestContext, id: Uuid) -> Result<(), ImageError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.wait_limit;
        loop {
            let image = self.get(ctx, id).await?;
            match image.status {
                ImageStatus::Active => return Ok(()),
                ImageStatus::Killed | ImageStatus::Deleted | ImageStatus::PendingDelete => {
                    return Err(ImageError::Http {
                        operation: "add location",
                        target: id.to_string(),
                        status: 409,
                        body: format!("image went {:?} while Glance checked the location", image.status),
                    })
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(ImageError::Transport {
                        operation: "add location",
                        message: format!("image {id} not active {:?} after registering its location", self.wait_limit),
                    })
                }
                _ => match self.newest_location_import(ctx, id).await? {
                    Some(task) if task.status == "failure" => {
                        return Err(ImageError::LocationImportFailed { id, message: task.message })
                    }
                    // This wait began as the task was made: it has been pending all along.
                    Some(task) if task.status == "pending" && started.elapsed() >= LOCATION_IMPORT_PENDING_LIMIT => {
                        let message = format!(
                            "task {} still pending after {LOCATION_IMPORT_PENDING_LIMIT:?}: Glance never started it",
                            task.id
                        );
                        return Err(ImageError::LocationImportFailed { id, message });
                    }
                    _ => tokio::time::sleep(Duration::from_millis(250)).await,
                },
            }
        }
    }

    /// The image's newest `location_import` task. Glance without the image-tasks API
    /// (< 2.12) tells nothing: None.
    async fn newest_location_import(
        &self,
        ctx: &RequestContext,
        id: Uuid,
    ) -> Result<Option<LocationImport>, ImageError> {
        let path = format!("/v2/images/{id}/tasks");
        let response = self.send("list image tasks", ctx, Method::GET, &path, |r| r, &self.http).await?;
        match self.json("list image tasks", id, response).await {
            Ok(tasks) => Ok(newest_location_import(&tasks)),
            Err(ImageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A `location_import` task as Glance's image-tasks listing shows it.
#[derive(Debug, PartialEq)]
struct LocationImport {
    id: String,
    status: String,
    message: String,
}

fn newest_location_import(tasks: &Value) -> Option<LocationImport> {
    let newest = tasks["tasks"]
        .as_array()?
        .iter()
        .filter(|t| t["type"] == "location_import")
        .max_by(|a, b| a["created_at"].as_str().cmp(&b["created_at"].as_str()))?;
    let text = |key: &str| newest[key].as_str().unwrap_or_default().to_string();
    Some(LocationImport { id: text("id"), status: text("status"), message: text("message") })
}

/// Turns non-2xx answers into errors; 404 becomes `NotFound`.
async fn check(operation: &'static str, target: Uuid, response: Response) -> Result<Response, ImageError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status == StatusCode::NOT_FOUND {
        return Err(ImageError::NotFound(target));
    }
    let mut body = response.text().await.unwrap_or_default();
    if body.len() > ERROR_BODY_LIMIT {
        let cut = (0..=ERROR_BODY_LIMIT).rev().find(|&i| body.is_char_boundary(i)).unwrap_or(0);
        body.truncate(cut);
    }
    Err(ImageError::Http { operation, target: target.to_string(), status: status.as_u16(), body })
}

/// Glance's image JSON → [`Image`]: the known fields typed, the rest kept as properties.
pub fn parse_image(v: &Value) -> Result<Image, ImageError> {
    let bad = |what: &str| ImageError::Transport {
        operation: "parse image",
        message: format!("image JSON without {what}: {v}"),
    };
    let obj = v.as_object().ok_or_else(|| bad("an object"))?;
    let id = obj.get("id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok()).ok_or_else(|| bad("an id"))?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(String::from);
    let mut locations: Vec<String> = obj
        .get("locations")
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(|l| l.get("url").and_then(Value::as_str).map(String::from)).collect())
        .unwrap_or_default();
    // `show_image_direct_url` (on in clouds with Ceph behind Glance) shows the first location
    // even with `show_multiple_locations` off, as Nova's `GlanceImageServiceV2.show` counts it.
    if let Some(direct) = text("direct_url").filter(|d| !locations.contains(d)) {
        locations.push(direct);
    }
    const TYPED: &[&str] =
        &["id", "name", "status", "size", "checksum", "disk_format", "container_format", "created_at", "locations"];
    Ok(Image {
        id,
        name: text("name"),
        status: ImageStatus::parse(obj.get("status").and_then(Value::as_str).unwrap_or("")),
        size: obj.get("size").and_then(Value::as_u64),
        checksum: text("checksum"),
        disk_format: text("disk_format"),
        container_format: text("container_format"),
        created_at: text("created_at"),
        locations,
        properties: obj
            .iter()
            .filter(|(k, _)| !TYPED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// JSON patch that makes `image` carry `properties`: `replace` where a key exists, `add`
/// where not, `remove` for nulls that exist; nothing for values already equal.
pub fn patch_for(image: &Image, properties: &ImageProperties) -> Vec<Value> {
    let current = |key: &str| -> Option<Value> {
        match key {
            "disk_format" => image.disk_format.clone().map(Value::String),
            "container_format" => image.container_format.clone().map(Value::String),
            "name" => image.name.clone().map(Value::String),
            _ => image.properties.get(key).cloned().filter(|v| !v.is_null()),
        }
    };
    properties
        .iter()
        .filter_map(|(key, value)| {
            let path = format!("/{}", key.replace('~', "~0").replace('/', "~1"));
            match (current(key), value.is_null()) {
                (Some(existing), false) if existing == *value => None,
                (Some(_), false) => Some(json!({"op": "replace", "path": path, "value": value})),
                (None, false) => Some(json!({"op": "add", "path": path, "value": value})),
                (Some(_), true) => Some(json!({"op": "remove", "path": path})),
                (None, true) => None,
            }
        })
        .collect()
}

#[async_trait]
impl ImageService for GlanceClient {
    async fn get(&self, ctx: &RequestContext, id: Uuid) -> Result<Image, ImageError> {
        let response = self.send("get image", ctx, Method::GET, &format!("/v2/images/{id}"), |r| r, &self.http).await?;
        match self.json("get image", id, response).await {
            // Glance's default policy shows other projects' images to admins only: to anyone
            // else, 404 does not tell a deleted image from one that cannot be seen.
            Err(ImageError::NotFound(_)) if !self.adapter.sees_everything(ctx).await? => {
                Err(ImageError::NotVisible(id))
            }
            other => parse_image(&other?),
        }
    }

    async fn update(&self, ctx: &RequestContext, id: Uuid, properties: &ImageProperties) -> Result<Image, ImageError> {
        let image = self.get(ctx, id).await?;
        let patch = Value::Array(patch_for(&image, properties));
        if patch.as_array().is_some_and(Vec::is_empty) {
            return Ok(image);
        }
        let body = patch.to_string();
        let response = self
            .send(
                "update image",
                ctx,
                Method::PATCH,
                &format!("/v2/images/{id}"),
                |r| r.header("Content-Type", PATCH_CONTENT_TYPE).body(body.clone()),
                &self.http,
            )
            .await?;
        parse_image(&self.json("update image", id, response).await?)
    }

    async fn add_location(&self, ctx: &RequestContext, id: Uuid, url: &str) -> Result<(), ImageError> {
        let image = self.get(ctx, id).await?;
        if image.locations.iter().any(|l| l == url) {
            // Registered by an earlier try, whose import task may still be at work.
            return match image.status {
                ImageStatus::Active => Ok(()),
                _ => self.wait_until_active(ctx, id).await,
            };
        }
        // The locations API (Glance ≥ 29), meant for services such as Nova.
        let body = json!({"url": url, "validation_data": {}});
        let response = self
            .send(
                "add location",
                ctx,
                Method::POST,
                &format!("/v2/images/{id}/locations"),
                |r| r.json(&body),
                &self.http,
            )
            .await?;
        let first_refusal = match check("add location", id, response).await {
            // 202: Glance verifies the location (hashing the data) in a task of its own.
            Ok(_) => return self.wait_until_active(ctx, id).await,
            // Older Glance, or the policy keeps this API to others, or (409) an earlier try's
            // task that failed or never started still holds the image's import lock, for up
            // to two hours: try the PATCH form, which takes no lock and activates at once.
            Err(ImageError::Http { status: status @ (400 | 403 | 404 | 405 | 409 | 501), body, .. }) => {
                format!("HTTP {status}: {body}")
            }
            Err(ImageError::NotFound(_)) => "locations API not found".to_string(),
            Err(e) => return Err(e),
        };
        let patch = json!([{"op": "add", "path": "/locations/-", "value": {"url": url, "metadata": {}}}]).to_string();
        let response = self
            .send(
                "add location",
                ctx,
                Method::PATCH,
                &format!("/v2/images/{id}"),
                |r| r.header("Content-Type", PATCH_CONTENT_TYPE).body(patch.clone()),
                &self.http,
            )
            .await?;
        match check("add location", id, response).await {
            Ok(_) => Ok(()),
            Err(ImageError::Http { status: status @ (400 | 403 | 409), body, .. }) => {
                // A concurrent try may have registered it meanwhile.
                if self.get(ctx, id).await?.locations.iter().any(|l| l == url) {
                    return Ok(());
                }
                Err(ImageError::LocationsRefused {
                    id,
                    reason: format!("locations API: {first_refusal}; PATCH add /locations/-: HTTP {status}: {body}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn upload(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        data: BoxStream<'static, Result<Bytes, std::io::Error>>,
        size: Option<u64>,
    ) -> Result<(), ImageError> {
        // A stream is consumed by the first request: `send` does not fail over with it.
        let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(data)));
        let response = self
            .send(
                "upload image data",
                ctx,
                Method::PUT,
                &format!("/v2/images/{id}/file"),
                |r| {
                    let r = r.header("Content-Type", "application/octet-stream");
                    // A known length goes as Content-Length (Glance can then check it);
                    // otherwise the body is chunked.
                    let r = match size {
                        Some(size) => r.header(reqwest::header::CONTENT_LENGTH, size),
                        None => r,
                    };
                    match body.lock().expect("upload body lock").take() {
                        Some(body) => r.body(body),
                        None => r,
                    }
                },
                &self.upload_http,
            )
            .await?;
        check("upload image data", id, response).await.map(drop)
    }

    async fn delete(&self, ctx: &RequestContext, id: Uuid) -> Result<(), ImageError> {
        let response =
            self.send("delete image", ctx, Method::DELETE, &format!("/v2/images/{id}"), |r| r, &self.http).await?;
        match check("delete image", id, response).await {
            Ok(_) | Err(ImageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, ctx: &RequestContext, filters: &[(&str, &str)]) -> Result<Vec<Image>, ImageError> {
        let mut query: Vec<(&str, &str)> = filters.to_vec();
        query.extend([("sort_key", "created_at"), ("sort_dir", "desc"), ("limit", "100")]);
        let mut path = format!("/v2/images?{}", serde_urlencode(&query));
        let mut images = Vec::new();
        loop {
            let response = self.send("list images", ctx, Method::GET, &path, |r| r, &self.http).await?;
            let page = self.json("list images", Uuid::nil(), response).await?;
            for image in page.get("images").and_then(Value::as_array).into_iter().flatten() {
                images.push(parse_image(image)?);
            }
            match page.get("next").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => path = next.to_string(),
                _ => return Ok(images),
            }
        }
    }
}

fn serde_urlencode(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request as a [`serve`] server received it: its head, and how much body came.
    #[derive(Debug, Clone)]
    struct Received {
        head: String,
        body: usize,
    }

    /// A one-request-per-connection HTTP server on 127.0.0.1 answering every request with
    /// `answer(port)` (a whole response head); returns its port and what it received.
    async fn serve(
        answer: impl Fn(u16) -> String + Send + Sync + 'static,
    ) -> (u16, Arc<std::sync::Mutex<Vec<Received>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (seen, answer) = (received.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (seen, answer) = (seen.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut data = Vec::new();
                    let mut buf = [0u8; 8192];
                    let head_end = loop {
                        let Ok(n) = client.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        data.extend_from_slice(&buf[..n]);
                        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
                        .unwrap_or(0);
                    let mut body = data.len() - head_end;
                    // A body that never comes is what is being tested for: wait a little.
                    while body < length {
                        match tokio::time::timeout(Duration::from_millis(500), client.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => body += n,
                            _ => break,
                        }
                    }
                    seen.lock().unwrap().push(Received { head, body });
                    let _ = client.write_all(answer(port).as_bytes()).await;
                });
            }
        });
        (port, received)
    }

    /// A client of fixed `servers`, with no Keystone credentials (tokens come from the context).
    fn client(servers: Vec<String>) -> GlanceClient {
        let adapter = crate::config::AdapterConfig {
            service_type: "image".into(),
            valid_interfaces: vec!["internal".into(), "public".into()],
            region_name: None,
            endpoint_override: None,
        };
        let config = GlanceConfig {
            api_servers: servers,
            adapter,
            session: Default::default(),
            request_timeout: Duration::from_secs(5),
        };
        let no_credentials = crate::config::IdentityConfig {
            service_user: crate::config::ServiceUserConfig { send_service_user_token: false, auth: None },
            novasnap_service_user: None,
        };
        GlanceClient::new(&config, &Identity::new(&no_credentials).unwrap()).unwrap()
    }

    fn stream(data: &'static [u8]) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
        use futures::StreamExt;
        futures::stream::iter(data.chunks(4).map(|c| Ok(Bytes::from_static(c)))).boxed()
    }

    /// A port nothing listens on: connecting is refused.
    async fn closed_port() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    /// The first Glance server refuses connections mid-failover: the upload's stream was
    /// consumed by that try, so it must not go to the second server without its body. The
    /// try fails (transient), and the retry, with a fresh stream, goes to the second server.
    #[tokio::test]
    async fn an_upload_never_fails_over_with_a_consumed_body() {
        let (port, received) = serve(|_| "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".into()).await;
        let dead = closed_port().await;
        let glance = client(vec![format!("http://127.0.0.1:{dead}"), format!("http://127.0.0.1:{port}")]);
        let (ctx, id, data) = (RequestContext::default(), Uuid::new_v4(), b"sixteen bytes!!!");
        let first = glance.upload(&ctx, id, stream(data), Some(data.len() as u64)).await;
        let bodiless = received.lock().unwrap().iter().any(|r| r.head.starts_with("put") && r.body < data.len());
        assert!(!bodiless, "a PUT without its body reached a server: {:?}", received.lock().unwrap());
        assert!(matches!(first, Err(ImageError::Transport { .. })), "{first:?}");
        glance
            .upload(&ctx, id, stream(data), Some(data.len() as u64))
            .await
            .expect("the retry reaches the next server");
        let puts = received.lock().unwrap().clone();
        assert_eq!(puts.len(), 1, "{puts:?}");
        assert_eq!(puts[0].body, data.len());
    }

    /// A Glance (or something posing as one) redirecting elsewhere: the token does not go.
    #[tokio::test]
    async fn the_token_does_not_follow_a_redirect_to_another_host() {
        let (elsewhere, stolen) = serve(|_| "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into()).await;
        let (port, _) = serve(move |_| {
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://localhost:{elsewhere}/v2/images/x\r\nContent-Length: 0\r\n\r\n"
            )
        })
        .await;
        let glance = client(vec![format!("http://127.0.0.1:{port}")]);
        let ctx = RequestContext { auth_token: Some(crate::request::AuthToken::new("s3cret")), ..Default::default() };
        let _ = glance.get(&ctx, Uuid::new_v4()).await;
        let leaked: Vec<_> = stolen.lock().unwrap().iter().filter(|r| r.head.contains("s3cret")).cloned().collect();
        assert!(leaked.is_empty(), "the token went to another host: {leaked:?}");
    }

    fn image(v: Value) -> Image {
        parse_image(&v).unwrap()
    }

    #[test]
    fn catalog_endpoints_lose_their_version_suffix() {
        assert_eq!(unversioned("http://127.0.0.1:9292"), "http://127.0.0.1:9292");
        assert_eq!(unversioned("http://127.0.0.1:9292/"), "http://127.0.0.1:9292");
        assert_eq!(unversioned("https://cloud/image/v2/"), "https://cloud/image");
        assert_eq!(unversioned("https://cloud/image/v2.1"), "https://cloud/image");
        assert_eq!(unversioned("https://cloud/images/vx"), "https://cloud/images/vx");
        assert_eq!(unversioned("https://v2"), "https://v2");
    }

    #[test]
    fn only_the_newest_location_import_task_counts() {
        let task = |id: &str, kind: &str, status: &str, created: &str| json!({"id": id, "type": kind, "status": status, "created_at": created, "message": format!("{status} {id}")});
        let tasks = json!({"tasks": [
            task("a", "location_import", "failure", "2026-11-25T07:59:26.125554"),
            task("c", "api_image_import", "processing", "2026-11-25T07:59:29.000000"),
            task("b", "location_import", "pending", "2026-11-25T07:59:27.000001"),
        ]});
        let newest = LocationImport { id: "b".into(), status: "pending".into(), message: "pending b".into() };
        assert_eq!(newest_location_import(&tasks), Some(newest));
        assert_eq!(newest_location_import(&json!({"tasks": []})), None);
    }

    #[test]
    fn glance_json_maps_into_an_image() {
        let i = image(json!({
            "id": "9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b", "name": "s", "status": "active", "size": 5,
            "disk_format": "raw", "container_format": "bare", "checksum": "abc",
            "locations": [{"url": "rbd://f/images/x/snap", "metadata": {}}],
            "instance_uuid": "i-1", "min_ram": 0
        }));
        assert_eq!(i.status, ImageStatus::Active);
        assert_eq!(i.locations, vec!["rbd://f/images/x/snap"]);
        let direct = image(json!({"id": "9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b", "status": "active",
                                  "direct_url": "rbd://f/images/y/snap"}));
        assert_eq!(direct.locations, vec!["rbd://f/images/y/snap"], "direct_url counts as a location");
        assert_eq!(i.properties["instance_uuid"], json!("i-1"));
        assert!(!i.properties.contains_key("status"));
        assert!(parse_image(&json!({"name": "no id"})).is_err());
    }

    #[test]
    fn patches_add_replace_remove_and_skip_what_is_already_so() {
        let i = image(json!({"id": "9e8f7a6b-5c4d-4e3f-8a2b-1c0d9e8f7a6b", "status": "queued",
                             "disk_format": null, "container_format": "bare", "os_type": "linux", "gone": "x"}));
        let props: ImageProperties = [
            ("disk_format".to_string(), json!("raw")),
            ("container_format".to_string(), json!("bare")),
            ("os_type".to_string(), json!("windows")),
            ("gone".to_string(), Value::Null),
            ("a/b".to_string(), json!("1")),
        ]
        .into();
        let patch = patch_for(&i, &props);
        assert_eq!(
            patch,
            vec![
                json!({"op": "add", "path": "/a~1b", "value": "1"}),
                json!({"op": "add", "path": "/disk_format", "value": "raw"}),
                json!({"op": "remove", "path": "/gone"}),
                json!({"op": "replace", "path": "/os_type", "value": "windows"}),
            ]
        );
    }
}
