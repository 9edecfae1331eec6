//! Turning a [`Config`] into a tonic [`Endpoint`] (TLS, timeouts, keepalive) and the token metadata.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};

use crate::{Config, ConfigError};

/// TCP connect timeout (Kuma's bootstrap uses 1 s for `ads_cluster`; we are more patient).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake timeout.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive like Kuma's `ads_cluster` (idle 10 s, interval 10 s, 3 probes). No HTTP/2 PINGs:
/// gRPC-Go servers punish pings that are more frequent than their enforcement policy.
const TCP_KEEPALIVE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

pub(crate) struct Transport {
    pub(crate) endpoint: Endpoint,
    pub(crate) token: Option<AsciiMetadataValue>,
    /// What the logs and error messages call the server.
    pub(crate) display: String,
}

/// How a client trusts a control plane's certificate.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Trust only this CA (PEM, one or more certificates).
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any certificate (the handshake signatures are still checked).
    pub skip_verify: bool,
    /// Name the certificate must match; defaults to the endpoint's host.
    pub server_name: Option<String>,
}

/// A tonic endpoint for a control plane at `url` (`https://host:port` or `http://host:port`):
/// TLS as `trust` says (neither a CA nor `skip_verify`: the system trust store), connect
/// timeout and TCP keepalive. Shared by the ADS client and `cp`'s KDS client, so both
/// trust a control plane the same way.
pub fn endpoint(url: &str, trust: &Trust) -> Result<Endpoint, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidEndpoint { endpoint: url.to_string(), reason };
    let uri: Uri = url.parse().map_err(|e: tonic::codegen::http::uri::InvalidUri| invalid(e.to_string()))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(invalid("the scheme must be http or https".into())),
    };
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| invalid("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();

    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .tcp_keepalive_interval(Some(TCP_KEEPALIVE))
        .tcp_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));

    if https {
        let server_name = trust.server_name.clone().unwrap_or(host);
        ServerName::try_from(server_name.clone())
            .map_err(|e| ConfigError::Tls(format!("server name {server_name:?}: {e}")))?;
        let tls = ClientTlsConfig::new().domain_name(server_name).assume_http2(true).timeout(TLS_TIMEOUT);
        endpoint = if trust.skip_verify {
            endpoint.tls_config_with_verifier(tls, Arc::new(AcceptAnyServerCert::new()))
        } else if let Some(pem) = &trust.ca_pem {
            check_ca_pem(pem)?;
            endpoint.tls_config(tls.ca_certificate(Certificate::from_pem(pem)))
        } else {
            // As kuma-dp 2.14: no CA given and no --skip-verify => the system trust store.
            endpoint.tls_config(tls.with_native_roots())
        }
        .map_err(|e| ConfigError::Tls(error_chain(&e)))?;
    }
    Ok(endpoint)
}

impl Transport {
    pub(crate) fn new(config: &Config) -> Result<Self, ConfigError> {
        if config.type_urls.is_empty() {
            return Err(ConfigError::NoTypes);
        }
        let trust = Trust {
            ca_pem: config.ca_pem.clone(),
            skip_verify: config.skip_verify,
            server_name: config.tls_server_name.clone(),
        };
        let endpoint = endpoint(&config.endpoint, &trust)?;

        let token = match &config.token {
            None => None,
            Some(t) => Some(MetadataValue::try_from(t.trim()).map_err(|_| ConfigError::InvalidToken)?),
        };
        Ok(Self { endpoint, token, display: config.endpoint.clone() })
    }
}

pub fn check_ca_pem(pem: &[u8]) -> Result<(), ConfigError> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| ConfigError::InvalidCa(e.to_string()))?;
        count += 1;
    }
    if count == 0 {
        return Err(ConfigError::InvalidCa("no PEM CERTIFICATE block found".into()));
    }
    Ok(())
}

/// `error: cause: cause`, skipping causes that repeat their parent's text.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A rustls verifier that accepts any server certificate (handshake signatures are still
/// checked): kuma-dp's `--skip-verify`, for every connection to a control plane.
pub fn accept_any_server() -> Arc<dyn ServerCertVerifier> {
    Arc::new(AcceptAnyServerCert::new())
}

/// `skip_verify`: any certificate is accepted, but the handshake signatures are still checked,
/// so the session is encrypted to whoever holds the presented certificate's key.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AcceptAnyServerCert {
    fn new() -> Self {
        Self { algorithms: rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms }
    }
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
