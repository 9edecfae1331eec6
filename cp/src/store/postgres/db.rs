//! Connections to PostgreSQL from Kuma's `KUMA_STORE_POSTGRES_*` settings: the pool the
//! store writes through, single connections (the change listener, `cp migrate up`), TLS
//! through the tokio-rustls stack the control plane already uses, and what an error
//! means for a person.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Connection, Socket};

use crate::config::{PgTlsMode, PostgresConfig};
use crate::store::StoreError;

/// What the store connects with: the driver's configuration and the TLS connector.
#[derive(Clone)]
pub struct Connector {
    pub cfg: PostgresConfig,
    pg: tokio_postgres::Config,
    tls: RustlsConnect,
}

impl Connector {
    /// Checks the settings (TLS files are read now: a missing CA fails at start-up, with
    /// the variable to fix).
    pub fn new(cfg: &PostgresConfig) -> anyhow::Result<Connector> {
        if cfg.host.trim().is_empty() {
            bail!("KUMA_STORE_POSTGRES_HOST is empty: set it to the database's host name or address");
        }
        if cfg.db_name.trim().is_empty() {
            bail!("KUMA_STORE_POSTGRES_DB_NAME is empty: set it to the database cp keeps its resources in");
        }
        let mut pg = tokio_postgres::Config::new();
        pg.host(&cfg.host)
            .port(cfg.port)
            .user(&cfg.user)
            .password(&cfg.password)
            .dbname(&cfg.db_name)
            .application_name("kuma-cp")
            .connect_timeout(cfg.timeout())
            .keepalives(true)
            .keepalives_idle(std::time::Duration::from_secs(10))
            .ssl_mode(if cfg.tls_mode == PgTlsMode::Disable { SslMode::Disable } else { SslMode::Require });
        let tls = RustlsConnect { config: Arc::new(client_config(cfg)?) };
        Ok(Connector { cfg: cfg.clone(), pg, tls })
    }

    /// A pool of at most `KUMA_STORE_POSTGRES_MAX_OPEN_CONNECTIONS`, each connection opened
    /// on demand (an unreachable database does not fail this, only its use).
    pub fn pool(&self) -> anyhow::Result<Pool> {
        let mgr = Manager::from_config(
            self.pg.clone(),
            self.tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let t = Some(self.cfg.timeout());
        Pool::builder(mgr)
            // Kuma: 0 = unlimited.
            .max_size(if self.cfg.max_open_connections == 0 { 10_000 } else { self.cfg.max_open_connections })
            .wait_timeout(t)
            .create_timeout(t)
            .recycle_timeout(t)
            .runtime(Runtime::Tokio1)
            .build()
            .context("cannot set up the PostgreSQL connection pool")
    }

    /// One connection of its own; the caller polls `Connection` (it carries notifications).
    pub async fn connect(&self) -> Result<(Client, Connection<Socket, RustlsStream>), StoreError> {
        let attempt = self.pg.connect(self.tls.clone());
        match tokio::time::timeout(self.cfg.timeout(), attempt).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(classify(&self.cfg, &e)),
            Err(_) => Err(unavailable(&self.cfg, &format!("no connection within {}s", self.cfg.timeout().as_secs()))),
        }
    }

    /// One connection whose `Connection` half runs on its own task, for short jobs.
    pub async fn connect_simple(&self) -> Result<Client, StoreError> {
        let (client, conn) = self.connect().await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// The sentence for a database that cannot be reached, with the settings to check when
/// the cause points at them.
pub fn unavailable(cfg: &PostgresConfig, cause: &str) -> StoreError {
    let lower = cause.to_ascii_lowercase();
    let hint = if lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl") {
        " (check KUMA_STORE_POSTGRES_TLS_MODE and KUMA_STORE_POSTGRES_TLS_CA_PATH)"
    } else if lower.contains("refused") || lower.contains("no route") || lower.contains("resolve") {
        " (is PostgreSQL running there? KUMA_STORE_POSTGRES_HOST and KUMA_STORE_POSTGRES_PORT say where)"
    } else {
        ""
    };
    StoreError::Unavailable(format!("the database ({}) is unavailable: {cause}{hint}", cfg.describe()))
}

/// A driver error as a store error: connection trouble is `Unavailable`, a duplicate key
/// a `Conflict` (filled in by the caller), the rest `Internal` with the server's message.
pub fn classify(cfg: &PostgresConfig, e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code();
            let class = &code.code()[..2];
            if class == "08" || class == "57" || class == "53" {
                // connection exception, operator intervention (shutdown), insufficient resources
                unavailable(cfg, db.message())
            } else if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
                StoreError::Unavailable(format!(
                    "the database ({}) refused the login: {}; check KUMA_STORE_POSTGRES_USER and \
                     KUMA_STORE_POSTGRES_PASSWORD",
                    cfg.describe(),
                    db.message()
                ))
            } else if *code == SqlState::INVALID_CATALOG_NAME {
                StoreError::Unavailable(format!(
                    "{}: {}; create the database or fix KUMA_STORE_POSTGRES_DB_NAME",
                    cfg.describe(),
                    db.message()
                ))
            } else {
                StoreError::Internal(format!("{}: {}", cfg.describe(), db.message()))
            }
        }
        None => unavailable(cfg, &error_chain(e)),
    }
}

/// A pool error as a store error.
pub fn classify_pool(cfg: &PostgresConfig, e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => classify(cfg, &e),
        PoolError::Timeout(_) => unavailable(cfg, &format!("no connection within {}s", cfg.timeout().as_secs())),
        other => unavailable(cfg, &other.to_string()),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn read_certs(path: &std::path::Path, var: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {var}={}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{var}={}: not a PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{var}={} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The rustls client configuration of a TLS mode.
fn client_config(cfg: &PostgresConfig) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder();
    let verifier: Arc<dyn ServerCertVerifier> = match cfg.tls_mode {
        PgTlsMode::Disable | PgTlsMode::VerifyNone => xds_client::accept_any_server(),
        PgTlsMode::VerifyCa | PgTlsMode::VerifyFull => {
            let Some(ca) = &cfg.tls_ca_path else {
                bail!(
                    "KUMA_STORE_POSTGRES_TLS_MODE={:?} needs the CA in KUMA_STORE_POSTGRES_TLS_CA_PATH",
                    if cfg.tls_mode == PgTlsMode::VerifyCa { "verifyCa" } else { "verifyFull" }
                );
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca, "KUMA_STORE_POSTGRES_TLS_CA_PATH")? {
                roots.add(c).map_err(|e| anyhow::anyhow!("KUMA_STORE_POSTGRES_TLS_CA_PATH={}: {e}", ca.display()))?;
            }
            let webpki = WebPkiServerVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| anyhow::anyhow!("KUMA_STORE_POSTGRES_TLS_CA_PATH={}: {e}", ca.display()))?;
            if cfg.tls_mode == PgTlsMode::VerifyCa { Arc::new(ChainOnly(webpki)) } else { webpki }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let mut config = match (&cfg.tls_cert_path, &cfg.tls_key_path) {
        (Some(c), Some(k)) => {
            let certs = read_certs(c, "KUMA_STORE_POSTGRES_TLS_CERT_PATH")?;
            let pem = std::fs::read(k)
                .with_context(|| format!("cannot read KUMA_STORE_POSTGRES_TLS_KEY_PATH={}", k.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                anyhow::anyhow!("KUMA_STORE_POSTGRES_TLS_KEY_PATH={}: not a PEM private key: {e}", k.display())
            })?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                anyhow::anyhow!("KUMA_STORE_POSTGRES_TLS_CERT_PATH and _KEY_PATH do not make a client identity: {e}")
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("KUMA_STORE_POSTGRES_TLS_CERT_PATH and KUMA_STORE_POSTGRES_TLS_KEY_PATH must be set together"),
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// verifyCa: the chain must lead to the CA, the name does not matter (libpq's `verify-ca`).
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
        // The chain is checked before the name: a name mismatch means the chain is good.
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

/// tokio-postgres' TLS hook, on tokio-rustls.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, io::Error> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{domain:?}: {e}")))?;
        Ok(RustlsConnector { config: self.config.clone(), name })
    }
}

pub struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnector {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(s)))
        })
    }
}

pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl AsyncRead for RustlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (as libpq's `channel_binding=prefer` falls back to).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: PgTlsMode) -> PostgresConfig {
        PostgresConfig { tls_mode: mode, ..PostgresConfig::default() }
    }

    #[test]
    fn tls_settings_that_cannot_work_name_the_variable_to_fix() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        assert!(Connector::new(&cfg(PgTlsMode::Disable)).is_ok());
        assert!(Connector::new(&cfg(PgTlsMode::VerifyNone)).is_ok());
        let e = Connector::new(&cfg(PgTlsMode::VerifyFull)).err().unwrap().to_string();
        assert!(e.contains("verifyFull") && e.contains("KUMA_STORE_POSTGRES_TLS_CA_PATH"), "{e}");
        let mut c = cfg(PgTlsMode::VerifyCa);
        c.tls_ca_path = Some("/nonexistent/ca.pem".into());
        let e = format!("{:#}", Connector::new(&c).err().unwrap());
        assert!(e.contains("cannot read KUMA_STORE_POSTGRES_TLS_CA_PATH=/nonexistent/ca.pem"), "{e}");
        let mut c = cfg(PgTlsMode::VerifyNone);
        c.tls_cert_path = Some("/x.pem".into());
        let e = Connector::new(&c).err().unwrap().to_string();
        assert!(e.contains("must be set together"), "{e}");
        let mut c = cfg(PgTlsMode::Disable);
        c.host = " ".into();
        assert!(Connector::new(&c).err().unwrap().to_string().contains("KUMA_STORE_POSTGRES_HOST"));
    }

    #[test]
    fn an_unavailable_database_is_said_so_with_the_settings_to_check() {
        let e = unavailable(&PostgresConfig::default(), "Connection refused (os error 111)").to_string();
        assert_eq!(
            e,
            "the database (PostgreSQL at 127.0.0.1:15432/kuma) is unavailable: Connection refused (os error 111) \
             (is PostgreSQL running there? KUMA_STORE_POSTGRES_HOST and KUMA_STORE_POSTGRES_PORT say where)"
        );
        let e = unavailable(&PostgresConfig::default(), "invalid peer certificate: UnknownIssuer").to_string();
        assert!(e.ends_with("(check KUMA_STORE_POSTGRES_TLS_MODE and KUMA_STORE_POSTGRES_TLS_CA_PATH)"), "{e}");
    }
}
