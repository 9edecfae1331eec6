//! A route's `hash_policy`: the request's hash for a consistent-hashing cluster, as
//! Envoy's router computes it (`source/common/http/hash_policy.cc`), so that dp and an
//! Envoy sidecar send the same request to the same host.
//!
//! Each policy may give a value; values combine in order ([`hashing::combine`]) and a
//! `terminal` policy that gave one (or after one was given) ends the list. A cookie
//! policy with a `ttl` and no cookie in the request makes one: Envoy's value (the XXH64
//! of the client's and the listener's addresses, in hex), sent back in `Set-Cookie`.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::route_action::{HashPolicy as PolicyProto, hash_policy};
use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

use crate::snapshot::hashing::{self, xxh64, xxh64_chain};

#[derive(Debug)]
pub struct HashPolicy {
    method: Method,
    terminal: bool,
}

#[derive(Debug)]
enum Method {
    Header {
        name: HeaderName,
        rewrite: Option<(Regex, String)>,
    },
    Cookie {
        name: String,
        path: String,
        ttl: Option<Duration>,
        attributes: Vec<(String, String)>,
    },
    SourceIp,
    Query(String),
    /// dp keeps no hashable filter state: this never gives a value.
    FilterState,
}

/// What the policies read from a request.
pub struct RequestParts<'a> {
    pub headers: &'a HeaderMap,
    /// Path and query, as the client sent them.
    pub path: &'a str,
    /// The client's address (the trusted one of `x-forwarded-for`, else the peer's).
    pub client: Option<std::net::IpAddr>,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
}

/// The hash, and the `Set-Cookie` value when a cookie was made.
#[derive(Debug, Default, PartialEq)]
pub struct Hashed {
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

impl HashPolicy {
    pub fn list(protos: &[PolicyProto]) -> Result<Vec<HashPolicy>, String> {
        protos.iter().filter_map(|p| HashPolicy::from_proto(p).transpose()).collect()
    }

    /// `None` for a policy that can never give a value (`source_ip: false`).
    fn from_proto(p: &PolicyProto) -> Result<Option<HashPolicy>, String> {
        use hash_policy::PolicySpecifier as S;
        let method = match &p.policy_specifier {
            Some(S::Header(h)) => {
                let name = HeaderName::try_from(h.header_name.as_str())
                    .map_err(|_| format!("hash_policy: header `{}` is not a header name", h.header_name))?;
                let rewrite = match &h.regex_rewrite {
                    None => None,
                    Some(rr) => {
                        let re = rr.pattern.as_ref().ok_or("hash_policy: header.regex_rewrite.pattern is missing")?;
                        Some((super::route::regex(re)?, super::route::envoy_substitution(&rr.substitution)))
                    }
                };
                Method::Header { name, rewrite }
            }
            Some(S::Cookie(c)) => Method::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl.as_ref().map(|d| Duration::from_secs(d.seconds.max(0) as u64)),
                attributes: c.attributes.iter().map(|a| (a.name.clone(), a.value.clone())).collect(),
            },
            Some(S::ConnectionProperties(c)) if c.source_ip => Method::SourceIp,
            Some(S::ConnectionProperties(_)) => return Ok(None),
            Some(S::QueryParameter(q)) => Method::Query(q.name.clone()),
            Some(S::FilterState(_)) => Method::FilterState,
            None => return Err("hash_policy: no policy is set".into()),
        };
        Ok(Some(HashPolicy { method, terminal: p.terminal }))
    }
}

/// The request's hash under `policies` (none: `Hashed::default()`).
pub fn hash(policies: &[HashPolicy], req: &RequestParts<'_>) -> Hashed {
    let mut out = Hashed::default();
    for p in policies {
        if let Some(h) = p.method.evaluate(req, &mut out.set_cookie) {
            out.hash = Some(hashing::combine(out.hash, h));
        }
        if p.terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

impl Method {
    fn evaluate(&self, req: &RequestParts<'_>, set_cookie: &mut Option<HeaderValue>) -> Option<u64> {
        match self {
            Method::Header { name, rewrite } => {
                let mut values: Vec<std::borrow::Cow<'_, [u8]>> = req
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| match rewrite {
                        // A value that is not text is hashed as it is.
                        Some((re, with)) => match v.to_str() {
                            Ok(s) => re.replace_all(s, with.as_str()).into_owned().into_bytes().into(),
                            Err(_) => v.as_bytes().into(),
                        },
                        None => v.as_bytes().into(),
                    })
                    .collect();
                if values.is_empty() {
                    return None;
                }
                // The same hash whatever order repeated values came in.
                values.sort();
                Some(xxh64_chain(values.iter().map(|v| &v[..])))
            }
            Method::Cookie { name, path, ttl, attributes } => match cookie(req.headers, name) {
                Some(v) if !v.is_empty() => Some(xxh64(v, 0)),
                _ => {
                    let ttl = (*ttl)?;
                    let (peer, local) = (req.peer?, req.local?);
                    let value = format!("{:016x}", xxh64(format!("{peer}{local}").as_bytes(), 0));
                    let mut header = format!("{name}=\"{value}\"");
                    if !ttl.is_zero() {
                        header.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                    }
                    if !path.is_empty() {
                        header.push_str(&format!("; Path={path}"));
                    }
                    for (n, v) in attributes {
                        header.push_str(&if v.is_empty() { format!("; {n}") } else { format!("; {n}={v}") });
                    }
                    header.push_str("; HttpOnly");
                    *set_cookie = HeaderValue::from_str(&header).ok();
                    Some(xxh64(value.as_bytes(), 0))
                }
            },
            Method::SourceIp => req.client.map(|ip| xxh64(ip.to_string().as_bytes(), 0)),
            Method::Query(name) => query_value(req.path, name).map(|v| xxh64(v.as_bytes(), 0)),
            Method::FilterState => None,
        }
    }
}

/// The first cookie named `name` in the request's `cookie` headers (surrounding double
/// quotes taken off), as Envoy reads it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for h in headers.get_all(http::header::COOKIE) {
        for part in h.as_bytes().split(|&b| b == b';').filter(|p| !p.is_empty()) {
            let start = part.iter().position(|&b| b != b' ').unwrap_or(part.len());
            let Some(eq) = part.iter().position(|&b| b == b'=') else { continue };
            if eq < start || &part[start..eq] != name.as_bytes() {
                continue;
            }
            let v = &part[eq + 1..];
            return Some(if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' { &v[1..v.len() - 1] } else { v });
        }
    }
    None
}

/// The first value of query parameter `name` (not decoded; `?a` has the empty value), as
/// Envoy's query parser gives it.
fn query_value<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query.split('&').find_map(|param| match param.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if param == name => Some(""),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier as S, QueryParameter,
    };

    fn policy(s: S, terminal: bool) -> PolicyProto {
        PolicyProto { policy_specifier: Some(s), terminal }
    }

    fn header(name: &str) -> S {
        S::Header(Header { header_name: name.into(), regex_rewrite: None })
    }

    fn parts<'a>(headers: &'a HeaderMap, path: &'a str) -> RequestParts<'a> {
        RequestParts {
            headers,
            path,
            client: Some([10, 0, 0, 7].into()),
            peer: Some("10.0.0.7:5000".parse().unwrap()),
            local: Some("10.0.0.1:8080".parse().unwrap()),
        }
    }

    #[test]
    fn values_hash_and_combine_as_envoy_does() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        let one = HashPolicy::list(&[policy(header("x-user"), false)]).unwrap();
        assert_eq!(hash(&one, &parts(&h, "/")).hash, Some(xxh64(b"alice", 0)));
        // Two policies: the first rotated, XORed with the second.
        let two = HashPolicy::list(&[
            policy(header("x-user"), false),
            policy(S::QueryParameter(QueryParameter { name: "q".into() }), false),
        ])
        .unwrap();
        let want = xxh64(b"alice", 0).rotate_left(1) ^ xxh64(b"7", 0);
        assert_eq!(hash(&two, &parts(&h, "/p?a=1&q=7&q=8")).hash, Some(want));
        // Terminal after a value: the rest do not count.
        let terminal = HashPolicy::list(&[
            policy(header("x-user"), true),
            policy(S::ConnectionProperties(ConnectionProperties { source_ip: true }), false),
        ])
        .unwrap();
        assert_eq!(hash(&terminal, &parts(&h, "/")).hash, Some(xxh64(b"alice", 0)));
        // A terminal policy without a value does not end the list.
        assert_eq!(hash(&terminal, &parts(&HeaderMap::new(), "/")).hash, Some(xxh64(b"10.0.0.7", 0)));
        // Nothing to hash.
        assert_eq!(hash(&one, &parts(&HeaderMap::new(), "/")), Hashed::default());
    }

    #[test]
    fn repeated_headers_hash_the_same_in_any_order() {
        let p = HashPolicy::list(&[policy(header("x-k"), false)]).unwrap();
        let mut a = HeaderMap::new();
        a.append("x-k", HeaderValue::from_static("b"));
        a.append("x-k", HeaderValue::from_static("a"));
        let mut b = HeaderMap::new();
        b.append("x-k", HeaderValue::from_static("a"));
        b.append("x-k", HeaderValue::from_static("b"));
        let ha = hash(&p, &parts(&a, "/")).hash;
        assert_eq!(ha, hash(&p, &parts(&b, "/")).hash);
        assert_eq!(ha, Some(xxh64(b"b", xxh64(b"a", 0))));
    }

    #[test]
    fn a_cookie_is_read_or_made() {
        let p = HashPolicy::list(&[policy(
            S::Cookie(Cookie {
                name: "sid".into(),
                ttl: Some(envoy_types::pb::google::protobuf::Duration { seconds: 60, nanos: 0 }),
                path: "/app".into(),
                attributes: vec![],
            }),
            false,
        )])
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("a=1; sid=\"abc\"; z=2"));
        assert_eq!(hash(&p, &parts(&h, "/")), Hashed { hash: Some(xxh64(b"abc", 0)), set_cookie: None });
        let made = hash(&p, &parts(&HeaderMap::new(), "/"));
        let value = format!("{:016x}", xxh64(b"10.0.0.7:500010.0.0.1:8080", 0));
        assert_eq!(made.hash, Some(xxh64(value.as_bytes(), 0)));
        assert_eq!(
            made.set_cookie.unwrap().to_str().unwrap(),
            format!("sid=\"{value}\"; Max-Age=60; Path=/app; HttpOnly")
        );
        // Without a ttl, no cookie is made and there is no hash.
        let no_ttl = HashPolicy::list(&[policy(
            S::Cookie(Cookie { name: "sid".into(), ttl: None, path: String::new(), attributes: vec![] }),
            false,
        )])
        .unwrap();
        assert_eq!(hash(&no_ttl, &parts(&HeaderMap::new(), "/")), Hashed::default());
    }

    #[test]
    fn query_parameters_are_read_raw() {
        assert_eq!(query_value("/p?a=1&b=x%20y", "b"), Some("x%20y"));
        assert_eq!(query_value("/p?flag&b=2", "flag"), Some(""));
        assert_eq!(query_value("/p?b=1&b=2", "b"), Some("1"));
        assert_eq!(query_value("/p", "b"), None);
    }
}
