//! The identity boundary: Keystone, as keystoneauth's Session and Adapter reach it.
//!
//! Built once from the config ([`Identity::new`]), it owns novasnap's service credentials
//! and their tokens (obtained through `openstack-sdk-auth-password`, cached, renewed before
//! they expire and on demand after a 401), endpoint lookup in a token's catalog, and the
//! headers a request carries:
//! - with a user context: the user's token as `X-Auth-Token`, and Nova's service user's
//!   token as `X-Service-Token` when `[service_user] send_service_user_token` is on, as
//!   Nova's `ServiceTokenAuthWrapper` does;
//! - without one (reclamation, cleanup): novasnap's own service token as `X-Auth-Token`
//!   (`[novasnap_service_user]`, else `[service_user]`).
//!
//! A service (today Glance) gets an [`Adapter`] for its service type and sends every request
//! through [`Adapter::send`]; HTTP clients come from [`client_builder`], with the TLS
//! settings of the section they serve.

mod adapter;
mod password;
mod session;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use tracing::warn;

pub use adapter::{Adapter, SendError};
pub use password::PasswordAuth;
pub use session::{client_builder, http_error_text};

use crate::config::{AdapterConfig, IdentityConfig};
use crate::error::{Classify, Disposition};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("[{section}] TLS settings: {message}")]
    Tls { section: String, message: String },
    #[error("Keystone at {auth_url} refuses {user} ([{section}]): HTTP {status}: {message}")]
    Rejected { section: String, auth_url: String, user: String, status: u16, message: String },
    #[error("Keystone at {auth_url} unavailable for {user} ([{section}]): {message}")]
    Unavailable { section: String, auth_url: String, user: String, message: String },
    #[error("Keystone at {auth_url} answered {user} ([{section}]) with something that is not a token: {message}")]
    BadResponse { section: String, auth_url: String, user: String, message: String },
    #[error("no {service_type} endpoint for interfaces {interfaces:?}{} in the catalog of [{section}]'s token", .region.as_deref().map(|r| format!(" in region {r}")).unwrap_or_default())]
    NoEndpoint { section: String, service_type: String, interfaces: Vec<String>, region: Option<String> },
    #[error("{0}")]
    NotConfigured(String),
    /// A 401 to a request whose body was a stream, so it could not be sent again at once;
    /// the service token it carried has been renewed for the next try.
    #[error("{service_type} answered 401 to a streamed request; its service token was renewed for the next try")]
    Reauthenticated { service_type: String },
}

impl Classify for IdentityError {
    fn disposition(&self) -> Disposition {
        match self {
            Self::Unavailable { .. } | Self::Reauthenticated { .. } => Disposition::Transient,
            Self::Tls { .. }
            | Self::Rejected { .. }
            | Self::BadResponse { .. }
            | Self::NoEndpoint { .. }
            | Self::NotConfigured(_) => Disposition::Permanent,
        }
    }
}

/// novasnap's service credentials, each with its token cache.
pub struct Identity {
    /// `[novasnap_service_user]`, else `[service_user]`: work without a user context and
    /// catalog lookups.
    own: Option<Arc<PasswordAuth>>,
    /// `[service_user]`, when `send_service_user_token` is on: the `X-Service-Token`.
    service_token: Option<Arc<PasswordAuth>>,
}

impl Identity {
    /// No network traffic: the first token is obtained when first needed.
    pub fn new(config: &IdentityConfig) -> Result<Self, IdentityError> {
        let service_user = config.service_user.auth.as_ref().map(PasswordAuth::new).transpose()?.map(Arc::new);
        let own = match &config.novasnap_service_user {
            Some(auth) => Some(Arc::new(PasswordAuth::new(auth)?)),
            None => service_user.clone(),
        };
        let service_token = match (config.service_user.send_service_user_token, &service_user) {
            (true, None) => {
                // What Nova does too (`get_service_user_token_auth_plugin`).
                warn!("[service_user] send_service_user_token is set without auth_type: no service token is sent");
                None
            }
            (send, _) => service_user.filter(|_| send),
        };
        Ok(Self { own, service_token })
    }

    /// The view of one service: where it is, and the credentials its requests carry.
    /// `fixed` endpoints (Nova's `[glance] api_servers`) win over `endpoint_override`, which
    /// wins over the catalog.
    pub fn adapter(&self, config: &AdapterConfig, fixed: &[String]) -> Result<Adapter, IdentityError> {
        Adapter::new(config, fixed, self.own.clone(), self.service_token.clone())
    }
}
