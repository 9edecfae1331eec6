//! Mesh mTLS from Envoy resources, on BoringSSL (the library Envoy links): server
//! contexts for `DownstreamTlsContext` (sidecar inbounds: terminate mTLS, require and check
//! the client certificate) and client contexts for `UpstreamTlsContext` (sidecar outbounds:
//! originate mTLS with Kuma's SNI and ALPN, verify the server's SPIFFE SAN).
//!
//! BoringSSL sends and accepts any SNI of 1-255 bytes without NUL, as Envoy does, so
//! Kuma's tag SNI (`backend{mesh=default}`) and KRI names ending in a port number work
//! both ways (rustls can carry only DNS names; `shared/reference/tls-sni.md`). rustls stays
//! on the control-plane connection, where names are DNS names.
//!
//! Certificates come inline or from SDS `Secret`s by name; the peer chain is verified
//! against the validation context's CA (or, with Envoy's SPIFFE validator, the bundle of
//! the peer's trust domain), then its SANs against `match_typed_subject_alt_names`, inside
//! the handshake: a refused peer gets a TLS alert. A chain a context accepted is accepted
//! again, byte for byte and while every certificate in it is valid, without checking its
//! signatures a second time ([`verified`]). Contexts are built with the snapshot, so a
//! rotated secret gives new connections a new context while live ones keep theirs.
//!
//! Two things Envoy does around BoringSSL that a bare `tokio-boring` stream does not, both
//! measured in `benches/mtls_bench.py`: reads go through a small read-ahead buffer
//! ([`READ_AHEAD`]), and client contexts keep the sessions servers hand out and resume them
//! (`max_session_keys`).

pub mod prefixed;
pub mod san;
pub mod stream;
pub mod verified;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use boring::ex_data::Index;
use boring::pkey::{PKey, Private};
use boring::ssl::{
    AlpnError, Ssl, SslContext, SslContextBuilder, SslMethod, SslRef, SslSession, SslSessionCacheMode, SslVerifyMode,
    SslVersion,
};
use boring::x509::store::{X509Store, X509StoreBuilder};
use boring::x509::{X509, X509StoreContext, X509StoreContextRef};
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, Secret, SpiffeCertValidatorConfig,
    TlsCertificate, TlsParameters, UpstreamTlsContext, common_tls_context::ValidationContextType, secret,
    tls_parameters::TlsProtocol,
};
use prost::{Message, Name};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};

use crate::matcher::StringMatch;
use crate::stats::SslStats;
use san::{SanMatcher, SanType};
use verified::VerifiedChains;

pub type Secrets<'a> = HashMap<&'a str, &'a Secret>;
pub use stream::{ReadReady, TlsStream};

/// Bytes read ahead from the transport. BoringSSL asks its BIO for exactly what it needs
/// next (a record's 5-byte header, then its body), and `tokio-boring` turns each ask into
/// a read(2): two per record, and more during a handshake, where the peer's flight comes as
/// several records. Envoy reads sockets into its own buffer and hands BoringSSL memory;
/// this buffer does the same for us. Large reads (bulk records) bypass it.
pub const READ_AHEAD: usize = 4 * 1024;

fn read_ahead<S: AsyncRead>(stream: S) -> BufReader<S> {
    BufReader::with_capacity(READ_AHEAD, stream)
}

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

fn ssl_err(what: &str) -> impl Fn(boring::error::ErrorStack) -> TlsError + '_ {
    move |e| TlsError::Invalid(format!("{what}: {e}"))
}

/// A terminating TLS context.
pub struct ServerTls {
    context: SslContext,
    /// Client chains this context accepted (none without a validation context).
    pub verified: Option<Arc<VerifiedChains>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The server side of a handshake on `stream` (whose first bytes may be a replay of
    /// the ClientHello already read for routing), counted in the listener's `stats`.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        stats: &SslStats,
    ) -> Result<TlsStream<S>, String> {
        let ssl = new_ssl(&self.context)?;
        let done = tokio_boring::SslStreamBuilder::new(ssl, read_ahead(stream)).accept().await;
        count(stats, &done, Side::Server);
        done.map(TlsStream::new).map_err(|e| handshake_error(&e))
    }
}

/// Why the verify callback refused a peer: kept on the connection's `Ssl` (ex_data) for
/// its `ssl.fail_verify_*` stat. The refusal itself is unchanged: the peer gets the alert
/// BoringSSL picks for the chain's error (`certificate_unknown` for a SAN), as from Envoy.
mod refusal {
    pub const CA: u8 = 1;
    pub const SAN: u8 = 2;
}

static REFUSAL: LazyLock<Option<Index<Ssl, AtomicU8>>> = LazyLock::new(|| Ssl::new_ex_index().ok());

fn new_ssl(context: &SslContext) -> Result<Ssl, String> {
    let mut ssl = Ssl::new(context).map_err(|e| e.to_string())?;
    if let Some(index) = *REFUSAL {
        ssl.set_ex_data(index, AtomicU8::new(0));
    }
    Ok(ssl)
}

/// Notes on the connection being verified why its peer was refused.
fn refuse(ctx: &X509StoreContextRef, why: u8) -> bool {
    let ssl = X509StoreContext::ssl_idx().ok().and_then(|i| ctx.ex_data(i));
    if let Some(r) = ssl.zip(*REFUSAL).and_then(|(ssl, i)| ssl.ex_data(i)) {
        r.store(why, Ordering::Relaxed);
    }
    false
}

/// A finished handshake in Envoy's `ssl.*` stats (of the listener on the server side, of
/// the cluster on the client side).
fn count<S>(stats: &SslStats, done: &Result<tokio_boring::SslStream<S>, tokio_boring::HandshakeError<S>>, side: Side) {
    match done {
        Ok(tls) => {
            stats.handshake.inc();
            if tls.ssl().session_reused() {
                stats.session_reused.inc();
            }
            if side == Side::Server && tls.ssl().peer_certificate().is_none() {
                stats.no_certificate.inc();
            }
        }
        Err(e) => {
            let why = e.ssl().zip(*REFUSAL).and_then(|(ssl, i)| ssl.ex_data(i)).map(|r| r.load(Ordering::Relaxed));
            match why {
                Some(refusal::SAN) => stats.fail_verify_san.inc(),
                Some(refusal::CA) => stats.fail_verify_error.inc(),
                // A server requiring a certificate got none (BoringSSL's reason name).
                _ if e.to_string().contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") => stats.fail_verify_no_cert.inc(),
                _ => stats.connection_error.inc(),
            }
        }
    }
}

/// Sessions a client context was handed, newest last, at most `max` (Envoy's
/// `UpstreamTlsContext.max_session_keys`, default 1). TLS 1.3 tickets are used once.
struct Sessions {
    max: usize,
    queue: Mutex<VecDeque<SslSession>>,
}

impl Sessions {
    fn push(&self, session: SslSession) {
        let mut q = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while q.len() >= self.max {
            q.pop_front();
        }
        q.push_back(session);
    }

    /// The newest session; TLS 1.3 ones leave the store (single use), older ones stay.
    fn take(&self) -> Option<SslSession> {
        let mut q = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let single_use = q.back()?.protocol_version() == SslVersion::TLS1_3;
        if single_use { q.pop_back() } else { q.back().cloned() }
    }
}

/// An originating TLS context and the SNI it sends.
pub struct ClientTls {
    context: SslContext,
    /// Sent verbatim (Kuma's tag SNI included); none when the config sets no SNI.
    pub sni: Option<String>,
    /// None when `max_session_keys` is 0 (no resumption).
    sessions: Option<Arc<Sessions>>,
    /// The context sets `alpn_protocols`: they are offered, and no fallback.
    alpn_configured: bool,
    /// Server chains this context accepted.
    pub verified: Arc<VerifiedChains>,
    /// False when the context has no validation context: as in Envoy, the server's
    /// certificate is then not checked at all (Kuma's `verification: SkipAll`).
    pub verifies: bool,
}

/// ALPN an HTTP connection pool offers, in wire form, when the cluster's
/// `UpstreamTlsContext` configures none: Envoy's pools pass their protocol as the ALPN
/// fallback (`http/1.1` for HTTP/1.1, `h2` for HTTP/2), so a TLS server that picks its
/// protocol by ALPN (Go, nginx, gRPC servers) speaks the one the pool will use.
pub const ALPN_HTTP11: &[u8] = b"\x08http/1.1";
/// See [`ALPN_HTTP11`].
pub const ALPN_H2: &[u8] = b"\x02h2";

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("sni", &self.sni).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// The client side of a handshake on `stream`, offering the configured
    /// `alpn_protocols` if any (what `tcp_proxy` does: Envoy adds no fallback there),
    /// counted in the cluster's `stats`.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        stats: &SslStats,
    ) -> Result<TlsStream<S>, String> {
        self.connect_with_alpn_fallback(stream, &[], stats).await
    }

    /// [`connect`](Self::connect) for a connection pool of a known protocol: when the
    /// context configures no `alpn_protocols`, it offers `fallback` (a wire-form list such
    /// as [`ALPN_H2`]). Envoy's precedence: configured ALPN first, then the fallback.
    pub async fn connect_with_alpn_fallback<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        fallback: &[u8],
        stats: &SslStats,
    ) -> Result<TlsStream<S>, String> {
        let mut ssl = new_ssl(&self.context)?;
        if let Some(sni) = &self.sni {
            ssl.set_hostname(sni).map_err(|e| e.to_string())?;
        }
        if !self.alpn_configured && !fallback.is_empty() {
            ssl.set_alpn_protos(fallback).map_err(|e| format!("ALPN fallback: {e}"))?;
        }
        if let Some(session) = self.sessions.as_ref().and_then(|s| s.take()) {
            #[allow(unsafe_code)]
            // SAFETY: every stored session came from this context's new-session callback, so
            // it belongs to `self.context`, the context `ssl` was made from.
            unsafe { ssl.set_session(&session) }.map_err(|e| e.to_string())?;
        }
        let done = tokio_boring::SslStreamBuilder::new(ssl, read_ahead(stream)).connect().await;
        count(stats, &done, Side::Client);
        done.map(TlsStream::new).map_err(|e| handshake_error(&e))
    }
}

fn handshake_error<S>(e: &tokio_boring::HandshakeError<S>) -> String {
    match e.as_io_error() {
        Some(io) => format!("TLS handshake: {io}"),
        None => format!("TLS handshake: {e}"),
    }
}

/// The peer's leaf certificate and its DER, once the handshake is done.
pub fn peer_certificate(ssl: &SslRef) -> Option<(X509, Vec<u8>)> {
    let cert = ssl.peer_certificate()?;
    let der = cert.to_der().ok()?;
    Some((cert, der))
}

/// The URI SANs of the certificate this side presented, for `x-forwarded-client-cert`.
pub fn local_uri_sans(ssl: &SslRef) -> Vec<String> {
    let Some(names) = ssl.certificate().and_then(|c| c.subject_alt_names()) else { return vec![] };
    names.iter().filter_map(|n| n.uri().map(str::to_owned)).collect()
}

/// The peer's chain in PEM, leaf first (a server's view includes the client's leaf).
pub fn peer_chain_pem(ssl: &SslRef) -> Vec<Vec<u8>> {
    let leaf = ssl.peer_certificate().and_then(|c| c.to_pem().ok());
    let rest = ssl.peer_cert_chain().into_iter().flatten().filter_map(|c| c.to_pem().ok());
    leaf.into_iter().chain(rest).collect()
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

fn pem_certs(pem: &[u8], what: &str) -> Result<Vec<X509>, TlsError> {
    let certs = X509::stack_from_pem(pem).map_err(|e| TlsError::from(format!("{what} is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no certificate").into());
    }
    Ok(certs)
}

/// A certificate chain (leaf first) and its key.
type Identity = (Vec<X509>, PKey<Private>);

/// The certificate chain and key to present.
fn identity(common: &CommonTlsContext, secrets: &Secrets<'_>) -> Result<Option<Identity>, TlsError> {
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
    let chain = pem_certs(&data(tls_cert.certificate_chain.as_ref(), "certificate_chain")?, "certificate_chain")?;
    let key_pem = data(tls_cert.private_key.as_ref(), "private_key")?;
    let key = PKey::private_key_from_pem(&key_pem)
        .map_err(|e| TlsError::from(format!("private_key is not a PEM key: {e}")))?;
    Ok(Some((chain, key)))
}

/// How a peer's chain is trusted.
#[derive(Clone)]
enum Trust {
    /// Any chain leading to these CAs (`trusted_ca`).
    Cas,
    /// Envoy's SPIFFE validator: the chain must lead to the bundle of the trust domain
    /// in the peer's SPIFFE ID (trust domain -> DER of its CA certificates).
    Spiffe(Arc<HashMap<String, Vec<Vec<u8>>>>),
}

/// A peer verifier: the CA store BoringSSL checks the chain against, then what the
/// callback checks on the leaf.
struct Validation {
    store: X509Store,
    trust: Trust,
    sans: Arc<Vec<SanMatcher>>,
}

fn validation(common: &CommonTlsContext, secrets: &Secrets<'_>) -> Result<Option<Validation>, TlsError> {
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
    unhonoured(&ca)
        .and_then(|()| unhonoured(&rules))
        .map_err(|field| format!("validation context: {field} is not supported"))?;
    let mut store = X509StoreBuilder::new().map_err(ssl_err("CA store"))?;
    let trust = match ca.custom_validator_config.as_ref().or(rules.custom_validator_config.as_ref()) {
        Some(custom) => {
            let spiffe = spiffe_bundles(custom)?;
            for der in spiffe.values().flatten() {
                let c = X509::from_der(der).map_err(ssl_err("trust bundle"))?;
                store.add_cert(c).map_err(ssl_err("trust bundle"))?;
            }
            Trust::Spiffe(Arc::new(spiffe))
        }
        None => {
            for c in pem_certs(&data(ca.trusted_ca.as_ref(), "trusted_ca")?, "trusted_ca")? {
                store.add_cert(c).map_err(ssl_err("trusted_ca"))?;
            }
            Trust::Cas
        }
    };
    let mut sans = vec![];
    for m in &rules.match_typed_subject_alt_names {
        let san_type =
            SanType::from_proto(m.san_type, &m.oid).map_err(|e| format!("match_typed_subject_alt_names: {e}"))?;
        let sm = m.matcher.as_ref().ok_or("match_typed_subject_alt_names: matcher is missing")?;
        let matcher = StringMatch::from_proto(sm).map_err(|e| format!("match_typed_subject_alt_names: {e}"))?;
        sans.push(SanMatcher { san_type, matcher });
    }
    // The deprecated untyped matchers, as Envoy reads them: ignored beside typed ones, and
    // otherwise each matches DNS, URI, email and IP SANs.
    #[allow(deprecated)]
    if sans.is_empty() {
        for sm in &rules.match_subject_alt_names {
            let matcher = StringMatch::from_proto(sm).map_err(|e| format!("match_subject_alt_names: {e}"))?;
            for san_type in [SanType::Dns, SanType::Uri, SanType::Email, SanType::Ip] {
                sans.push(SanMatcher { san_type, matcher: matcher.clone() });
            }
        }
    }
    Ok(Some(Validation { store: store.build(), trust, sans: Arc::new(sans) }))
}

/// The first field of a validation context that would change which peers are accepted and
/// that dp does not implement: refused by name rather than ignored, since ignoring it would
/// accept a revoked certificate or a longer chain than allowed, or refuse peers Envoy lets in.
fn unhonoured(v: &CertificateValidationContext) -> Result<(), &'static str> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::certificate_validation_context::TrustChainVerification;
    let checks = [
        (!v.verify_certificate_spki.is_empty(), "verify_certificate_spki"),
        (!v.verify_certificate_hash.is_empty(), "verify_certificate_hash"),
        (v.crl.is_some(), "crl"),
        (v.allow_expired_certificate, "allow_expired_certificate"),
        (v.trust_chain_verification != TrustChainVerification::VerifyTrustChain as i32, "trust_chain_verification"),
        (
            v.require_signed_certificate_timestamp.as_ref().is_some_and(|b| b.value),
            "require_signed_certificate_timestamp",
        ),
        (v.max_verify_depth.is_some(), "max_verify_depth"),
        (v.system_root_certs.is_some(), "system_root_certs"),
        (v.ca_certificate_provider_instance.is_some(), "ca_certificate_provider_instance"),
    ];
    checks.iter().find(|(set, _)| *set).map_or(Ok(()), |(_, field)| Err(*field))
}

/// `envoy.tls.cert_validator.spiffe`: trust domain -> its CA certificates (DER).
fn spiffe_bundles(
    custom: &envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig,
) -> Result<HashMap<String, Vec<Vec<u8>>>, TlsError> {
    let any = custom.typed_config.as_ref().ok_or("custom_validator_config has no typed_config")?;
    if any.type_url != SpiffeCertValidatorConfig::type_url() {
        return Err(format!(
            "custom_validator_config {:?} is not supported (only the SPIFFE validator is)",
            any.type_url
        )
        .into());
    }
    let cfg = SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .map_err(|e| format!("SPIFFECertValidatorConfig: {e}"))?;
    if cfg.trust_bundles.is_some() {
        return Err(
            "SPIFFECertValidatorConfig.trust_bundles (a SPIFFE bundle map) is not supported; use trust_domains".into(),
        );
    }
    let mut out = HashMap::new();
    for td in &cfg.trust_domains {
        let pem = data(td.trust_bundle.as_ref(), &format!("trust bundle of {}", td.name))?;
        let ders = pem_certs(&pem, &format!("trust bundle of {}", td.name))?
            .iter()
            .map(|c| c.to_der())
            .collect::<Result<Vec<_>, _>>()
            .map_err(ssl_err("trust bundle"))?;
        out.insert(td.name.clone(), ders);
    }
    if out.is_empty() {
        return Err("SPIFFECertValidatorConfig has no trust domain".into());
    }
    Ok(out)
}

/// The verify callback: BoringSSL checked the chain; at the leaf, the SPIFFE trust domain
/// (with that validator) and the SAN matchers decide.
fn verify_peer(preverified: bool, ctx: &mut X509StoreContextRef, trust: &Trust, sans: &[SanMatcher]) -> bool {
    if !preverified {
        return refuse(ctx, refusal::CA);
    }
    if ctx.error_depth() != 0 {
        return true;
    }
    if sans.is_empty() && matches!(trust, Trust::Cas) {
        return true;
    }
    let Some(cert) = ctx.current_cert() else { return refuse(ctx, refusal::CA) };
    let Ok(leaf) = cert.to_der() else { return refuse(ctx, refusal::CA) };
    // The leaf's names, read once for the trust domain and the matchers.
    let names = san::sans_of(cert, &leaf);
    if let Trust::Spiffe(bundles) = trust {
        let Some(td) = names.as_deref().and_then(san::spiffe_id_in).and_then(san::trust_domain) else {
            tracing::debug!("peer certificate refused: no SPIFFE ID");
            return refuse(ctx, refusal::CA);
        };
        let root = ctx.chain().and_then(|c| c.iter().next_back()).and_then(|r| r.to_der().ok());
        let in_bundle = bundles.get(td).is_some_and(|b| root.as_ref().is_some_and(|r| b.contains(r)));
        if !in_bundle {
            tracing::debug!(trust_domain = td, "peer certificate refused: not issued by its trust domain's bundle");
            return refuse(ctx, refusal::CA);
        }
    }
    match san::matched(sans, names.as_deref()) {
        Ok(()) => true,
        Err(reason) => {
            tracing::debug!(%reason, "peer certificate refused");
            refuse(ctx, refusal::SAN)
        }
    }
}

/// The CA store and the verify callback; chains accepted once are accepted again without
/// a second verification while they are valid ([`verified`]).
fn apply_validation(
    b: &mut SslContextBuilder,
    v: Validation,
    mode: SslVerifyMode,
) -> Result<Arc<VerifiedChains>, TlsError> {
    b.set_verify_cert_store(v.store).map_err(ssl_err("CA store"))?;
    let (trust, sans) = (v.trust, v.sans);
    b.set_verify_callback(mode, move |ok, ctx| verify_peer(ok, ctx, &trust, &sans));
    let verified = Arc::new(VerifiedChains::new(verified::CAPACITY));
    let chains = verified.clone();
    b.set_cert_verify_callback(move |ctx| chains.verify(ctx));
    Ok(verified)
}

fn apply_identity(b: &mut SslContextBuilder, chain: &[X509], key: &PKey<Private>) -> Result<(), TlsError> {
    b.set_certificate(&chain[0]).map_err(ssl_err("certificate"))?;
    for c in &chain[1..] {
        b.add_extra_chain_cert(c.clone()).map_err(ssl_err("certificate chain"))?;
    }
    b.set_private_key(key).map_err(ssl_err("private key"))?;
    b.check_private_key().map_err(ssl_err("certificate and key do not match"))
}

fn version(p: i32) -> Option<SslVersion> {
    match TlsProtocol::try_from(p).ok()? {
        TlsProtocol::TlsAuto => None,
        TlsProtocol::TlSv10 => Some(SslVersion::TLS1),
        TlsProtocol::TlSv11 => Some(SslVersion::TLS1_1),
        TlsProtocol::TlSv12 => Some(SslVersion::TLS1_2),
        TlsProtocol::TlSv13 => Some(SslVersion::TLS1_3),
    }
}

/// Which side of a connection a context serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// A context builder with Envoy's defaults or the `tls_params` versions: TLS 1.2 at the
/// least; at most TLS 1.3 for servers and TLS 1.2 for clients (Envoy's upstream default,
/// so a dp sidecar resumes its upstream sessions as an Envoy one does).
fn builder(params: Option<&TlsParameters>, side: Side) -> Result<SslContextBuilder, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls()).map_err(ssl_err("TLS context"))?;
    let default_max = if side == Side::Client { SslVersion::TLS1_2 } else { SslVersion::TLS1_3 };
    let min = params.and_then(|p| version(p.tls_minimum_protocol_version)).unwrap_or(SslVersion::TLS1_2);
    let max = params.and_then(|p| version(p.tls_maximum_protocol_version)).unwrap_or(default_max);
    b.set_min_proto_version(Some(min)).map_err(ssl_err("tls_minimum_protocol_version"))?;
    b.set_max_proto_version(Some(max)).map_err(ssl_err("tls_maximum_protocol_version"))?;
    if let Some(p) = params {
        if !p.cipher_suites.is_empty() {
            b.set_cipher_list(&p.cipher_suites.join(":")).map_err(ssl_err("cipher_suites"))?;
        }
        if !p.ecdh_curves.is_empty() {
            b.set_curves_list(&p.ecdh_curves.join(":")).map_err(ssl_err("ecdh_curves"))?;
        }
    }
    Ok(b)
}

/// The first of our protocols the client offers, as a slice of the client's wire list.
fn select_alpn<'a>(ours: &[String], client: &'a [u8]) -> Option<&'a [u8]> {
    ours.iter().find_map(|p| {
        let mut rest = client;
        while let Some((&len, tail)) = rest.split_first() {
            let (proto, next) = tail.split_at_checked(usize::from(len))?;
            if proto == p.as_bytes() {
                return Some(proto);
            }
            rest = next;
        }
        None
    })
}

/// ALPN protocol list in TLS wire form.
fn alpn_wire(protocols: &[String]) -> Result<Vec<u8>, TlsError> {
    let mut out = vec![];
    for p in protocols {
        let len = u8::try_from(p.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| format!("alpn protocol {p:?} is not 1-255 bytes"))?;
        out.push(len);
        out.extend_from_slice(p.as_bytes());
    }
    Ok(out)
}

pub fn server(ctx: &DownstreamTlsContext, secrets: &Secrets<'_>) -> Result<ServerTls, TlsError> {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    let (chain, key) = identity(&common, secrets)?.ok_or("no certificate to present (tls_certificates or SDS)")?;
    let require = ctx.require_client_certificate.is_some_and(|b| b.value);
    let mut b = builder(common.tls_params.as_ref(), Side::Server)?;
    apply_identity(&mut b, &chain, &key)?;
    let verified = match validation(&common, secrets)? {
        Some(v) => {
            let mode =
                if require { SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT } else { SslVerifyMode::PEER };
            Some(apply_validation(&mut b, v, mode)?)
        }
        None if require => return Err("require_client_certificate needs a validation context".into()),
        None => None,
    };
    if !common.alpn_protocols.is_empty() {
        let ours = common.alpn_protocols.clone();
        b.set_alpn_select_callback(move |_, client| select_alpn(&ours, client).ok_or(AlpnError::NOACK));
    }
    Ok(ServerTls { context: b.build(), verified })
}

/// Envoy's rule for an SNI it sends: 1 to 255 bytes, no NUL.
pub fn check_sni(sni: &str) -> Result<(), String> {
    if sni.len() > 255 {
        return Err(format!("sni is {} bytes; at most 255 are allowed", sni.len()));
    }
    if sni.contains('\0') {
        return Err("sni contains a NUL byte".into());
    }
    Ok(())
}

pub fn client(ctx: &UpstreamTlsContext, secrets: &Secrets<'_>) -> Result<ClientTls, TlsError> {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    check_sni(&ctx.sni)?;
    let mut b = builder(common.tls_params.as_ref(), Side::Client)?;
    let (verified, verifies) = match validation(&common, secrets)? {
        Some(v) => (apply_validation(&mut b, v, SslVerifyMode::PEER)?, true),
        None => {
            b.set_verify(SslVerifyMode::NONE);
            (Arc::new(VerifiedChains::new(0)), false)
        }
    };
    if let Some((chain, key)) = identity(&common, secrets)? {
        apply_identity(&mut b, &chain, &key)?;
    }
    if !common.alpn_protocols.is_empty() {
        b.set_alpn_protos(&alpn_wire(&common.alpn_protocols)?).map_err(ssl_err("alpn_protocols"))?;
    }
    // Resumption as Envoy's client: keep the newest `max_session_keys` sessions (default 1).
    // A resumed session was verified by this context when it was made (chain and SANs).
    let max = ctx.max_session_keys.as_ref().map_or(1, |v| v.value) as usize;
    let sessions = (max > 0).then(|| Arc::new(Sessions { max, queue: Mutex::new(VecDeque::new()) }));
    if let Some(store) = &sessions {
        b.set_session_cache_mode(SslSessionCacheMode::CLIENT);
        let store = store.clone();
        b.set_new_session_callback(move |_, session| store.push(session));
    }
    let sni = (!ctx.sni.is_empty()).then(|| ctx.sni.clone());
    Ok(ClientTls {
        context: b.build(),
        sni,
        sessions,
        alpn_configured: !common.alpn_protocols.is_empty(),
        verified,
        verifies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{SdsSecretConfig, SubjectAltNameMatcher};

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
    fn missing_secrets_wait_and_bad_snis_are_refused_precisely() {
        let none = Secrets::new();
        // Kuma's tag SNI is fine; the context waits for its CA.
        assert_eq!(
            client(&upstream("backend{mesh=default}"), &none).unwrap_err(),
            TlsError::Missing("mesh_ca:secret:default".into())
        );
        let e = client(&upstream(&"a".repeat(256)), &none).unwrap_err().to_string();
        assert!(e.contains("at most 255"), "{e}");
        let e = client(&upstream("a\0b"), &none).unwrap_err().to_string();
        assert!(e.contains("NUL"), "{e}");
        let e = server(&DownstreamTlsContext::default(), &none).unwrap_err().to_string();
        assert!(e.contains("no certificate to present"), "{e}");
        assert_eq!(alpn_wire(&["kuma".into(), "h2".into()]).unwrap(), b"\x04kuma\x02h2");
        assert_eq!(select_alpn(&["kuma".into()], b"\x02h2\x04kuma"), Some(&b"kuma"[..]));
        assert_eq!(select_alpn(&["kuma".into()], b"\x02h2\x09"), None);
    }

    #[test]
    #[allow(deprecated)]
    fn validation_fields_dp_does_not_implement_are_refused_by_name_and_untyped_san_matchers_work() {
        use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let base = CertificateValidationContext { trusted_ca: inline(ca.pem()), ..Default::default() };
        let with = |v: CertificateValidationContext| {
            let common = CommonTlsContext {
                validation_context_type: Some(ValidationContextType::ValidationContext(v)),
                ..Default::default()
            };
            validation(&common, &Secrets::new()).map(|v| v.map(|v| v.sans))
        };
        let refused = |v: CertificateValidationContext| match with(v) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        };
        let bytes = inline("x".into());
        assert_eq!(
            refused(CertificateValidationContext { crl: bytes.clone(), ..base.clone() }),
            "validation context: crl is not supported"
        );
        for (v, field) in [
            (
                CertificateValidationContext { allow_expired_certificate: true, ..base.clone() },
                "allow_expired_certificate",
            ),
            (CertificateValidationContext { trust_chain_verification: 1, ..base.clone() }, "trust_chain_verification"),
            (
                CertificateValidationContext {
                    max_verify_depth: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 2 }),
                    ..base.clone()
                },
                "max_verify_depth",
            ),
            (
                CertificateValidationContext { verify_certificate_hash: vec!["ab".into()], ..base.clone() },
                "verify_certificate_hash",
            ),
        ] {
            assert!(refused(v).contains(field), "{field}");
        }
        let exact =
            |s: &str| StringMatcher { match_pattern: Some(MatchPattern::Exact(s.into())), ..Default::default() };
        let untyped = CertificateValidationContext { match_subject_alt_names: vec![exact("web")], ..base.clone() };
        let sans = with(untyped.clone()).unwrap().unwrap();
        let types: Vec<_> = sans.iter().map(|m| m.san_type.clone()).collect();
        assert_eq!(types, [SanType::Dns, SanType::Uri, SanType::Email, SanType::Ip]);
        // Beside typed matchers, the untyped ones are ignored (Envoy's rule).
        let typed =
            SubjectAltNameMatcher { san_type: 3, matcher: Some(exact("spiffe://default/web")), ..Default::default() };
        let both = CertificateValidationContext { match_typed_subject_alt_names: vec![typed], ..untyped };
        let sans = with(both).unwrap().unwrap();
        assert_eq!(sans.iter().map(|m| m.san_type.clone()).collect::<Vec<_>>(), [SanType::Uri]);
    }

    fn inline(pem: String) -> Option<DataSource> {
        Some(DataSource { specifier: Some(data_source::Specifier::InlineString(pem)), ..Default::default() })
    }

    /// The ALPN a client context offers, as a server accepting h2, http/1.1 and kuma sees
    /// it: what it negotiates with each of them.
    #[tokio::test]
    async fn http_pools_offer_their_protocol_as_alpn_unless_the_context_configures_one() {
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext;
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "external CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["external.test".to_string()]).unwrap();
        let leaf = leaf.signed_by(&key, &issuer).unwrap();
        let alpn = |list: &[&str]| list.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let srv = server(
            &DownstreamTlsContext {
                common_tls_context: Some(CommonTlsContext {
                    tls_certificates: vec![TlsCertificate {
                        certificate_chain: inline(leaf.pem()),
                        private_key: inline(key.serialize_pem()),
                        ..Default::default()
                    }],
                    alpn_protocols: alpn(&["h2", "http/1.1", "kuma"]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &Secrets::new(),
        )
        .unwrap();
        let client_with = |protocols: &[&str]| {
            let ctx = UpstreamTlsContext {
                sni: "external.test".into(),
                common_tls_context: Some(CommonTlsContext {
                    validation_context_type: Some(ValidationContextType::ValidationContext(
                        CertificateValidationContext { trusted_ca: inline(ca_cert.pem()), ..Default::default() },
                    )),
                    alpn_protocols: alpn(protocols),
                    ..Default::default()
                }),
                ..Default::default()
            };
            client(&ctx, &Secrets::new()).unwrap()
        };
        let negotiated = async |c: &ClientTls, fallback: &[u8]| -> Option<String> {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let stats = SslStats::default();
            let (accepted, connected) =
                tokio::join!(srv.accept(a, &stats), c.connect_with_alpn_fallback(b, fallback, &stats));
            accepted.unwrap();
            connected.unwrap().ssl().selected_alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())
        };
        let plain = client_with(&[]);
        assert_eq!(negotiated(&plain, ALPN_H2).await.as_deref(), Some("h2"));
        assert_eq!(negotiated(&plain, ALPN_HTTP11).await.as_deref(), Some("http/1.1"));
        // tcp_proxy: no fallback, no ALPN.
        assert_eq!(negotiated(&plain, &[]).await, None);
        // Configured ALPN wins over the pool's fallback, as in Envoy.
        let kuma = client_with(&["kuma"]);
        assert_eq!(negotiated(&kuma, ALPN_H2).await.as_deref(), Some("kuma"));
    }
}
