//! TLS from Envoy resources: rustls server configs for `DownstreamTlsContext`
//! (sidecar inbounds: terminate mTLS, require and check the client certificate) and
//! client configs for `UpstreamTlsContext` (sidecar outbounds: originate mTLS with an
//! SNI and ALPN, verify the server's SPIFFE SAN). Certificates come inline or from SDS
//! `Secret`s by name. Configs are built with the snapshot, so a rotated secret gives
//! new connections a new config while live ones keep theirs.

pub mod prefixed;
pub mod san;

use crate::matcher::StringMatch;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, Secret, TlsCertificate, UpstreamTlsContext,
    common_tls_context::ValidationContextType, secret,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use san::SanMatcher;
use std::collections::HashMap;
use std::sync::Arc;

pub type Secrets<'a> = HashMap<&'a str, &'a Secret>;

/// Why a TLS context cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsError {
    /// An SDS secret it names has not arrived (yet): like Envoy's warming, the route
    /// refuses connections until it does, but the configuration is not invalid.
    Missing(String),
    Invalid(String),
}

impl From<String> for TlsError {
    fn from(s: String) -> Self {
        TlsError::Invalid(s)
    }
}

impl From<&str> for TlsError {
    fn from(s: &str) -> Self {
        TlsError::Invalid(s.to_string())
    }
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Missing(name) => write!(f, "SDS secret `{name}` has not arrived"),
            TlsError::Invalid(e) => f.write_str(e),
        }
    }
}

/// A terminating TLS context: the rustls config plus the SAN rules for the client.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub client_sans: Vec<SanMatcher>,
}

/// An originating TLS context.
#[derive(Debug)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn data(d: Option<&DataSource>, what: &str) -> Result<Vec<u8>, String> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(data_source::Specifier::Filename(f)) => std::fs::read(f).map_err(|e| format!("{what}: {f}: {e}")),
        Some(_) => Err(format!("{what}: only inline_bytes, inline_string and filename are supported")),
        None => Err(format!("{what} is missing")),
    }
}

fn secret<'a>(secrets: &Secrets<'a>, name: &str) -> Result<&'a Secret, TlsError> {
    secrets.get(name).copied().ok_or_else(|| TlsError::Missing(name.to_string()))
}

/// The certificate chain and key to present.
fn identity(
    common: &CommonTlsContext,
    secrets: &Secrets<'_>,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    let tls_cert: TlsCertificate = if let Some(c) = common.tls_certificates.first() {
        c.clone()
    } else if let Some(sds) = common.tls_certificate_sds_secret_configs.first() {
        match &secret(secrets, &sds.name)?.r#type {
            Some(secret::Type::TlsCertificate(c)) => c.clone(),
            _ => return Err(format!("SDS secret `{}` is not a tls_certificate", sds.name).into()),
        }
    } else {
        return Ok(None);
    };
    let chain_pem = data(tls_cert.certificate_chain.as_ref(), "certificate_chain")?;
    let key_pem = data(tls_cert.private_key.as_ref(), "private_key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::from(format!("certificate_chain is not PEM: {e:?}")))?;
    if chain.is_empty() {
        return Err("certificate_chain holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::from(format!("private_key is not a PEM key: {e:?}")))?;
    Ok(Some((chain, key)))
}

/// Trusted roots and SAN matchers of the validation context, if any.
fn validation(
    common: &CommonTlsContext,
    secrets: &Secrets<'_>,
) -> Result<Option<(rustls::RootCertStore, Vec<SanMatcher>)>, TlsError> {
    let from_sds = |name: &str| -> Result<CertificateValidationContext, TlsError> {
        match &secret(secrets, name)?.r#type {
            Some(secret::Type::ValidationContext(v)) => Ok(v.clone()),
            _ => Err(format!("SDS secret `{name}` is not a validation_context").into()),
        }
    };
    let (ca, rules) = match &common.validation_context_type {
        None => return Ok(None),
        Some(ValidationContextType::ValidationContext(v)) => (v.clone(), v.clone()),
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            let v = from_sds(&s.name)?;
            (v.clone(), v)
        }
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            let name = c.validation_context_sds_secret_config.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            let ca = from_sds(name)?;
            let rules = c.default_validation_context.clone().unwrap_or_default();
            (ca, rules)
        }
        Some(_) => return Err("validation_context_certificate_provider is not supported".into()),
    };
    let pem = data(ca.trusted_ca.as_ref(), "trusted_ca")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| TlsError::from(format!("trusted_ca is not PEM: {e:?}")))?;
        roots.add(c).map_err(|e| TlsError::from(format!("trusted_ca: {e}")))?;
    }
    if roots.is_empty() {
        return Err("trusted_ca holds no certificate".into());
    }
    if !rules.verify_certificate_spki.is_empty() || !rules.verify_certificate_hash.is_empty() {
        return Err("verify_certificate_spki / verify_certificate_hash are not supported".into());
    }
    let mut matchers = vec![];
    for m in &rules.match_typed_subject_alt_names {
        let uri = match m.san_type {
            2 => false,
            3 => true,
            t => {
                return Err(
                    format!("match_typed_subject_alt_names: san_type {t} is not supported (DNS and URI are)").into()
                );
            }
        };
        let sm = m.matcher.as_ref().ok_or("match_typed_subject_alt_names: matcher is missing")?;
        let matcher = StringMatch::from_proto(sm).map_err(|e| format!("match_typed_subject_alt_names: {e}"))?;
        matchers.push(SanMatcher { uri, matcher });
    }
    Ok(Some((roots, matchers)))
}

pub fn server(ctx: &DownstreamTlsContext, secrets: &Secrets<'_>) -> Result<ServerTls, TlsError> {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    let (chain, key) = identity(&common, secrets)?.ok_or("no certificate to present (tls_certificates or SDS)")?;
    let require = ctx.require_client_certificate.is_some_and(|b| b.value);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let (builder, client_sans) = match validation(&common, secrets)? {
        Some((roots, sans)) => {
            let mut v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if !require {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| TlsError::from(format!("client certificate validation: {e}")))?;
            (builder.with_client_cert_verifier(verifier), sans)
        }
        None if require => return Err("require_client_certificate needs a validation context".into()),
        None => (builder.with_no_client_auth(), vec![]),
    };
    let mut config =
        builder.with_single_cert(chain, key).map_err(|e| TlsError::from(format!("certificate and key: {e}")))?;
    config.alpn_protocols = common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(ServerTls { config: Arc::new(config), client_sans })
}

pub fn client(ctx: &UpstreamTlsContext, secrets: &Secrets<'_>) -> Result<ClientTls, TlsError> {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    // rustls sends only DNS-valid names; Kuma's tag SNI (`svc{mesh=m}`) is not one.
    let server_name = ServerName::try_from(ctx.sni.clone()).map_err(|_| {
        TlsError::from(format!(
            "sni {:?} is not a DNS name, and dp's TLS client (rustls) can only send DNS names",
            ctx.sni
        ))
    })?;
    let (roots, sans) = validation(&common, secrets)?
        .ok_or("a validation context is required: dp does not originate TLS without verifying the server")?;
    let verifier = Arc::new(PeerVerifier { trust: Some((Arc::new(roots), sans)), provider: provider() });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity(&common, secrets)? {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain, key).map_err(|e| TlsError::from(format!("client certificate: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(ClientTls { config: Arc::new(config), server_name })
}

/// A verifier that accepts any server certificate (handshake signatures are still
/// checked): kuma-dp's `--skip-verify`.
pub fn accept_any_server() -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    Arc::new(PeerVerifier { trust: None, provider: provider() })
}

/// Envoy's upstream validation: the chain must lead to a trusted CA and a SAN must
/// match; the SNI is not compared with the certificate's names (Kuma relies on SANs).
/// Without `trust`, any certificate is accepted.
#[derive(Debug)]
struct PeerVerifier {
    trust: Option<(Arc<rustls::RootCertStore>, Vec<SanMatcher>)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some((roots, sans)) = &self.trust else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        san::accepted(sans, end_entity.as_ref()).map_err(rustls::Error::General)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;

    fn upstream(sni: &str) -> UpstreamTlsContext {
        UpstreamTlsContext {
            sni: sni.into(),
            common_tls_context: Some(CommonTlsContext {
                validation_context_type: Some(ValidationContextType::ValidationContextSdsSecretConfig(
                    SdsSecretConfig { name: "mesh_ca:secret:default".into(), ..Default::default() },
                )),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn missing_secrets_wait_and_tag_sni_is_refused_precisely() {
        let none = Secrets::new();
        assert_eq!(
            client(&upstream("backend.default.mesh"), &none).unwrap_err(),
            TlsError::Missing("mesh_ca:secret:default".into())
        );
        let e = client(&upstream("backend{mesh=default}"), &none).unwrap_err().to_string();
        assert!(e.contains("\"backend{mesh=default}\" is not a DNS name"), "{e}");
        let e = server(&DownstreamTlsContext::default(), &none).unwrap_err().to_string();
        assert!(e.contains("no certificate to present"), "{e}");
    }
}
