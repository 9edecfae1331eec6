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
