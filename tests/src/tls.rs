//! A real TLS server and client (rustls) for end-to-end passthrough checks.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config with a self-signed certificate for `name`, and a client config
/// that trusts exactly that certificate.
pub fn pair(name: &str) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("self-signed cert");
    let der: CertificateDer<'static> = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server config");
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A server config with a self-signed certificate for `name`, and that certificate in
/// PEM (for a peer to trust it).
pub fn self_signed(name: &str) -> (Arc<ServerConfig>, String) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("self-signed cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
    (Arc::new(server), cert.cert.pem())
}

/// A TLS server answering each line with `<name>: <line>`.
pub async fn serve(cfg: Arc<ServerConfig>, name: &str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(cfg);
    let name = name.to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (acceptor, name) = (acceptor.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else { return };
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{name}: {line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Connects through `addr` with SNI `sni`, sends `msg`, returns the first line back.
pub async fn request(addr: SocketAddr, sni: &str, cfg: Arc<ClientConfig>, msg: &[u8]) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).expect("DNS-valid SNI");
    let mut tls = TlsConnector::from(cfg).connect(name, s).await.expect("TLS handshake through the proxy");
    tls.write_all(msg).await.unwrap();
    let mut line = String::new();
    BufReader::new(tls).read_line(&mut line).await.unwrap();
    line.trim_end().to_string()
}

/// A mesh CA issuing SPIFFE identities, as the control plane's builtin CA does: leaves
/// carry key usage digitalSignature and keyEncipherment and both extended usages (Envoy's
/// SPIFFE validator refuses a leaf without a key usage extension).
pub struct MeshCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// An identity: certificate chain and private key, PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl MeshCa {
    pub fn new(name: &str) -> MeshCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        MeshCa { pem: cert.pem(), issuer: rcgen::Issuer::new(p, key) }
    }

    /// A leaf with the URI SAN `spiffe_id`, usable as client and server certificate.
    pub fn identity(&self, spiffe_id: &str) -> Identity {
        self.leaf(vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())])
    }

    /// A leaf with the DNS SAN `name` (the control plane's `kuma-cp`, for instance).
    pub fn dns(&self, name: &str) -> Identity {
        self.leaf(vec![rcgen::SanType::DnsName(name.try_into().unwrap())])
    }

    /// A leaf with these SANs (several SPIFFE IDs, DNS names, IP addresses), usable as
    /// client and server certificate.
    pub fn leaf(&self, sans: Vec<rcgen::SanType>) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }
}

/// A client verifier that accepts any server certificate (signatures still checked):
/// for tests of a server's *client* authentication.
#[derive(Debug)]
pub struct AcceptAnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client presenting `id` (or no certificate), accepting any server certificate.
pub fn client_with_identity(id: Option<&Identity>) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())));
    Arc::new(match id {
        Some(id) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}
