//! ClientHellos built field by field, to reach the cases real clients rarely
//! send.

mod common;

use clienthello::{MAX_ALPN, MAX_ALPN_LEN, MAX_SERVER_NAME_LEN, Parsed, parse};
use common::{
    EXT_ALPN, EXT_KEY_SHARE, EXT_SERVER_NAME, EXT_SUPPORTED_VERSIONS, Expect, HelloBuilder, alpn_ext, assert_complete,
    assert_malformed, one_record, sni_ext, wrap, wrap_with,
};

const NAME: &str = "svc.zone-a.example.com";

fn typical() -> HelloBuilder {
    HelloBuilder::default().sni(NAME.as_bytes()).alpn(&[b"h2", b"http/1.1"])
}

fn typical_expect() -> Expect<'static> {
    Expect { server_name: Some(NAME), alpn: &[b"h2", b"http/1.1"] }
}

#[test]
fn typical_hello() {
    let hello = assert_complete(&typical().record(), typical_expect(), "typical");
    assert_eq!(
        format!("{hello:?}"),
        format!(
            "ClientHello {{ server_name: Some({NAME:?}), alpn: [\"h2\", \"http/1.1\"], consumed: {} }}",
            hello.consumed()
        )
    );
}

#[test]
fn every_record_size() {
    let msg = typical().handshake();
    for frag in 1..=msg.len() {
        assert_complete(&wrap(&msg, frag), typical_expect(), &format!("frag {frag}"));
    }
}

#[test]
fn record_versions() {
    let msg = typical().handshake();
    for first in [[3, 0], [3, 1], [3, 2], [3, 3], [3, 4]] {
        for rest in [[3, 0], [3, 3], [3, 4]] {
            let what = format!("record versions {first:?} {rest:?}");
            assert_complete(&wrap_with(&msg, 50, first, rest), typical_expect(), &what);
        }
    }
    assert_malformed(&wrap_with(&msg, msg.len(), [3, 5], [3, 3]), "version 3.5");
    assert_malformed(&wrap_with(&msg, 50, [3, 3], [3, 5]), "later version 3.5");
    assert_malformed(&wrap_with(&msg, 50, [3, 3], [2, 0]), "later version 2.0");
    assert_eq!(parse(&wrap_with(&msg, 50, [2, 0], [3, 3])), Parsed::NotTls);
}

#[test]
fn grease() {
    let hello = HelloBuilder { cipher_suites: vec![0x0a, 0x0a, 0x13, 0x01], ..HelloBuilder::default() }
        .ext(0x0a0a, [])
        .sni(NAME.as_bytes())
        .ext(0x1a1a, [0])
        .ext(EXT_SUPPORTED_VERSIONS, [4, 0x2a, 0x2a, 3, 4])
        .alpn(&[b"h2", b"http/1.1"])
        .ext(0xfafa, [0; 7]);
    assert_complete(&hello.record(), typical_expect(), "grease");
}

#[test]
fn no_sni() {
    let hello = HelloBuilder::default().alpn(&[b"h2", b"http/1.1"]);
    let expect = Expect { server_name: None, alpn: &[b"h2", b"http/1.1"] };
    assert_complete(&hello.record(), expect, "no sni");
}

#[test]
fn no_extensions_at_all() {
    let expect = Expect { server_name: None, alpn: &[] };
    // SSL 3.0 and TLS 1.0 clients may send no extensions block.
    for version in [[3, 0], [3, 1]] {
        let hello = HelloBuilder { version, session_id: Vec::new(), extensions: None, ..HelloBuilder::default() };
        let buf = wrap_with(&hello.handshake(), 1000, version, version);
        assert_complete(&buf, expect, &format!("no extensions {version:?}"));
    }
    // An empty extensions block is fine too.
    let hello = HelloBuilder::default();
    assert_complete(&hello.record(), expect, "empty extensions");
}

#[test]
fn sni_entries_of_other_types_are_skipped() {
    let sni = sni_ext(&[(1, b"not-a-host-name"), (0, NAME.as_bytes()), (7, b"")]);
    let hello = HelloBuilder::default().ext(EXT_SERVER_NAME, sni).alpn(&[b"h2", b"http/1.1"]);
    assert_complete(&hello.record(), typical_expect(), "other name types");

    let only_other = HelloBuilder::default().ext(EXT_SERVER_NAME, sni_ext(&[(1, b"x")]));
    let expect = Expect { server_name: None, alpn: &[] };
    assert_complete(&only_other.record(), expect, "only other name types");
}

#[test]
fn server_name_length_limit() {
    let name = "a".repeat(MAX_SERVER_NAME_LEN);
    let hello = HelloBuilder::default().sni(name.as_bytes());
    let expect = Expect { server_name: Some(&name), alpn: &[] };
    assert_complete(&hello.record(), expect, "255-byte name");
    // Also when the name straddles records.
    assert_complete(&wrap(&hello.handshake(), 100), expect, "255-byte name, split");

    let long = HelloBuilder::default().sni("a".repeat(MAX_SERVER_NAME_LEN + 1).as_bytes());
    assert_malformed(&long.record(), "256-byte name");
    assert_malformed(&wrap(&long.handshake(), 3), "256-byte name, split");
}

#[test]
fn bad_server_names() {
    for (name, what) in
        [(&b""[..], "empty name"), (b"\xff\xfe.example.com", "not UTF-8"), (b"caf\xc3", "truncated UTF-8")]
    {
        assert_malformed(&HelloBuilder::default().sni(name).record(), what);
    }
    // UTF-8 is accepted as is (IDNs should come as A-labels, but routing
    // just won't match).
    let hello = HelloBuilder::default().sni("café.example".as_bytes());
    let expect = Expect { server_name: Some("café.example"), alpn: &[] };
    assert_complete(&hello.record(), expect, "UTF-8 name");

    let two_names = sni_ext(&[(0, b"a.example"), (0, b"b.example")]);
    let hello = HelloBuilder::default().ext(EXT_SERVER_NAME, two_names);
    assert_malformed(&hello.record(), "two host names");

    let hello = HelloBuilder::default().sni(b"a.example").sni(b"a.example");
    assert_malformed(&hello.record(), "two server_name extensions");
    let hello = HelloBuilder::default().ext(EXT_SERVER_NAME, sni_ext(&[(1, b"x")])).sni(b"a.example");
    assert_malformed(&hello.record(), "two server_name extensions, one without host_name");

    let hello = HelloBuilder::default().ext(EXT_SERVER_NAME, []);
    assert_malformed(&hello.record(), "empty server_name extension");
    let hello = HelloBuilder::default().ext(EXT_SERVER_NAME, [0, 0]);
    assert_malformed(&hello.record(), "empty server_name list");
}

#[test]
fn alpn_limits() {
    // An empty list is tolerated.
    let hello = HelloBuilder::default().sni(NAME.as_bytes()).alpn(&[]);
    let expect = Expect { server_name: Some(NAME), alpn: &[] };
    assert_complete(&hello.record(), expect, "empty ALPN list");

    // Ids over MAX_ALPN_LEN are skipped; only MAX_ALPN are kept.
    let long = [b'x'; MAX_ALPN_LEN + 1];
    let max = [b'y'; MAX_ALPN_LEN];
    let ids: Vec<Vec<u8>> = (0..12).map(|i| format!("p{i}").into_bytes()).collect();
    let mut offered: Vec<&[u8]> = vec![&long, &max, b"\x00\xff"];
    offered.extend(ids.iter().map(Vec::as_slice));
    let mut kept: Vec<&[u8]> = vec![&max, b"\x00\xff"];
    kept.extend(ids.iter().map(Vec::as_slice));
    kept.truncate(MAX_ALPN);
    let hello = HelloBuilder::default().alpn(&offered);
    let expect = Expect { server_name: None, alpn: &kept };
    let parsed = assert_complete(&hello.record(), expect, "many ALPN ids");
    assert!(format!("{parsed:?}").contains(r#""\x00\xff""#));
    assert_complete(&wrap(&hello.handshake(), 5), expect, "many ALPN ids, split");

    let hello = HelloBuilder::default().alpn(&[b"h2", b""]);
    assert_malformed(&hello.record(), "empty ALPN id");
    let hello = HelloBuilder::default().ext(EXT_ALPN, []);
    assert_malformed(&hello.record(), "ALPN extension without list");
    let hello = HelloBuilder::default().alpn(&[b"h2"]).alpn(&[b"h2"]);
    assert_malformed(&hello.record(), "two ALPN extensions");
}

#[test]
fn large_post_quantum_hello() {
    // A TLS 1.3 hello with X25519MLKEM768, X25519 and P-256 key shares and
    // padding, > 1500 bytes, with names right after the key share.
    let mut key_share = Vec::new();
    for (group, len) in [(0x11ecu16, 1216usize), (0x001d, 32), (0x0017, 65)] {
        key_share.extend_from_slice(&group.to_be_bytes());
        key_share.extend_from_slice(&common::u16be(len));
        key_share.extend((0..len).map(|i| i as u8));
    }
    let mut data = common::u16be(key_share.len()).to_vec();
    data.extend_from_slice(&key_share);
    let hello = HelloBuilder::default()
        .ext(EXT_SUPPORTED_VERSIONS, [2, 3, 4])
        .ext(EXT_KEY_SHARE, data)
        .sni(NAME.as_bytes())
        .alpn(&[b"h2", b"http/1.1"])
        .ext(0x0015, [0; 64]);
    let buf = hello.record();
    assert!(buf.len() > 1500, "{}", buf.len());
    assert_complete(&buf, typical_expect(), "post-quantum");
    for frag in [1, 2, 7, 100, 1400] {
        let what = format!("post-quantum, {frag}-byte records");
        assert_complete(&wrap(&hello.handshake(), frag), typical_expect(), &what);
    }
}

#[test]
fn not_tls() {
    for buf in [
        &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x00",
        b"\x17\x03\x03\x00\x10",
        // SSLv2-compatible ClientHello.
        b"\x80\x2e\x01\x03\x01",
        // A record major version other than 3.
        b"\x16\x02",
        b"\x16\x00\x01",
        b"\x16\x04\x00\x00\x05",
    ] {
        assert_eq!(parse(buf), Parsed::NotTls, "{buf:?}");
    }
    // An alert as the very first record is not a handshake either.
    assert_eq!(parse(b"\x15\x03\x03\x00\x02\x02\x28"), Parsed::NotTls);
    let mut http = b"GET".to_vec();
    http.extend_from_slice(&typical().record());
    assert_eq!(parse(&http), Parsed::NotTls);
}

#[test]
fn non_handshake_record_before_hello_completes() {
    let msg = typical().handshake();
    let (head, tail) = msg.split_at(40);
    for interloper in [
        &b"\x15\x03\x03\x00\x02\x02\x28"[..], // fatal alert
        b"\x14\x03\x03\x00\x01\x01",          // change_cipher_spec
        b"\x17\x03\x03\x00\x01\x00",          // application_data
        b"\x15",                              // just the type byte of an alert
    ] {
        let mut buf = one_record(head);
        buf.extend_from_slice(interloper);
        buf.extend_from_slice(&one_record(tail));
        assert_malformed(&buf, &format!("{interloper:?} interleaved"));
    }
}

#[test]
fn not_a_client_hello() {
    let mut msg = typical().handshake();
    for ty in [0, 2, 4, 11, 20, 0xff] {
        msg[0] = ty;
        assert_malformed(&one_record(&msg), &format!("handshake type {ty}"));
    }
    let hello = HelloBuilder { version: [2, 0], ..HelloBuilder::default() };
    assert_malformed(&hello.record(), "client version 2.0");
}

#[test]
fn record_lengths() {
    let msg = typical().handshake();
    // Zero-length handshake records are forbidden.
    let mut buf = b"\x16\x03\x01\x00\x00".to_vec();
    buf.extend_from_slice(&one_record(&msg));
    assert_malformed(&buf, "empty first record");
    let mut buf = one_record(&msg[..10]);
    buf.extend_from_slice(b"\x16\x03\x03\x00\x00");
    buf.extend_from_slice(&one_record(&msg[10..]));
    assert_malformed(&buf, "empty middle record");

    // 2^14 + 256 is the limit.
    assert_eq!(parse(b"\x16\x03\x01\x41\x00"), Parsed::NeedMore);
    assert_eq!(parse(b"\x16\x03\x01\x41\x01"), Parsed::Malformed);
    assert_eq!(parse(b"\x16\x03\x01\xff\xff\x01"), Parsed::Malformed);
    // A record split in the middle of the hello may be longer than 2^14.
    let big =
        HelloBuilder { cipher_suites: (0..9000u16).flat_map(u16::to_be_bytes).collect(), ..HelloBuilder::default() }
            .sni(NAME.as_bytes());
    let expect = Expect { server_name: Some(NAME), alpn: &[] };
    assert_complete(&wrap(&big.handshake(), 16384 + 256), expect, "max records");
    assert_malformed(&wrap(&big.handshake(), 16384 + 257), "oversized record");
}

#[test]
fn bytes_after_hello_in_its_record() {
    let mut msg = typical().handshake();
    msg.extend_from_slice(b"\x0b\x00\x00\x00");
    assert_malformed(&one_record(&msg), "extra handshake message");
}

/// Builds `typical()` with the byte pair at `offset` in its handshake
/// message replaced by `f(old)`, in one record.
fn patch_u16(hello: &HelloBuilder, offset: usize, f: impl Fn(u16) -> u16) -> Vec<u8> {
    let mut msg = hello.handshake();
    let old = u16::from_be_bytes([msg[offset], msg[offset + 1]]);
    msg[offset..offset + 2].copy_from_slice(&f(old).to_be_bytes());
    one_record(&msg)
}

#[test]
fn inconsistent_lengths() {
    let hello = typical().ext(0x1234, [1, 2, 3, 4, 5]);
    let exts = hello.extensions_offset();
    // extensions: 0 = server_name, 1 = ALPN, 2 = 0x1234.
    let sni = hello.extension_offset(0);
    let alpn = hello.extension_offset(1);
    let last = hello.extension_offset(2);
    for delta in [1u16, 2, 0xffff] {
        let d = |n: u16| n.wrapping_add(delta);
        let what = |field: &str| format!("{field} {:+}", delta as i16);
        assert_malformed(&patch_u16(&hello, exts, d), &what("extensions block"));
        assert_malformed(&patch_u16(&hello, sni + 2, d), &what("server_name ext"));
        assert_malformed(&patch_u16(&hello, sni + 4, d), &what("server_name list"));
        assert_malformed(&patch_u16(&hello, sni + 7, d), &what("host_name"));
        assert_malformed(&patch_u16(&hello, alpn + 2, d), &what("ALPN ext"));
        assert_malformed(&patch_u16(&hello, alpn + 4, d), &what("ALPN list"));
        assert_malformed(&patch_u16(&hello, last + 2, d), &what("last ext"));
    }
    // The first ALPN id's length byte.
    let mut msg = hello.handshake();
    msg[alpn + 6] = 30;
    assert_malformed(&one_record(&msg), "ALPN id longer than its list");

    // Handshake length vs. record and body.
    let msg = hello.handshake();
    let body = msg.len() - 4;
    for (len, what) in [
        (body - 1, "handshake length - 1"),
        (body - 5, "handshake length - 5"),
        (10, "handshake length 10"),
        (0, "handshake length 0"),
    ] {
        let mut short = msg.clone();
        short[1..4].copy_from_slice(&u32::try_from(len).unwrap().to_be_bytes()[1..]);
        assert_malformed(&one_record(&short), what);
    }
    let mut long = msg.clone();
    long[1..4].copy_from_slice(&u32::try_from(body + 1).unwrap().to_be_bytes()[1..]);
    long.push(0);
    assert_malformed(&one_record(&long), "handshake length + 1");
    let mut huge = msg.clone();
    huge[1..4].copy_from_slice(&[0xff, 0xff, 0xff]);
    assert_malformed(&wrap(&huge, 100), "handshake length 2^24 - 1");
    // Rejected from the header alone: no ClientHello body can be that long.
    assert_eq!(parse(b"\x16\x03\x01\x00\x10\x01\x02\x01\x45"), Parsed::Malformed);
    assert_eq!(parse(b"\x16\x03\x01\x00\x10\x01\x02\x01\x44"), Parsed::NeedMore);

    // Record longer than the hello (what follows is not a record header).
    let mut buf = one_record(&msg);
    buf[3..5].copy_from_slice(&common::u16be(msg.len() + 1));
    buf.push(0x16);
    assert_malformed(&buf, "record length + 1");

    // Fixed fields.
    let bad = [
        HelloBuilder { session_id: vec![0; 33], ..typical() },
        HelloBuilder { cipher_suites: vec![0x13, 0x01, 0x13], ..typical() },
        HelloBuilder { cipher_suites: Vec::new(), ..typical() },
        HelloBuilder { compression: Vec::new(), ..typical() },
    ];
    for hello in bad {
        assert_malformed(&hello.record(), &format!("{hello:?}"));
    }
    // A truncated extensions block length (only one of its two bytes).
    let mut msg = HelloBuilder { extensions: None, ..HelloBuilder::default() }.handshake();
    msg.push(0);
    let body = u32::try_from(msg.len() - 4).unwrap().to_be_bytes();
    msg[1..4].copy_from_slice(&body[1..]);
    assert_malformed(&one_record(&msg), "one-byte extensions length");
}

#[test]
fn names_straddling_records() {
    // Every split point of the name and of the ALPN ids, in two records.
    let hello = typical();
    let msg = hello.handshake();
    let start = hello.extension_offset(0);
    let end = hello.extension_offset(1) + 4 + alpn_ext(&[b"h2", b"http/1.1"]).len();
    for split in start..end {
        let mut buf = one_record(&msg[..split]);
        buf.extend_from_slice(&one_record(&msg[split..]));
        assert_complete(&buf, typical_expect(), &format!("split at {split}"));
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = common::Rng(42);
    for _ in 0..20_000 {
        let len = rng.below(300);
        let mut buf: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        if let Some(first) = buf.first_mut() {
            *first = 0x16;
        }
        if len > 1 {
            buf[1] = 3;
        }
        assert!(!matches!(common::assert_consistent(&buf, 1), Parsed::NotTls));
    }
}
