//! DP server: one TLS port for `POST /bootstrap` (HTTP/1.1 or HTTP/2) and gRPC ADS (HTTP/2),
//! dispatched by path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bootstrap::{self, BootstrapRequest, BootstrapResponse};
use crate::components::zone::ZoneCp;

const MAX_BOOTSTRAP_BODY: usize = 2 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 10_000;

pub fn router(cp: Arc<ZoneCp>) -> Router {
    let grpc = tonic::service::Routes::new(crate::xds::service(cp.clone())).prepare().into_axum_router();
    grpc.route("/bootstrap", post(bootstrap_handler).with_state(cp)).fallback(not_found)
}

pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404: Page Not Found").into_response()
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn bootstrap_handler(State(cp): State<Arc<ZoneCp>>, req: Request) -> Response {
    let host = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| {
                // strip the port; keep IPv6 literals in brackets intact for parsing below
                if let Some(stripped) = h.strip_prefix('[') {
                    stripped.split(']').next().unwrap_or_default().to_string()
                } else {
                    h.rsplit_once(':').map_or(h, |(a, _)| a).to_string()
                }
            })
        })
        .unwrap_or_else(|| "localhost".into());
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let wants_json =
        req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"));
    let body = match axum::body::to_bytes(req.into_body(), MAX_BOOTSTRAP_BODY).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "the bootstrap request is larger than 2 MiB".into()),
    };
    let parsed: BootstrapRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let name = parsed.name.clone();
    match bootstrap::handle(&cp, parsed, &host).await {
        Ok((yaml, sidecar)) => {
            tracing::info!(name = %name, host = %host, "bootstrap served");
            if wants_json {
                let resp = BootstrapResponse {
                    bootstrap: base64::engine::general_purpose::STANDARD.encode(yaml.as_bytes()),
                    kuma_sidecar_configuration: sidecar,
                };
                let mut r = (StatusCode::OK, serde_json::to_string(&resp).unwrap_or_default()).into_response();
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            } else {
                let mut r = (StatusCode::OK, yaml).into_response();
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/x-yaml"));
                r
            }
        }
        Err(e) => {
            tracing::warn!(name = %name, status = e.status, message = %e.message, "bootstrap refused");
            text(StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.message)
        }
    }
}

/// Serve HTTP (TLS when `tls` is set) on `listener` until `shutdown` turns true.
/// `per_conn` may decorate the router per connection (e.g. with the peer address).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    per_conn: fn(Router, SocketAddr) -> Router,
    shutdown: watch::Receiver<bool>,
) {
    serve_with(listener, tls, router, per_conn, None, shutdown).await
}

/// [`serve`] with HTTP/2 PINGs every `keepalive` (a peer that does not answer within
/// the same time is dropped): how a KDS server notices a zone behind a dead link.
pub async fn serve_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    per_conn: fn(Router, SocketAddr) -> Router,
    keepalive: Option<Duration>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(per_conn(router.clone(), peer));
        let acceptor = acceptor.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            if let Some(k) = keepalive {
                builder.http2().keep_alive_interval(k).keep_alive_timeout(k);
            }
            match acceptor {
                Some(acc) => {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection error") },
                        _ = shutdown.changed() => {},
                    }
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection error") },
                        _ = shutdown.changed() => {},
                    }
                }
            }
        });
    }
}
