//! kuma-dp's metrics socket (its "metrics hijacker"), `<workdir>/kuma-mh-<name>-<mesh>.sock`.
//!
//! The Prometheus listener a kuma-cp generates for a sidecar (`/metrics`, port 5670 by
//! default, from the Mesh's metrics backend or a MeshMetric) routes to a cluster on this
//! socket, and kuma-dp answers there with Envoy's stats in Prometheus' text format. dp is
//! both processes, so it answers with its own stats: without this socket, a scrape through
//! that listener fails (there is nothing to connect to). The applications the bootstrap's
//! `aggregate` list or a MeshMetric policy names are scraped on each request and their
//! answers follow the proxy's.

use crate::admin::{Resp, text};
use crate::conn::Ctx;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::header::CONTENT_TYPE;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio::net::UnixListener;
use tracing::warn;

/// Kuma's `MetricsHijackerSocketName` ([`crate::work_dir::socket_path`]).
pub fn socket_path(workdir: &Path, name: &str, mesh: &str) -> PathBuf {
    crate::work_dir::socket_path(workdir, "kuma-mh", name, mesh)
}

/// Binds the socket. A file left there by a process that is gone is replaced; a socket
/// another process still answers on is not taken over (kuma-dp refuses that too).
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let p = path.display();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("the metrics socket {p} is in use by another process (another dp or kuma-dp?)"));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale metrics socket {p}: {e}"))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot bind the metrics socket {p}: {e}"))
}

/// An application whose Prometheus endpoint is served beside the proxy's stats (Kuma's
/// `aggregate` entries of a Prometheus metrics backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub path: String,
}

/// The `kumaSidecarConfiguration.metrics.aggregate` list of a bootstrap response; entries
/// without a usable port are skipped.
pub fn apps(v: &serde_json::Value) -> Vec<App> {
    let Some(list) = v.as_array() else { return vec![] };
    list.iter()
        .filter_map(|a| {
            let port = u16::try_from(a["port"].as_u64()?).ok().filter(|p| *p > 0)?;
            let path = a["path"].as_str().filter(|p| !p.is_empty()).unwrap_or("/metrics");
            Some(App {
                name: a["name"].as_str().unwrap_or_default().to_string(),
                address: a["address"].as_str().filter(|a| !a.is_empty()).unwrap_or("127.0.0.1").to_string(),
                port,
                path: if path.starts_with('/') { path.to_string() } else { format!("/{path}") },
            })
        })
        .collect()
}

/// How long an application may take to answer when the scrape does not say
/// (`X-Prometheus-Scrape-Timeout-Seconds`).
const APP_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an application's answer that is kept.
const APP_MAX_BYTES: usize = 16 << 20;

/// Scrapes the applications, as kuma-dp does: from 127.0.0.6 (or ::6) with transparent
/// proxying, so that the redirect rules let the request through to the application.
pub struct Scraper {
    apps: Vec<App>,
    transparent: bool,
}

impl Scraper {
    pub fn new(apps: Vec<App>, transparent: bool) -> Self {
        Scraper { apps, transparent }
    }

    /// Every application's answer (the bootstrap's, then `more`), in order; one that fails
    /// is logged and left out (the proxy's own stats are still served).
    async fn scrape(&self, more: &[App], headers: &hyper::HeaderMap) -> Vec<u8> {
        let timeout = headers
            .get("x-prometheus-scrape-timeout-seconds")
            .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(APP_TIMEOUT, Duration::from_secs_f64);
        let mut out = Vec::new();
        let fetches = self.apps.iter().chain(more).map(|app| async move {
            match tokio::time::timeout(timeout, self.fetch(app, headers)).await {
                Ok(Ok(body)) => Some(body),
                Ok(Err(e)) => {
                    warn!(application = %app.name, address = %app.address, port = app.port, path = %app.path, "cannot scrape: {e}");
                    None
                }
                Err(_) => {
                    warn!(application = %app.name, port = app.port, "cannot scrape: no answer within {timeout:?}");
                    None
                }
            }
        });
        for body in futures_util::future::join_all(fetches).await.into_iter().flatten() {
            out.extend_from_slice(&body);
            if !body.ends_with(b"\n") {
                out.push(b'\n');
            }
        }
        out
    }

    async fn fetch(&self, app: &App, headers: &hyper::HeaderMap) -> Result<Bytes, String> {
        let ip: IpAddr = match app.address.parse() {
            Ok(ip) => ip,
            Err(_) => tokio::net::lookup_host((app.address.as_str(), app.port))
                .await
                .map_err(|e| format!("resolve: {e}"))?
                .next()
                .ok_or("resolve: no address")?
                .ip(),
        };
        let target = SocketAddr::new(ip, app.port);
        let socket = if ip.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| e.to_string())?;
        if self.transparent {
            let from: IpAddr =
                if ip.is_ipv4() { [127, 0, 0, 6].into() } else { "::6".parse().expect("an IPv6 address") };
            socket.bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
        }
        let stream = socket.connect(target).await.map_err(|e| format!("connect {target}: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::get(app.path.as_str()).header("host", format!("{}:{}", app.address, app.port));
        // Prometheus' own headers, as kuma-dp passes them (not accept-encoding: the answers
        // are concatenated as they come).
        for h in ["accept", "user-agent", "x-prometheus-scrape-timeout-seconds"] {
            if let Some(v) = headers.get(h) {
                req = req.header(h, v);
            }
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), APP_MAX_BYTES);
        Ok(body.collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes())
    }
}

/// The answer to any request: every stat of the proxy in Prometheus' text format (what
/// kuma-dp relays from Envoy's `/stats?format=prometheus`), then each application's.
/// The answer to any request: every stat of the proxy in Prometheus' text format (what
/// kuma-dp relays from Envoy's `/stats?format=prometheus`), then each application's.
/// A scrape's `usedonly` (kuma-dp passes the query on to Envoy) leaves out the unused
/// stats, and so does a MeshMetric policy unless it includes them; its extra labels go on
/// every sample.
async fn respond(ctx: &Ctx, scraper: &Scraper, req: &hyper::Request<hyper::body::Incoming>) -> Resp {
    let policy = ctx.routes.load().mesh_metric.clone();
    let asked = req.uri().query().is_some_and(crate::stats::text::asks_used_only);
    let used_only = asked || policy.as_ref().is_some_and(|m| !m.include_unused);
    let mut body = crate::admin::prometheus(&ctx.stats, used_only).into_bytes();
    let policy_apps = policy.as_ref().map_or(&[][..], |m| &m.apps[..]);
    body.extend_from_slice(&scraper.scrape(policy_apps, req.headers()).await);
    if let Some(m) = policy.as_ref().filter(|m| !m.extra_labels.is_empty()) {
        body = with_labels(&String::from_utf8_lossy(&body), &m.extra_labels).into_bytes();
    }
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8".parse().expect("valid header"));
    r
}

/// Every sample of a Prometheus text with `labels` added (after its own, which win: a
/// label the sample has already is not added twice).
pub fn with_labels(text: &str, labels: &[(String, String)]) -> String {
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let (name, rest) = line.split_at(name_end);
        let (own, after) = match rest.strip_prefix('{') {
            Some(r) => match r.find('}') {
                Some(close) => (&r[..close], &r[close + 1..]),
                None => ("", rest),
            },
            None => ("", rest),
        };
        let has = |k: &str| own.split(',').any(|kv| kv.trim().split('=').next() == Some(k));
        let added: Vec<String> =
            labels.iter().filter(|(k, _)| !has(k)).map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        let all: Vec<&str> =
            std::iter::once(own).filter(|o| !o.is_empty()).chain(added.iter().map(String::as_str)).collect();
        if all.is_empty() {
            out.push_str(line);
        } else {
            out.push_str(&format!("{name}{{{}}}{after}", all.join(",")));
        }
        out.push('\n');
    }
    out
}

/// Serves the socket until the process exits.
pub async fn serve(listener: UnixListener, ctx: Arc<Ctx>, scraper: Scraper) {
    let scraper = Arc::new(scraper);
    crate::admin::serve_with(listener, move |req| {
        let (ctx, scraper) = (ctx.clone(), scraper.clone());
        async move { respond(&ctx, &scraper, &req).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_kumas_cut_to_98_bytes_before_the_suffix() {
        assert_eq!(
            socket_path(Path::new("/tmp/w"), "backend-1", "default"),
            PathBuf::from("/tmp/w/kuma-mh-backend-1-default.sock")
        );
        let long = "n".repeat(200);
        let p = socket_path(Path::new("/tmp/w"), &long, "default");
        let s = p.to_str().unwrap();
        assert_eq!(s.len(), 98 + ".sock".len());
        assert!(s.starts_with("/tmp/w/kuma-mh-nnn") && s.ends_with("n.sock"), "{s}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
        let dir = crate::work_dir::WorkDir::resolve(None).unwrap();
        let path = socket_path(dir.path(), "web", "default");
        let first = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(err.contains("in use by another process"), "{err}");
        drop(first);
        // The file is still there; nothing answers on it.
        assert!(path.exists());
        let _again = bind(&path).unwrap();
    }

    #[test]
    fn extra_labels_go_on_every_sample_after_its_own() {
        let labels = vec![("team".to_string(), "a\"b".to_string()), ("x".to_string(), "1".to_string())];
        let text = "# TYPE m counter\nm 3\nm{x=\"own\",y=\"2\"} 4 1700000000\n\nn{} 1\n";
        assert_eq!(
            with_labels(text, &labels),
            "# TYPE m counter\nm{team=\"a\\\"b\",x=\"1\"} 3\nm{x=\"own\",y=\"2\",team=\"a\\\"b\"} 4 1700000000\n\n\
             n{team=\"a\\\"b\",x=\"1\"} 1\n"
        );
    }
}
