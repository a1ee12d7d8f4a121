//! keystoneauth's Adapter: one service's endpoints, and the credentials its requests carry.

use std::sync::Arc;

use reqwest::{RequestBuilder, Response, StatusCode};
use tracing::warn;

use super::{IdentityError, PasswordAuth};
use crate::config::AdapterConfig;
use crate::request::{AuthToken, RequestContext};

/// Why [`Adapter::send`] returned no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The request itself failed (connection, timeout): the caller's to judge, e.g. to try
    /// another server.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

pub struct Adapter {
    config: AdapterConfig,
    /// `api_servers`, else `endpoint_override`: used instead of the catalog.
    fixed: Vec<String>,
    /// novasnap's own credentials: requests without a user context, catalog lookups.
    own: Option<Arc<PasswordAuth>>,
    /// Nova's service user, whose token goes beside the user's.
    service_token: Option<Arc<PasswordAuth>>,
}

/// What one request carries.
struct Credentials {
    user: Option<AuthToken>,
    /// The service token and who issued it, to renew it after a 401.
    service: Option<(Arc<PasswordAuth>, AuthToken)>,
}

impl Adapter {
    pub(super) fn new(
        config: &AdapterConfig,
        fixed: &[String],
        own: Option<Arc<PasswordAuth>>,
        service_token: Option<Arc<PasswordAuth>>,
    ) -> Result<Self, IdentityError> {
        let fixed = match (fixed, &config.endpoint_override) {
            ([], Some(url)) => vec![url.clone()],
            (fixed, _) => fixed.to_vec(),
        };
        if fixed.is_empty() && own.is_none() {
            return Err(IdentityError::NotConfigured(format!(
                "no way to find the {} service: set [glance] api_servers or endpoint_override, or service \
                 credentials ([novasnap_service_user] or [service_user] auth_type ...) to look it up in \
                 Keystone's catalog",
                config.service_type
            )));
        }
        Ok(Self { config: config.clone(), fixed, own, service_token })
    }

    /// Where the service is: the fixed endpoints, else the catalog's endpoint for the
    /// service type in `valid_interfaces` order and `region_name`.
    pub async fn endpoints(&self) -> Result<Vec<String>, IdentityError> {
        if !self.fixed.is_empty() {
            return Ok(self.fixed.clone());
        }
        let own = self.own.as_ref().expect("checked in Adapter::new");
        let c = &self.config;
        Ok(vec![own.endpoint(&c.service_type, &c.valid_interfaces, c.region_name.as_deref()).await?])
    }

    /// Sends `request` with the credentials for `ctx`. A 401 to a request that carried a
    /// service token renews that token and sends the request once more; a request whose body
    /// is a stream cannot be sent again and fails as [`IdentityError::Reauthenticated`], which
    /// is transient. A 401 without a service token to renew is the caller's answer.
    pub async fn send(&self, ctx: &RequestContext, request: RequestBuilder) -> Result<Response, SendError> {
        let spare = request.try_clone();
        let credentials = self.credentials(ctx).await?;
        let response = credentials.apply(request).send().await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some((issuer, token)) = &credentials.service else { return Ok(response) };
        issuer.invalidate(token).await;
        let Some(spare) = spare else {
            return Err(IdentityError::Reauthenticated { service_type: self.config.service_type.clone() }.into());
        };
        warn!(service = %self.config.service_type, url = %response.url(), "HTTP 401: sending once more with a new service token");
        let credentials = self.credentials(ctx).await?;
        Ok(credentials.apply(spare).send().await?)
    }

    /// Whether a request with `ctx` is made as an admin, who sees every project's resources:
    /// only then does "not found" prove that something does not exist. A user's request is
    /// the user's to judge; novasnap's own are admin's only if its token has that role.
    pub async fn sees_everything(&self, ctx: &RequestContext) -> Result<bool, IdentityError> {
        match (&ctx.auth_token, &self.own) {
            (Some(_), _) => Ok(true),
            (None, Some(own)) => own.has_role("admin").await,
            (None, None) => Ok(false),
        }
    }

    async fn credentials(&self, ctx: &RequestContext) -> Result<Credentials, IdentityError> {
        let issuer = match &ctx.auth_token {
            Some(_) => &self.service_token,
            None => &self.own,
        };
        let service = match issuer {
            Some(issuer) => Some((issuer.clone(), issuer.token().await?)),
            None => None,
        };
        Ok(Credentials { user: ctx.auth_token.clone(), service })
    }
}

impl Credentials {
    fn apply(&self, request: RequestBuilder) -> RequestBuilder {
        let service = self.service.as_ref().map(|(_, token)| token.expose());
        match (&self.user, service) {
            (Some(user), Some(service)) => {
                request.header("X-Auth-Token", user.expose()).header("X-Service-Token", service)
            }
            (Some(user), None) => request.header("X-Auth-Token", user.expose()),
            (None, Some(service)) => request.header("X-Auth-Token", service),
            (None, None) => request,
        }
    }
}
