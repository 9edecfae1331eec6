//! Upstream HTTP connections, pooled per host: HTTP/1.1 connections kept alive and reused
//! one request at a time, or one multiplexed HTTP/2 connection.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use crate::snapshot::Tls;
use crate::snapshot::cluster::{ClusterCfg, Host};

/// The body of a request going upstream.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle HTTP/1.1 connections kept per host.
const MAX_IDLE: usize = 128;
/// Longest a TLS handshake to an upstream may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// Why no response came back.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (Envoy: connection failure, UF).
    Connect(String),
    /// A TLS context waits for a secret.
    TlsPending(String),
    /// The connection ended before the response headers (Envoy: UC / reset).
    Reset(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connection failure: {e}"),
            SendError::TlsPending(s) => write!(f, "TLS context waits for secret {s}"),
            SendError::Reset(e) => write!(f, "reset before headers: {e}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct HostPool {
    idle: Mutex<Vec<http1::SendRequest<Body>>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl HostPool {
    /// Sends a request to `host` and waits for the response headers.
    pub async fn send(
        &self,
        cluster: &ClusterCfg,
        host: &Host,
        proto: Proto,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        match proto {
            Proto::Http1 => self.send_h1(cluster, host, req).await,
            Proto::Http2 => self.send_h2(cluster, host, req).await,
        }
    }

    async fn send_h1(
        &self,
        cluster: &ClusterCfg,
        host: &Host,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let reused = self.take_idle();
        let mut sender = match reused {
            Some(s) => s,
            None => {
                let io = open(cluster, host, crate::tls::ALPN_HTTP11).await?;
                let (sender, conn) =
                    http1::handshake(io).await.map_err(|e| SendError::Connect(format!("HTTP/1.1 handshake: {e}")))?;
                let addr = host.addr.to_string();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                sender
            }
        };
        let res = sender.send_request(req).await.map_err(|e| SendError::Reset(e.to_string()))?;
        // Back to the pool at once: it takes no new request until this response's body
        // is read (`is_ready`), and a dropped body closes the connection.
        self.give_back(sender);
        Ok(res)
    }

    fn take_idle(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|s| !s.is_closed());
        let i = idle.iter().rposition(|s| s.is_ready())?;
        Some(idle.swap_remove(i))
    }

    fn give_back(&self, sender: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn send_h2(
        &self,
        cluster: &ClusterCfg,
        host: &Host,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let existing = self.h2.lock().unwrap_or_else(|e| e.into_inner()).clone().filter(|s| !s.is_closed());
        let mut sender = match existing {
            Some(s) => s,
            None => {
                let io = open(cluster, host, crate::tls::ALPN_H2).await?;
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| SendError::Connect(format!("HTTP/2 handshake: {e}")))?;
                let addr = host.addr.to_string();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(|e| SendError::Reset(e.to_string()))?;
        sender.send_request(req).await.map_err(|e| SendError::Reset(e.to_string()))
    }
}

/// A stream to the host: TCP or Unix, with TLS when its transport socket says so.
type Io = TokioIo<Box<dyn Stream>>;

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Opens a connection to `host`, with TLS when its transport socket originates it;
/// `alpn_fallback` is the pool's protocol, offered when the context configures no ALPN
/// (as Envoy's pools do, so a server choosing by ALPN speaks what the pool will).
async fn open(cluster: &ClusterCfg, host: &Host, alpn_fallback: &[u8]) -> Result<Io, SendError> {
    let cs = &cluster.stats;
    cs.upstream_cx_total.inc();
    host.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let plain = match tokio::time::timeout(cluster.connect_timeout, host.addr.connect_from(&cluster.source)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            cs.upstream_cx_connect_fail.inc();
            host.connect_fail.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(SendError::Connect(e.to_string()));
        }
        Err(_) => {
            cs.upstream_cx_connect_timeout.inc();
            cs.upstream_cx_connect_fail.inc();
            return Err(SendError::Connect(format!("no connection within {:?}", cluster.connect_timeout)));
        }
    };
    let stream: Box<dyn Stream> = match cluster.tls_for(host) {
        Tls::Off => Box::new(plain),
        Tls::Pending(secret) => return Err(SendError::TlsPending(secret.clone())),
        Tls::Ready(ct) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, ct.connect_with_alpn_fallback(plain, alpn_fallback, cs.ssl()))
                .await
            {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(e)) => {
                    cs.upstream_cx_connect_fail.inc();
                    return Err(SendError::Connect(format!("TLS handshake: {e}")));
                }
                Err(_) => {
                    cs.upstream_cx_connect_fail.inc();
                    return Err(SendError::Connect("TLS handshake timed out".into()));
                }
            }
        }
    };
    Ok(TokioIo::new(stream))
}
