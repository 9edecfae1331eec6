//! Writes the first flight of a rustls client (a ClientHello using the
//! post-quantum X25519MLKEM768 key share) to stdout. No network is used.
//!
//! Usage: `cargo run -p clienthello --example rustls_client_hello -- NAME ALPN,ALPN > out.bin`
//! (see `testdata/capture.sh`).

use std::io::Write;
use std::sync::Arc;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "rustls.example.com".into());
    let alpn = args.next().unwrap_or_else(|| "h2,http/1.1".into());
    let alpn: Vec<Vec<u8>> = alpn.split(',').filter(|p| !p.is_empty()).map(|p| p.as_bytes().to_vec()).collect();
    let hello = client_hello(&name, alpn);
    std::io::stdout().write_all(&hello).expect("write stdout");
}

/// Returns the bytes a rustls client sends first.
fn client_hello(name: &str, alpn: Vec<Vec<u8>>) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}
