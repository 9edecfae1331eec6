//! The HTTP request path: arbitrary bytes from a client into dp's
//! `http_connection_manager` (hyper's HTTP/1.1 codec, header handling, the RBAC filter,
//! virtual-host and route matching, rewrites, redirects, direct responses, a cluster
//! with no endpoints), built from an xDS document as `dp run --xds-file` builds it.
//!
//! Properties: the connection ends once the client has sent everything and closed; what
//! dp writes back is a sequence of well-formed HTTP/1.x responses (status line, headers,
//! a body whose length the headers give; HTTP/2 frames after the h2 preface); and the first answer to a well-formed first
//! request is the one the route table prescribes, from a reference model of Envoy's
//! rules (RBAC deny on `/deny` first, then the virtual host by exact domain, longest
//! `*.suffix`, longest `prefix.*`, `*`, then the first matching route).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::hcm::HttpCfg;
use proxy::hcm::server::{ConnInfo, serve};
use proxy::resources::Resources;
use proxy::snapshot::{Action, DnsAnswers, build};
use proxy::stats::Registry;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"{"version_info": "fuzz", "resources": [
 {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "empty", "type": "STATIC",
  "connectTimeout": "1s", "loadAssignment": {"clusterName": "empty"}},
 {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "fuzz",
  "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
  "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
   "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
   "statPrefix": "fuzz",
   "httpFilters": [
    {"name": "envoy.filters.http.rbac", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
     "rules": {"action": "DENY", "policies": {"deny": {"permissions": [{"urlPath": {"path": {"prefix": "/deny"}}}],
      "principals": [{"any": true}]}}}}},
    {"name": "envoy.filters.http.router", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
   "routeConfig": {"name": "fuzz", "requestHeadersToAdd": [{"header": {"key": "x-added", "value": "1"}}],
    "responseHeadersToAdd": [{"header": {"key": "x-route-config", "value": "fuzz"}}],
    "virtualHosts": [
     {"name": "exact", "domains": ["exact.example", "other.example:8080"],
      "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200, "body": {"inlineString": "vh:exact"}}}]},
     {"name": "suffix", "domains": ["*.wild.example"],
      "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200, "body": {"inlineString": "vh:suffix"}}}]},
     {"name": "longsuffix", "domains": ["*.deep.wild.example"],
      "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200, "body": {"inlineString": "vh:longsuffix"}}}]},
     {"name": "prefix", "domains": ["pre.*"],
      "routes": [{"match": {"prefix": "/"}, "directResponse": {"status": 200, "body": {"inlineString": "vh:prefix"}}}]},
     {"name": "any", "domains": ["*"], "routes": [
      {"match": {"prefix": "/redirect"}, "redirect": {"hostRedirect": "elsewhere.example", "responseCode": "MOVED_PERMANENTLY"}},
      {"match": {"prefix": "/old"}, "route": {"cluster": "empty", "prefixRewrite": "/new"}},
      {"match": {"path": "/exact"}, "directResponse": {"status": 202, "body": {"inlineString": "path:exact"}}},
      {"match": {"safeRegex": {"regex": "/re/[0-9]+"}}, "directResponse": {"status": 203, "body": {"inlineString": "path:regex"}}},
      {"match": {"prefix": "/"}, "directResponse": {"status": 200, "body": {"inlineString": "vh:any"}}}]}]}}}]}]}
]}"#;

fn http_cfg() -> Arc<HttpCfg> {
    static CFG: OnceLock<Arc<HttpCfg>> = OnceLock::new();
    CFG.get_or_init(|| {
        let resources = Resources::from_file_bytes(CONFIG.as_bytes(), "fuzz").expect("the fuzz config decodes");
        let snapshot = build(&resources, &DnsAnswers::new(), &Registry::default(), &mut vec![]).expect("builds");
        let listener = snapshot.listeners.get("fuzz").expect("the listener");
        match &listener.chains[0].action {
            Action::Http(cfg) => cfg.clone(),
            _ => panic!("an HTTP chain"),
        }
    })
    .clone()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap())
}

/// What the route table prescribes for a well-formed request: (status, body).
fn expected(host: &str, path: &str) -> (u16, Option<&'static str>) {
    if path == "HTTP/1.0" {
        return (426, Some("Upgrade Required"));
    }
    let p = path.split('?').next().unwrap_or(path);
    if p.starts_with("/deny") {
        return (403, Some("RBAC: access denied"));
    }
    let h = host.to_ascii_lowercase();
    let longer = |suffix: &str| h.len() > suffix.len() && h.ends_with(suffix);
    if h == "exact.example" || h == "other.example:8080" {
        (200, Some("vh:exact"))
    } else if longer(".deep.wild.example") {
        (200, Some("vh:longsuffix"))
    } else if longer(".wild.example") {
        (200, Some("vh:suffix"))
    } else if h.len() > 4 && h.starts_with("pre.") {
        (200, Some("vh:prefix"))
    } else if p.starts_with("/redirect") {
        (301, None)
    } else if p.starts_with("/old") {
        (503, Some("no healthy upstream"))
    } else if p == "/exact" {
        (202, Some("path:exact"))
    } else if p.strip_prefix("/re/").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
        (203, Some("path:regex"))
    } else {
        (200, Some("vh:any"))
    }
}

/// One parsed response: status, body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Splits dp's output into responses, asserting each is well formed.
fn responses(mut out: &[u8]) -> Vec<Answer> {
    let mut all = vec![];
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        let head = match r.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("dp wrote a malformed response head ({other:?}): {:?}", String::from_utf8_lossy(out)),
        };
        // HTTP/1.1, or 1.0 for a 1.0 client (hyper's choice; Envoy writes 1.1 there).
        assert!(matches!(r.version, Some(0 | 1)), "an HTTP/1.x answer");
        let status = r.code.expect("a status");
        assert!((100..=599).contains(&status), "status {status}");
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let rest = &out[head..];
        let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
            (vec![], 0)
        } else if let Some(len) = header("content-length") {
            let len: usize = len.trim().parse().expect("a numeric content-length");
            assert!(rest.len() >= len, "a body shorter than its content-length");
            (rest[..len].to_vec(), len)
        } else if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            let (mut body, mut at) = (vec![], 0);
            loop {
                let line_end = rest[at..].windows(2).position(|w| w == b"\r\n").expect("a chunk size line") + at;
                let size = usize::from_str_radix(std::str::from_utf8(&rest[at..line_end]).unwrap().trim(), 16)
                    .expect("a hex chunk size");
                at = line_end + 2;
                if size == 0 {
                    assert_eq!(&rest[at..at + 2], b"\r\n", "the last chunk ends the body");
                    break (body, at + 2);
                }
                body.extend_from_slice(&rest[at..at + size]);
                at += size + 2;
            }
        } else {
            // Delimited by the end of the connection.
            (rest.to_vec(), rest.len())
        };
        all.push(Answer { status, body });
        out = &rest[used..];
    }
    all
}

/// The first request of the input when it is complete and unambiguous: (host, target).
fn first_request(data: &[u8]) -> Option<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else { return None };
    if req.method? != "GET" {
        return None;
    }
    let target = req.path?;
    // Only origin-form targets of URI characters, one Host header `name[:port]`.
    let uri_char = |b: u8| b.is_ascii_alphanumeric() || b"-._~/?=&:@!$'()*+,;".contains(&b);
    if !target.starts_with('/') || !target.bytes().all(uri_char) {
        return None;
    }
    let mut hosts = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = std::str::from_utf8(hosts.next()?.value).ok()?.trim().to_string();
    let (name, port) = host.split_once(':').unwrap_or((&host, "1"));
    if hosts.next().is_some()
        || name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        || !(1..=5).contains(&port.len())
        || !port.bytes().all(|b| b.is_ascii_digit())
        || req.headers.iter().any(|h| {
            let n = h.name.to_ascii_lowercase();
            matches!(n.as_str(), "content-length" | "transfer-encoding" | "expect" | "upgrade" | "connection")
        })
    {
        return None;
    }
    if req.version == Some(0) {
        // Refused whatever it asks, as Envoy does without `accept_http_10`.
        return Some((String::new(), "HTTP/1.0".into()));
    }
    Some((host, target.to_string()))
}

fuzz_target!(|data: &[u8]| {
    let cfg = http_cfg();
    let out = runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let info =
            ConnInfo { listener: "fuzz".into(), peer: Some(([127, 0, 0, 1], 40000).into()), ..Default::default() };
        let conn = tokio::spawn(serve(cfg, server, Arc::new(info)));
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = data.to_vec();
        // The client sends everything and keeps its side open, as curl does (dp, as
        // Envoy, drops a connection whose client half-closes before the answer). The
        // clock is paused: once dp waits for more input, time jumps to the deadline.
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            wr
        });
        let mut out = vec![];
        let _ = tokio::time::timeout(Duration::from_secs(600), rd.read_to_end(&mut out)).await;
        // Then it closes: dp ends the connection.
        drop(writer.await.expect("the writer"));
        drop(rd);
        tokio::time::timeout(Duration::from_secs(3600), conn)
            .await
            .expect("dp kept the connection after the client closed it")
            .expect("the connection task ends without a panic");
        out
    });
    if data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") {
        // The h2 preface: dp speaks HTTP/2 (codec AUTO), starting with its SETTINGS frame.
        assert!(out.is_empty() || (out.len() >= 9 && out[3] == 4), "HTTP/2 begins with SETTINGS: {out:?}");
        return;
    }
    let answers = responses(&out);
    if let Some((host, target)) = first_request(data) {
        let first = answers.iter().find(|a| a.status >= 200).expect("an answer to a well-formed request");
        let (status, body) = expected(&host, &target);
        assert_eq!(first.status, status, "{host} {target}: body {:?}", String::from_utf8_lossy(&first.body));
        if let Some(body) = body {
            assert_eq!(first.body, body.as_bytes(), "{host} {target}");
        }
    }
});
