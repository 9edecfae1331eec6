//! The client side of the sidecar mTLS benchmark (`benches/mtls_bench.py`, run by
//! `scripts/bench-mtls.sh`): a plain echo app, a mesh mTLS handshake load and a
//! fixed-rate request load. BoringSSL on the client too: rustls cannot send Kuma's tag
//! SNI (`backend{mesh=default}`).

use boring::pkey::PKey;
use boring::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslSessionCacheMode, SslVerifyMode, SslVersion};
use boring::x509::X509;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on any single network wait (30 s: sidecars under valgrind's cache simulation, in
/// benches/relay_instructions.py --cache-sim, take over 10 s to answer their first request).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of one request (and of its echo).
pub const REQUEST: usize = 64;

/// A plain TCP echo app (the workload behind the inbound sidecar).
pub async fn echo_app(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// How the handshake client presents itself.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// Sent verbatim as SNI (Kuma's tag SNI, or a DNS name for the rustls-era dp).
    pub sni: String,
    pub alpn: Vec<String>,
    /// `SSL_CTX_set1_curves_list` syntax; None = BoringSSL's defaults (what dp's own
    /// outbound offers).
    pub curves: Option<String>,
    /// Trust anchor for the server's chain; None = the server certificate is not checked
    /// (the server's work, which is what is measured, is the same either way).
    pub ca: Option<Vec<u8>>,
    pub tls13_only: bool,
}

/// A client context with the mesh identity in `cert` (PEM chain) and `key` (PEM), no
/// session cache and no resumption: every connection is a full handshake.
pub fn client_context(cert: &Path, key: &Path, o: &ClientOpts) -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::tls())?;
    let chain = X509::stack_from_pem(&std::fs::read(cert)?)?;
    let (leaf, rest) = chain.split_first().ok_or_else(|| anyhow::anyhow!("{}: no certificate", cert.display()))?;
    b.set_certificate(leaf)?;
    for c in rest {
        b.add_extra_chain_cert(c.clone())?;
    }
    let key = PKey::private_key_from_pem(&std::fs::read(key)?)?;
    b.set_private_key(&key)?;
    b.check_private_key()?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_min_proto_version(Some(if o.tls13_only { SslVersion::TLS1_3 } else { SslVersion::TLS1_2 }))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    if let Some(c) = &o.curves {
        b.set_curves_list(c)?;
    }
    if !o.alpn.is_empty() {
        let mut wire = vec![];
        for p in &o.alpn {
            wire.push(u8::try_from(p.len())?);
            wire.extend_from_slice(p.as_bytes());
        }
        b.set_alpn_protos(&wire)?;
    }
    match &o.ca {
        Some(pem) => {
            for c in X509::stack_from_pem(pem)? {
                b.cert_store_mut().add_cert(c)?;
            }
            b.set_verify(SslVerifyMode::PEER);
        }
        None => b.set_verify(SslVerifyMode::NONE),
    }
    Ok(b.build())
}

/// What a handshake negotiated (from the first one that succeeded).
#[derive(Debug, Clone, Default)]
pub struct Negotiated {
    pub version: String,
    pub cipher: String,
    pub group: String,
    pub alpn: String,
}

#[derive(Debug, Default)]
pub struct Handshakes {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub negotiated: Option<Negotiated>,
    pub first_error: Option<String>,
}

impl Handshakes {
    pub fn json(&self) -> Value {
        let n = self.negotiated.clone().unwrap_or_default();
        json!({
            "ok": self.ok, "errors": self.errors, "elapsed_s": self.elapsed.as_secs_f64(),
            "per_s": self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "version": n.version, "cipher": n.cipher, "group": n.group, "alpn": n.alpn,
            "first_error": self.first_error,
        })
    }
}

/// One connection: connect, full mTLS handshake, one byte to the app and back, close.
async fn one_handshake(addr: SocketAddr, ctx: &SslContext, sni: &str) -> Result<Negotiated, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut ssl = Ssl::new(ctx).map_err(|e| e.to_string())?;
    ssl.set_hostname(sni).map_err(|e| e.to_string())?;
    let mut t = tokio_boring::SslStreamBuilder::new(ssl, s).connect().await.map_err(|e| format!("handshake: {e}"))?;
    // In TLS 1.3 the server checks the client certificate after the client's side of the
    // handshake is done: the echoed byte is what proves it was accepted.
    t.write_all(b"x").await.map_err(|e| format!("write: {e}"))?;
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.map_err(|e| format!("read (certificate refused?): {e}"))?;
    let ssl = t.ssl();
    let neg = Negotiated {
        version: ssl.version_str().to_string(),
        cipher: ssl.current_cipher().map(|c| c.name().to_string()).unwrap_or_default(),
        group: ssl.curve_name().unwrap_or("").to_string(),
        alpn: ssl.selected_alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default(),
    };
    let _ = t.shutdown().await;
    Ok(neg)
}

/// `workers` loops until `dur` is over, each doing [`one_handshake`] back to back.
pub async fn handshakes(addr: SocketAddr, ctx: SslContext, sni: String, workers: usize, dur: Duration) -> Handshakes {
    let start = Instant::now();
    let deadline = start + dur;
    let (ctx, sni) = (Arc::new(ctx), Arc::new(sni));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for _ in 0..workers {
        let (ctx, sni, errors) = (ctx.clone(), sni.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut neg, mut first_error) = (0u64, None, None);
            while Instant::now() < deadline {
                match tokio::time::timeout(IO_TIMEOUT, one_handshake(addr, &ctx, &sni)).await {
                    Ok(Ok(n)) => {
                        ok += 1;
                        neg.get_or_insert(n);
                    }
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                        // A refused client is refused at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| "timed out".to_string());
                    }
                }
            }
            (ok, neg, first_error)
        }));
    }
    let mut r = Handshakes::default();
    for t in tasks {
        if let Ok((ok, neg, e)) = t.await {
            r.ok += ok;
            if r.negotiated.is_none() {
                r.negotiated = neg;
            }
            if r.first_error.is_none() {
                r.first_error = e;
            }
        }
    }
    r.errors = errors.load(Ordering::Relaxed);
    r.elapsed = start.elapsed();
    r
}

/// Latencies in µs (sorted) and the number of failed requests.
#[derive(Debug, Default)]
pub struct Latencies {
    pub samples: Vec<u32>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Latencies {
    pub fn json(&self) -> Value {
        let q = |p| crate::load::quantile(&self.samples, p);
        json!({
            "requests": self.samples.len(), "errors": self.errors, "first_error": self.first_error,
            "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999),
            "max_us": self.samples.last().copied().unwrap_or(0),
        })
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// Requests over `conns` long-lived plain connections to `addr` at `rate` requests per
/// second in all: each connection sends [`REQUEST`] bytes every `conns / rate` seconds and
/// waits for the echo. Measuring starts once every connection has made one warm-up
/// exchange: the sidecars' upstream handshakes (one per connection) then lie before the
/// first measured request, not under the early connections' first requests, which in a
/// one-second slice would be most of its p99.
pub async fn latency_kept(addr: SocketAddr, conns: usize, rate: u32, dur: Duration) -> Latencies {
    let interval = Duration::from_secs_f64(conns as f64 / f64::from(rate.max(1)));
    let per_conn = (dur.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    let warm = Arc::new(tokio::sync::Barrier::new(conns));
    let mut tasks = vec![];
    for i in 0..conns {
        let warm = warm.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_conn);
            let req = [0x61u8; REQUEST];
            let mut resp = [0u8; REQUEST];
            let open = async {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await?;
                std::io::Result::Ok(s)
            };
            let opened = tokio::time::timeout(IO_TIMEOUT, open).await;
            // Every task reaches the barrier, a failed one too, so none waits forever.
            let released = tokio::time::timeout(IO_TIMEOUT, warm.wait()).await.is_ok();
            let mut s = match opened {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return (samples, 1u64, Some(format!("open: {e}"))),
                Err(_) => return (samples, 1, Some("open: timed out".to_string())),
            };
            if !released {
                return (samples, 1, Some("open: the other connections' warm-up timed out".to_string()));
            }
            // Spread the connections' phases over the interval.
            let start = tokio::time::Instant::now() + interval.mul_f64(i as f64 / conns as f64);
            for k in 0..per_conn {
                tokio::time::sleep_until(start + interval * k as u32).await;
                let t0 = Instant::now();
                let one = async {
                    s.write_all(&req).await?;
                    s.read_exact(&mut resp).await
                };
                match tokio::time::timeout(IO_TIMEOUT, one).await {
                    Ok(Ok(_)) => samples.push(micros(t0.elapsed())),
                    Ok(Err(e)) => return (samples, 1, Some(format!("request: {e}"))),
                    Err(_) => return (samples, 1, Some("request: timed out".to_string())),
                }
            }
            (samples, 0, None)
        }));
    }
    collect(tasks).await
}

/// One request per new connection, opened at `rate` per second (open loop: a slow
/// request does not delay the next one): connect, send [`REQUEST`] bytes, read the echo,
/// close. The latency runs from when the opener woke up to start the connection, not from
/// the scheduled instant: tokio's timer fires up to a millisecond late, which measured
/// 1.5 ms at p50 for a direct connection when it was counted.
pub async fn latency_new(addr: SocketAddr, rate: u32, dur: Duration) -> Latencies {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let n = (dur.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for k in 0..n {
        let at = start + interval * k as u32;
        tokio::time::sleep_until(at).await;
        let t0 = Instant::now();
        tasks.push(tokio::spawn(async move {
            let one = async {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let req = [0x62u8; REQUEST];
                let mut resp = [0u8; REQUEST];
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await?;
                std::io::Result::Ok(())
            };
            match tokio::time::timeout(IO_TIMEOUT, one).await {
                Ok(Ok(())) => (vec![micros(t0.elapsed())], 0u64, None),
                Ok(Err(e)) => (vec![], 1, Some(format!("request: {e}"))),
                Err(_) => (vec![], 1, Some("request: timed out".to_string())),
            }
        }));
    }
    collect(tasks).await
}

/// What one latency task returns: its samples in µs, its failed requests, its first error.
type Outcome = (Vec<u32>, u64, Option<String>);

async fn collect(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Latencies {
    let mut l = Latencies::default();
    for t in tasks {
        if let Ok((s, e, first)) = t.await {
            l.samples.extend(s);
            l.errors += e;
            if l.first_error.is_none() {
                l.first_error = first;
            }
        }
    }
    l.samples.sort_unstable();
    l
}
