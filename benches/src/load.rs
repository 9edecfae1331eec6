//! Load scenarios. Every loop is bounded by a deadline and by a count.

use crate::{backend, hello, tls};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Upper bound on the connections one handshake test opens.
const MAX_HANDSHAKES: u64 = 5_000_000;
/// Bound on any single network wait inside a test.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of `names` names the k-th connection uses: a stride through all of them.
pub fn pick(k: u64, names: usize) -> usize {
    ((k.wrapping_mul(7919)) % names.max(1) as u64) as usize
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Handshakes {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

/// `workers` loops, until `dur` is over: connect, full TLS handshake with SNI, send one
/// byte, read it back, close.
pub async fn handshakes(
    addr: SocketAddr,
    names: usize,
    cfg: Arc<ClientConfig>,
    workers: usize,
    dur: Duration,
) -> Handshakes {
    let start = Instant::now();
    let deadline = start + dur;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for _ in 0..workers {
        let (cfg, next) = (cfg.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let connector = TlsConnector::from(cfg);
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= MAX_HANDSHAKES {
                    break;
                }
                let name = ServerName::try_from(tls::name(pick(k, names))).expect("valid name");
                let one = async {
                    let s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    let mut t = connector.connect(name, s).await?;
                    t.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    t.read_exact(&mut b).await?;
                    std::io::Result::Ok(())
                };
                match tokio::time::timeout(IO_TIMEOUT, one).await {
                    Ok(Ok(())) => ok += 1,
                    _ => errors += 1,
                }
            }
            (ok, errors)
        }));
    }
    let mut r = Handshakes::default();
    for t in tasks {
        if let Ok((ok, errors)) = t.await {
            r.ok += ok;
            r.errors += errors;
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// Opens a plain-bytes session: synthetic hello for `name`, then the command byte.
pub async fn session(addr: SocketAddr, name: &str, cmd: u8) -> std::io::Result<TcpStream> {
    let mut s = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await??;
    s.set_nodelay(true)?;
    let mut first = hello::client_hello(name);
    first.push(cmd);
    s.write_all(&first).await?;
    Ok(s)
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Bulk {
    pub bytes: u64,
    pub elapsed: Duration,
    pub errors: u64,
}

impl Bulk {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// `conns` downloads in parallel for `dur`; counts the bytes received.
pub async fn bulk(addr: SocketAddr, names: usize, conns: usize, dur: Duration) -> Bulk {
    let mut streams = vec![];
    let mut errors = 0;
    for i in 0..conns {
        match session(addr, &tls::name(pick(i as u64, names)), backend::DOWNLOAD).await {
            Ok(s) => streams.push(s),
            Err(_) => errors += 1,
        }
    }
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while Instant::now() < deadline {
                    match tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => total += n as u64,
                        _ => return (total, 1u64),
                    }
                }
                (total, 0)
            })
        })
        .collect();
    let mut bytes = 0;
    for t in tasks {
        if let Ok((b, e)) = t.await {
            bytes += b;
            errors += e;
        }
    }
    Bulk { bytes, elapsed: start.elapsed(), errors }
}

/// Request/response latencies (µs, sorted) at a fixed total rate: `conns` echo
/// sessions, each sending a 64-byte request every `conns / rate` seconds and waiting
/// for the 64 bytes back.
pub async fn latency(addr: SocketAddr, names: usize, conns: usize, rate: u32, dur: Duration) -> (Vec<u32>, u64) {
    let interval = Duration::from_secs_f64(conns as f64 / f64::from(rate.max(1)));
    let per_conn = (dur.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    let mut tasks = vec![];
    for i in 0..conns {
        let name = tls::name(pick(i as u64, names));
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_conn);
            let Ok(mut s) = session(addr, &name, backend::ECHO).await else {
                return (samples, 1u64);
            };
            let req = [0x61u8; 64];
            let mut resp = [0u8; 64];
            // Warm the path once, then spread the connections' phases over the interval.
            let warm = async {
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await
            };
            if !matches!(tokio::time::timeout(IO_TIMEOUT, warm).await, Ok(Ok(_))) {
                return (samples, 1);
            }
            let start = tokio::time::Instant::now() + interval.mul_f64(i as f64 / conns as f64);
            for k in 0..per_conn {
                tokio::time::sleep_until(start + interval * k as u32).await;
                let t0 = Instant::now();
                let one = async {
                    s.write_all(&req).await?;
                    s.read_exact(&mut resp).await
                };
                match tokio::time::timeout(IO_TIMEOUT, one).await {
                    Ok(Ok(_)) => samples.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    _ => return (samples, 1),
                }
            }
            (samples, 0)
        }));
    }
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        if let Ok((s, e)) = t.await {
            all.extend(s);
            errors += e;
        }
    }
    all.sort_unstable();
    (all, errors)
}

/// The `q` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

/// Opens `n` echo sessions and completes one exchange on each; they stay open while
/// the returned streams live.
pub async fn hold(addr: SocketAddr, names: usize, n: usize) -> (Vec<TcpStream>, u64) {
    let mut open = vec![];
    let mut errors = 0;
    for i in 0..n {
        let one = async {
            let mut s = session(addr, &tls::name(pick(i as u64, names)), backend::ECHO).await?;
            s.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            std::io::Result::Ok(s)
        };
        match tokio::time::timeout(IO_TIMEOUT, one).await {
            Ok(Ok(s)) => open.push(s),
            _ => errors += 1,
        }
    }
    (open, errors)
}
