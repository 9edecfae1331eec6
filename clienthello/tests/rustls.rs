//! A ClientHello generated at test time by the current rustls, with the
//! post-quantum X25519MLKEM768 key share (well over 1200 bytes). No network:
//! the client's first flight is written to a Vec.

mod common;

use std::sync::Arc;

use common::{Expect, assert_complete, handshake_message, wrap};

fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|id| id.to_vec()).collect();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

#[test]
fn rustls_post_quantum_hello() {
    let alpn: &[&[u8]] = &[b"h2", b"http/1.1", b"acme-tls/1"];
    let expect = Expect { server_name: Some("generated.zone-b.example.com"), alpn };
    let buf = rustls_hello("generated.zone-b.example.com", alpn);
    assert!(buf.len() > 1200, "{} bytes", buf.len());
    // key_share entry: group X25519MLKEM768 (0x11ec), key_exchange<1216>.
    assert!(buf.windows(4).any(|w| w == [0x11, 0xec, 0x04, 0xc0]));
    assert_complete(&buf, expect, "rustls");
    let msg = handshake_message(&buf);
    for frag in [1, 2, 7, 100, 1000] {
        assert_complete(&wrap(&msg, frag), expect, &format!("rustls, {frag}-byte records"));
    }
}

#[test]
fn rustls_without_alpn() {
    let buf = rustls_hello("x.example", &[]);
    let expect = Expect { server_name: Some("x.example"), alpn: &[] };
    assert_complete(&buf, expect, "rustls without ALPN");
}

#[test]
fn rustls_ip_address_sends_no_sni() {
    // rustls sends no server_name extension for IP addresses.
    let buf = rustls_hello("192.0.2.1", &[b"h2"]);
    let expect = Expect { server_name: None, alpn: &[b"h2"] };
    assert_complete(&buf, expect, "rustls to an IP address");
}
