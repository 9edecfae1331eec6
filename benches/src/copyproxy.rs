//! An in-process loopback proxy that forwards with one of three copy strategies, and a
//! measurement of their throughput and CPU time (issue 2: copy vs splice).

use crate::backend;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `tokio::io::copy_bidirectional` (8 KiB buffers).
    Tokio,
    /// `proxy::copy::bidirectional`, dp's copy (16 KiB buffers).
    Dp,
    /// splice(2) through a pipe per direction.
    Splice,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Tokio, Strategy::Dp, Strategy::Splice];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Tokio => "tokio::io::copy_bidirectional",
            Strategy::Dp => "proxy::copy::bidirectional",
            Strategy::Splice => "splice(2)",
        }
    }
}

/// Forwards one accepted connection to `upstream` with `s`.
pub async fn forward(s: Strategy, mut down: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    down.set_nodelay(true)?;
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    match s {
        Strategy::Tokio => {
            tokio::io::copy_bidirectional(&mut down, &mut up).await?;
        }
        Strategy::Dp => {
            let (_, _, err) =
                proxy::copy::bidirectional(&mut down, &mut up, vec![0u8; proxy::copy::BUF_SIZE], 0, None).await;
            if let Some(e) = err {
                return Err(e);
            }
        }
        Strategy::Splice => {
            // dp's own splice path (proxy/src/splice.rs), as the ingress uses it.
            let (_, _, err) = proxy::splice::bidirectional(&down, &up, None).await;
            if let Some(e) = err {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Accept loop of the in-process proxy.
pub async fn serve(l: TcpListener, s: Strategy, upstream: SocketAddr) {
    while let Ok((c, _)) = l.accept().await {
        tokio::spawn(forward(s, c, upstream));
    }
}

/// A source: every connection gets `bytes` bytes, then end of stream.
pub async fn source(l: TcpListener, bytes: u64) {
    while let Ok((mut c, _)) = l.accept().await {
        tokio::spawn(async move {
            let _ = c.set_nodelay(true);
            let buf = vec![0x5au8; backend::CHUNK];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if c.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = c.shutdown().await;
            // Wait for the client to close so the proxy sees both ends.
            let mut b = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await;
        });
    }
}

/// `conns` clients each read `per_conn` bytes through `addr` in parallel; returns the
/// bytes received and the wall time. Bounded by `limit`.
pub async fn download(addr: SocketAddr, conns: usize, per_conn: u64, limit: Duration) -> (u64, Duration) {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(addr).await else { return 0 };
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while total < per_conn {
                    match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => total += n as u64,
                        _ => break,
                    }
                }
                let _ = s.shutdown().await;
                total
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    (total, start.elapsed())
}

/// CPU time (user + system) of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    #[allow(unsafe_code)]
    // SAFETY: clock_gettime writes into the struct we pass.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts)
    };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Pins the calling thread to `cpu` (best effort; ignored when the CPU does not exist).
pub fn pin_to(cpu: usize) {
    #[allow(unsafe_code)]
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CopyResult {
    pub bytes: u64,
    pub wall: Duration,
    /// CPU time of the proxy's thread (user + system).
    pub proxy_cpu: Duration,
}

impl CopyResult {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.wall.as_secs_f64() / 1e9
    }
    /// Proxy CPU seconds per GiB forwarded.
    pub fn cpu_s_per_gib(&self) -> f64 {
        self.proxy_cpu.as_secs_f64() / (self.bytes as f64 / (1u64 << 30) as f64)
    }
}

/// Runs the in-process proxy with `s` on its own thread (pinned to `proxy_cpu`) and
/// `conns` downloads of `per_conn` bytes through it from this thread's runtime.
pub fn measure(
    s: Strategy,
    conns: usize,
    per_conn: u64,
    limit: Duration,
    proxy_cpu: Option<usize>,
) -> anyhow::Result<CopyResult> {
    let load = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let src = load.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let src_addr = src.local_addr()?;
    let std_l = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_l.set_nonblocking(true)?;
    let proxy_addr = std_l.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy = std::thread::spawn(move || -> anyhow::Result<Duration> {
        if let Some(cpu) = proxy_cpu {
            pin_to(cpu);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let before = thread_cpu();
        rt.block_on(async move {
            let l = TcpListener::from_std(std_l)?;
            tokio::select! {
                _ = serve(l, s, src_addr) => {}
                _ = stop_rx => {}
            }
            anyhow::Ok(())
        })?;
        Ok(thread_cpu() - before)
    });
    let (bytes, wall) = load.block_on(async move {
        tokio::spawn(source(src, per_conn));
        download(proxy_addr, conns, per_conn, limit).await
    });
    // Let the proxy see both ends close before stopping it.
    std::thread::sleep(Duration::from_millis(50));
    let _ = stop_tx.send(());
    let proxy_cpu = proxy.join().map_err(|_| anyhow::anyhow!("proxy thread panicked"))??;
    Ok(CopyResult { bytes, wall, proxy_cpu })
}
