//! TLS towards RabbitMQ as oslo.messaging's rabbit driver sets it up (`impl_rabbit.py`
//! `Connection._fetch_ssl_params`, then py-amqp `SSLTransport._wrap_socket_sni`), with
//! rustls:
//! - with `ssl_ca_file`: that bundle is the only trust, and the broker's certificate must
//!   name the host the transport URL names (oslo passes `server_hostname` then);
//! - without it: the system's CA store, and the chain alone is checked: oslo passes no
//!   `server_hostname`, so Python's context checks no name (a warning says so at connect);
//! - `ssl_cert_file` / `ssl_key_file`: the client certificate (PEM), for brokers that ask
//!   for one (and `rabbit_login_method = EXTERNAL`);
//! - `ssl_version = TLSv1_2` pins TLS 1.2; otherwise 1.2 and 1.3 are negotiated.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::MessagingError;
use crate::config::{RabbitTls, TlsVersions};

/// The client side of a TLS connection to RabbitMQ, from the `[oslo_messaging_rabbit]`
/// `ssl_*` options. Files are read each time, so certificates renewed on disk are used at
/// the next connection.
pub fn client_config(tls: &RabbitTls) -> Result<Arc<ClientConfig>, MessagingError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(ca_file) => {
            for cert in pem_certificates("ssl_ca_file", ca_file)? {
                roots.add(cert).map_err(|e| invalid("ssl_ca_file", ca_file, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| MessagingError::Tls(format!("[oslo_messaging_rabbit] TLS trust: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.ca_file {
        Some(_) => webpki,
        None => Arc::new(ChainOnly(webpki)),
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.versions {
        TlsVersions::Negotiated => rustls::ALL_VERSIONS,
        TlsVersions::Tls12Only => &[&rustls::version::TLS12],
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| MessagingError::Tls(format!("[oslo_messaging_rabbit] ssl_version: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &tls.cert_file {
        Some(cert_file) => {
            let chain = pem_certificates("ssl_cert_file", cert_file)?;
            // py-amqp's `load_cert_chain(certfile, keyfile)`: the key may sit in the cert file.
            let (name, key_path) = match &tls.key_file {
                Some(key_file) => ("ssl_key_file", key_file),
                None => ("ssl_cert_file", cert_file),
            };
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| invalid(name, key_path, e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| invalid("ssl_cert_file", cert_file, e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn pem_certificates(option: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, MessagingError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(option, path, e))?;
    if certs.is_empty() {
        return Err(invalid(option, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn invalid(option: &str, path: &Path, e: impl std::fmt::Display) -> MessagingError {
    MessagingError::Tls(format!("[oslo_messaging_rabbit] {option} = {}: {e}", path.display()))
}

/// Checks the broker's chain, not its name: what Python's `ssl` does for oslo without
/// `ssl_ca_file` (`check_hostname` off, `CERT_REQUIRED` against the default store).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
