//! The admin API (Envoy's paths, on `--admin-address`) and kuma-dp's readiness
//! reporter (`GET /ready` on `KUMA_READINESS_PORT`).

use crate::conn::Ctx;
use crate::drain::Readiness;
use crate::listeners::Listeners;
use crate::stats::text::{Format, Query};
use crate::telemetry::LogLevel;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, info};

/// What the admin handlers read.
pub struct Admin {
    pub ctx: Arc<Ctx>,
    pub listeners: Arc<Mutex<Listeners>>,
    pub log_level: LogLevel,
    /// Notified by `POST /quitquitquit`.
    pub quit: Arc<Notify>,
}

pub type Resp = Response<Full<Bytes>>;

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=UTF-8")
        .header(CACHE_CONTROL, "no-cache, max-age=0")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(body: &serde_json::Value) -> Resp {
    let mut r = text(StatusCode::OK, serde_json::to_vec_pretty(body).unwrap_or_default());
    r.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("valid header"));
    r
}

/// A listener an admin-style server accepts on: TCP (admin, readiness) or a Unix socket
/// (kuma-dp's metrics socket).
pub trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
    /// What it listens on, for the log.
    fn describe(&self) -> String;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
    fn describe(&self) -> String {
        format!("admin-style listener {:?}", self.local_addr().ok())
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
    fn describe(&self) -> String {
        format!("admin-style socket {:?}", self.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.to_owned())))
    }
}

/// Serves HTTP/1.1 on `listener` until the process exits.
pub async fn serve<L: Accept, F>(listener: L, handler: F)
where
    F: Fn(Request<Incoming>) -> Resp + Send + Sync + 'static,
{
    serve_with(listener, move |req| std::future::ready(handler(req))).await
}

/// [`serve`] with a handler that answers asynchronously (one that asks others first).
pub async fn serve_with<L: Accept, F, Fut>(listener: L, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Resp> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut errors = crate::accept::AcceptErrors::new(listener.describe());
    loop {
        let stream = match listener.accept_one().await {
            Ok(stream) => {
                errors.accepted();
                stream
            }
            Err(e) => {
                errors.failed(&e, None).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = handler(req);
                async move { Ok::<_, std::convert::Infallible>(r.await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

impl Admin {
    pub fn handle(&self, req: Request<Incoming>) -> Resp {
        let query = req.uri().query().unwrap_or("");
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ready") => match self.ctx.drain.readiness() {
                Readiness::Ready => text(StatusCode::OK, "LIVE\n"),
                Readiness::NotReady => text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n"),
                Readiness::Terminating => text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n"),
            },
            (&Method::GET, "/stats/prometheus") => {
                text(StatusCode::OK, prometheus(&self.ctx.stats, crate::stats::text::asks_used_only(query)))
            }
            (&Method::GET, "/stats") => self.stats(query),
            (&Method::GET, "/config_dump") => json(&self.ctx.routes.load().resources.to_json()),
            (&Method::GET, "/clusters") => text(StatusCode::OK, self.clusters()),
            (&Method::GET, "/listeners") => self.listeners(query),
            (&Method::POST, "/logging") => match query.strip_prefix("level=") {
                Some(level) => match self.log_level.set(level) {
                    Ok(()) => text(StatusCode::OK, format!("log level set to {level}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                None => text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=<trace|debug|info|warn|error|off>\n"),
            },
            (&Method::POST, "/quitquitquit") => {
                info!("shutdown requested through the admin API");
                self.quit.notify_one();
                text(StatusCode::OK, "OK\n")
            }
            (&Method::GET, "/") => text(
                StatusCode::OK,
                "GET /ready\nGET /stats[?filter=REGEX&usedonly&type=T&format=json|prometheus]\nGET /stats/prometheus[?usedonly]\nGET /config_dump\nGET /clusters\nGET /listeners[?format=json]\n\
                 POST /logging?level=L\nPOST /quitquitquit\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found; GET / lists the admin paths\n"),
        }
    }

    /// Envoy's `/stats`, text or JSON (or Prometheus, as `/stats/prometheus`).
    fn stats(&self, query: &str) -> Resp {
        match Query::parse(query) {
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            Ok(q) if q.format == Format::Prometheus => text(StatusCode::OK, prometheus(&self.ctx.stats, q.used_only())),
            Ok(q) => {
                let mut r = text(StatusCode::OK, q.render(&self.ctx.stats.envoy_stats()));
                if q.format == Format::Json {
                    r.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("valid header"));
                }
                r
            }
        }
    }

    /// Envoy's `/clusters` text: `name::host:port::stat::value` lines.
    fn clusters(&self) -> String {
        let snap = self.ctx.routes.load();
        let mut names: Vec<&String> = snap.clusters.keys().collect();
        names.sort();
        let mut out = String::new();
        for name in names {
            let c = &snap.clusters[name];
            let _ = writeln!(out, "{name}::default_priority::max_connections::{}", c.max_connections);
            for h in &c.hosts().hosts {
                let a = &h.addr;
                let _ = writeln!(out, "{name}::{a}::cx_active::{}", h.active.load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}::{a}::cx_total::{}", h.total.load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}::{a}::cx_connect_fail::{}", h.connect_fail.load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}::{a}::weight::{}", h.weight);
                let _ = writeln!(out, "{name}::{a}::priority::{}", h.priority);
                let _ = writeln!(out, "{name}::{a}::health_flags::{}", health_flags(h));
            }
        }
        out
    }

    fn listeners(&self, query: &str) -> Resp {
        let (bound, dns) = {
            let l = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            (l.bound(), l.dns_bound())
        };
        let udp: std::collections::HashSet<String> = dns.iter().map(|(n, _)| n.clone()).collect();
        let bound: Vec<(String, SocketAddr)> = bound.into_iter().chain(dns).collect();
        if query.split('&').any(|kv| kv == "format=json") {
            let items: Vec<_> = bound
                .iter()
                .map(|(name, a)| {
                    let protocol = if udp.contains(name) { "UDP" } else { "TCP" };
                    serde_json::json!({"name": name, "local_address": {"socket_address": {
                        "address": a.ip().to_string(), "port_value": a.port(), "protocol": protocol}}})
                })
                .collect();
            return json(&serde_json::json!({ "listener_statuses": items }));
        }
        let mut out = String::new();
        for (name, a) in bound {
            let _ = writeln!(out, "{name}::{a}");
        }
        text(StatusCode::OK, out)
    }
}

/// Every stat in Prometheus' text format; with `usedonly`, only those in use.
pub fn prometheus(stats: &crate::stats::Registry, used_only: bool) -> String {
    let all = stats.prometheus();
    if used_only { crate::stats::text::prometheus_used_only(&all) } else { all }
}

/// kuma-dp's readiness reporter: only `/ready`, `READY` / `NOT_READY` / `TERMINATING`.
pub fn readiness(ctx: &Ctx, req: &Request<Incoming>) -> Resp {
    if req.uri().path() != "/ready" {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    }
    let mut r = match ctx.drain.readiness() {
        Readiness::Ready => text(StatusCode::OK, "READY"),
        Readiness::NotReady => text(StatusCode::SERVICE_UNAVAILABLE, "NOT_READY"),
        Readiness::Terminating => text(StatusCode::SERVICE_UNAVAILABLE, "TERMINATING"),
    };
    r.headers_mut().insert("x-powered-by", "kuma-dp".parse().expect("valid header"));
    r
}

/// Binds an admin-style listener with a clear error.
pub async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot bind the {what} to {addr}: {e}; choose another address or stop the process using it")
    })
}

/// Envoy's `health_flags` of a host: `healthy`, or each reason it takes no traffic.
fn health_flags(h: &crate::snapshot::cluster::Host) -> String {
    let mut flags = String::new();
    if h.health.as_ref().is_some_and(|hh| !hh.passing()) {
        flags.push_str("/failed_active_hc");
    }
    if let Some((d, m)) = &h.outlier
        && m.ejected_until(&d.cfg(), std::time::Instant::now()).is_some()
    {
        flags.push_str("/failed_outlier_check");
    }
    if !h.healthy {
        flags.push_str("/failed_eds_health");
    }
    if flags.is_empty() { "healthy".into() } else { flags }
}
