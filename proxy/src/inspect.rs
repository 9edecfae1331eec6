//! Listener filters that read a connection's first bytes before a filter chain is
//! chosen, as Envoy's do: `tls_inspector` (the ClientHello's SNI and ALPN) and
//! `http_inspector` (an HTTP/1.x request line or the HTTP/2 preface gives the
//! application protocol `http/1.0`, `http/1.1` or `h2c`, which MeshPassthrough's chains
//! match). Either is skipped for a connection its `filter_disabled` predicate matches
//! (MeshPassthrough disables both on the ports of server-first protocols such as MySQL,
//! where the client would wait for the server).
//!
//! The bytes read are kept and replayed into whatever the chain does.

use crate::snapshot::ListenerCfg;
use crate::stats::GlobalStats;
use clienthello::{ClientHello, Parsed};
use envoy_types::pb::envoy::config::listener::v3::ListenerFilterChainMatchPredicate;
use envoy_types::pb::envoy::config::listener::v3::listener_filter_chain_match_predicate::Rule;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The first read of a ClientHello (it grows up to the listener's bound when needed).
pub const FIRST_READ: usize = 2048;

/// Envoy's `http_inspector` reads at most this much looking for the request line.
const MAX_HTTP_INSPECT: usize = 64 * 1024;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A configured listener filter: `Some(predicate)` when it is skipped for some
/// connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspector {
    pub disabled: Option<Predicate>,
}

impl Inspector {
    /// Whether it runs for a connection to `port` (0 when unknown).
    pub fn runs_for(&self, port: u16) -> bool {
        self.disabled.as_ref().is_none_or(|p| !p.matches(port))
    }
}

/// Envoy's `ListenerFilterChainMatchPredicate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
    Not(Box<Predicate>),
    Any,
    /// `[start, end)`.
    Ports(i32, i32),
}

impl Predicate {
    pub fn from_proto(p: &ListenerFilterChainMatchPredicate) -> Result<Predicate, String> {
        let list = |rules: &[ListenerFilterChainMatchPredicate]| -> Result<Vec<Predicate>, String> {
            rules.iter().map(Predicate::from_proto).collect()
        };
        Ok(match &p.rule {
            Some(Rule::OrMatch(s)) => Predicate::Or(list(&s.rules)?),
            Some(Rule::AndMatch(s)) => Predicate::And(list(&s.rules)?),
            Some(Rule::NotMatch(n)) => Predicate::Not(Box::new(Predicate::from_proto(n)?)),
            Some(Rule::AnyMatch(true)) => Predicate::Any,
            Some(Rule::AnyMatch(false)) => return Err("any_match must be true".into()),
            Some(Rule::DestinationPortRange(r)) if r.start < r.end => Predicate::Ports(r.start, r.end),
            Some(Rule::DestinationPortRange(r)) => {
                return Err(format!("destination_port_range [{}, {}) is empty", r.start, r.end));
            }
            None => return Err("no rule is set".into()),
        })
    }

    pub fn matches(&self, port: u16) -> bool {
        match self {
            Predicate::Or(v) => v.iter().any(|p| p.matches(port)),
            Predicate::And(v) => v.iter().all(|p| p.matches(port)),
            Predicate::Not(p) => !p.matches(port),
            Predicate::Any => true,
            Predicate::Ports(start, end) => (*start..*end).contains(&i32::from(port)),
        }
    }

    /// Whether it looks at the destination port.
    pub fn uses_port(&self) -> bool {
        match self {
            Predicate::Or(v) | Predicate::And(v) => v.iter().any(Predicate::uses_port),
            Predicate::Not(p) => p.uses_port(),
            Predicate::Any => false,
            Predicate::Ports(..) => true,
        }
    }
}

/// Why inspection stopped the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The bytes did not come in time (without `continue_on_listener_filters_timeout`),
    /// the ClientHello was too large, or the client closed first.
    Detect,
}

/// What the inspectors learnt.
#[derive(Debug, Default)]
pub struct Found {
    pub hello: Option<ClientHello>,
    /// `http_inspector`'s application protocol.
    pub http: Option<&'static [u8]>,
    /// How many bytes of the buffer were read.
    pub read: usize,
}

/// Runs the listener's inspectors that apply to a connection to `port`, reading into
/// `buf` (grown as needed).
pub async fn inspect(
    g: &GlobalStats,
    lst: &ListenerCfg,
    port: u16,
    down: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Found, Stop> {
    let tls = lst.tls_inspector.as_ref().is_some_and(|i| i.runs_for(port));
    let http = lst.http_inspector.as_ref().is_some_and(|i| i.runs_for(port));
    let mut found = Found::default();
    let mut reader = Reader { lst, deadline: lst.filters_timeout.map(|t| tokio::time::Instant::now() + t) };
    if tls {
        let limit = lst.max_client_hello;
        loop {
            match clienthello::parse(&buf[..found.read]) {
                Parsed::Hello(h) => {
                    g.tls_inspector_tls_found.inc();
                    if h.server_name().is_some() {
                        g.tls_inspector_sni_found.inc();
                    } else {
                        g.tls_inspector_sni_not_found.inc();
                    }
                    if h.alpn().next().is_some() {
                        g.tls_inspector_alpn_found.inc();
                    }
                    found.hello = Some(h);
                    // Envoy's http_inspector leaves TLS connections alone.
                    return Ok(found);
                }
                Parsed::NotTls | Parsed::Malformed => {
                    g.tls_inspector_tls_not_found.inc();
                    break;
                }
                Parsed::NeedMore if found.read >= limit => {
                    g.tls_inspector_client_hello_too_large.inc();
                    return Err(Stop::Detect);
                }
                Parsed::NeedMore => {}
            }
            if !reader.more(down, buf, &mut found.read, limit).await? {
                return Ok(found);
            }
        }
    }
    if http {
        loop {
            match http_protocol(&buf[..found.read]) {
                Http::Found(p) => {
                    match p {
                        b"h2c" => g.http_inspector_http2_found.inc(),
                        b"http/1.0" => g.http_inspector_http10_found.inc(),
                        _ => g.http_inspector_http11_found.inc(),
                    }
                    found.http = Some(p);
                    return Ok(found);
                }
                Http::Other => break,
                Http::NeedMore if found.read >= MAX_HTTP_INSPECT => break,
                Http::NeedMore => {}
            }
            if !reader.more(down, buf, &mut found.read, MAX_HTTP_INSPECT).await? {
                return Ok(found);
            }
        }
        g.http_inspector_http_not_found.inc();
    }
    Ok(found)
}

struct Reader<'a> {
    lst: &'a ListenerCfg,
    deadline: Option<tokio::time::Instant>,
}

impl Reader<'_> {
    /// Reads more into `buf` (growing it up to `limit`). `Ok(false)`: the listener filter
    /// timeout passed and the listener goes on without (`continue_on_listener_filters_timeout`).
    async fn more(
        &mut self,
        down: &mut TcpStream,
        buf: &mut Vec<u8>,
        filled: &mut usize,
        limit: usize,
    ) -> Result<bool, Stop> {
        if *filled == buf.len() {
            buf.resize((buf.len() * 2).max(FIRST_READ).min(limit.max(*filled + 1)), 0);
        }
        let read = down.read(&mut buf[*filled..]);
        let n = match self.deadline {
            None => read.await,
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => {
                    self.lst.stats.downstream_pre_cx_timeout.inc();
                    return if self.lst.continue_on_timeout { Ok(false) } else { Err(Stop::Detect) };
                }
            },
        };
        match n {
            Ok(0) | Err(_) => Err(Stop::Detect),
            Ok(n) => {
                *filled += n;
                Ok(true)
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Http {
    Found(&'static [u8]),
    /// Not HTTP/1.x nor HTTP/2.
    Other,
    NeedMore,
}

/// What the first bytes say: the HTTP/2 preface (`h2c`), or an HTTP/1.0 or 1.1 request
/// line (`METHOD SP target SP HTTP/1.x CRLF`), checked as it comes in so that anything
/// else is known early.
fn http_protocol(data: &[u8]) -> Http {
    let n = data.len().min(H2_PREFACE.len());
    if data[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Http::Found(b"h2c") } else { Http::NeedMore };
    }
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let mut i = 0;
    while i < data.len() && is_tchar(data[i]) {
        i += 1;
    }
    if i == data.len() {
        return Http::NeedMore;
    }
    if i == 0 || data[i] != b' ' {
        return Http::Other;
    }
    i += 1;
    let target = i;
    while i < data.len() && data[i] > b' ' && data[i] != 0x7f {
        i += 1;
    }
    if i == data.len() {
        return Http::NeedMore;
    }
    if i == target || data[i] != b' ' {
        return Http::Other;
    }
    let rest = &data[i + 1..];
    for (want, proto) in [(&b"HTTP/1.1\r\n"[..], &b"http/1.1"[..]), (b"HTTP/1.0\r\n", b"http/1.0")] {
        let m = rest.len().min(want.len());
        if rest[..m] == want[..m] {
            return if m == want.len() { Http::Found(proto) } else { Http::NeedMore };
        }
    }
    Http::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_preface_are_told_apart_early() {
        assert_eq!(http_protocol(b"GET / HTTP/1.1\r\nhost: a\r\n"), Http::Found(b"http/1.1"));
        assert_eq!(http_protocol(b"POST /x?y=1 HTTP/1.0\r\n"), Http::Found(b"http/1.0"));
        assert_eq!(http_protocol(H2_PREFACE), Http::Found(b"h2c"));
        // Incomplete: wait for more.
        for partial in [&b""[..], b"GE", b"GET", b"GET /", b"GET / HTTP/1.", b"GET / HTTP/1.1\r", b"PRI * HTTP/2.0\r\n"]
        {
            assert_eq!(http_protocol(partial), Http::NeedMore, "{:?}", String::from_utf8_lossy(partial));
        }
        // Not HTTP as soon as a byte says so.
        for other in
            [&b"\x16\x03\x01"[..], b"SSH-2.0-OpenSSH_9.6\r\n", b"GET  / HTTP/1.1\r\n", b"GET / HTTP/2.0\r\n", b" GET"]
        {
            assert_eq!(http_protocol(other), Http::Other, "{:?}", String::from_utf8_lossy(other));
        }
        // MySQL's server greeting never comes from a client; a binary first byte is enough.
        assert_eq!(http_protocol(b"\x4a\x00\x00\x00\x0a8.0"), Http::Other);
    }

    #[test]
    fn predicates_match_destination_ports() {
        let p = Predicate::Or(vec![Predicate::Ports(3306, 3307), Predicate::Ports(5432, 5433)]);
        assert!(p.matches(3306) && p.matches(5432));
        assert!(!p.matches(3307) && !p.matches(80));
        let not = Predicate::Not(Box::new(p.clone()));
        assert!(not.matches(80) && !not.matches(3306));
        assert!(Predicate::And(vec![Predicate::Any, Predicate::Ports(1, 100)]).matches(99));
        assert!(p.uses_port() && !Predicate::Any.uses_port());
        let i = Inspector { disabled: Some(p) };
        assert!(!i.runs_for(3306) && i.runs_for(443));
    }
}
