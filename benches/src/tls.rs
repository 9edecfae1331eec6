//! Certificates and rustls configurations for the TLS backend and the load generator.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::sync::Arc;

/// Every benchmark name is `n<i>.svc.bench`; one wildcard certificate covers them.
pub const CERT_NAME: &str = "*.svc.bench";

/// The server name the load uses for name number `i`.
pub fn name(i: usize) -> String {
    format!("n{i}.svc.bench")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config with a fresh self-signed ECDSA P-256 certificate for
/// [`CERT_NAME`], and a client config trusting exactly that certificate.
pub fn pair() -> anyhow::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let cert = rcgen::generate_simple_self_signed(vec![CERT_NAME.to_string()])?;
    let der: CertificateDer<'static> = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)?;
    // Full handshake on every connection: no tickets, no session cache.
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut roots = RootCertStore::empty();
    roots.add(der)?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(server), Arc::new(client)))
}
