//! A synthetic TLS ClientHello for the plain-bytes scenarios (bulk, latency, hold).
//!
//! Proxies that route by SNI without terminating TLS only look at the ClientHello and
//! then copy bytes. Sending a well-formed hello followed by plain bytes puts all the
//! cost of a test on the proxy instead of on TLS record encryption in the load
//! generator. The client random is a fixed marker so that the backend can tell this
//! hello from a real one (a real one is handed to rustls).

/// The 32-byte client random that marks a synthetic hello.
pub const MAGIC: &[u8; 32] = b"DPBENCH-RAW-HELLO-MAGIC-32BYTES!";
/// Offset of the client random in the record: record header (5), handshake header (4),
/// legacy version (2).
pub const MAGIC_OFFSET: usize = 11;

fn u16be(v: usize) -> [u8; 2] {
    u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes()
}

fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16be(body.len()));
    out.extend_from_slice(body);
}

/// One TLS record holding a TLS 1.3-style ClientHello for `sni`.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let mut exts = vec![];
    let mut entry = vec![0u8];
    entry.extend_from_slice(&u16be(sni.len()));
    entry.extend_from_slice(sni.as_bytes());
    let mut list = u16be(entry.len()).to_vec();
    list.extend_from_slice(&entry);
    ext(&mut exts, 0, &list); // server_name
    ext(&mut exts, 0x0a, &[0, 2, 0, 0x1d]); // supported_groups: x25519
    ext(&mut exts, 0x0d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // signature_algorithms
    let mut ks = vec![0, 36, 0, 0x1d, 0, 32];
    ks.extend_from_slice(&[0x42; 32]);
    ext(&mut exts, 0x33, &ks); // key_share: x25519
    ext(&mut exts, 0x2b, &[2, 3, 4]); // supported_versions: TLS 1.3
    let mut body = vec![3, 3];
    body.extend_from_slice(MAGIC);
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&u16be(exts.len()));
    body.extend(exts);
    let mut msg = vec![1, 0];
    msg.extend_from_slice(&u16be(body.len()));
    msg.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&u16be(msg.len()));
    rec.extend(msg);
    rec
}

/// Whether `prefix` (at least `MAGIC_OFFSET + 32` bytes) starts a synthetic hello.
pub fn is_synthetic(prefix: &[u8]) -> bool {
    prefix.get(MAGIC_OFFSET..MAGIC_OFFSET + MAGIC.len()) == Some(&MAGIC[..])
}

/// Total length of the TLS record that starts `prefix` (at least 5 bytes).
pub fn record_len(prefix: &[u8]) -> usize {
    5 + usize::from(u16::from_be_bytes([prefix[3], prefix[4]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_as_a_hello_with_the_name() {
        let h = client_hello("n7.svc.bench");
        assert!(is_synthetic(&h));
        assert_eq!(record_len(&h), h.len());
        match clienthello::parse(&h) {
            clienthello::Parsed::Hello(p) => assert_eq!(p.server_name(), Some("n7.svc.bench")),
            other => panic!("{other:?}"),
        }
    }
}
