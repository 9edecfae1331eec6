//! Builds TLS ClientHello messages with any server name, including names a TLS
//! library would refuse to send (Kuma's tag SNI `backend{mesh=default}`).

fn u16be(v: usize) -> [u8; 2] {
    (v as u16).to_be_bytes()
}

fn ext(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut e = kind.to_be_bytes().to_vec();
    e.extend_from_slice(&u16be(body.len()));
    e.extend_from_slice(body);
    e
}

/// The handshake message (type 1) of a TLS 1.3-style ClientHello.
pub fn handshake(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
    let mut exts = vec![];
    if let Some(name) = sni {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&u16be(name.len()));
        entry.extend_from_slice(name.as_bytes());
        let mut list = u16be(entry.len()).to_vec();
        list.extend_from_slice(&entry);
        exts.extend(ext(0, &list));
    }
    if !alpn.is_empty() {
        let mut protos = vec![];
        for p in alpn {
            protos.push(p.len() as u8);
            protos.extend_from_slice(p.as_bytes());
        }
        let mut list = u16be(protos.len()).to_vec();
        list.extend_from_slice(&protos);
        exts.extend(ext(16, &list));
    }
    exts.extend(ext(0x2b, &[2, 3, 4])); // supported_versions: TLS 1.3
    exts.extend(ext(0x0a, &[0, 2, 0, 0x1d])); // supported_groups: x25519
    let mut body = vec![3, 3];
    body.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&u16be(exts.len()));
    body.extend(exts);
    let mut msg = vec![1, 0];
    msg.extend_from_slice(&u16be(body.len()));
    msg.extend(body);
    msg
}

/// Wraps a handshake message into TLS records of at most `fragment` bytes each.
pub fn records(handshake: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = vec![];
    for chunk in handshake.chunks(fragment.max(1)) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&u16be(chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

/// A complete ClientHello in one record.
pub fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
    records(&handshake(sni, alpn), 16384)
}
