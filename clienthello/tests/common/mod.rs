//! Helpers shared by the integration tests: record (re)wrapping, the
//! incremental-parsing checks and a builder for synthetic ClientHellos.
#![allow(dead_code)]

use clienthello::{ClientHello, Parsed, parse};

/// What a test expects [`parse`] to find in a complete ClientHello.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub server_name: Option<&'a str>,
    pub alpn: &'a [&'a [u8]],
}

/// Unwraps `Parsed::Hello`, panicking with `what` otherwise.
#[track_caller]
pub fn hello(parsed: Parsed, what: &str) -> ClientHello {
    match parsed {
        Parsed::Hello(hello) => hello,
        other => panic!("{what}: expected Hello, got {other:?}"),
    }
}

/// Checks the name and ALPN ids of `hello`.
#[track_caller]
pub fn assert_expect(hello: &ClientHello, expect: Expect<'_>, what: &str) {
    assert_eq!(hello.server_name(), expect.server_name, "{what}: server name");
    let alpn: Vec<&[u8]> = hello.alpn().collect();
    assert_eq!(alpn, expect.alpn, "{what}: alpn");
}

/// The incremental-parsing contract for a buffer `buf` holding exactly one
/// complete ClientHello: every strict prefix (the empty one included) is
/// `NeedMore`, the whole buffer is a `Hello` consuming all of it with the
/// expected contents, and trailing bytes of any kind change nothing.
/// Returns the hello.
#[track_caller]
pub fn assert_complete(buf: &[u8], expect: Expect<'_>, what: &str) -> ClientHello {
    for i in 0..buf.len() {
        let got = parse(&buf[..i]);
        assert_eq!(got, Parsed::NeedMore, "{what}: prefix of {i}/{} bytes", buf.len());
    }
    let hello = hello(parse(buf), what);
    assert_expect(&hello, expect, what);
    assert_eq!(hello.consumed(), buf.len(), "{what}: consumed");
    for trailer in TRAILERS {
        let mut longer = buf.to_vec();
        longer.extend_from_slice(trailer);
        assert_eq!(parse(&longer), Parsed::Hello(hello.clone()), "{what}: with trailer {trailer:?}");
    }
    hello
}

/// Bytes a client could send after its ClientHello, and plain garbage.
pub const TRAILERS: &[&[u8]] = &[
    b"\x00",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    // change_cipher_spec, then the start of an application_data record.
    b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x20",
    // The start of another ClientHello record.
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
];

/// Concatenates the payloads of the handshake records at the start of `buf`
/// until they hold one complete handshake message, which is returned (with
/// its 4-byte header). Panics on anything unexpected: only for test input.
pub fn handshake_message(buf: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    let mut pos = 0;
    loop {
        assert_eq!(buf[pos], 22, "handshake record expected at {pos}");
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        msg.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if msg.len() >= 4 {
            let body = usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
            if msg.len() >= 4 + body {
                assert_eq!(msg.len(), 4 + body, "bytes after the handshake message");
                return msg;
            }
        }
    }
}

/// Wraps the handshake bytes `msg` into handshake records carrying at most
/// `frag` bytes each; the first record says version 3.1, the others 3.3
/// (as TLS 1.3 clients do).
pub fn wrap(msg: &[u8], frag: usize) -> Vec<u8> {
    wrap_with(msg, frag, [3, 1], [3, 3])
}

/// Like [`wrap`] with the given record versions.
pub fn wrap_with(msg: &[u8], frag: usize, first: [u8; 2], rest: [u8; 2]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, chunk) in msg.chunks(frag).enumerate() {
        out.push(22);
        out.extend_from_slice(if i == 0 { &first } else { &rest });
        out.extend_from_slice(&u16be(chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

pub fn u16be(n: usize) -> [u8; 2] {
    u16::try_from(n).expect("fits in u16").to_be_bytes()
}

/// `server_name` extension data with the given `(name_type, name)` entries.
pub fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (ty, name) in entries {
        list.push(*ty);
        list.extend_from_slice(&u16be(name.len()));
        list.extend_from_slice(name);
    }
    let mut data = u16be(list.len()).to_vec();
    data.extend_from_slice(&list);
    data
}

/// ALPN extension data with the given protocol ids.
pub fn alpn_ext(ids: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for id in ids {
        list.push(u8::try_from(id.len()).expect("short id"));
        list.extend_from_slice(id);
    }
    let mut data = u16be(list.len()).to_vec();
    data.extend_from_slice(&list);
    data
}

pub const EXT_SERVER_NAME: u16 = 0;
pub const EXT_ALPN: u16 = 16;
pub const EXT_SUPPORTED_VERSIONS: u16 = 43;
pub const EXT_KEY_SHARE: u16 = 51;

/// A synthetic ClientHello, serialised field by field so that tests can
/// break any length.
#[derive(Debug, Clone)]
pub struct HelloBuilder {
    pub version: [u8; 2],
    pub session_id: Vec<u8>,
    /// Raw cipher_suites bytes (normally an even number).
    pub cipher_suites: Vec<u8>,
    pub compression: Vec<u8>,
    /// `None`: no extensions block at all (SSL 3.0 style).
    pub extensions: Option<Vec<(u16, Vec<u8>)>>,
}

impl Default for HelloBuilder {
    fn default() -> Self {
        Self {
            version: [3, 3],
            session_id: vec![0xaa; 32],
            cipher_suites: vec![0x13, 0x01, 0xc0, 0x2f, 0x00, 0xff],
            compression: vec![0],
            extensions: Some(Vec::new()),
        }
    }
}

impl HelloBuilder {
    /// Appends an extension.
    pub fn ext(mut self, ty: u16, data: impl Into<Vec<u8>>) -> Self {
        self.extensions.get_or_insert_with(Vec::new).push((ty, data.into()));
        self
    }

    /// Appends a `server_name` extension with one host_name.
    pub fn sni(self, name: &[u8]) -> Self {
        self.ext(EXT_SERVER_NAME, sni_ext(&[(0, name)]))
    }

    /// Appends an ALPN extension.
    pub fn alpn(self, ids: &[&[u8]]) -> Self {
        self.ext(EXT_ALPN, alpn_ext(ids))
    }

    /// Offset, in the handshake message, of the extensions block's length.
    pub fn extensions_offset(&self) -> usize {
        4 + 2 + 32 + 1 + self.session_id.len() + 2 + self.cipher_suites.len() + 1 + self.compression.len()
    }

    /// Offset, in the handshake message, of extension number `n`'s type.
    pub fn extension_offset(&self, n: usize) -> usize {
        let exts = self.extensions.as_deref().unwrap_or_default();
        self.extensions_offset() + 2 + exts[..n].iter().map(|(_, data)| 4 + data.len()).sum::<usize>()
    }

    /// The handshake message (4-byte header and body).
    pub fn handshake(&self) -> Vec<u8> {
        let mut body = self.version.to_vec();
        body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
        body.push(u8::try_from(self.session_id.len()).expect("session id length"));
        body.extend_from_slice(&self.session_id);
        body.extend_from_slice(&u16be(self.cipher_suites.len()));
        body.extend_from_slice(&self.cipher_suites);
        body.push(u8::try_from(self.compression.len()).expect("compression length"));
        body.extend_from_slice(&self.compression);
        if let Some(exts) = &self.extensions {
            let mut block = Vec::new();
            for (ty, data) in exts {
                block.extend_from_slice(&ty.to_be_bytes());
                block.extend_from_slice(&u16be(data.len()));
                block.extend_from_slice(data);
            }
            body.extend_from_slice(&u16be(block.len()));
            body.extend_from_slice(&block);
        }
        let len = u32::try_from(body.len()).expect("body length").to_be_bytes();
        let mut msg = vec![1, len[1], len[2], len[3]];
        msg.extend_from_slice(&body);
        msg
    }

    /// The handshake message in one record (version 3.1).
    pub fn record(&self) -> Vec<u8> {
        let msg = self.handshake();
        wrap(&msg, msg.len())
    }
}

/// Puts a handshake message whose lengths were tampered with in one record.
pub fn one_record(msg: &[u8]) -> Vec<u8> {
    wrap(msg, msg.len())
}

/// Asserts that `buf` is `Malformed`, with and without trailing bytes, and
/// that no prefix of it is a `Hello` or `NotTls`.
#[track_caller]
pub fn assert_malformed(buf: &[u8], what: &str) {
    assert_eq!(parse(buf), Parsed::Malformed, "{what}");
    for trailer in TRAILERS {
        let mut longer = buf.to_vec();
        longer.extend_from_slice(trailer);
        assert_eq!(parse(&longer), Parsed::Malformed, "{what}: with trailer");
    }
    for i in 0..buf.len() {
        let got = parse(&buf[..i]);
        assert!(matches!(got, Parsed::NeedMore | Parsed::Malformed), "{what}: prefix of {i} bytes gave {got:?}");
    }
}

/// Tiny deterministic PRNG (xorshift64*) for the mutation tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The properties every input must satisfy: no panic, and a `Hello` is
/// reproduced by exactly its consumed bytes, all shorter prefixes of which
/// are `NeedMore` (checking every `step`-th prefix and the longest).
#[track_caller]
pub fn assert_consistent(buf: &[u8], step: usize) -> Parsed {
    let got = parse(buf);
    if let Parsed::Hello(hello) = &got {
        let n = hello.consumed();
        assert!(n > 5 && n <= buf.len(), "consumed {n} of {}", buf.len());
        assert_eq!(parse(&buf[..n]), got);
        for i in (0..n).step_by(step).chain([n - 1]) {
            assert_eq!(parse(&buf[..i]), Parsed::NeedMore, "prefix {i}");
        }
        assert!(hello.server_name().is_none_or(|n| !n.is_empty() && n.len() <= 255));
        assert!(hello.alpn().count() <= clienthello::MAX_ALPN);
        assert!(hello.alpn().all(|id| !id.is_empty() && id.len() <= clienthello::MAX_ALPN_LEN));
    }
    got
}
