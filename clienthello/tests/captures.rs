//! Real ClientHellos captured by `testdata/capture.sh`.

mod common;

use clienthello::{Parsed, parse};
use common::{Expect, Rng, assert_complete, assert_consistent, handshake_message, wrap};

struct Capture {
    file: &'static str,
    expect: Expect<'static>,
    /// Lower bound on the capture's size (the exact size varies per run).
    min_len: usize,
    /// The ClientHello's legacy_version.
    client_version: [u8; 2],
}

const H2_HTTP11: &[&[u8]] = &[b"h2", b"http/1.1"];

const CAPTURES: &[Capture] = &[
    Capture {
        file: "openssl-tls13.bin",
        expect: Expect { server_name: Some("openssl.example.com"), alpn: H2_HTTP11 },
        min_len: 200,
        client_version: [3, 3],
    },
    Capture {
        file: "openssl-tls12.bin",
        expect: Expect { server_name: Some("tls12.example.com"), alpn: &[] },
        min_len: 100,
        client_version: [3, 3],
    },
    Capture {
        file: "openssl-tls10.bin",
        expect: Expect { server_name: Some("tls10.example.com"), alpn: &[] },
        min_len: 60,
        client_version: [3, 1],
    },
    Capture {
        file: "openssl-nosni.bin",
        expect: Expect { server_name: None, alpn: &[] },
        min_len: 200,
        client_version: [3, 3],
    },
    Capture {
        file: "python.bin",
        expect: Expect { server_name: Some("python.example.com"), alpn: &[b"http/1.1"] },
        min_len: 200,
        client_version: [3, 3],
    },
    Capture {
        file: "curl.bin",
        expect: Expect { server_name: Some("curl.example.com"), alpn: H2_HTTP11 },
        min_len: 200,
        client_version: [3, 3],
    },
    Capture {
        file: "rustls-pq.bin",
        expect: Expect { server_name: Some("rustls.example.com"), alpn: H2_HTTP11 },
        // X25519MLKEM768 key share: 1184 + 32 bytes.
        min_len: 1200,
        client_version: [3, 3],
    },
];

fn testdata() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn load(capture: &Capture) -> Vec<u8> {
    let path = testdata().join(capture.file);
    let buf = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(buf.len() >= capture.min_len, "{}: only {} bytes", capture.file, buf.len());
    // Offset 9: record header (5) + handshake header (4).
    assert_eq!(buf[9..11], capture.client_version, "{}: version", capture.file);
    buf
}

#[test]
fn every_capture_has_expectations() {
    let mut files: Vec<String> = std::fs::read_dir(testdata())
        .expect("testdata")
        .map(|entry| entry.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|name| name.ends_with(".bin"))
        .collect();
    files.sort();
    let mut listed: Vec<&str> = CAPTURES.iter().map(|c| c.file).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn captures_parse_with_every_prefix_and_trailer() {
    for capture in CAPTURES {
        let buf = load(capture);
        assert_complete(&buf, capture.expect, capture.file);
    }
}

#[test]
fn captures_refragmented() {
    for capture in CAPTURES {
        let msg = handshake_message(&load(capture));
        for frag in [1, 2, 7, 100] {
            let what = format!("{} in {frag}-byte records", capture.file);
            let buf = wrap(&msg, frag);
            assert_eq!(buf.len(), msg.len() + 5 * msg.len().div_ceil(frag));
            assert_complete(&buf, capture.expect, &what);
        }
    }
}

#[test]
fn rustls_capture_offers_x25519mlkem768() {
    let buf = load(&CAPTURES[6]);
    // key_share entry: group 0x11ec, key_exchange<1216>.
    assert!(buf.windows(4).any(|w| w == [0x11, 0xec, 0x04, 0xc0]));
}

#[test]
fn truncated_capture_is_malformed() {
    // Claim the record ends one byte early: the hello cannot complete in it,
    // and the next "record header" is the hello's last byte.
    for capture in CAPTURES {
        let mut buf = load(capture);
        let len = u16::from_be_bytes([buf[3], buf[4]]) - 1;
        buf[3..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse(&buf), Parsed::Malformed, "{}", capture.file);
    }
}

#[test]
fn mutated_captures_never_panic() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut hellos = 0;
    for capture in CAPTURES {
        let orig = load(capture);
        for _ in 0..1000 {
            let mut buf = orig.clone();
            for _ in 0..=rng.below(4) {
                let i = rng.below(buf.len());
                match rng.below(4) {
                    0 => buf[i] ^= 1 << rng.below(8),
                    1 => buf[i] = rng.below(256) as u8,
                    2 => buf.truncate(i + 1),
                    _ => buf.insert(i, rng.below(256) as u8),
                }
            }
            if matches!(assert_consistent(&buf, 11), Parsed::Hello(_)) {
                hellos += 1;
            }
        }
    }
    // Flips inside randoms, key shares etc. keep the hello valid.
    assert!(hellos > 500, "only {hellos} mutants parsed");
}
