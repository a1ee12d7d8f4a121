//! keystoneauth's Session options as an HTTP client: TLS from a section's `cafile`,
//! `certfile`, `keyfile` and `insecure`, the system CA store otherwise.

use std::path::Path;
use std::time::Duration;

use super::IdentityError;
use crate::config::SessionConfig;

/// A client builder with `section`'s TLS settings; the caller sets its timeouts.
///
/// Without `cafile`, server certificates are checked against the system's CA store
/// (reqwest's rustls platform verifier); with it, against that bundle only, as keystoneauth
/// does. Redirects are never followed: every request carries a token, which must not travel
/// to wherever a `Location` points.
pub fn client_builder(section: &str, config: &SessionConfig) -> Result<reqwest::ClientBuilder, IdentityError> {
    let tls = |message: String| IdentityError::Tls { section: section.into(), message };
    let read = |path: &Path| std::fs::read(path).map_err(|e| tls(format!("{}: {e}", path.display())));
    let mut builder =
        reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).redirect(reqwest::redirect::Policy::none());
    if let Some(cafile) = &config.cafile {
        let certs = reqwest::Certificate::from_pem_bundle(&read(cafile)?)
            .map_err(|e| tls(format!("cafile {}: {e}", cafile.display())))?;
        builder = builder.tls_certs_only(certs);
    }
    if let Some(certfile) = &config.certfile {
        let mut pem = read(certfile)?;
        if let Some(keyfile) = &config.keyfile {
            pem.push(b'\n');
            pem.extend(read(keyfile)?);
        }
        let identity =
            reqwest::Identity::from_pem(&pem).map_err(|e| tls(format!("certfile {}: {e}", certfile.display())))?;
        builder = builder.identity(identity);
    }
    Ok(builder.tls_danger_accept_invalid_certs(config.insecure))
}

/// An HTTP error with what caused it (reqwest's own text stops at "error sending request
/// for url (…)"): the TLS verdict on a certificate, the refused connection.
pub fn http_error_text(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
