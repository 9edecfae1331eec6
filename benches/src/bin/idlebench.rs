//! `idlebench`: memory per idle passthrough connection, dp vs Envoy vs HAProxy in one run
//! (issue 14). Run it through `scripts/bench-idle.sh`, which raises the descriptor limits
//! and pins the processes.
//!
//! ```text
//! idlebench --dp PATH [--envoy PATH] [--haproxy PATH] [--conns 50000] [--proxy-cpu 0]
//!           [--out-md FILE] [--json FILE]
//! ```
//!
//! For each proxy in turn: fresh TCP backends (four ports, one round-robin cluster, so the
//! proxy's upstream connections do not run out of ephemeral ports), the proxy configured
//! as a zone ingress (tls_inspector, a filter chain for the server name, tcp_proxy; the
//! same routes for each, with connection limits raised out of the way), a warm-up of a
//! few hundred connections, then `--conns` connections from 127.<n>.0.0/24 source
//! addresses (5,000 per address), each sending one ClientHello and then nothing. Once the
//! backends hold every connection with its ClientHello, the proxy's VmRSS is read until
//! it settles. Reported: VmRSS before and with the connections, the difference per
//! connection, the proxy's descriptors, and the machine's slab memory (kernel socket and
//! pipe objects; the clients' and backends' sockets are in it too, the same for every
//! proxy, and other work on the machine moves it, so it is indicative only).

use anyhow::{Context, bail};
use benches::hello::client_hello;
use benches::procstat::memory_kib;
use benches::targets::{free_port, http_get};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const SNI: &str = "backend.bench";
const BACKEND_PORTS: usize = 4;
const PER_SOURCE: usize = 5000;
const WARMUP: usize = 300;
const IN_FLIGHT: usize = 256;

struct Args {
    dp: PathBuf,
    envoy: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    conns: usize,
    cpu: usize,
    out_md: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args { dp: "dp".into(), envoy: None, haproxy: None, conns: 50_000, cpu: 0, out_md: None, json: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--dp" => a.dp = v.into(),
            "--envoy" => a.envoy = Some(v.into()),
            "--haproxy" => a.haproxy = Some(v.into()),
            "--conns" => a.conns = v.parse().context("--conns")?,
            "--proxy-cpu" => a.cpu = v.parse().context("--proxy-cpu")?,
            "--out-md" => a.out_md = Some(v.into()),
            "--json" => a.json = Some(v.into()),
            other => bail!("unexpected argument `{other}`"),
        }
    }
    Ok(a)
}

/// TCP backends that read what comes and hold the connection until the other side closes.
#[derive(Default)]
struct Backends {
    addrs: Vec<SocketAddr>,
    /// Connections whose first bytes (the ClientHello) arrived.
    greeted: Arc<AtomicU64>,
    /// Connections open now.
    live: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Backends {
    async fn start() -> anyhow::Result<Backends> {
        let mut b = Backends::default();
        for _ in 0..BACKEND_PORTS {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            b.addrs.push(l.local_addr()?);
            let (greeted, live) = (b.greeted.clone(), b.live.clone());
            b.tasks.push(tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let (greeted, live) = (greeted.clone(), live.clone());
                    live.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let mut first = true;
                        while let Ok(n @ 1..) = s.read(&mut buf).await {
                            if std::mem::take(&mut first) && n > 0 {
                                greeted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        live.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }));
        }
        Ok(b)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dp,
    Envoy,
    Haproxy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dp => "dp",
            Kind::Envoy => "Envoy",
            Kind::Haproxy => "HAProxy",
        }
    }
}

fn socket(a: SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

/// The zone-ingress listener (Envoy v3 JSON, as dp and Envoy read it).
fn listener(port: u16) -> Value {
    json!({
        "name": "ingress",
        "address": socket(SocketAddr::from(([127, 0, 0, 1], port))),
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
        "filter_chains": [{
            "filter_chain_match": {"server_names": [SNI], "transport_protocol": "tls"},
            "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "backend", "cluster": "backend"}}]
        }]
    })
}

/// One STATIC round-robin cluster over the backends, with Envoy's default circuit
/// breakers (1,024 connections, pending connections and requests; dp has the same
/// connection default) raised out of the way.
fn cluster(backends: &[SocketAddr]) -> Value {
    let eps: Vec<Value> = backends.iter().map(|a| json!({"endpoint": {"address": socket(*a)}})).collect();
    json!({
        "name": "backend", "type": "STATIC", "connect_timeout": "5s",
        "circuit_breakers": {"thresholds": [{"max_connections": 1_000_000, "max_pending_requests": 1_000_000,
            "max_requests": 1_000_000}]},
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": eps}]}
    })
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for<T>(child: &mut Child, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if let Some(status) = child.try_wait()? {
            bail!("waiting for {what}: the process exited ({status})");
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(kind: Kind, program: &Path, a: &Args, backends: &[SocketAddr], dir: &Path) -> anyhow::Result<Proxy> {
    let cpu = a.cpu;
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = std::fs::File::create(dir.join("log"))?;
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(program).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let admin_path = dir.join("admin-address");
    match kind {
        Kind::Dp => {
            let mut l = listener(port);
            l["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
            let mut cl = cluster(backends);
            cl["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            let file = dir.join("xds.json");
            std::fs::write(&file, serde_json::to_vec(&json!({"version_info": "1", "resources": [cl, l]}))?)?;
            c.args(["run", "--proxy-type=ingress", "--xds-file"])
                .arg(&file)
                .args(["--admin-address", "127.0.0.1:0", "--admin-address-path"])
                .arg(&admin_path)
                .args(["--readiness-port", "0", "--concurrency", "1"]);
        }
        Kind::Envoy => {
            let boot = json!({
                "node": {"id": "idle-bench", "cluster": "bench"},
                "admin": {"address": socket(SocketAddr::from(([127, 0, 0, 1], 0)))},
                "static_resources": {"listeners": [listener(port)], "clusters": [cluster(backends)]},
            });
            let file = dir.join("envoy.json");
            std::fs::write(&file, serde_json::to_vec(&boot)?)?;
            c.arg("-c")
                .arg(&file)
                .args(["--concurrency", "1", "--disable-hot-restart", "--log-level", "warn", "--admin-address-path"])
                .arg(&admin_path);
        }
        Kind::Haproxy => {
            // maxconn just above the run's connections: HAProxy sizes its descriptor
            // needs (and refuses to start beyond RLIMIT_NOFILE) from it.
            let maxconn = a.conns + WARMUP + 1000;
            let mut cfg = format!(
                "global\n  nbthread 1\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 1h\n  timeout server 1h\n\nfrontend ingress\n  bind {addr}\n  maxconn {maxconn}\n  \
                 tcp-request inspect-delay 15s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  \
                 use_backend backend if {{ req.ssl_sni -m str {SNI} }}\n\nbackend backend\n  balance roundrobin\n"
            );
            for (i, b) in backends.iter().enumerate() {
                let _ = writeln!(cfg, "  server s{i} {b}");
            }
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, cfg)?;
            c.arg("-db").arg("-f").arg(&file);
        }
    }
    let mut child = c.spawn().with_context(|| format!("starting {}", program.display()))?;
    if kind != Kind::Haproxy {
        let admin: SocketAddr = wait_for(&mut child, "the admin address", || {
            std::fs::read_to_string(&admin_path).ok()?.trim().parse().ok()
        })?;
        wait_for(&mut child, "/ready", || (http_get(admin, "/ready").ok()?.0 == 200).then_some(()))?;
    }
    wait_for(&mut child, "the listener", || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok().map(|_| ())
    })?;
    Ok(Proxy { child, addr, dir: dir.to_path_buf() })
}

/// Opens `n` connections to `to` from `127.<net>.0.<1..>` (5,000 per address), each
/// sending the ClientHello; returns them open.
async fn open(to: SocketAddr, n: usize, net: u8) -> anyhow::Result<Vec<TcpStream>> {
    let hello = Arc::new(client_hello(SNI));
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let src = Ipv4Addr::new(127, net, 0, u8::try_from(1 + i / PER_SOURCE).context("too many connections")?);
        let (hello, permit) = (hello.clone(), sem.clone().acquire_owned().await?);
        set.spawn(async move {
            let _permit = permit;
            let s = TcpSocket::new_v4()?;
            s.set_reuseaddr(true)?;
            s.bind(SocketAddr::from((src, 0)))?;
            let mut s = s.connect(to).await?;
            s.write_all(&hello).await?;
            Ok::<_, std::io::Error>(s)
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        out.push(r?.context("opening a connection")?);
    }
    Ok(out)
}

async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// VmRSS in KiB once two readings a second apart agree within 0.2 % (10 s at most).
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let mut last = memory_kib(pid).context("VmRSS")?.0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = memory_kib(pid).context("VmRSS")?.0;
        if now.abs_diff(last) * 500 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn slab_kib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[derive(Debug)]
struct Figures {
    proxy: &'static str,
    rss_before_kib: u64,
    rss_with_kib: u64,
    hwm_kib: u64,
    fds_before: usize,
    fds_with: usize,
    slab_delta_kib: i64,
    open_secs: f64,
}

impl Figures {
    fn per_conn_bytes(&self, conns: usize) -> f64 {
        (self.rss_with_kib as f64 - self.rss_before_kib as f64) * 1024.0 / conns as f64
    }
}

async fn measure(kind: Kind, program: &Path, a: &Args, net: u8, work: &Path) -> anyhow::Result<Figures> {
    let backends = Backends::start().await?;
    let proxy = start(kind, program, a, &backends.addrs, &work.join(kind.name()))?;
    let pid = proxy.child.id();
    let result = async {
        // Warm-up: every code path the connections take, run once.
        let warm = open(proxy.addr, WARMUP, net).await?;
        wait_until("the warm-up connections upstream", Duration::from_secs(30), || {
            backends.greeted.load(Ordering::Relaxed) >= WARMUP as u64
        })
        .await?;
        drop(warm);
        wait_until("the warm-up connections to close", Duration::from_secs(30), || {
            backends.live.load(Ordering::Relaxed) == 0
        })
        .await?;
        let rss_before = settled_rss(pid).await?;
        let fds_before = fd_count(pid);
        let slab_before = slab_kib();
        let t = Instant::now();
        let conns = open(proxy.addr, a.conns, net + 1).await?;
        let want = (WARMUP + a.conns) as u64;
        wait_until("every connection's ClientHello at a backend", Duration::from_secs(120), || {
            backends.greeted.load(Ordering::Relaxed) >= want
        })
        .await
        .with_context(|| {
            let (g, l) = (backends.greeted.load(Ordering::Relaxed), backends.live.load(Ordering::Relaxed));
            format!("{g} of {want} ClientHellos arrived, {l} connections open at the backends")
        })?;
        let open_secs = t.elapsed().as_secs_f64();
        let rss_with = settled_rss(pid).await?;
        let hwm = memory_kib(pid).map_or(0, |m| m.1);
        let fds_with = fd_count(pid);
        let slab_delta = slab_kib() as i64 - slab_before as i64;
        if backends.live.load(Ordering::Relaxed) < a.conns as u64 {
            bail!(
                "{}: only {} of {} connections open at the backends",
                kind.name(),
                backends.live.load(Ordering::Relaxed),
                a.conns
            );
        }
        drop(conns);
        wait_until("the connections to close", Duration::from_secs(120), || backends.live.load(Ordering::Relaxed) == 0)
            .await?;
        Ok(Figures {
            proxy: kind.name(),
            rss_before_kib: rss_before,
            rss_with_kib: rss_with,
            hwm_kib: hwm,
            fds_before,
            fds_with,
            slab_delta_kib: slab_delta,
            open_secs,
        })
    }
    .await;
    result.with_context(|| format!("{} (log in {})", kind.name(), proxy.dir.display()))
}

fn markdown(a: &Args, figs: &[Figures]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| proxy | VmRSS before | VmRSS with {} idle connections | per connection | VmHWM | descriptors (before → with) | slab Δ (machine) | time to open |",
        a.conns
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for f in figs {
        let _ = writeln!(
            s,
            "| {} | {:.1} MiB | {:.1} MiB | {:.0} B | {:.1} MiB | {} → {} ({:.1}/conn) | {:+.0} MiB | {:.1} s |",
            f.proxy,
            f.rss_before_kib as f64 / 1024.0,
            f.rss_with_kib as f64 / 1024.0,
            f.per_conn_bytes(a.conns),
            f.hwm_kib as f64 / 1024.0,
            f.fds_before,
            f.fds_with,
            (f.fds_with as f64 - f.fds_before as f64) / a.conns as f64,
            f.slab_delta_kib as f64 / 1024.0,
            f.open_secs,
        );
    }
    let dp = figs.iter().find(|f| f.proxy == "dp");
    for other in figs.iter().filter(|f| f.proxy != "dp") {
        if let Some(dp) = dp {
            let _ = writeln!(
                s,
                "\ndp / {}: {:.2}× the memory per idle connection, {:.2}× the RSS with {} connections.",
                other.proxy,
                dp.per_conn_bytes(a.conns) / other.per_conn_bytes(a.conns),
                dp.rss_with_kib as f64 / other.rss_with_kib as f64,
                a.conns
            );
        }
    }
    s
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let work = std::env::temp_dir().join(format!("idlebench-{}", std::process::id()));
    let mut runs: Vec<(Kind, PathBuf)> = vec![(Kind::Dp, a.dp.clone())];
    runs.extend(a.envoy.clone().map(|p| (Kind::Envoy, p)));
    runs.extend(a.haproxy.clone().map(|p| (Kind::Haproxy, p)));
    let mut figs = vec![];
    for (i, (kind, program)) in runs.iter().enumerate() {
        // Fresh source addresses for each proxy: the last one's connections may still sit
        // in TIME_WAIT.
        let net = 10 + 2 * i as u8;
        eprintln!("idlebench: {} with {} idle connections", kind.name(), a.conns);
        let f = rt.block_on(measure(*kind, program, &a, net, &work))?;
        eprintln!(
            "idlebench: {}: VmRSS {} KiB -> {} KiB, {:.0} B per connection, {} -> {} descriptors",
            f.proxy,
            f.rss_before_kib,
            f.rss_with_kib,
            f.per_conn_bytes(a.conns),
            f.fds_before,
            f.fds_with
        );
        figs.push(f);
    }
    let md = markdown(&a, &figs);
    print!("{md}");
    if let Some(p) = &a.out_md {
        std::fs::write(p, &md)?;
    }
    if let Some(p) = &a.json {
        let v: Vec<Value> = figs
            .iter()
            .map(|f| {
                json!({
                    "proxy": f.proxy, "connections": a.conns,
                    "rss_before_kib": f.rss_before_kib, "rss_with_kib": f.rss_with_kib, "hwm_kib": f.hwm_kib,
                    "bytes_per_connection": f.per_conn_bytes(a.conns).round(),
                    "fds_before": f.fds_before, "fds_with": f.fds_with,
                    "slab_delta_kib": f.slab_delta_kib, "open_secs": f.open_secs,
                })
            })
            .collect();
        std::fs::write(p, serde_json::to_vec_pretty(&v)?)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
