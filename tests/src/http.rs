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
/// Sends one HTTP/1.1 POST with `body` on a new connection.
pub async fn post(addr: SocketAddr, host: &str, path: &str, body: &[u8]) -> Got {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    got(sender.send_request(req).await.unwrap()).await.expect("a whole response")
}

/// Sends one HTTP/2 request in clear text with prior knowledge (h2c) on a new connection.
pub async fn h2c_get(addr: SocketAddr, authority: &str, path: &str) -> Got {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder().uri(format!("http://{authority}{path}")).body(Full::new(Bytes::new())).unwrap();
    let res = sender.send_request(req).await.unwrap();
    got(res).await.expect("a whole response")
}

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

/// Reads a response into a [`Got`].
async fn got(res: Response<Incoming>) -> Option<Got> {
    let status = res.status().as_u16();
    let headers =
        res.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string())).collect();
    let body = String::from_utf8_lossy(&res.into_body().collect().await.ok()?.to_bytes()).into_owned();
    Some(Got { status, headers, body })
}

/// A kept-alive HTTP/1.1 connection over TLS (SNI `sni`, the client certificate of `cfg`),
/// for requests through a TLS-terminating HTTP chain. Every step gives `None` when the
/// proxy refuses (handshake failure, the connection closed before an answer); a step
/// that hangs past [`crate::WAIT`] fails the test.
pub struct TlsClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl TlsClient {
    pub async fn connect(addr: SocketAddr, sni: &str, cfg: Arc<rustls::ClientConfig>) -> Option<TlsClient> {
        let fut = async {
            let s = tokio::net::TcpStream::connect(addr).await.ok()?;
            let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("a DNS-valid SNI");
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, s).await.ok()?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.ok()?;
            tokio::spawn(conn);
            Some(TlsClient { sender })
        };
        tokio::time::timeout(crate::WAIT, fut).await.expect("TLS connect through the proxy hung")
    }

    /// Whether the proxy closed the connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<Got> {
        let fut = async {
            self.sender.ready().await.ok()?;
            let mut b = Request::builder().uri(path).header("host", host);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let res = self.sender.send_request(b.body(Full::new(Bytes::new())).unwrap()).await.ok()?;
            got(res).await
        };
        tokio::time::timeout(crate::WAIT, fut).await.expect("a request through the proxy hung")
    }
}

/// One request on a new TLS connection: `None` when the proxy refused it before answering.
pub async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
) -> Option<Got> {
    TlsClient::connect(addr, sni, cfg).await?.get(host, path, &[]).await
}

/// A client certificate and key written to files, for curl.
pub struct CurlIdentity {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl CurlIdentity {
    pub fn write(dir: &std::path::Path, name: &str, cert_pem: &str, key_pem: &str) -> CurlIdentity {
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        CurlIdentity { cert, key }
    }
}

/// One answer curl got: status, body and content type; `None` when the proxy refused
/// (handshake failure, connection closed: curl's status 000).
pub type CurlAnswer = Option<(u16, String, String)>;

const CURL_MARK: &str = "\n@@curl@@";

/// GETs `paths` in order with curl over TLS with the SNI `sni` (any name, Kuma's
/// `sni.extsvc.<mesh>.<zone>.<name>.80` included, which rustls refuses to send), through
/// `addr`, presenting `id` (or no certificate), with `host` as the Host header. One curl
/// process: the requests share kept-alive connections.
pub async fn curl_tls(
    addr: SocketAddr,
    sni: &str,
    id: Option<&CurlIdentity>,
    host: &str,
    paths: &[&str],
) -> Vec<CurlAnswer> {
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "-k".into(),
        "--max-time".into(),
        crate::WAIT.as_secs().to_string(),
        "--resolve".into(),
        format!("{sni}:{}:{}", addr.port(), addr.ip()),
        "-H".into(),
        format!("host: {host}"),
        "-w".into(),
        format!("{CURL_MARK}%{{http_code}} %{{content_type}}\n"),
    ];
    if let Some(id) = id {
        args.extend(["--cert".into(), id.cert.display().to_string(), "--key".into(), id.key.display().to_string()]);
    }
    for p in paths {
        args.push(format!("https://{sni}:{}{p}", addr.port()));
    }
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl").args(&args).output().expect("curl runs")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut answers = vec![];
    let mut rest = text.as_str();
    while let Some((body, after)) = rest.split_once(CURL_MARK) {
        let (line, next) = after.split_once('\n').unwrap_or((after, ""));
        let (code, ct) = line.split_once(' ').unwrap_or((line, ""));
        let code: u16 = code.parse().expect("curl's http_code");
        answers.push((code != 0).then(|| (code, body.to_string(), ct.to_string())));
        rest = next;
    }
    assert_eq!(answers.len(), paths.len(), "curl answered {} of {} requests: {text}", answers.len(), paths.len());
    answers
}

/// One GET with `openssl s_client` (`Connection: close`), which sends the SNI exactly as
/// given (curl lower-cases the host it puts there): status, body and content type, or
/// `None` when the proxy refused.
pub async fn openssl_get(addr: SocketAddr, sni: &str, id: Option<&CurlIdentity>, host: &str, path: &str) -> CurlAnswer {
    let mut args: Vec<String> = vec![
        "s_client".into(),
        "-quiet".into(),
        "-ign_eof".into(),
        "-connect".into(),
        addr.to_string(),
        "-servername".into(),
        sni.into(),
    ];
    if let Some(id) = id {
        args.extend(["-cert".into(), id.cert.display().to_string(), "-key".into(), id.key.display().to_string()]);
    }
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl runs");
        child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
        child.wait_with_output().expect("openssl ends")
    });
    let out = tokio::time::timeout(crate::WAIT, out).await.expect("openssl s_client hung").unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let ct = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map_or(String::new(), |(_, v)| v.trim().to_string());
    Some((status, body.to_string(), ct))
}
