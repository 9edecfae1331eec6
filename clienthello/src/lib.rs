//! Incremental, allocation-free TLS ClientHello parser.
//!
//! The zone-ingress proxy peeks at the first bytes a client sends to route the
//! connection by SNI (and ALPN) without terminating TLS, like Envoy's
//! `tls_inspector` listener filter.
//!
//! [`parse`] is *stateless and incremental*: the caller keeps the bytes it has
//! read so far and calls [`parse`] again with the whole prefix each time more
//! arrive, until the answer is no longer [`Parsed::NeedMore`]. The parser:
//!
//! * walks the handshake message across any number of TLS records (each with
//!   its own 5-byte header) without copying it into a heap buffer; only the
//!   server name and the ALPN protocol ids are copied, into fixed inline
//!   arrays, so values straddling a record boundary are handled too;
//! * returns [`Parsed::NeedMore`] for every strict prefix of a valid
//!   ClientHello (including the empty buffer), and the same
//!   [`Parsed::Hello`] for the ClientHello followed by any trailing bytes;
//! * never panics and never allocates (the crate is `no_std`, without `alloc`).
//!
//! ```
//! use clienthello::{parse, Parsed};
//!
//! assert_eq!(parse(b""), Parsed::NeedMore);
//! assert_eq!(parse(b"\x16\x03"), Parsed::NeedMore);
//! assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NotTls);
//! ```
#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

/// Longest accepted server name, in bytes (the DNS limit). A longer
/// `host_name` makes the ClientHello [`Parsed::Malformed`].
pub const MAX_SERVER_NAME_LEN: usize = 255;

/// Number of ALPN protocol ids kept by [`ClientHello::alpn`]; further ids are
/// ignored (but still validated).
pub const MAX_ALPN: usize = 8;

/// Longest ALPN protocol id kept, in bytes; longer ids are skipped (but still
/// validated) and do not count towards [`MAX_ALPN`].
pub const MAX_ALPN_LEN: usize = 32;

/// TLS record content type `handshake`.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest record payload accepted (`TLSCiphertext` limit: 2^14 + 256).
const MAX_RECORD_LEN: usize = 16384 + 256;
/// Largest ClientHello body that length fields can describe: version (2),
/// random (32), session id (1 + 32), cipher suites (2 + 65534),
/// compression methods (1 + 255), extensions (2 + 65535).
const MAX_HELLO_BODY_LEN: usize = 2 + 32 + 1 + 32 + 2 + 65534 + 1 + 255 + 2 + 65535;
/// Extension type `server_name` (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension type `application_layer_protocol_negotiation` (RFC 7301).
const EXT_ALPN: u16 = 16;
/// `NameType` `host_name` in a `ServerNameList`.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// The outcome of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "the hello is inline on purpose (no allocation); ~540 bytes moved once per connection"
)]
pub enum Parsed {
    /// More bytes are needed to decide. The caller reads more and calls again
    /// with the whole prefix.
    NeedMore,
    /// The first bytes are not a TLS handshake record (plain text, HTTP, etc).
    /// Envoy: transport_protocol "raw_buffer".
    NotTls,
    /// It is a TLS handshake record but the ClientHello is malformed.
    Malformed,
    /// A complete ClientHello was found.
    Hello(ClientHello),
}

/// The routing-relevant contents of a complete ClientHello.
///
/// Stored inline in fixed arrays (about 540 bytes), without any allocation.
/// Two values are equal when they have the same server name, the same kept
/// ALPN ids and the same [`consumed`](ClientHello::consumed) count.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name`, valid UTF-8; bytes past `server_name_len` stay zero.
    server_name: [u8; MAX_SERVER_NAME_LEN],
    /// Length of the server name; 0 when absent (an empty name is malformed).
    server_name_len: u8,
    /// Kept ALPN protocol ids; bytes past each length stay zero.
    alpn: [[u8; MAX_ALPN_LEN]; MAX_ALPN],
    /// Length of each kept ALPN protocol id.
    alpn_lens: [u8; MAX_ALPN],
    /// Number of kept ALPN protocol ids (at most [`MAX_ALPN`]).
    alpn_count: u8,
    /// See [`ClientHello::consumed`].
    consumed: usize,
}

impl ClientHello {
    const EMPTY: Self = Self {
        server_name: [0; MAX_SERVER_NAME_LEN],
        server_name_len: 0,
        alpn: [[0; MAX_ALPN_LEN]; MAX_ALPN],
        alpn_lens: [0; MAX_ALPN],
        alpn_count: 0,
        consumed: 0,
    };

    /// The `host_name` entry of the `server_name` extension, exactly as sent
    /// (no case folding, no trailing-dot removal). `None` when the client sent
    /// no `server_name` extension or no `host_name` entry in it.
    pub fn server_name(&self) -> Option<&str> {
        let name = self.server_name.get(..usize::from(self.server_name_len)).filter(|name| !name.is_empty())?;
        // Validated while parsing; cannot fail.
        core::str::from_utf8(name).ok()
    }

    /// The ALPN protocol ids offered by the client, in the client's order.
    ///
    /// At most [`MAX_ALPN`] ids are kept; ids longer than [`MAX_ALPN_LEN`]
    /// bytes are skipped. Empty when the client sent no ALPN extension or an
    /// empty protocol list.
    pub fn alpn(&self) -> impl Iterator<Item = &[u8]> {
        self.alpn
            .iter()
            .zip(self.alpn_lens)
            .take(usize::from(self.alpn_count))
            .map(|(id, len)| id.get(..usize::from(len)).unwrap_or_default())
    }

    /// Number of bytes of the parsed buffer up to and including the end of the
    /// TLS record that completed the ClientHello. Bytes after that (the next
    /// records the client sent) were not looked at.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    fn set_server_name(&mut self, name: &[u8]) {
        // The caller checked 1 <= len <= MAX_SERVER_NAME_LEN.
        if let (Some(dst), Ok(len)) = (self.server_name.get_mut(..name.len()), u8::try_from(name.len())) {
            dst.copy_from_slice(name);
            self.server_name_len = len;
        }
    }
}

impl fmt::Debug for ClientHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Prints an ALPN id as a string (escaping non-printable bytes).
        struct Id<'a>(&'a [u8]);
        impl fmt::Debug for Id<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "\"{}\"", self.0.escape_ascii())
            }
        }
        /// Prints the kept ALPN ids as a list of strings.
        struct Alpn<'a>(&'a ClientHello);
        impl fmt::Debug for Alpn<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.alpn().map(Id)).finish()
            }
        }
        f.debug_struct("ClientHello")
            .field("server_name", &self.server_name())
            .field("alpn", &Alpn(self))
            .field("consumed", &self.consumed)
            .finish()
    }
}

/// Parses the start of a TLS connection, `buf`, as a ClientHello.
///
/// `buf` must hold every byte received so far from the start of the
/// connection. The result depends only on the bytes up to the end of the
/// record that completes the ClientHello: see [`ClientHello::consumed`].
///
/// * [`Parsed::NotTls`] as soon as the first byte is not 22 (handshake) or
///   the record's major version is not 3.
/// * [`Parsed::Malformed`] for a handshake record that does not carry a
///   well-formed ClientHello: another handshake type, inconsistent length
///   fields, a record longer than 2^14 + 256 bytes or of length 0, a
///   non-handshake record (alert, change_cipher_spec, ...) before the hello
///   is complete, other bytes after the hello in its last record, a record
///   version outside 3.0..=3.4, a server name that is empty, longer than
///   [`MAX_SERVER_NAME_LEN`] or not UTF-8, duplicate `server_name` or ALPN
///   extensions, etc.
/// * [`Parsed::NeedMore`] while neither is decided and the hello is not
///   complete.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => return Parsed::NeedMore,
        Some(&ty) if ty != CONTENT_TYPE_HANDSHAKE => return Parsed::NotTls,
        Some(_) => {}
    }
    match buf.get(1) {
        Some(&major) if major != 3 => return Parsed::NotTls,
        _ => {}
    }
    match parse_hello(buf) {
        Ok(hello) => Parsed::Hello(hello),
        Err(Stop::NeedMore) => Parsed::NeedMore,
        Err(Stop::Malformed) => Parsed::Malformed,
    }
}

/// Why parsing stopped before finding a complete ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    NeedMore,
    Malformed,
}

type Res<T> = Result<T, Stop>;

/// Reads the handshake byte stream carried by consecutive handshake records,
/// stepping over record headers as they come.
struct Reader<'a> {
    buf: &'a [u8],
    /// Index in `buf` of the next unread byte.
    pos: usize,
    /// Bytes of the current record's payload not read yet.
    record_left: usize,
    /// Handshake-stream bytes read so far (record headers not counted).
    off: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0, record_left: 0, off: 0 }
    }

    /// Reads the header of the next record, checking each byte as soon as it
    /// is available so that a bad header is rejected without waiting.
    fn next_record(&mut self) -> Res<()> {
        let header = self.buf.get(self.pos..).unwrap_or_default();
        if header.first().is_some_and(|&ty| ty != CONTENT_TYPE_HANDSHAKE) {
            return Err(Stop::Malformed);
        }
        if header.get(1).is_some_and(|&major| major != 3) {
            return Err(Stop::Malformed);
        }
        if header.get(2).is_some_and(|&minor| minor > 4) {
            return Err(Stop::Malformed);
        }
        let (Some(&hi), Some(&lo)) = (header.get(3), header.get(4)) else {
            return Err(Stop::NeedMore);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        // Zero-length handshake fragments are forbidden (RFC 8446 5.1).
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(Stop::Malformed);
        }
        self.pos += 5;
        self.record_left = len;
        Ok(())
    }

    /// Reads the next contiguous run of at most `max` (> 0) handshake bytes.
    fn chunk(&mut self, max: usize) -> Res<&'a [u8]> {
        if self.record_left == 0 {
            self.next_record()?;
        }
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = max.min(self.record_left).min(rest.len());
        match rest.get(..len) {
            Some(chunk) if !chunk.is_empty() => {
                self.pos += len;
                self.record_left -= len;
                self.off += len;
                Ok(chunk)
            }
            _ => Err(Stop::NeedMore),
        }
    }

    /// Skips `len` handshake bytes.
    fn skip(&mut self, mut len: usize) -> Res<()> {
        while len > 0 {
            len -= self.chunk(len)?.len();
        }
        Ok(())
    }

    /// Fills `dst` with the next handshake bytes.
    fn copy(&mut self, mut dst: &mut [u8]) -> Res<()> {
        while !dst.is_empty() {
            let chunk = self.chunk(dst.len())?;
            let (head, tail) = dst.split_at_mut(chunk.len());
            head.copy_from_slice(chunk);
            dst = tail;
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut bytes = [0; N];
        self.copy(&mut bytes)?;
        Ok(bytes)
    }

    fn u8(&mut self) -> Res<u8> {
        let [b] = self.array()?;
        Ok(b)
    }

    fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u24(&mut self) -> Res<usize> {
        let [a, b, c] = self.array()?;
        Ok(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
    }

    /// Checks that `len` more bytes fit before the handshake offset `end`
    /// (the end of the enclosing structure) and returns where they end.
    fn span(&self, len: usize, end: usize) -> Res<usize> {
        match end.checked_sub(self.off) {
            Some(room) if room >= len => Ok(self.off + len),
            _ => Err(Stop::Malformed),
        }
    }

    /// Reads a big-endian length field of `width` bytes (1 or 2), which must
    /// fit before `end`, and checks that the vector it announces does too.
    /// Returns the vector's length and end offset.
    fn vec(&mut self, width: usize, end: usize) -> Res<(usize, usize)> {
        self.span(width, end)?;
        let len = if width == 1 { usize::from(self.u8()?) } else { usize::from(self.u16()?) };
        Ok((len, self.span(len, end)?))
    }

    /// Like [`Reader::vec`], but the vector must end exactly at `end`.
    fn vec_to(&mut self, width: usize, end: usize) -> Res<usize> {
        let (len, vec_end) = self.vec(width, end)?;
        if vec_end == end { Ok(len) } else { Err(Stop::Malformed) }
    }
}

fn parse_hello(buf: &[u8]) -> Res<ClientHello> {
    let mut r = Reader::new(buf);

    // Handshake header.
    if r.u8()? != HANDSHAKE_CLIENT_HELLO {
        return Err(Stop::Malformed);
    }
    let body_len = r.u24()?;
    if body_len > MAX_HELLO_BODY_LEN {
        return Err(Stop::Malformed);
    }
    let end = r.span(body_len, usize::MAX)?;

    // legacy_version: SSL 3.0 to TLS 1.2 (TLS 1.3 also says 3.3).
    r.span(2 + 32, end)?;
    let [major, _minor] = r.array()?;
    if major != 3 {
        return Err(Stop::Malformed);
    }
    // random
    r.skip(32)?;
    // legacy_session_id<0..32>
    let (len, _) = r.vec(1, end)?;
    if len > 32 {
        return Err(Stop::Malformed);
    }
    r.skip(len)?;
    // cipher_suites<2..2^16-2>
    let (len, _) = r.vec(2, end)?;
    if len < 2 || len % 2 != 0 {
        return Err(Stop::Malformed);
    }
    r.skip(len)?;
    // legacy_compression_methods<1..2^8-1>
    let (len, _) = r.vec(1, end)?;
    if len < 1 {
        return Err(Stop::Malformed);
    }
    r.skip(len)?;

    let mut hello = ClientHello::EMPTY;
    // Extensions are optional before TLS 1.3 (SSL 3.0 clients send none).
    if r.off != end {
        parse_extensions(&mut r, end, &mut hello)?;
    }

    // The ClientHello must be the last (only) message of its record.
    if r.record_left != 0 {
        return Err(Stop::Malformed);
    }
    hello.consumed = r.pos;
    Ok(hello)
}

/// Parses `extensions<0..2^16-1>`, which must end exactly at `end`.
fn parse_extensions(r: &mut Reader<'_>, end: usize, hello: &mut ClientHello) -> Res<()> {
    r.vec_to(2, end)?;
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while r.off < end {
        // extension_type, then extension_data<0..2^16-1>.
        r.span(2, end)?;
        let ty = r.u16()?;
        let (len, ext_end) = r.vec(2, end)?;
        match ty {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Err(Stop::Malformed);
                }
                seen_sni = true;
                parse_server_name(r, ext_end, hello)?;
            }
            EXT_ALPN => {
                if seen_alpn {
                    return Err(Stop::Malformed);
                }
                seen_alpn = true;
                parse_alpn(r, ext_end, hello)?;
            }
            // Anything else, GREASE included, is skipped.
            _ => r.skip(len)?,
        }
        if r.off != ext_end {
            return Err(Stop::Malformed);
        }
    }
    Ok(())
}

/// Parses a `ServerNameList` (RFC 6066 section 3) ending exactly at `end`.
fn parse_server_name(r: &mut Reader<'_>, end: usize, hello: &mut ClientHello) -> Res<()> {
    // server_name_list<1..2^16-1>
    if r.vec_to(2, end)? == 0 {
        return Err(Stop::Malformed);
    }
    while r.off < end {
        r.span(1, end)?;
        let name_type = r.u8()?;
        // HostName / other name types: opaque<1..2^16-1> in practice.
        let (len, _) = r.vec(2, end)?;
        if name_type != NAME_TYPE_HOST_NAME {
            r.skip(len)?;
            continue;
        }
        // "MUST NOT contain more than one name of the same name_type".
        if hello.server_name_len != 0 || len == 0 || len > MAX_SERVER_NAME_LEN {
            return Err(Stop::Malformed);
        }
        let mut name = [0; MAX_SERVER_NAME_LEN];
        let name = name.get_mut(..len).ok_or(Stop::Malformed)?;
        r.copy(name)?;
        if core::str::from_utf8(name).is_err() {
            return Err(Stop::Malformed);
        }
        hello.set_server_name(name);
    }
    Ok(())
}

/// Parses a `ProtocolNameList` (RFC 7301 section 3.1) ending exactly at `end`.
/// An empty list is tolerated.
fn parse_alpn(r: &mut Reader<'_>, end: usize, hello: &mut ClientHello) -> Res<()> {
    r.vec_to(2, end)?;
    while r.off < end {
        // ProtocolName opaque<1..2^8-1>
        let (len, _) = r.vec(1, end)?;
        if len == 0 {
            return Err(Stop::Malformed);
        }
        let slot = usize::from(hello.alpn_count);
        match (hello.alpn.get_mut(slot), hello.alpn_lens.get_mut(slot)) {
            (Some(id), Some(id_len)) if len <= MAX_ALPN_LEN => {
                r.copy(id.get_mut(..len).ok_or(Stop::Malformed)?)?;
                *id_len = u8::try_from(len).map_err(|_| Stop::Malformed)?;
                hello.alpn_count += 1;
            }
            _ => r.skip(len)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_first_bytes() {
        assert_eq!(parse(b""), Parsed::NeedMore);
        assert_eq!(parse(b"\x16"), Parsed::NeedMore);
        assert_eq!(parse(b"\x16\x03"), Parsed::NeedMore);
        assert_eq!(parse(b"\x16\x02"), Parsed::NotTls);
        assert_eq!(parse(b"\x17"), Parsed::NotTls);
        assert_eq!(parse(b"\x16\x03\x05"), Parsed::Malformed);
        assert_eq!(parse(b"\x16\x03\x01\x00\x00"), Parsed::Malformed);
        assert_eq!(parse(b"\x16\x03\x01\x41\x01"), Parsed::Malformed);
        assert_eq!(parse(b"\x16\x03\x01\x41\x00"), Parsed::NeedMore);
        assert_eq!(parse(b"\x16\x03\x01\x41\x00\x02"), Parsed::Malformed);
    }

    #[test]
    fn debug_prints_strings() {
        let mut hello = ClientHello::EMPTY;
        hello.set_server_name(b"example.com");
        hello.alpn[0][..2].copy_from_slice(b"h2");
        hello.alpn_lens[0] = 2;
        hello.alpn[1][..2].copy_from_slice(b"\x00x");
        hello.alpn_lens[1] = 2;
        hello.alpn_count = 2;
        hello.consumed = 9;
        extern crate std;
        assert_eq!(
            std::format!("{hello:?}"),
            r#"ClientHello { server_name: Some("example.com"), alpn: ["h2", "\x00x"], consumed: 9 }"#
        );
    }
}
