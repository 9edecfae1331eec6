//! Header additions and removals of route configurations, virtual hosts and routes, and
//! the headers a proxy adds or strips on its own (hop-by-hop, `x-forwarded-*`,
//! `x-envoy-*`, `x-request-id`).

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Append {
    OrAdd,
    IfAbsent,
    OverwriteOrAdd,
    OverwriteIfExists,
}

#[derive(Debug, Default)]
pub struct Mutations {
    request_add: Vec<(HeaderName, HeaderValue, Append)>,
    request_remove: Vec<HeaderName>,
    response_add: Vec<(HeaderName, HeaderValue, Append)>,
    response_remove: Vec<HeaderName>,
}

fn name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("`{n}` is not a header name"))
}

fn adds(list: &[HeaderValueOption]) -> Result<Vec<(HeaderName, HeaderValue, Append)>, String> {
    let mut out = vec![];
    for o in list {
        let h = o.header.as_ref().ok_or("a header to add has no header")?;
        let raw = if h.raw_value.is_empty() { h.value.as_bytes() } else { h.raw_value.as_slice() };
        // Envoy expands `%COMMAND%` operators in values; dp does not, and would rather
        // refuse than send the operator itself. `%%` is a literal percent sign.
        let text = String::from_utf8_lossy(raw);
        if text.replace("%%", "").contains('%') {
            return Err(format!("header `{}`: values with %COMMAND% operators are not supported", h.key));
        }
        let value = HeaderValue::from_bytes(text.replace("%%", "%").as_bytes())
            .map_err(|_| format!("header `{}`: not a valid header value", h.key))?;
        #[allow(deprecated)]
        let append = match (o.append, HeaderAppendAction::try_from(o.append_action)) {
            (Some(b), _) if b.value => Append::OrAdd,
            (Some(_), _) => Append::OverwriteOrAdd,
            (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => Append::OrAdd,
            (None, Ok(HeaderAppendAction::AddIfAbsent)) => Append::IfAbsent,
            (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => Append::OverwriteOrAdd,
            (None, Ok(HeaderAppendAction::OverwriteIfExists)) => Append::OverwriteIfExists,
            (None, Err(_)) => return Err(format!("header `{}`: unknown append_action", h.key)),
        };
        out.push((name(&h.key)?, value, append));
    }
    Ok(out)
}

impl Mutations {
    pub fn build(
        request_add: &[HeaderValueOption],
        request_remove: &[String],
        response_add: &[HeaderValueOption],
        response_remove: &[String],
    ) -> Result<Mutations, String> {
        Ok(Mutations {
            request_add: adds(request_add).map_err(|e| format!("request_headers_to_add: {e}"))?,
            request_remove: request_remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            response_add: adds(response_add).map_err(|e| format!("response_headers_to_add: {e}"))?,
            response_remove: response_remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
        })
    }

    pub fn apply_request(&self, h: &mut HeaderMap) {
        apply(h, &self.request_remove, &self.request_add);
    }

    pub fn apply_response(&self, h: &mut HeaderMap) {
        apply(h, &self.response_remove, &self.response_add);
    }
}

fn apply(h: &mut HeaderMap, remove: &[HeaderName], add: &[(HeaderName, HeaderValue, Append)]) {
    for n in remove {
        h.remove(n);
    }
    for (n, v, how) in add {
        match how {
            Append::OrAdd => {
                h.append(n.clone(), v.clone());
            }
            Append::IfAbsent => {
                if !h.contains_key(n) {
                    h.insert(n.clone(), v.clone());
                }
            }
            Append::OverwriteOrAdd => {
                h.insert(n.clone(), v.clone());
            }
            Append::OverwriteIfExists => {
                if h.contains_key(n) {
                    h.insert(n.clone(), v.clone());
                }
            }
        }
    }
}

/// Connection-specific headers, never forwarded (HTTP/2 forbids them outright).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(listed) = h.get(header::CONNECTION).and_then(|v| v.to_str().ok()).map(str::to_owned) {
        for n in listed.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
                h.remove(n);
            }
        }
    }
    for n in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::PROXY_AUTHENTICATE] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE).is_some_and(|v| v.as_bytes() != b"trailers") {
        h.remove(header::TE);
    }
}

/// The `x-envoy-*` headers that steer the proxy: Envoy removes them from a request that
/// is not internal (other `x-envoy-*` headers pass, as through Envoy).
const INTERNAL_ONLY: [&str; 14] = [
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Removed from an edge request (no `x-forwarded-for` yet, `use_remote_address`) too.
const EDGE_ONLY: [&str; 3] =
    ["x-envoy-decorator-operation", "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node"];

/// Removes what an external client may not set, as Envoy's connection manager does:
/// the steering `x-envoy-*` headers, `x-envoy-internal`, and at the edge the
/// service-identity ones.
pub fn strip_envoy_headers(h: &mut HeaderMap, edge: bool) {
    h.remove("x-envoy-internal");
    for n in INTERNAL_ONLY {
        h.remove(n);
    }
    if edge {
        for n in EDGE_ONLY {
            h.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue as PbHeader;

    fn opt(k: &str, v: &str, action: HeaderAppendAction) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(PbHeader { key: k.into(), value: v.into(), ..Default::default() }),
            append_action: action as i32,
            ..Default::default()
        }
    }

    #[test]
    fn append_actions_and_removals() {
        let m = Mutations::build(
            &[
                opt("x-a", "1", HeaderAppendAction::AppendIfExistsOrAdd),
                opt("x-b", "2", HeaderAppendAction::AddIfAbsent),
                opt("x-c", "3", HeaderAppendAction::OverwriteIfExistsOrAdd),
                opt("x-d", "4", HeaderAppendAction::OverwriteIfExists),
                opt("x-pct", "100%%", HeaderAppendAction::OverwriteIfExistsOrAdd),
            ],
            &["x-gone".into()],
            &[],
            &[],
        )
        .unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in [("x-a", "0"), ("x-b", "0"), ("x-c", "0"), ("x-gone", "0")] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m.apply_request(&mut h);
        let all = |k: &str| h.get_all(k).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(all("x-a"), ["0", "1"]);
        assert_eq!(all("x-b"), ["0"]);
        assert_eq!(all("x-c"), ["3"]);
        assert!(all("x-d").is_empty());
        assert_eq!(all("x-pct"), ["100%"]);
        assert!(all("x-gone").is_empty());
        let e = Mutations::build(
            &[opt("x", "%DOWNSTREAM_REMOTE_ADDRESS%", HeaderAppendAction::AddIfAbsent)],
            &[],
            &[],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("%COMMAND%"), "{e}");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn an_external_request_loses_only_the_steering_headers() {
        let mut h = HeaderMap::new();
        for n in ["x-envoy-retry-on", "x-envoy-internal", "x-envoy-custom", "x-envoy-decorator-operation"] {
            h.insert(HeaderName::from_static(n), http::HeaderValue::from_static("1"));
        }
        let mut mid = h.clone();
        strip_envoy_headers(&mut mid, false);
        let names = |h: &HeaderMap| h.keys().map(|k| k.as_str().to_string()).collect::<Vec<_>>();
        assert_eq!(names(&mid), ["x-envoy-custom", "x-envoy-decorator-operation"]);
        strip_envoy_headers(&mut h, true);
        assert_eq!(names(&h), ["x-envoy-custom"]);
    }
}
