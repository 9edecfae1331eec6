//! `x-forwarded-client-cert` (XFCC), as Envoy's connection manager writes it
//! (`forward_client_cert_details`, `set_current_client_cert_details`). Kuma's inbound
//! sets `SANITIZE_SET` with the client's URI, so an application behind a sidecar learns
//! its caller's identity from `By=<own SPIFFE ID>;…;Hash=<sha256 of the client
//! certificate>;URI=<the client's SPIFFE ID>;…` (one `By` and one `URI` per URI SAN), and never from a header the caller wrote.
//!
//! The details of the current connection are worked out once per connection (they depend
//! only on its certificates) and then set or appended on each of its requests.

use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::ForwardClientCertDetails as Fcc;
use http::{HeaderMap, HeaderValue};

const HEADER: &str = "x-forwarded-client-cert";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Envoy's default: the header is removed.
    Sanitize,
    /// Passed on as it came, on mTLS connections only.
    ForwardOnly,
    /// This connection's details appended to what came.
    AppendForward,
    /// This connection's details replace what came.
    SanitizeSet,
    /// Passed on as it came, always.
    AlwaysForwardOnly,
}

/// The fields of `set_current_client_cert_details` dp writes, in Envoy's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    Cert,
    Chain,
    Uri,
    Dns,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xfcc {
    pub forward: Forward,
    details: Vec<Detail>,
}

impl Default for Xfcc {
    fn default() -> Self {
        Xfcc { forward: Forward::Sanitize, details: vec![] }
    }
}

/// What one mTLS connection's certificates say, for [`Xfcc::current`].
pub struct Certs<'a> {
    /// The URI SANs of dp's own certificate.
    pub local_uris: Vec<String>,
    pub peer_der: &'a [u8],
    /// The peer's chain in PEM, leaf first.
    pub peer_chain_pem: Vec<Vec<u8>>,
    pub peer_uris: &'a [String],
    pub peer_dns: &'a [String],
}

impl Xfcc {
    pub fn build(h: &HttpConnectionManager, notes: &mut Vec<String>) -> Xfcc {
        let forward = match Fcc::try_from(h.forward_client_cert_details) {
            Ok(Fcc::ForwardOnly) => Forward::ForwardOnly,
            Ok(Fcc::AppendForward) => Forward::AppendForward,
            Ok(Fcc::SanitizeSet) => Forward::SanitizeSet,
            Ok(Fcc::AlwaysForwardOnly) => Forward::AlwaysForwardOnly,
            _ => Forward::Sanitize,
        };
        let mut details = vec![];
        if let Some(s) = &h.set_current_client_cert_details {
            for (unsupported, field) in
                [(s.subject.is_some_and(|b| b.value), "subject"), (s.issuer, "issuer"), (s.format != 0, "format")]
            {
                if unsupported {
                    notes.push(format!(
                        "http_connection_manager `{}`: set_current_client_cert_details.{field} is not \
                         implemented; x-forwarded-client-cert is written without it",
                        h.stat_prefix
                    ));
                }
            }
            for (on, d) in
                [(s.cert, Detail::Cert), (s.chain, Detail::Chain), (s.uri, Detail::Uri), (s.dns, Detail::Dns)]
            {
                if on {
                    details.push(d);
                }
            }
        }
        Xfcc { forward, details }
    }

    /// Whether requests need this connection's details.
    pub fn sets(&self) -> bool {
        matches!(self.forward, Forward::AppendForward | Forward::SanitizeSet)
    }

    /// The details of a connection whose peer presented a certificate.
    pub fn current(&self, c: &Certs<'_>) -> String {
        let mut out: Vec<String> = c.local_uris.iter().map(|u| format!("By={u}")).collect();
        out.push(format!("Hash={}", hex(&boring::sha::sha256(c.peer_der))));
        for d in &self.details {
            match d {
                Detail::Cert => {
                    if let Some(leaf) = c.peer_chain_pem.first() {
                        out.push(format!("Cert=\"{}\"", url_encode(leaf)));
                    }
                }
                Detail::Chain => {
                    let chain: Vec<u8> = c.peer_chain_pem.concat();
                    if !chain.is_empty() {
                        out.push(format!("Chain=\"{}\"", url_encode(&chain)));
                    }
                }
                // One per URI SAN (Envoy 1.40), and the key even when there is none.
                Detail::Uri if c.peer_uris.is_empty() => out.push("URI=".into()),
                Detail::Uri => out.extend(c.peer_uris.iter().map(|u| format!("URI={u}"))),
                Detail::Dns => out.extend(c.peer_dns.iter().map(|d| format!("DNS={d}"))),
            }
        }
        out.join(";")
    }

    /// Rewrites a request's header. `current` is the connection's details when its peer
    /// presented a certificate (`None`: plaintext, or TLS without a client certificate).
    pub fn apply(&self, headers: &mut HeaderMap, mtls: bool, current: Option<&str>) {
        match self.forward {
            Forward::AlwaysForwardOnly => {}
            Forward::Sanitize => drop(headers.remove(HEADER)),
            _ if !mtls => drop(headers.remove(HEADER)),
            Forward::ForwardOnly => {}
            Forward::AppendForward | Forward::SanitizeSet => {
                let Some(cur) = current else { return drop(headers.remove(HEADER)) };
                let value = match (self.forward, headers.get(HEADER).and_then(|v| v.to_str().ok())) {
                    (Forward::AppendForward, Some(prev)) if !prev.is_empty() => format!("{prev},{cur}"),
                    _ => cur.to_string(),
                };
                match HeaderValue::from_str(&value) {
                    Ok(v) => drop(headers.insert(HEADER, v)),
                    Err(_) => drop(headers.remove(HEADER)),
                }
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Percent-encodes all but RFC 3986's unreserved characters, as Envoy encodes PEM.
fn url_encode(b: &[u8]) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::percent_encode(b, KEEP).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::SetCurrentClientCertDetails;
    use envoy_types::pb::google::protobuf::BoolValue;

    fn kuma_inbound() -> Xfcc {
        let h = HttpConnectionManager {
            forward_client_cert_details: Fcc::SanitizeSet as i32,
            set_current_client_cert_details: Some(SetCurrentClientCertDetails { uri: true, ..Default::default() }),
            ..Default::default()
        };
        Xfcc::build(&h, &mut vec![])
    }

    fn certs<'a>(uris: &'a [String], dns: &'a [String]) -> Certs<'a> {
        Certs {
            local_uris: vec!["spiffe://default/backend".into(), "kuma://kuma.io/service/backend".into()],
            peer_der: b"der",
            peer_chain_pem: vec![b"-----BEGIN CERTIFICATE-----\nAB+/=\n".to_vec()],
            peer_uris: uris,
            peer_dns: dns,
        }
    }

    #[test]
    fn kumas_inbound_sets_by_hash_and_the_clients_uris() {
        let x = kuma_inbound();
        let uris = ["spiffe://default/web".to_string(), "kuma://kuma.io/service/web".to_string()];
        let cur = x.current(&certs(&uris, &[]));
        let hash = hex(&boring::sha::sha256(b"der"));
        assert_eq!(
            cur,
            format!(
                "By=spiffe://default/backend;By=kuma://kuma.io/service/backend;Hash={hash};\
                 URI=spiffe://default/web;URI=kuma://kuma.io/service/web"
            )
        );
        // A header the client wrote is replaced, on mTLS; removed without it.
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_static("URI=spiffe://default/admin"));
        x.apply(&mut h, true, Some(&cur));
        assert_eq!(h.get(HEADER).unwrap(), cur.as_str());
        h.insert(HEADER, HeaderValue::from_static("URI=spiffe://default/admin"));
        x.apply(&mut h, false, None);
        assert!(h.get(HEADER).is_none());
    }

    #[test]
    fn the_other_modes_follow_envoys_table() {
        let mk = |fcc: Fcc, details: SetCurrentClientCertDetails| {
            Xfcc::build(
                &HttpConnectionManager {
                    forward_client_cert_details: fcc as i32,
                    set_current_client_cert_details: Some(details),
                    ..Default::default()
                },
                &mut vec![],
            )
        };
        let came = || {
            let mut h = HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_static("By=a;URI=b"));
            h
        };
        let all = SetCurrentClientCertDetails { cert: true, chain: true, dns: true, uri: true, ..Default::default() };
        let append = mk(Fcc::AppendForward, all);
        let (uris, dns) = (vec![], vec!["a.example".to_string(), "b.example".to_string()]);
        let cur = append.current(&certs(&uris, &dns));
        assert!(cur.ends_with(";Cert=\"-----BEGIN%20CERTIFICATE-----%0AAB%2B%2F%3D%0A\";Chain=\"-----BEGIN%20CERTIFICATE-----%0AAB%2B%2F%3D%0A\";URI=;DNS=a.example;DNS=b.example"), "{cur}");
        let mut h = came();
        append.apply(&mut h, true, Some(&cur));
        assert_eq!(h.get(HEADER).unwrap().to_str().unwrap(), format!("By=a;URI=b,{cur}"));
        for (fcc, mtls, kept) in [
            (Fcc::Sanitize, true, false),
            (Fcc::ForwardOnly, true, true),
            (Fcc::ForwardOnly, false, false),
            (Fcc::AlwaysForwardOnly, false, true),
            (Fcc::AppendForward, false, false),
        ] {
            let mut h = came();
            mk(fcc, all).apply(&mut h, mtls, None);
            assert_eq!(h.contains_key(HEADER), kept, "{fcc:?} mtls={mtls}");
        }
        let mut notes = vec![];
        let subject = SetCurrentClientCertDetails { subject: Some(BoolValue { value: true }), ..Default::default() };
        Xfcc::build(
            &HttpConnectionManager {
                forward_client_cert_details: Fcc::SanitizeSet as i32,
                set_current_client_cert_details: Some(subject),
                ..Default::default()
            },
            &mut notes,
        );
        assert!(notes[0].contains("subject is not implemented"), "{notes:?}");
    }
}
