//! One downstream HTTP connection (HTTP/1.1 or HTTP/2, hyper), and each request on it:
//! filters, route, then a direct answer or the upstream, with retries and timeouts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tracing::{debug, info};

use super::filters::{Request as FilterRequest, Verdict};
use super::hash_policy;
use super::headers::{strip_envoy_headers, strip_hop_by_hop};
use super::park::{self, Activity, InFlight, Tracked};
use super::pool::{Body, BoxError, Proto, SendError};
use super::route::{Forward, PseudoHeaders, RequestView, Route, RouteAction, VirtualHost};
use super::{Codec, HttpCfg};
use crate::outlier::Outcome;
use crate::snapshot::Target;
use crate::snapshot::cluster::UpstreamHttp;
pub use crate::snapshot::lb::random;
use crate::snapshot::rbac::Subject;
use crate::tls::prefixed::Prefixed;

/// Request headers Envoy's router consumes (after the connection manager has removed
/// them from an external request, only a trusted client's are left).
const ROUTER_CONSUMES: [&str; 8] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Largest request body buffered so that a retry can send it again (Envoy's default
/// per-connection buffer limit).
const RETRY_BUFFER: usize = 1 << 20;

/// The connection's HTTP configuration as the proxy's configuration is now: its chain
/// selected again in the listener's current version (`None`: gone, or no longer HTTP).
pub struct Refresh(pub Box<dyn Fn() -> Option<Arc<HttpCfg>> + Send + Sync>);

impl std::fmt::Debug for Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresh")
    }
}

/// What the connection knows about its peer.
#[derive(Debug, Default)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub sni: Option<String>,
    pub tls: bool,
    /// The client certificate was verified.
    pub authenticated: bool,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// ALPN chose `h2`.
    pub alpn_h2: bool,
    /// This connection's `x-forwarded-client-cert` details, when the chain's connection
    /// manager sets them and the peer presented a certificate.
    pub xfcc: Option<String>,
    /// Each request is handled with the chain's current configuration: a changed route
    /// table or HTTP filter reaches kept-alive connections (clients' pools, sidecars'
    /// HTTP/2 connections) at their next request, as an RDS update reaches Envoy's. The
    /// connection's own settings (codec, timeouts, TLS) stay as it was accepted with.
    pub refresh: Option<Refresh>,
    /// What the chain's `set_filter_state` filter set.
    pub filter_state: crate::filter_state::FilterState,
}

/// The body of a response going downstream.
type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Serves one downstream connection until it closes.
pub async fn serve<IO>(cfg: Arc<HttpCfg>, io: IO, info: Arc<ConnInfo>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let armed = Arc::new(AtomicBool::new(cfg.request_headers_timeout.is_some() && !info.alpn_h2));
    let mut io = HeaderDeadline {
        io,
        sleep: cfg.request_headers_timeout.map(|d| Box::pin(tokio::time::sleep(d))),
        armed: armed.clone(),
        sniffed: false,
    };
    let activity = Arc::new(Activity::default());
    let svc_cfg = cfg.clone();
    let svc_info = info.clone();
    let svc_activity = activity.clone();
    let service = service_fn(move |req: Request<Incoming>| -> ResponseFuture {
        armed.store(false, Ordering::Relaxed);
        let info = svc_info.clone();
        let cfg = info.refresh.as_ref().and_then(|r| (r.0)()).unwrap_or_else(|| svc_cfg.clone());
        let in_flight = InFlight::begin(&svc_activity);
        // Boxed: hyper keeps the slot of a request's future for the connection's life, so
        // an idle kept-alive connection holds a pointer, not the whole request state.
        Box::pin(async move { Ok(handle(&cfg, &info, req).await.map(|b| Tracked::new(b, in_flight))) })
    });
    let max_headers = (cfg.max_request_headers_kb as usize) * 1024;
    let first = match (cfg.codec, info.alpn_h2) {
        (Codec::Http2, _) | (Codec::Auto, true) => First::Http2(Bytes::new()),
        (Codec::Http1, _) => First::Http1(Bytes::new()),
        (Codec::Auto, false) => match sniff_h2(&mut io).await {
            Some(first) => first,
            None => return, // closed (or timed out) before it said which
        },
    };
    let ended = match first {
        First::Http1(prefix) => {
            let mut h1 = hyper::server::conn::http1::Builder::new();
            h1.timer(TokioTimer::new())
                .max_buf_size(max_headers.max(8192))
                .keep_alive(true)
                // hyper's header timer also runs while a kept-alive connection waits for
                // its next request: with no `request_headers_timeout` it is the idle
                // timeout. With one, a second later than ours, so that ours answers 408.
                .header_read_timeout(
                    cfg.request_headers_timeout.map(|d| d + Duration::from_secs(1)).or(cfg.idle_timeout),
                );
            let parked = || cfg.stats.downstream_cx_http1_parked.inc();
            park::serve_http1(h1, io, prefix, service, activity, cfg.idle_timeout, parked).await
        }
        First::Http2(prefix) => {
            let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            h2.timer(TokioTimer::new()).max_header_list_size(max_headers as u32);
            // Boxed, so that HTTP/2's larger state does not size every connection's task.
            Box::pin(h2.serve_connection(TokioIo::new(Prefixed::new(prefix, io)), service)).await
        }
    };
    if let Err(e) = ended {
        debug!(listener = %info.listener, error = %e, "downstream HTTP connection ended");
    }
}

/// What a connection speaks, with the bytes read to tell.
enum First {
    Http1(Bytes),
    Http2(Bytes),
}

/// The HTTP/2 connection preface a client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the first bytes until they are, or cannot be, HTTP/2's preface (at most its 24
/// bytes: whatever else the client sent stays in the socket for hyper). `None`: the
/// connection ended first.
async fn sniff_h2<IO: AsyncRead + Unpin>(io: &mut IO) -> Option<First> {
    let mut buf = [0u8; PREFACE.len()];
    let mut filled = 0;
    loop {
        match io.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => filled += n,
        }
        let seen = Bytes::copy_from_slice(&buf[..filled]);
        if !PREFACE.starts_with(&seen) {
            return Some(First::Http1(seen));
        }
        if filled == PREFACE.len() {
            return Some(First::Http2(seen));
        }
    }
}

/// The future of one request, boxed so that the service is `Unpin` (hyper's
/// `poll_without_shutdown` asks it) and an idle connection holds a pointer, not a whole
/// request's state.
type ResponseFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Response<Tracked<RespBody>>, Infallible>> + Send>>;

/// Answers `408` when a request's headers do not arrive in time (hyper would only
/// close), and steps aside once the first request is under way or the client speaks
/// HTTP/2 (its first bytes are the `PRI` preface).
struct HeaderDeadline<IO> {
    io: IO,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: Arc<AtomicBool>,
    sniffed: bool,
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\nserver: envoy\r\n\r\n";

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeaderDeadline<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if me.armed.load(Ordering::Relaxed)
            && let Some(sleep) = &mut me.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            me.armed.store(false, Ordering::Relaxed);
            me.sleep = None;
            // Best effort: the answer is small enough for any socket buffer.
            let _ = Pin::new(&mut me.io).poll_write(cx, REQUEST_TIMEOUT);
            let _ = Pin::new(&mut me.io).poll_flush(cx);
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "request headers timeout")));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if !me.sniffed && buf.filled().len() > before {
            me.sniffed = true;
            if buf.filled()[before..].starts_with(b"PRI ") {
                me.armed.store(false, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// One request's record, written once as the access-log line.
struct Log<'a> {
    info: &'a ConnInfo,
    method: String,
    authority: String,
    path: String,
    protocol: &'static str,
    started: Instant,
    cluster: String,
    upstream: Option<String>,
    flag: &'static str,
    attempts: u32,
    /// For the configured access logs: the request's headers and route.
    request: Option<http::HeaderMap>,
    route_name: String,
    route_kri: Option<String>,
}

impl Log<'_> {
    fn finish(&self, status: u16) {
        info!(
            target: "access",
            listener = &*self.info.listener,
            peer = %self.info.peer.map_or("-".to_string(), |p| p.to_string()),
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            protocol = self.protocol,
            status,
            cluster = if self.cluster.is_empty() { "-" } else { &self.cluster },
            upstream = self.upstream.as_deref().unwrap_or("-"),
            attempts = self.attempts,
            duration_ms = self.started.elapsed().as_millis() as u64,
            flag = self.flag,
        );
    }
}

fn local_reply(cfg: &HttpCfg, status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let body: Bytes = body.into();
    let mut r = Response::new(Full::new(body.clone()).map_err(|e: Infallible| -> BoxError { match e {} }).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    if !body.is_empty() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    if let Ok(v) = HeaderValue::from_str(&cfg.server_name) {
        h.insert(header::SERVER, v);
    }
    r
}

async fn handle(cfg: &Arc<HttpCfg>, info: &Arc<ConnInfo>, req: Request<Incoming>) -> Response<RespBody> {
    let stats = &cfg.stats;
    stats.downstream_rq_total.inc();
    stats.downstream_rq_active.inc();
    match req.version() {
        http::Version::HTTP_2 => stats.downstream_rq_http2_total.inc(),
        _ => stats.downstream_rq_http1_total.inc(),
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_default();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut log = Log {
        info,
        method: req.method().to_string(),
        authority: authority.clone(),
        path: path.clone(),
        protocol: if req.version() == http::Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" },
        started: Instant::now(),
        cluster: String::new(),
        upstream: None,
        flag: "-",
        attempts: 0,
        request: (!cfg.access_log.is_empty()).then(|| req.headers().clone()),
        route_name: String::new(),
        route_kri: None,
    };
    let mut resp = if matches!(req.version(), http::Version::HTTP_10 | http::Version::HTTP_09) {
        // Envoy refuses HTTP/1.0 and 0.9 unless `accept_http_10` (which dp refuses), with
        // 426 and the connection closed. (hyper writes the status line as HTTP/1.0 to a
        // 1.0 client; Envoy writes HTTP/1.1.)
        log.flag = "DPE";
        let mut r = local_reply(cfg, StatusCode::UPGRADE_REQUIRED, "Upgrade Required");
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    } else {
        respond(cfg, info, req, &authority, &path, &mut log).await
    };
    if let Ok(v) = HeaderValue::from_str(&cfg.server_name) {
        resp.headers_mut().insert(header::SERVER, v);
    }
    let status = resp.status().as_u16();
    stats.classes.record(status);
    stats.downstream_rq_active.dec();
    log.finish(status);
    match log.request.take() {
        // The entry is written when the response body ends (or the client goes), with
        // its duration and the bytes sent, as Envoy writes it.
        Some(request) => {
            let entry = Entry {
                cfg: cfg.clone(),
                info: info.clone(),
                started: log.started,
                status,
                flag: log.flag,
                cluster: std::mem::take(&mut log.cluster),
                upstream: log.upstream.take(),
                method: std::mem::take(&mut log.method),
                path: std::mem::take(&mut log.path),
                authority: std::mem::take(&mut log.authority),
                protocol: log.protocol,
                route_name: std::mem::take(&mut log.route_name),
                route_kri: log.route_kri.take(),
                response: resp.headers().clone(),
                request,
            };
            resp.map(|b| Logged { inner: b, sent: 0, entry: Some(entry) }.boxed())
        }
        None => resp,
    }
}

/// What an HTTP access-log entry needs once the response is over.
struct Entry {
    cfg: Arc<HttpCfg>,
    info: Arc<ConnInfo>,
    started: Instant,
    status: u16,
    flag: &'static str,
    cluster: String,
    upstream: Option<String>,
    method: String,
    path: String,
    authority: String,
    protocol: &'static str,
    route_name: String,
    route_kri: Option<String>,
    request: http::HeaderMap,
    response: http::HeaderMap,
}

impl Entry {
    fn write(&self, sent: u64) {
        let (cfg, info) = (&self.cfg, &self.info);
        let duration = self.started.elapsed();
        let (uri_sans, dns_sans) = (info.uri_sans.join(","), info.dns_sans.join(","));
        cfg.access_log.log(&crate::access_log::Record {
            start: std::time::SystemTime::now().checked_sub(duration),
            duration,
            response_code: Some(self.status),
            // The request body as its header gives it (dp streams it upstream uncounted).
            bytes_received: content_length(&self.request).unwrap_or(0),
            bytes_sent: sent,
            flags: self.flag,
            cluster: Some(&self.cluster),
            upstream_host: self.upstream.clone(),
            remote: downstream_remote(cfg, info, &self.request),
            direct_remote: info.peer,
            local: info.local,
            peer_uri_san: Some(uri_sans.as_str()).filter(|s| !s.is_empty()),
            peer_dns_san: Some(dns_sans.as_str()).filter(|s| !s.is_empty()),
            sni: info.sni.as_deref(),
            http: Some(crate::access_log::HttpRecord {
                method: &self.method,
                path: &self.path,
                authority: &self.authority,
                scheme: if info.tls { "https" } else { "http" },
                protocol: self.protocol,
                route_name: &self.route_name,
                request: &self.request,
                response: Some(&self.response),
                route_kri: self.route_kri.as_deref(),
            }),
            ..Default::default()
        });
    }
}

/// A response body that writes its access-log entry when it ends, or when it is dropped
/// before (the client went away).
struct Logged {
    inner: RespBody,
    sent: u64,
    entry: Option<Entry>,
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                }
            }
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(e) = this.entry.take() {
                    e.write(this.sent);
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(e) = self.entry.take() {
            e.write(self.sent);
        }
    }
}

async fn respond(
    cfg: &HttpCfg,
    info: &ConnInfo,
    req: Request<Incoming>,
    authority: &str,
    path: &str,
    log: &mut Log<'_>,
) -> Response<RespBody> {
    let scheme = req.uri().scheme_str().unwrap_or(if info.tls { "https" } else { "http" });
    let method = req.method().as_str();
    let random = random();
    let view = RequestView {
        host: authority,
        path,
        headers: req.headers(),
        method,
        scheme,
        random,
        filter_state: &info.filter_state,
    };
    let routed = cfg.routes.route(&view);
    let uri_sans: Vec<&str> = info.uri_sans.iter().map(String::as_str).collect();
    let dns_sans: Vec<&str> = info.dns_sans.iter().map(String::as_str).collect();
    let subject = Subject {
        remote_ip: info.peer.map(|p| p.ip()),
        local_ip: info.local.map(|l| l.ip()),
        local_port: info.local.map_or(0, |l| l.port()),
        server_name: info.sni.as_deref(),
        authenticated: info.authenticated,
        uri_sans: &uri_sans,
        dns_sans: &dns_sans,
        headers: Some(req.headers()),
        path: Some(path),
        pseudo: PseudoHeaders { method, path, authority, scheme },
    };
    let per_route =
        routed.map(|(vh, r)| if r.per_filter.rate_limit.is_some() { &r.per_filter } else { &vh.per_filter });
    let freq = FilterRequest { subject, random };
    let mut throttle = None;
    for f in &cfg.filters {
        match f.decide(&freq, per_route) {
            Verdict::Continue => {}
            Verdict::Delay(d) => tokio::time::sleep(d).await,
            Verdict::Throttle { delay, kbps } => {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                throttle = Some(kbps);
            }
            Verdict::Respond { status, body, flag, headers } => {
                log.flag = flag;
                let mut reply = local_reply(cfg, status, body);
                if let Some(m) = headers {
                    m.apply_response(reply.headers_mut());
                }
                return reply;
            }
        }
    }
    let Some((vh, route)) = routed else {
        cfg.stats.no_route.inc();
        log.flag = "NR";
        return local_reply(cfg, StatusCode::NOT_FOUND, "");
    };
    if log.request.is_some() {
        log.route_name = route.name.clone();
        if cfg.route_kri {
            log.route_kri = route.route_kri.clone();
        }
    }
    let mut resp = match &route.action {
        RouteAction::Direct { status, body } => {
            cfg.stats.rq_direct_response.inc();
            local_reply(cfg, *status, body.clone())
        }
        RouteAction::Redirect(rd) => {
            cfg.stats.rq_redirect.inc();
            let scheme = if info.tls { "https" } else { "http" };
            let mut r = local_reply(cfg, rd.status, "");
            if let Ok(v) = HeaderValue::from_str(&rd.location(route, scheme, authority, path)) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        RouteAction::Forward(fwd) => forward(cfg, info, req, vh, route, fwd, random, log).await,
    };
    let h = resp.headers_mut();
    strip_hop_by_hop(h);
    route.headers.apply_response(h);
    vh.headers.apply_response(h);
    cfg.routes.headers.apply_response(h);
    match throttle {
        Some(kbps) => resp.map(|b| super::throttle::Throttled::new(b, kbps).boxed()),
        None => resp,
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    cfg: &HttpCfg,
    info: &ConnInfo,
    req: Request<Incoming>,
    vh: &VirtualHost,
    route: &Route,
    fwd: &Forward,
    random: u64,
    log: &mut Log<'_>,
) -> Response<RespBody> {
    let target: &Target = fwd.pick(random);
    log.cluster = target.cluster_name.clone();
    let Some(cluster) = &target.cluster else {
        log.flag = "NC";
        return local_reply(cfg, StatusCode::SERVICE_UNAVAILABLE, "");
    };
    // One view of the cluster's hosts for every attempt of this request.
    let hosts = target.hosts();
    if hosts.is_empty() {
        cluster.stats.upstream_cx_none_healthy.inc();
        log.flag = "UH";
        return local_reply(cfg, StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    }
    let hs = cluster.stats.http();
    if hs.upstream_rq_active.get() >= cluster.max_requests {
        hs.upstream_rq_pending_overflow.inc();
        log.flag = "UO";
        return local_reply(
            cfg,
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        );
    }
    let (parts, body) = req.into_parts();
    let downstream_version = parts.version;
    let proto = match cluster.http_protocol {
        UpstreamHttp::Http1 => Proto::Http1,
        UpstreamHttp::Http2 => Proto::Http2,
        UpstreamHttp::Downstream if downstream_version == http::Version::HTTP_2 => Proto::Http2,
        UpstreamHttp::Downstream => Proto::Http1,
    };
    let small = content_length(&parts.headers).is_none_or(|n| n <= RETRY_BUFFER as u64);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let peer_ip = info.peer.map(|p| p.ip());
    // Envoy's notion of an internal request: exactly one client address is known (the
    // peer when `use_remote_address` and no `x-forwarded-for` came; else the only entry of
    // `x-forwarded-for`), and it is internal.
    let xff = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    let (client, single) = if cfg.use_remote_address {
        (peer_ip, xff.is_empty())
    } else {
        let mut entries = xff.split(',').map(str::trim).filter(|e| !e.is_empty());
        let last = entries.clone().next_back().and_then(|e| e.parse::<std::net::IpAddr>().ok());
        (last, entries.nth(1).is_none())
    };
    let internal = single && client.is_some_and(|ip| cfg.is_internal(ip));
    if internal {
        headers.insert("x-envoy-internal", HeaderValue::from_static("true"));
    } else {
        strip_envoy_headers(&mut headers, cfg.use_remote_address && xff.is_empty());
    }
    if cfg.use_remote_address
        && let Some(ip) = peer_ip
    {
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
    }
    cfg.xfcc.apply(&mut headers, info.authenticated, info.xfcc.as_deref());
    if cfg.use_remote_address || !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static(if info.tls { "https" } else { "http" }));
    }
    if !headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&request_id(random))
    {
        headers.insert("x-request-id", v);
    }
    // The router reads the timeout a trusted client asks for (0: none), and takes the
    // steering headers off the request. dp does not apply a client's retry headers.
    let ms = |h: &http::HeaderMap, name: &str| h.get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut timeout = fwd.timeout;
    if let Some(ms) = ms(&headers, "x-envoy-upstream-rq-timeout-ms") {
        timeout = (ms > 0).then(|| Duration::from_millis(ms));
    }
    let mut per_try_timeout = fwd.retry.as_deref().and_then(|r| r.per_try_timeout);
    if let Some(ms) = ms(&headers, "x-envoy-upstream-rq-per-try-timeout-ms") {
        per_try_timeout = (ms > 0).then(|| Duration::from_millis(ms));
    }
    for n in ROUTER_CONSUMES {
        headers.remove(n);
    }
    // What the upstream may expect: the per-try timeout when it is the shorter.
    let expected = match (timeout, per_try_timeout) {
        (Some(t), Some(p)) => Some(t.min(p)),
        (None, p) => p,
        (t, None) => t,
    };
    if let Some(t) = expected {
        headers.insert("x-envoy-expected-rq-timeout-ms", HeaderValue::from(t.as_millis() as u64));
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // The hash, only for a consistent-hashing cluster (as Envoy's hashing balancers ask
    // for it; so a cookie policy makes no cookie for another cluster), from the request as
    // the client sent it (Envoy picks the host before the route's header changes).
    let hashed = if cluster.hashes() {
        hash_policy::hash(
            &fwd.hash_policy,
            &hash_policy::RequestParts {
                headers: &headers,
                path,
                client: client.or(peer_ip),
                peer: info.peer,
                local: info.local,
            },
        )
    } else {
        Default::default()
    };
    route.headers.apply_request(&mut headers);
    vh.headers.apply_request(&mut headers);
    cfg.routes.headers.apply_request(&mut headers);
    // A rewritten path (even to itself) keeps the client's in `x-envoy-original-path`, as
    // Envoy's router does.
    let new_path = match fwd.rewrite_path(route, path) {
        Some(p) => {
            if let Ok(v) = HeaderValue::from_str(path) {
                headers.insert("x-envoy-original-path", v);
            }
            p
        }
        None => path.to_string(),
    };
    let mut authority = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if let Some(h) = &fwd.host_rewrite {
        authority = h.clone();
    }

    // The body: buffered when a retry or a mirror may need it again.
    let retry = fwd.retry.as_deref();
    let (buffered, mut streaming): (Option<Bytes>, Option<Incoming>) =
        if (retry.is_some_and(|r| r.num_retries > 0) || !fwd.mirrors.is_empty()) && small {
            match Limited::new(body, RETRY_BUFFER).collect().await {
                Ok(c) => (Some(c.to_bytes()), None),
                Err(_) => {
                    log.flag = "DPE";
                    return local_reply(cfg, StatusCode::PAYLOAD_TOO_LARGE, "request body too large to retry");
                }
            }
        } else {
            (None, Some(body))
        };
    for m in &fwd.mirrors {
        match &buffered {
            Some(body) if m.fraction.as_ref().is_none_or(|f| super::filters::hit(f, random.rotate_left(17))) => {
                mirror(m, &parts.method, &new_path, &headers, &authority, body.clone(), random);
            }
            Some(_) => {}
            None => debug!(cluster = %m.target.cluster_name, "request body too large to mirror; not mirrored"),
        }
    }
    let attempts = 1 + retry.map_or(0, |r| r.num_retries);
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    let mut last: Option<(StatusCode, &'static str, String)> = None;
    for attempt in 0..attempts {
        log.attempts = attempt + 1;
        if attempt > 0 {
            hs.upstream_rq_retry.inc();
            let r = retry.expect("attempts > 1 only with a retry policy");
            let backoff = backoff(r.base_interval, r.max_interval, attempt, random);
            if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                break;
            }
            tokio::time::sleep(backoff).await;
        }
        let Some(host) = hosts.pick(cluster.lb, attempt, hashed.hash) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            last = Some((StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream".into()));
            break;
        };
        let mut host_authority = authority.clone();
        if fwd.auto_host_rewrite
            && let Some(name) = &host.hostname
        {
            host_authority = name.clone();
        }
        let uri = match proto {
            Proto::Http1 => new_path.parse::<Uri>(),
            Proto::Http2 => {
                format!("{}://{}{}", if cluster_tls(cluster) { "https" } else { "http" }, host_authority, new_path)
                    .parse::<Uri>()
            }
        };
        let Ok(uri) = uri else {
            log.flag = "DPE";
            return local_reply(cfg, StatusCode::BAD_REQUEST, "");
        };
        let mut up = Request::builder().method(parts.method.clone()).uri(uri);
        *up.headers_mut().expect("fresh builder") = headers.clone();
        let up_headers = up.headers_mut().expect("fresh builder");
        match proto {
            Proto::Http1 => {
                if let Ok(v) = HeaderValue::from_str(&host_authority) {
                    up_headers.insert(header::HOST, v);
                }
            }
            // HTTP/2 carries the authority in `:authority`.
            Proto::Http2 => {
                up_headers.remove(header::HOST);
            }
        }
        let up_body: Body = match (&buffered, streaming.take()) {
            (Some(b), _) => Full::new(b.clone()).map_err(|e: Infallible| -> BoxError { match e {} }).boxed(),
            (None, Some(b)) => b.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
            (None, None) => break, // a streamed body cannot be sent twice
        };
        let Ok(up_req) = up.body(up_body) else {
            log.flag = "DPE";
            return local_reply(cfg, StatusCode::BAD_REQUEST, "");
        };
        log.upstream = Some(host.addr.to_string());
        let per_try = per_try_timeout;
        let limit = match (per_try, deadline) {
            (Some(p), Some(d)) => Some((Instant::now() + p).min(d)),
            (Some(p), None) => Some(Instant::now() + p),
            (None, d) => d,
        };
        hs.upstream_rq_active.inc();
        host.active.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let sent = host.pool.send(cluster, &host, proto, up_req);
        let result = match limit {
            Some(l) => tokio::time::timeout_at(l.into(), sent).await.ok(),
            None => Some(sent.await),
        };
        host.active.fetch_sub(1, Ordering::Relaxed);
        hs.upstream_rq_active.dec();
        host.record(match &result {
            None => Outcome::ConnectTimeout,
            Some(Ok(res)) => Outcome::Status(res.status().as_u16()),
            Some(Err(SendError::Connect(_))) => Outcome::ConnectFailed,
            Some(Err(_)) => Outcome::Status(500),
        });
        match result {
            None => {
                // Dropping the request future closed that upstream request.
                let overall = deadline.is_some_and(|d| Instant::now() >= d);
                if overall {
                    hs.upstream_rq_timeout.inc();
                    log.flag = "UT";
                    return local_reply(cfg, StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
                }
                hs.upstream_rq_per_try_timeout.inc();
                last = Some((StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout".into()));
                if !retry.is_some_and(|r| r.on_5xx || r.on_gateway_error) {
                    break;
                }
            }
            Some(Ok(res)) => {
                let status = res.status().as_u16();
                hs.record(status, t0.elapsed());
                if attempt + 1 < attempts && retry.is_some_and(|r| r.retries_status(status)) && buffered.is_some() {
                    last = Some((res.status(), "-", String::new()));
                    continue;
                }
                let (mut rp, rb) = res.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                if let Some(c) = &hashed.set_cookie {
                    rp.headers.append(header::SET_COOKIE, c.clone());
                }
                rp.version = downstream_version;
                return Response::from_parts(rp, rb.map_err(|e| -> BoxError { Box::new(e) }).boxed());
            }
            Some(Err(e)) => {
                debug!(upstream = %host.addr, error = %e, attempt, "upstream request failed");
                let (flag, retriable) = match &e {
                    SendError::Connect(_) => ("UF", retry.is_some_and(|r| r.retries_connect_failure())),
                    SendError::Reset(_) => ("UC", retry.is_some_and(|r| r.retries_reset())),
                    SendError::TlsPending(_) => ("UF", false),
                };
                let reason = match &e {
                    SendError::Connect(_) | SendError::TlsPending(_) => "connection failure",
                    SendError::Reset(_) => "connection termination",
                };
                last = Some((
                    StatusCode::SERVICE_UNAVAILABLE,
                    flag,
                    format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}"),
                ));
                if !retriable {
                    break;
                }
            }
        }
    }
    let (status, flag, body) = last.unwrap_or((StatusCode::SERVICE_UNAVAILABLE, "UF", String::new()));
    log.flag = flag;
    if flag == "-" {
        // The last attempt's status was retriable but no attempt was left: Envoy passes
        // that response on; dp made the request again and has no body to pass, so it
        // answers with the status alone.
        return local_reply(cfg, status, "");
    }
    local_reply(cfg, status, body)
}

/// The client's address as Envoy's HCM settles it: the peer with `use_remote_address`,
/// else the last `x-forwarded-for` entry (port 0) when there is one.
fn downstream_remote(cfg: &HttpCfg, info: &ConnInfo, headers: &http::HeaderMap) -> Option<std::net::SocketAddr> {
    if cfg.use_remote_address {
        return info.peer;
    }
    let last = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).next_back();
    let ip = last.and_then(|v| v.rsplit(',').next()).and_then(|e| e.trim().parse::<std::net::IpAddr>().ok());
    ip.map(|ip| std::net::SocketAddr::new(ip, 0)).or(info.peer)
}

/// Sends a copy of the request to the mirror's cluster and forgets it (Envoy's shadow):
/// its answer and its failure reach no one, its stats are the mirror cluster's.
fn mirror(
    m: &super::route::Mirror,
    method: &http::Method,
    path: &str,
    headers: &http::HeaderMap,
    authority: &str,
    body: Bytes,
    random: u64,
) {
    let Some(cluster) = m.target.cluster.clone() else {
        debug!(cluster = %m.target.cluster_name, "mirror cluster unknown; not mirrored");
        return;
    };
    // The mirror cluster's circuit breaker bounds the copies in flight, as in Envoy.
    if cluster.stats.http().upstream_rq_active.get() >= cluster.max_requests {
        cluster.stats.http().upstream_rq_pending_overflow.inc();
        return;
    }
    let hosts = m.target.hosts();
    let Some(host) = hosts.pick(cluster.lb, 0, Some(random)) else {
        cluster.stats.upstream_cx_none_healthy.inc();
        return;
    };
    let authority = m.authority(authority);
    let proto = match cluster.http_protocol {
        UpstreamHttp::Http2 => Proto::Http2,
        _ => Proto::Http1,
    };
    let uri = match proto {
        Proto::Http1 => path.parse::<Uri>(),
        Proto::Http2 => format!("{}://{authority}{path}", if cluster_tls(&cluster) { "https" } else { "http" }).parse(),
    };
    let Ok(uri) = uri else { return };
    let mut req = Request::builder().method(method.clone()).uri(uri);
    let h = req.headers_mut().expect("fresh builder");
    *h = headers.clone();
    match proto {
        Proto::Http1 => {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                h.insert(header::HOST, v);
            }
        }
        Proto::Http2 => {
            h.remove(header::HOST);
        }
    }
    let body: Body = Full::new(body).map_err(|e: Infallible| -> BoxError { match e {} }).boxed();
    let Ok(req) = req.body(body) else { return };
    tokio::spawn(async move {
        let t0 = Instant::now();
        let hs = cluster.stats.http();
        hs.upstream_rq_active.inc();
        let sent = tokio::time::timeout(MIRROR_TIMEOUT, host.pool.send(&cluster, &host, proto, req)).await;
        hs.upstream_rq_active.dec();
        match sent {
            Ok(Ok(res)) => {
                hs.record(res.status().as_u16(), t0.elapsed());
                // Read and drop the answer so the connection can serve again.
                let _ = res.into_body().collect().await;
            }
            Ok(Err(e)) => debug!(upstream = %host.addr, error = %e, "mirrored request failed"),
            Err(_) => debug!(upstream = %host.addr, "mirrored request timed out"),
        }
    });
}

/// How long a mirrored request may take (its client is gone; nothing waits for it).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

fn cluster_tls(c: &crate::snapshot::cluster::ClusterCfg) -> bool {
    !matches!(c.tls, crate::snapshot::Tls::Off)
}

/// The request's `content-length`, when it has one.
fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Envoy's retry back-off: a random wait up to base * 2^(attempt-1), capped.
fn backoff(base: Duration, max: Duration, attempt: u32, random: u64) -> Duration {
    let ceiling = base.saturating_mul(1 << (attempt - 1).min(16)).min(max);
    let ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(random.rotate_left(attempt * 7) % ms + 1)
}

fn request_id(r: u64) -> String {
    let b = random().to_le_bytes();
    let a = r.to_le_bytes();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:x}{:02x}-{:x}{:x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
        a[6] & 0xf,
        a[7],
        8 | (b[0] & 3),
        b[1] & 0xf,
        b[2],
        b[3],
        b[4],
        b[5],
        b[6],
        b[7],
        a[0] ^ b[0]
    )
}
