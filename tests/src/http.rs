//! HTTP backends that say who they are and what they got, and a small client, for the
//! tests of dp's HTTP data path.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// How a backend answers a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 with `name` as the body (the default).
    Echo,
    /// Close the connection without answering.
    Reset,
    /// Wait this long, then answer.
    Slow(Duration),
}

#[derive(Clone)]
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    mode: Arc<Mutex<Mode>>,
    /// Requests whose handling was cut short (the client went away).
    pub cancelled: Arc<AtomicUsize>,
}

struct CancelGuard(Arc<AtomicUsize>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl HttpBackend {
    /// An HTTP/1.1 and h2c (prior knowledge) server on an ephemeral loopback port.
    pub async fn start(name: &str) -> HttpBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = HttpBackend {
            name: name.into(),
            addr: l.local_addr().unwrap(),
            seen: Default::default(),
            mode: Arc::new(Mutex::new(Mode::Echo)),
            cancelled: Default::default(),
        };
        let me = b.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(me.clone().serve(s));
            }
        });
        b
    }

    /// The same server on a Unix socket (Envoy's `pipe` endpoints).
    pub async fn start_unix(name: &str, path: &std::path::Path) -> HttpBackend {
        let l = tokio::net::UnixListener::bind(path).unwrap();
        let b = HttpBackend {
            name: name.into(),
            addr: "0.0.0.0:0".parse().unwrap(),
            seen: Default::default(),
            mode: Arc::new(Mutex::new(Mode::Echo)),
            cancelled: Default::default(),
        };
        let me = b.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(me.clone().serve(s));
            }
        });
        b
    }

    async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(self, mut s: S) {
        if *self.mode.lock().unwrap() == Mode::Reset {
            // Read the request, then drop the connection unanswered.
            let mut b = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
            self.seen.lock().unwrap().push(Seen {
                method: "?".into(),
                path: "?".into(),
                version: "?".into(),
                headers: BTreeMap::new(),
                body: vec![],
            });
            return;
        }
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.answer(req).await) }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    }

    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the backend saw no request")
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes().to_vec()).unwrap_or_default();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.path_and_query().map_or("/".to_string(), |p| p.to_string()),
            version: format!("{:?}", parts.version),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect(),
            body,
        });
        if let Some(authority) = parts.uri.authority() {
            // HTTP/2 carries the authority in the URI: show it like a host header.
            let mut seen = self.seen.lock().unwrap();
            let last = seen.last_mut().unwrap();
            last.headers.entry("host".into()).or_insert_with(|| authority.to_string());
        }
        let mode = *self.mode.lock().unwrap();
        if let Mode::Slow(d) = mode {
            let mut guard = CancelGuard(self.cancelled.clone(), false);
            tokio::time::sleep(d).await;
            guard.1 = true;
        }
        let status = parts.uri.path().strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()).unwrap_or(200);
        let mut r = Response::new(Full::new(Bytes::from(self.name.clone())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("x-backend", self.name.parse().unwrap());
        r
    }
}

/// One response, as a client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Sends one HTTP/1.1 request on a new connection (`host` as the Host header).
pub async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder().uri(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let res = sender.send_request(b.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = res.status().as_u16();
    let headers =
        res.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string())).collect();
    let body = String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned();
    Got { status, headers, body }
}

/// A kept-alive HTTP/1.1 connection for many requests.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Got {
        self.sender.ready().await.unwrap();
        let req = Request::builder().uri(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
        let res = self.sender.send_request(req).await.unwrap();
        let status = res.status().as_u16();
        let headers =
            res.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string())).collect();
        let body = String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned();
        Got { status, headers, body }
    }
}
