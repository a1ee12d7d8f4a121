//! keystoneauth's `password` plugin: a token for one section's credentials, cached, renewed
//! before it expires and on demand after a 401, and the catalog that came with it.
//!
//! The authentication itself (the v3 request body for user id or name and domain, scope,
//! Keystone's error shapes) is `openstack-sdk-auth-password`'s; the cache is ours.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use openstack_sdk_auth_core::{
    Auth, AuthError, AuthTokenScope, Domain, OpenStackAuthType, Project, ServiceEndpoints, System,
};
use openstack_sdk_auth_password::PasswordAuthenticator;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tracing::{debug, warn};
use url::Url;

use super::{client_builder, IdentityError};
use crate::config::PasswordAuthConfig;
use crate::request::AuthToken;

/// How long before its expiry a token is renewed (keystoneauth's `MIN_TOKEN_LIFE_SECONDS`),
/// or half its lifetime for tokens shorter-lived than twice that.
const RENEW_AHEAD: Duration = Duration::from_secs(120);
/// Bound on one Keystone request when the section sets no `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct PasswordAuth {
    http: reqwest::Client,
    /// `auth_url`, ending in `/v3/`.
    identity_url: Url,
    /// The plugin's inputs: `password`, `user_id` or `username` and its domain.
    values: HashMap<String, SecretString>,
    scope: Option<AuthTokenScope>,
    /// For error messages: the section, `auth_url` as configured, and who.
    section: String,
    auth_url: String,
    user: String,
    current: Mutex<Option<Arc<Issued>>>,
}

/// A token and what came with it.
struct Issued {
    token: AuthToken,
    expires_at: DateTime<Utc>,
    renew_at: DateTime<Utc>,
    catalog: Vec<ServiceEndpoints>,
    /// The roles the token carries, by name.
    roles: Vec<String>,
}

impl PasswordAuth {
    pub fn new(config: &PasswordAuthConfig) -> Result<Self, IdentityError> {
        let section = config.section.clone();
        let http = client_builder(&section, &config.session)?
            .timeout(config.session.timeout.unwrap_or(DEFAULT_TIMEOUT))
            .build()
            .map_err(|e| IdentityError::Tls { section: section.clone(), message: e.to_string() })?;
        let not_configured = |what: String| IdentityError::NotConfigured(format!("[{section}] auth_url: {what}"));
        let mut identity_url = Url::parse(&config.auth_url).map_err(|e| not_configured(e.to_string()))?;
        // keystoneauth's generic plugin discovers the version under an unversioned URL;
        // novasnap speaks v3 only, at `/v3`.
        let path = identity_url.path().trim_end_matches('/').to_string();
        let path = if path.ends_with("/v3") { format!("{path}/") } else { format!("{path}/v3/") };
        identity_url.set_path(&path);

        let mut values = HashMap::from([("password".to_string(), config.password.clone())]);
        let mut put = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                values.insert(key.to_string(), SecretString::from(v.clone()));
            }
        };
        put("user_id", &config.user_id);
        put("username", &config.username);
        put("user_domain_id", &config.user_domain_id);
        put("user_domain_name", &config.user_domain_name);
        let user = match (&config.user_id, &config.username) {
            (Some(id), _) => format!("user id {id}"),
            (None, name) => {
                let domain = config.user_domain_name.as_ref().or(config.user_domain_id.as_ref());
                format!("user {} in domain {}", name.as_deref().unwrap_or(""), domain.map_or("", String::as_str))
            }
        };
        Ok(Self {
            http,
            identity_url,
            values,
            scope: scope(config),
            auth_url: config.auth_url.clone(),
            user,
            section,
            current: Mutex::new(None),
        })
    }

    /// A valid token: the cached one, or a new one when it is due for renewal.
    pub async fn token(&self) -> Result<AuthToken, IdentityError> {
        Ok(self.issued().await?.token.clone())
    }

    /// Whether the token carries `role`.
    pub async fn has_role(&self, role: &str) -> Result<bool, IdentityError> {
        Ok(self.issued().await?.roles.iter().any(|r| r == role))
    }

    /// Forgets `token` (a service answered 401 to it), unless it was renewed meanwhile, so
    /// the next [`Self::token`] asks Keystone for a new one.
    pub async fn invalidate(&self, token: &AuthToken) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|issued| issued.token == *token) {
            warn!(section = %self.section, "a service refused the token of {}: renewing it", self.user);
            *current = None;
        }
    }

    /// The URL of `service_type` in the token's catalog: the first of `interfaces`, in
    /// order, that has an endpoint in `region` (any region when None).
    pub async fn endpoint(
        &self,
        service_type: &str,
        interfaces: &[String],
        region: Option<&str>,
    ) -> Result<String, IdentityError> {
        let issued = self.issued().await?;
        find_endpoint(&issued.catalog, service_type, interfaces, region).ok_or_else(|| IdentityError::NoEndpoint {
            section: self.section.clone(),
            service_type: service_type.into(),
            interfaces: interfaces.to_vec(),
            region: region.map(String::from),
        })
    }

    async fn issued(&self) -> Result<Arc<Issued>, IdentityError> {
        // Held while Keystone answers: concurrent callers wait for one new token.
        let mut current = self.current.lock().await;
        let now = Utc::now();
        if let Some(issued) = current.as_ref().filter(|i| now < i.renew_at) {
            return Ok(issued.clone());
        }
        match self.authenticate().await {
            Ok(issued) => {
                debug!(section = %self.section, expires_at = %issued.expires_at, "new Keystone token for {}", self.user);
                let issued = Arc::new(issued);
                *current = Some(issued.clone());
                Ok(issued)
            }
            // Keystone away while the token is still good: keep using it.
            Err(e @ IdentityError::Unavailable { .. }) if current.as_ref().is_some_and(|i| now < i.expires_at) => {
                warn!(section = %self.section, error = %e, "cannot renew the Keystone token yet; the current one is still valid");
                Ok(current.clone().expect("checked above"))
            }
            Err(e) => Err(e),
        }
    }

    async fn authenticate(&self) -> Result<Issued, IdentityError> {
        let auth = PasswordAuthenticator
            .auth(&self.http, &self.identity_url, &self.values, self.scope.as_ref(), None)
            .await
            .map_err(|e| self.error(e))?;
        let bad = |message: &str| self.bad_response(message.to_string());
        let Auth::AuthToken(token) = auth else { return Err(bad("no token")) };
        let info = token.auth_info.ok_or_else(|| bad("no token body"))?.token;
        let lifetime = (info.expires_at - info.issued_at.unwrap_or_else(Utc::now)).to_std().unwrap_or_default();
        let ahead = RENEW_AHEAD.min(lifetime / 2);
        Ok(Issued {
            token: AuthToken::new(token.token.expose_secret()),
            expires_at: info.expires_at,
            renew_at: info.expires_at - chrono::Duration::from_std(ahead).unwrap_or_default(),
            catalog: info.catalog.unwrap_or_default(),
            roles: info.roles.unwrap_or_default().into_iter().map(|r| r.name).collect(),
        })
    }

    fn bad_response(&self, message: String) -> IdentityError {
        IdentityError::BadResponse {
            section: self.section.clone(),
            auth_url: self.auth_url.clone(),
            user: self.user.clone(),
            message,
        }
    }

    fn error(&self, error: AuthError) -> IdentityError {
        let status = |code: u16, message: String| {
            let (section, auth_url, user) = (self.section.clone(), self.auth_url.clone(), self.user.clone());
            if code >= 500 || code == 429 || code == 408 {
                IdentityError::Unavailable { section, auth_url, user, message: format!("HTTP {code}: {message}") }
            } else {
                IdentityError::Rejected { section, auth_url, user, status: code, message }
            }
        };
        match error {
            AuthError::Identity(e) => status(u16::try_from(e.code).unwrap_or(500), e.message),
            AuthError::UnknownAuth { code, message } => status(code, message.unwrap_or_default()),
            AuthError::AuthReceipt(_) => status(401, "Keystone asks for more authentication methods".into()),
            AuthError::Reqwest { source } if !source.is_decode() => IdentityError::Unavailable {
                section: self.section.clone(),
                auth_url: self.auth_url.clone(),
                user: self.user.clone(),
                message: super::http_error_text(&source),
            },
            other => self.bad_response(other.to_string()),
        }
    }
}

/// keystoneauth's scope options: a project, else a domain, else the system.
fn scope(config: &PasswordAuthConfig) -> Option<AuthTokenScope> {
    let domain = |id: &Option<String>, name: &Option<String>| {
        (id.is_some() || name.is_some()).then(|| Domain { id: id.clone(), name: name.clone() })
    };
    if config.project_id.is_some() || config.project_name.is_some() {
        return Some(AuthTokenScope::Project(Project {
            id: config.project_id.clone(),
            name: config.project_name.clone(),
            domain: domain(&config.project_domain_id, &config.project_domain_name),
        }));
    }
    if let Some(d) = domain(&config.domain_id, &config.domain_name) {
        return Some(AuthTokenScope::Domain(d));
    }
    config.system_scope.as_ref().map(|s| AuthTokenScope::System(System { all: Some(s == "all") }))
}

fn find_endpoint(
    catalog: &[ServiceEndpoints],
    service_type: &str,
    interfaces: &[String],
    region: Option<&str>,
) -> Option<String> {
    let endpoints: Vec<_> =
        catalog.iter().filter(|s| s.service_type == service_type).flat_map(|s| &s.endpoints).collect();
    interfaces.iter().find_map(|interface| {
        endpoints
            .iter()
            .find(|e| e.interface == *interface && region.is_none_or(|r| e.region.as_deref() == Some(r)))
            .map(|e| e.url.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn catalog_lookup_takes_interfaces_in_order_within_the_region() {
        let catalog: Vec<ServiceEndpoints> = serde_json::from_value(json!([
            {"type": "compute", "name": "nova", "endpoints": [
                {"id": "1", "interface": "internal", "region": "RegionOne", "url": "http://nova"}]},
            {"type": "image", "name": "glance", "endpoints": [
                {"id": "2", "interface": "public", "region": "RegionOne", "url": "http://public-one"},
                {"id": "3", "interface": "internal", "region": "RegionTwo", "url": "http://internal-two"},
                {"id": "4", "interface": "public", "region": "RegionTwo", "url": "http://public-two"}]}
        ]))
        .unwrap();
        let both = ["internal".to_string(), "public".to_string()];
        assert_eq!(find_endpoint(&catalog, "image", &both, Some("RegionOne")).as_deref(), Some("http://public-one"));
        assert_eq!(find_endpoint(&catalog, "image", &both, Some("RegionTwo")).as_deref(), Some("http://internal-two"));
        assert_eq!(find_endpoint(&catalog, "image", &both, None).as_deref(), Some("http://internal-two"));
        assert_eq!(find_endpoint(&catalog, "image", &both[..1], Some("RegionOne")), None);
        assert_eq!(find_endpoint(&catalog, "volumev3", &both, None), None);
    }
}
