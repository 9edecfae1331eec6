//! Active health checking, Envoy's `Cluster.health_checks`: TCP checks (connect-only, or
//! send a payload and look for the expected bytes) and HTTP checks (a GET whose status
//! must be in the expected ranges, 200 by default). gRPC and custom checks are refused
//! by name: ignoring them would send traffic to hosts the control plane meant to exclude.
//!
//! A host's health outlives configuration updates: it is kept in [`Checks`], keyed by
//! cluster, address and check, and a snapshot holds `Arc`s to it. Each checked host has
//! one task, which ends by itself once no snapshot refers to the host any more.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HealthCheck;
use envoy_types::pb::envoy::config::core::v3::health_check::{HealthChecker, Payload, payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::snapshot::Snapshot;
use crate::snapshot::cluster::ClusterCfg;
use crate::upstream::HostAddr;

/// One cluster's check, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckCfg {
    pub timeout: Duration,
    pub interval: Duration,
    /// Between checks of a host that is unhealthy (Envoy's `unhealthy_interval`).
    pub unhealthy_interval: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Bytes to send; none: connect-only.
    pub send: Vec<u8>,
    /// Blocks to find in the response, in order but not necessarily adjacent.
    pub receive: Vec<Vec<u8>>,
    /// An HTTP check instead of a TCP one.
    pub http: Option<HttpCheck>,
    /// A gRPC check (`grpc.health.v1.Health/Check`) instead of a TCP one.
    pub grpc: Option<GrpcCheck>,
}

/// Envoy's `GrpcHealthCheck`: the standard gRPC health service over HTTP/2 (clear text,
/// as dp's HTTP checks), passing only on `SERVING`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrpcCheck {
    pub service: String,
    /// `:authority` (Envoy: the cluster's name when empty).
    pub authority: String,
    /// `initial_metadata`, in order.
    pub metadata: Vec<(String, String)>,
}

/// Envoy's `HttpHealthCheck`, as far as dp runs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    /// The `host` header (Envoy: the cluster's name when empty).
    pub host: String,
    pub path: String,
    /// `[start, end)` ranges of statuses that pass.
    pub expected: Vec<(u16, u16)>,
    pub http2: bool,
    /// `request_headers_to_add` (Kuma's MeshHealthCheck adds `x-kuma-tags`), in order.
    pub add_headers: Vec<(String, String)>,
    /// `request_headers_to_remove`, lower-cased.
    pub remove_headers: Vec<String>,
}

impl CheckCfg {
    /// Reads a cluster's `health_checks`; `None` when there are none.
    pub fn from_cluster(checks: &[HealthCheck], cluster: &str) -> Result<Option<CheckCfg>, String> {
        let Some(hc) = checks.first() else { return Ok(None) };
        if checks.len() > 1 {
            return Err("health_checks: only one check per cluster is supported".into());
        }
        let default_tcp = Default::default();
        let (tcp, http, grpc) = match &hc.health_checker {
            Some(HealthChecker::TcpHealthCheck(t)) => (t, None, None),
            Some(HealthChecker::HttpHealthCheck(h)) => (&default_tcp, Some(http_check(h, cluster)?), None),
            Some(HealthChecker::GrpcHealthCheck(g)) => {
                let metadata = headers_to_add(&g.initial_metadata, "grpc_health_check.initial_metadata")?;
                let authority = if g.authority.is_empty() { cluster.to_string() } else { g.authority.clone() };
                (&default_tcp, None, Some(GrpcCheck { service: g.service_name.clone(), authority, metadata }))
            }
            Some(HealthChecker::CustomHealthCheck(c)) => {
                return Err(format!("health_checks[0]: custom_health_check {} is not supported", c.name));
            }
            None => return Err("health_checks[0]: no health checker is set".into()),
        };
        if tcp.proxy_protocol_config.is_some() {
            return Err("health_checks[0].tcp_health_check.proxy_protocol_config is not supported".into());
        }
        if hc.alt_port.is_some() {
            return Err("health_checks[0].alt_port is not supported".into());
        }
        let d = |d: &Option<envoy_types::pb::google::protobuf::Duration>| {
            d.as_ref().map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        };
        let timeout = d(&hc.timeout).filter(|t| !t.is_zero()).ok_or("health_checks[0]: timeout is required")?;
        let interval = d(&hc.interval).filter(|t| !t.is_zero()).ok_or("health_checks[0]: interval is required")?;
        let payload = |p: &Payload| -> Result<Vec<u8>, String> {
            match &p.payload {
                Some(payload::Payload::Text(hex)) => decode_hex(hex),
                Some(payload::Payload::Binary(b)) => Ok(b.clone()),
                None => Ok(vec![]),
            }
        };
        Ok(Some(CheckCfg {
            timeout,
            interval,
            unhealthy_interval: d(&hc.unhealthy_interval).filter(|t| !t.is_zero()).unwrap_or(interval),
            unhealthy_threshold: hc.unhealthy_threshold.map_or(1, |v| v.value.max(1)),
            healthy_threshold: hc.healthy_threshold.map_or(1, |v| v.value.max(1)),
            send: tcp.send.as_ref().map(payload).transpose()?.unwrap_or_default(),
            receive: tcp.receive.iter().map(payload).collect::<Result<_, _>>()?,
            http,
            grpc,
        }))
    }

    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// Headers a check adds, lower-cased, checked as header names and values.
fn headers_to_add(
    list: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
    field: &str,
) -> Result<Vec<(String, String)>, String> {
    let mut out = vec![];
    for (i, o) in list.iter().enumerate() {
        let Some(hv) = &o.header else { continue };
        let bad = |what: &str| format!("health_checks[0].{field}[{i}]: {what}");
        http::HeaderName::from_bytes(hv.key.as_bytes())
            .map_err(|_| bad(&format!("`{}` is not a header name", hv.key)))?;
        let value =
            if hv.raw_value.is_empty() { hv.value.clone() } else { String::from_utf8_lossy(&hv.raw_value).into() };
        http::HeaderValue::from_str(&value)
            .map_err(|_| bad(&format!("the value of `{}` is not a header value", hv.key)))?;
        out.push((hv.key.to_ascii_lowercase(), value));
    }
    Ok(out)
}

fn http_check(
    h: &envoy_types::pb::envoy::config::core::v3::health_check::HttpHealthCheck,
    cluster: &str,
) -> Result<HttpCheck, String> {
    if h.send.is_some() || !h.receive.is_empty() || h.service_name_matcher.is_some() {
        return Err(
            "health_checks[0].http_health_check: send, receive and service_name_matcher are not supported".into()
        );
    }
    let add_headers = headers_to_add(&h.request_headers_to_add, "http_health_check.request_headers_to_add")?;
    let remove_headers = h.request_headers_to_remove.iter().map(|n| n.to_ascii_lowercase()).collect();
    let http2 = match h.codec_client_type {
        0 => false,
        1 => true,
        c => return Err(format!("health_checks[0].http_health_check: codec_client_type {c} is not supported")),
    };
    let expected = if h.expected_statuses.is_empty() {
        vec![(200, 201)]
    } else {
        h.expected_statuses.iter().map(|r| (r.start.clamp(100, 600) as u16, r.end.clamp(100, 600) as u16)).collect()
    };
    Ok(HttpCheck {
        host: if h.host.is_empty() { cluster.to_string() } else { h.host.clone() },
        path: if h.path.is_empty() { "/".to_string() } else { h.path.clone() },
        expected,
        http2,
        add_headers,
        remove_headers,
    })
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("health_checks[0]: payload text `{s}` is not hex");
    if !s.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

const PENDING: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// What the checks say about one host.
#[derive(Debug)]
pub struct HostHealth {
    state: AtomicU8,
    /// Consecutive results against the current state.
    streak: AtomicU32,
    started: AtomicBool,
    /// How checks reach the host: the cluster's transport socket for it, as Envoy's
    /// checks use (mesh mTLS to a sidecar's inbound); replaced when the cluster changes.
    transport: arc_swap::ArcSwap<Transport>,
}

/// A check's connection: plain, or TLS with the cluster's context for the host.
#[derive(Default)]
pub enum Transport {
    #[default]
    Plain,
    Tls(Arc<crate::tls::ClientTls>),
    /// The context waits for an SDS secret: checks fail until it comes.
    Pending(String),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Plain => "Plain",
            Transport::Tls(_) => "Tls",
            Transport::Pending(_) => "Pending",
        })
    }
}

impl HostHealth {
    fn new() -> Self {
        HostHealth {
            state: AtomicU8::new(PENDING),
            streak: AtomicU32::new(0),
            started: AtomicBool::new(false),
            transport: Default::default(),
        }
    }

    /// Whether the host may take traffic: not before its first check passes (a new host
    /// needs one success, as in Envoy), and not once `unhealthy_threshold` checks in a
    /// row failed until `healthy_threshold` in a row pass.
    pub fn passing(&self) -> bool {
        self.state.load(Ordering::Relaxed) == HEALTHY
    }

    fn record(&self, ok: bool, cfg: &CheckCfg) -> Option<bool> {
        let state = self.state.load(Ordering::Relaxed);
        let (agrees, threshold, next) = match state {
            PENDING if ok => (false, 1, HEALTHY),
            PENDING => (false, 1, UNHEALTHY),
            HEALTHY => (ok, cfg.unhealthy_threshold, UNHEALTHY),
            _ => (!ok, cfg.healthy_threshold, HEALTHY),
        };
        if agrees {
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        if self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= threshold {
            self.streak.store(0, Ordering::Relaxed);
            self.state.store(next, Ordering::Relaxed);
            return Some(next == HEALTHY);
        }
        None
    }
}

type Key = (String, HostAddr, u64);

/// Every checked host's health, for as long as a snapshot uses it.
#[derive(Debug, Default)]
pub struct Checks {
    hosts: Mutex<HashMap<Key, Weak<HostHealth>>>,
}

impl Checks {
    /// The health of `addr` in `cluster` under `cfg`: the one already known, or a new
    /// pending one.
    pub fn host(&self, cluster: &str, addr: &HostAddr, cfg: &CheckCfg) -> Arc<HostHealth> {
        let mut m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let key = (cluster.to_string(), addr.clone(), cfg.fingerprint());
        if let Some(h) = m.get(&key).and_then(Weak::upgrade) {
            return h;
        }
        m.retain(|_, w| w.strong_count() > 0);
        let h = Arc::new(HostHealth::new());
        m.insert(key, Arc::downgrade(&h));
        h
    }
}

/// Starts checking every host of a snapshot's clusters that is not checked yet. Needs a
/// tokio runtime.
pub fn start(snapshot: &Snapshot) {
    for c in snapshot.clusters.values() {
        if let Some(cfg) = &c.health_check {
            start_cluster(c, cfg);
        }
    }
}

pub fn start_cluster(c: &ClusterCfg, cfg: &Arc<CheckCfg>) {
    for host in &c.hosts().hosts {
        let Some(health) = &host.health else { continue };
        health.transport.store(Arc::new(match c.tls_for(host) {
            crate::snapshot::Tls::Off => Transport::Plain,
            crate::snapshot::Tls::Ready(ct) => Transport::Tls(ct.clone()),
            crate::snapshot::Tls::Pending(secret) => Transport::Pending(secret.clone()),
        }));
        if health.started.swap(true, Ordering::Relaxed) {
            continue;
        }
        let (cluster, stats, addr) = (c.name.clone(), c.stats.clone(), host.addr.clone());
        let cfg = cfg.clone();
        let health = Arc::downgrade(health);
        tokio::spawn(async move {
            loop {
                let Some(h) = health.upgrade() else { return };
                stats.health_check_attempt.inc();
                let transport = h.transport.load_full();
                let result = check(&addr, &transport, stats.ssl(), &cfg).await;
                match &result {
                    Ok(()) => stats.health_check_success.inc(),
                    Err(_) => stats.health_check_failure.inc(),
                }
                if let Some(healthy) = h.record(result.is_ok(), &cfg) {
                    crate::snapshot::lb::availability_changed();
                    match result {
                        Ok(()) => tracing::info!(%cluster, host = %addr, healthy, "health check: host is healthy"),
                        Err(e) => tracing::warn!(%cluster, host = %addr, error = %e, "health check: host is unhealthy"),
                    }
                }
                let wait = if h.passing() { cfg.interval } else { cfg.unhealthy_interval };
                drop(h);
                tokio::time::sleep(wait).await;
            }
        });
    }
}

/// A check's connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Connects to the host as the cluster's traffic does: with its TLS (offering `alpn` when
/// the context configures none, as Envoy's checkers do for their codec).
async fn open(
    addr: &HostAddr,
    t: &Transport,
    ssl: &crate::stats::SslStats,
    alpn: &[u8],
) -> Result<Box<dyn Io>, String> {
    if let Transport::Pending(secret) = t {
        return Err(format!("TLS waits for secret `{secret}`"));
    }
    let s = addr.connect().await.map_err(|e| format!("connect: {e}"))?;
    match t {
        Transport::Tls(ct) => {
            Ok(Box::new(ct.connect_with_alpn_fallback(s, alpn, ssl).await.map_err(|e| format!("TLS: {e}"))?))
        }
        _ => Ok(Box::new(s)),
    }
}

/// One check.
async fn check(addr: &HostAddr, t: &Transport, ssl: &crate::stats::SslStats, cfg: &CheckCfg) -> Result<(), String> {
    let within = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| {
        r.map_err(|_| format!("no answer within {:?}", cfg.timeout))?
    };
    if let Some(h) = &cfg.http {
        let alpn = if h.http2 { crate::tls::ALPN_H2 } else { crate::tls::ALPN_HTTP11 };
        return within(
            tokio::time::timeout(cfg.timeout, async { http(open(addr, t, ssl, alpn).await?, h).await }).await,
        );
    }
    if let Some(g) = &cfg.grpc {
        return within(
            tokio::time::timeout(cfg.timeout, async { grpc(open(addr, t, ssl, crate::tls::ALPN_H2).await?, g).await })
                .await,
        );
    }
    let attempt = async {
        let mut s = open(addr, t, ssl, &[]).await?;
        if !cfg.send.is_empty() {
            s.write_all(&cfg.send).await.map_err(|e| format!("send: {e}"))?;
        }
        if cfg.receive.is_empty() {
            return Ok(());
        }
        let mut got = Vec::new();
        let mut next = 0;
        let mut at = 0;
        let mut buf = [0u8; 1024];
        loop {
            // Each block must appear after the end of the previous one.
            while next < cfg.receive.len() {
                let want = &cfg.receive[next];
                match got[at..].windows(want.len().max(1)).position(|w| w == want.as_slice()) {
                    Some(p) => {
                        at += p + want.len();
                        next += 1;
                    }
                    None => break,
                }
            }
            if next == cfg.receive.len() {
                return Ok(());
            }
            let n = s.read(&mut buf).await.map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                return Err("the host closed the connection before the expected response".to_string());
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(cfg.timeout, attempt).await.map_err(|_| format!("no answer within {:?}", cfg.timeout))?
}

/// One HTTP check: GET `path` on a new connection; the status must be expected.
async fn http(s: Box<dyn Io>, h: &HttpCheck) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let uri = if h.http2 { format!("http://{}{}", h.host, h.path) } else { h.path.clone() };
    let mut req = hyper::Request::get(uri);
    if !h.remove_headers.iter().any(|n| n == "user-agent") {
        req = req.header("user-agent", "Envoy/HC");
    }
    if !h.http2 {
        req = req.header("host", &h.host).header("connection", "close");
    }
    for (k, v) in &h.add_headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Empty::<bytes::Bytes>::new()).map_err(|e| format!("request: {e}"))?;
    let status = if h.http2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| format!("request: {e}"))?.status()
    } else {
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(s)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| format!("request: {e}"))?.status()
    };
    let code = status.as_u16();
    if h.expected.iter().any(|(lo, hi)| *lo <= code && code < *hi) {
        Ok(())
    } else {
        Err(format!("status {code} is not expected"))
    }
}

/// One gRPC check: `grpc.health.v1.Health/Check` for the service; the answer must be
/// `SERVING` with `grpc-status` 0.
async fn grpc(s: Box<dyn Io>, g: &GrpcCheck) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::post(format!("http://{}/grpc.health.v1.Health/Check", g.authority))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "Envoy/HC");
    for (k, v) in &g.metadata {
        req = req.header(k.as_str(), v.as_str());
    }
    let req =
        req.body(Full::new(bytes::Bytes::from(grpc_frame(&health_request(&g.service))))).map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    if res.status() != http::StatusCode::OK {
        return Err(format!("status {}", res.status().as_u16()));
    }
    // A trailers-only answer carries grpc-status in the headers.
    let mut grpc_status = res.headers().get("grpc-status").cloned();
    let collected = res.into_body().collect().await.map_err(|e| format!("response: {e}"))?;
    if let Some(t) = collected.trailers() {
        grpc_status = t.get("grpc-status").cloned().or(grpc_status);
    }
    if grpc_status.as_ref().map(|v| v.as_bytes()) != Some(b"0") {
        return Err(format!("grpc-status {grpc_status:?}"));
    }
    match serving_status(&collected.to_bytes()) {
        Some(1) => Ok(()),
        other => Err(format!("health status {other:?}, not SERVING")),
    }
}

/// `HealthCheckRequest { service = 1 }`.
fn health_request(service: &str) -> Vec<u8> {
    let mut m = vec![];
    if !service.is_empty() {
        m.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            m.push((n as u8) | 0x80);
            n >>= 7;
        }
        m.push(n as u8);
        m.extend_from_slice(service.as_bytes());
    }
    m
}

/// A gRPC message frame: not compressed, big-endian length, the message.
fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

/// `HealthCheckResponse.status` (field 1, varint) of the first frame of `body`; 0
/// (UNKNOWN) when the field is absent.
fn serving_status(body: &[u8]) -> Option<u64> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let varint = |b: &mut &[u8]| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, tail) = b.split_first()?;
            *b = tail;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    };
    let mut status = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut msg)?,
            (_, 0) => {
                varint(&mut msg)?;
            }
            (_, 2) => {
                let n = varint(&mut msg)? as usize;
                msg = msg.get(n..)?;
            }
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(unhealthy: u32, healthy: u32) -> CheckCfg {
        CheckCfg {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            unhealthy_interval: Duration::from_secs(1),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            send: vec![],
            receive: vec![],
            http: None,
            grpc: None,
        }
    }

    /// A gRPC health server on HTTP/2 answering `status` to every check, with the
    /// service it was asked about recorded.
    async fn grpc_server(status: u8) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        use http_body_util::{BodyExt, Full};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let asked = Arc::new(std::sync::Mutex::new(vec![]));
        let seen = asked.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen.clone();
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        // The request frame: 5 bytes of header, then field 1.
                        let service =
                            body.get(7..).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                        seen.lock().unwrap().push(format!("{path} {service}"));
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let answer = Full::new(bytes::Bytes::from(grpc_frame(&[0x08, status])))
                            .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
                        let mut res = hyper::Response::new(answer);
                        res.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        (addr, asked)
    }

    async fn grpc_to(addr: std::net::SocketAddr, check: &GrpcCheck) -> Result<(), String> {
        let s = open(&HostAddr::Ip(addr), &Transport::Plain, &Default::default(), &[]).await?;
        grpc(s, check).await
    }

    #[tokio::test]
    async fn grpc_checks_pass_on_serving_only() {
        let check = GrpcCheck { service: "orders".into(), authority: "backend".into(), metadata: vec![] };
        let (serving, asked) = grpc_server(1).await;
        assert_eq!(grpc_to(serving, &check).await, Ok(()));
        assert_eq!(asked.lock().unwrap().as_slice(), ["/grpc.health.v1.Health/Check orders"]);
        let (not_serving, _) = grpc_server(2).await;
        let e = grpc_to(not_serving, &check).await.unwrap_err();
        assert!(e.contains("Some(2), not SERVING"), "{e}");
        assert_eq!(serving_status(&grpc_frame(&[])), Some(0), "no field: UNKNOWN");
        assert_eq!(health_request("a"), [0x0a, 1, b'a']);
    }

    #[test]
    fn thresholds_move_a_host_as_envoy_does() {
        let c = cfg(2, 3);
        let h = HostHealth::new();
        assert!(!h.passing(), "a new host waits for its first check");
        assert_eq!(h.record(true, &c), Some(true), "one success is enough for a new host");
        assert_eq!(h.record(false, &c), None);
        assert!(h.passing(), "one failure of two needed");
        assert_eq!(h.record(true, &c), None, "a success resets the streak");
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), Some(false));
        assert!(!h.passing());
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(true, &c), Some(true));
        assert!(h.passing());
    }

    #[test]
    fn health_survives_while_a_snapshot_holds_it() {
        let checks = Checks::default();
        let c = cfg(1, 1);
        let addr = HostAddr::Ip("127.0.0.1:1".parse().unwrap());
        let a = checks.host("c", &addr, &c);
        a.record(true, &c);
        assert!(checks.host("c", &addr, &c).passing());
        assert!(!checks.host("other", &addr, &c).passing());
        drop(a);
        assert!(!checks.host("c", &addr, &c).passing(), "forgotten once no snapshot holds it");
    }

    #[tokio::test]
    async fn tcp_checks_connect_send_and_find_the_blocks_in_order() {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = HostAddr::Ip(l.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    if s.read_exact(&mut b).await.is_ok() && &b == b"ping" {
                        let _ = s.write_all(b"xxPONGyyOK").await;
                    }
                });
            }
        });
        let mut c = cfg(1, 1);
        c.send = b"ping".to_vec();
        c.receive = vec![b"PONG".to_vec(), b"OK".to_vec()];
        check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap();
        c.receive = vec![b"OK".to_vec(), b"PONG".to_vec()];
        let e = check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap_err();
        assert!(e.contains("closed"), "{e}");
        c.send = vec![];
        c.receive = vec![];
        check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap();
        let closed = HostAddr::Ip(std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
        assert!(check(&closed, &Transport::Plain, &Default::default(), &c).await.unwrap_err().starts_with("connect"));
        assert_eq!(decode_hex("50494e47").unwrap(), b"PING");
    }

    #[tokio::test]
    async fn http_checks_want_an_expected_status() {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = HostAddr::Ip(l.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut b = vec![0u8; 1024];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&b[..n]).to_string();
                    let lower = req.to_lowercase();
                    let tagged = lower.contains("x-kuma-tags: &kuma.io/service=web&") && !lower.contains("user-agent");
                    let status = if (req.starts_with("GET /health ") && lower.contains("host: web"))
                        || (req.starts_with("GET /tagged ") && tagged)
                    {
                        200
                    } else {
                        503
                    };
                    let _ = s.write_all(format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n").as_bytes()).await;
                });
            }
        });
        let hc = |path: &str, expected: (u16, u16)| HttpCheck {
            host: "web".into(),
            path: path.into(),
            expected: vec![expected],
            http2: false,
            add_headers: vec![],
            remove_headers: vec![],
        };
        let mut c = cfg(1, 1);
        c.http = Some(hc("/health", (200, 201)));
        check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap();
        c.http = Some(hc("/other", (200, 201)));
        assert_eq!(
            check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap_err(),
            "status 503 is not expected"
        );
        c.http = Some(hc("/other", (500, 504)));
        check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap();
        // Kuma's MeshHealthCheck adds `x-kuma-tags`; a removed header is not sent.
        c.http = Some(hc("/tagged", (200, 201)));
        assert_eq!(
            check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap_err(),
            "status 503 is not expected"
        );
        c.http = Some(HttpCheck {
            add_headers: vec![("x-kuma-tags".into(), "&kuma.io/service=web&".into())],
            remove_headers: vec!["user-agent".into()],
            ..hc("/tagged", (200, 201))
        });
        check(&addr, &Transport::Plain, &Default::default(), &c).await.unwrap();
        assert!(decode_hex("5").is_err() && decode_hex("zz").is_err());
    }
}
