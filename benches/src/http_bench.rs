//! The HTTP data-path comparison (issue 11): dp vs Envoy (one worker) vs nginx as HTTP/1.1
//! reverse proxies in front of the same backend, driven by `h2load` (Debian's
//! nghttp2-client). Run it through `scripts/bench-http.sh`.
//!
//! Per proxy, pinned to one core: requests per second over kept-alive connections and
//! requests per CPU-second of the proxy (`/proc/<pid>/stat`), p50/p99 at a fixed rate
//! (h2load's per-request log), and the resident set with 1,000 idle kept-alive
//! connections that have each carried one request.

use crate::procstat;
use crate::targets::{free_port, http_get};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the backend answers (nginx `return 200`).
const BODY: &str = "hello from the backend\n";

#[derive(Debug, Clone)]
pub struct Opts {
    pub dp: PathBuf,
    pub envoy: PathBuf,
    pub nginx: PathBuf,
    /// CPU the proxies are pinned to (the caller runs on another).
    pub cpu: usize,
    /// Seconds of each throughput and latency run.
    pub secs: u32,
    /// Kept-alive connections of the throughput run.
    pub conns: u32,
    /// Requests per second of the latency run (all connections together).
    pub rate: u32,
    /// Connections of the latency run.
    pub rate_conns: u32,
    /// Idle kept-alive connections for the memory figure.
    pub idle: usize,
    /// Runs per proxy (the median is reported).
    pub runs: usize,
}

impl Opts {
    pub fn full(dp: PathBuf, envoy: PathBuf, nginx: PathBuf) -> Opts {
        Opts { dp, envoy, nginx, cpu: 0, secs: 10, conns: 32, rate: 4000, rate_conns: 16, idle: 1000, runs: 3 }
    }

    pub fn quick(self) -> Opts {
        Opts { secs: 3, runs: 1, ..self }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dp,
    /// dp at its default log level: one access-log line per request.
    DpLogged,
    Envoy,
    Nginx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Dp => "dp",
            Kind::DpLogged => "dp (access log on)",
            Kind::Envoy => "Envoy",
            Kind::Nginx => "nginx",
        }
    }
}

/// The figures of one proxy.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub rps: f64,
    pub rps_per_core: f64,
    pub cpu_share: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub latency_failed: u64,
    pub rss_base_kib: u64,
    pub rss_idle_kib: u64,
}

impl Figures {
    fn json(&self) -> Value {
        json!({"rps": self.rps, "rps_per_core": self.rps_per_core, "cpu_share": self.cpu_share,
            "p50_us": self.p50_us, "p99_us": self.p99_us, "latency_failed": self.latency_failed,
            "rss_base_kib": self.rss_base_kib, "rss_idle_kib": self.rss_idle_kib})
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let mut s = String::new();
        for f in ["log", "error.log"] {
            if let Ok(all) = std::fs::read_to_string(self.dir.join(f)) {
                let lines: Vec<&str> = all.lines().collect();
                s.push_str(&lines[lines.len().saturating_sub(10)..].join("\n"));
            }
        }
        s
    }
}

fn wait_for<T>(p: &mut Proc, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if let Some(status) = p.child.try_wait()? {
            bail!("waiting for {what}: the process exited ({status}): {}", p.tail());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {}", p.tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connects(addr: SocketAddr) -> Option<()> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok().map(|_| ())
}

/// nginx as the backend (not pinned: it runs with the caller, on the load core).
fn nginx_backend(bin: &Path, dir: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 9000; }}\nhttp {{\n  access_log off;\n  \
         keepalive_requests 10000000;\n  keepalive_timeout 3600s;\n  server {{\n    listen 127.0.0.1:{port};\n    \
         location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
        d = dir.display(),
        body = BODY.trim_end().to_string() + "\\n",
    );
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log"))?)
        .spawn()
        .context("starting the nginx backend")?;
    let mut p = Proc { child, dir: dir.to_path_buf() };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(&mut p, "the backend to listen", || connects(addr))?;
    Ok((p, addr))
}

fn socket(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

/// The same listener for dp and Envoy: an HCM routing everything to `backend`.
fn listener(port: u16) -> Value {
    json!({
        "name": "http",
        "address": socket(SocketAddr::from(([127, 0, 0, 1], port))),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "http",
                "codec_type": "AUTO",
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                "route_config": {"name": "http", "virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]}]}
            }
        }]}]
    })
}

fn cluster(backend: SocketAddr) -> Value {
    json!({
        "name": "backend", "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(backend)}}]}]}
    })
}

fn start(kind: Kind, o: &Opts, backend: SocketAddr, dir: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let pin = |bin: &Path| {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(o.cpu.to_string()).arg(bin).stdin(Stdio::null()).stdout(Stdio::null());
        c
    };
    let log = std::fs::File::create(dir.join("log"))?;
    match kind {
        Kind::Dp | Kind::DpLogged => {
            let mut l = listener(0);
            l["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
            let mut c = cluster(backend);
            c["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            let file = dir.join("xds.json");
            std::fs::write(&file, serde_json::to_vec(&json!({"version_info": "1", "resources": [c, l]}))?)?;
            let admin_path = dir.join("admin-address");
            let level = if kind == Kind::Dp { "warn" } else { "info" };
            let child = pin(&o.dp)
                .args(["run", "--proxy-type=ingress", "--xds-file"])
                .arg(&file)
                .args(["--admin-address", "127.0.0.1:0", "--admin-address-path"])
                .arg(&admin_path)
                .args(["--readiness-port", "0", "--concurrency", "1", "--log-level", level])
                .stderr(log)
                .spawn()
                .context("starting dp")?;
            let mut p = Proc { child, dir: dir.to_path_buf() };
            let admin: SocketAddr = wait_for(&mut p, "dp's admin address", || {
                std::fs::read_to_string(&admin_path).ok()?.trim().parse().ok()
            })?;
            let addr = wait_for(&mut p, "dp's listener", || {
                let (_, body) = http_get(admin, "/listeners?format=json").ok()?;
                let v: Value = serde_json::from_str(&body).ok()?;
                let l = v["listener_statuses"].as_array()?.iter().find(|l| l["name"] == "http")?.clone();
                let sa = &l["local_address"]["socket_address"];
                format!("{}:{}", sa["address"].as_str()?, sa["port_value"]).parse::<SocketAddr>().ok()
            })?;
            wait_for(&mut p, "dp to listen", || connects(addr))?;
            Ok((p, addr))
        }
        Kind::Envoy => {
            let port = free_port()?;
            let file = dir.join("envoy.json");
            let bootstrap = json!({
                "node": {"id": "bench-http", "cluster": "bench"},
                "admin": {"address": socket(SocketAddr::from(([127, 0, 0, 1], 0)))},
                "static_resources": {"listeners": [listener(port)], "clusters": [cluster(backend)]},
            });
            std::fs::write(&file, serde_json::to_vec(&bootstrap)?)?;
            let child = pin(&o.envoy)
                .arg("-c")
                .arg(&file)
                .args(["--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"])
                .stderr(log)
                .spawn()
                .context("starting Envoy")?;
            let mut p = Proc { child, dir: dir.to_path_buf() };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_for(&mut p, "Envoy to listen", || connects(addr))?;
            Ok((p, addr))
        }
        Kind::Nginx => {
            let port = free_port()?;
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log warn;\nevents {{ worker_connections 9000; }}\nhttp {{\n  access_log off;\n  \
                 keepalive_requests 10000000;\n  keepalive_timeout 3600s;\n  upstream backend {{ server {backend}; keepalive 64; }}\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backend;\n      \
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                d = dir.display()
            );
            std::fs::write(dir.join("nginx.conf"), conf)?;
            let child = pin(&o.nginx)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stderr(log)
                .spawn()
                .context("starting nginx")?;
            let mut p = Proc { child, dir: dir.to_path_buf() };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_for(&mut p, "nginx to listen", || connects(addr))?;
            Ok((p, addr))
        }
    }
}

/// One h2load run over HTTP/1.1: its standard output.
fn h2load(addr: SocketAddr, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new("h2load")
        .arg("--h1")
        .args(args)
        .arg(format!("http://{addr}/"))
        .stdin(Stdio::null())
        .output()
        .context("running h2load (Debian's nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("h2load failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// (requests per second, succeeded, failed) from h2load's summary.
fn parse_h2load(text: &str) -> anyhow::Result<(f64, u64, u64)> {
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.strip_suffix(" req/s"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no req/s in h2load's output: {text}"))?;
    let req = text.lines().find(|l| l.starts_with("requests: ")).context("no requests line")?;
    let count = |what: &str| -> u64 {
        req.split(", ")
            .find_map(|p| p.trim_start_matches("requests: ").strip_suffix(what)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let failed = count(" failed") + count(" errored") + count(" timeout");
    let status = text.lines().find(|l| l.starts_with("status codes: ")).unwrap_or("");
    let ok2xx: u64 = status
        .trim_start_matches("status codes: ")
        .split(", ")
        .find_map(|p| p.strip_suffix(" 2xx")?.parse().ok())
        .unwrap_or(0);
    Ok((rps, ok2xx, failed + count(" succeeded").saturating_sub(ok2xx)))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

/// Reads one HTTP/1.1 response (Content-Length or chunked) from a blocking stream.
fn read_response(s: &mut TcpStream) -> anyhow::Result<u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("the proxy closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = &buf[end + 4..];
        let done = if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
            body.len() >= len.trim().parse::<usize>().unwrap_or(0)
        } else if head.contains("transfer-encoding: chunked") {
            body.ends_with(b"0\r\n\r\n")
        } else {
            true
        };
        if done {
            return Ok(status);
        }
    }
}

/// RSS of the proxy: after one request on one connection, then with `n` kept-alive
/// connections that have each carried one request and are left idle.
fn idle_rss(pid: u32, addr: SocketAddr, n: usize) -> anyhow::Result<(u64, u64)> {
    let one = |_: usize| -> anyhow::Result<TcpStream> {
        let mut s = TcpStream::connect(addr).context("connect")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n").context("send")?;
        let status = read_response(&mut s).context("read the answer")?;
        if status != 200 {
            bail!("status {status} through the proxy");
        }
        Ok(s)
    };
    let first = one(0)?;
    let base = procstat::memory_kib(pid).context("the proxy's /proc status")?.0;
    let mut conns = vec![first];
    for i in 1..n {
        conns.push(one(i).with_context(|| format!("idle connection {i}"))?);
    }
    let idle = procstat::memory_kib(pid).context("the proxy's /proc status")?.0;
    drop(conns);
    Ok((base, idle))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Measures one proxy: `runs` throughput and latency runs (medians), then the idle RSS.
fn measure(kind: Kind, o: &Opts, backend: SocketAddr, dir: &Path) -> anyhow::Result<Figures> {
    let (p, addr) = start(kind, o, backend, dir)?;
    let pid = p.pid();
    // Warm-up: connections, pools, caches.
    h2load(addr, &["-c".into(), o.conns.to_string(), "-t".into(), "1".into(), "-D".into(), "1".into()])?;
    let (mut rps, mut per_core, mut share, mut p50, mut p99) = (vec![], vec![], vec![], vec![], vec![]);
    let mut latency_failed = 0;
    for run in 0..o.runs {
        let cpu0 = procstat::cpu_time(pid).context("proxy CPU time")?;
        let t0 = Instant::now();
        let out = h2load(
            addr,
            &["-c".into(), o.conns.to_string(), "-t".into(), "1".into(), "-D".into(), o.secs.to_string()],
        )?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = (procstat::cpu_time(pid).context("proxy CPU time")? - cpu0).as_secs_f64();
        let (r, ok, failed) = parse_h2load(&out)?;
        if failed > 0 || ok == 0 {
            bail!("{}: {failed} failed requests, {ok} 2xx, run {run}: {out}", kind.name());
        }
        rps.push(r);
        per_core.push(ok as f64 / cpu.max(1e-9));
        share.push(cpu / wall);

        let log = dir.join(format!("latency-{run}.log"));
        let per_client = (o.rate / o.rate_conns).max(1);
        let out = h2load(
            addr,
            &[
                "-c".into(),
                o.rate_conns.to_string(),
                "-t".into(),
                "1".into(),
                "--rps".into(),
                per_client.to_string(),
                "-D".into(),
                o.secs.to_string(),
                "--log-file".into(),
                log.display().to_string(),
            ],
        )?;
        let (_, _, failed) = parse_h2load(&out)?;
        latency_failed += failed;
        let mut us: Vec<u64> = std::fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.get(1) == Some(&"200")).then(|| f.get(2)?.trim().parse().ok()).flatten()
            })
            .collect();
        us.sort_unstable();
        p50.push(percentile(&us, 0.50));
        p99.push(percentile(&us, 0.99));
    }
    let (rss_base_kib, rss_idle_kib) = idle_rss(pid, addr, o.idle)?;
    Ok(Figures {
        rps: median(rps),
        rps_per_core: median(per_core),
        cpu_share: median(share),
        p50_us: median(p50),
        p99_us: median(p99),
        latency_failed,
        rss_base_kib,
        rss_idle_kib,
    })
}

/// Runs every proxy; returns (the Markdown section's table and verdicts, the JSON).
pub fn run(o: &Opts, work: &Path) -> anyhow::Result<(String, Value)> {
    let (_backend, backend) = nginx_backend(&o.nginx, &work.join("backend"))?;
    let kinds = [Kind::Dp, Kind::Envoy, Kind::Nginx, Kind::DpLogged];
    let (mut all, mut failed) = (vec![], vec![]);
    for k in kinds {
        eprintln!("bench-http: {}", k.name());
        let f = match measure(k, o, backend, &work.join(k.name().replace([' ', '(', ')'], "_"))) {
            Ok(f) => f,
            // The extra row is informative: its failure is reported, not fatal.
            Err(e) if k == Kind::DpLogged => {
                eprintln!("bench-http: {}: {e:#}", k.name());
                failed.push(format!("{}: {e:#}", k.name()));
                continue;
            }
            Err(e) => return Err(e.context(k.name())),
        };
        eprintln!("bench-http: {} {f:?}", k.name());
        all.push((k, f));
    }
    let get = |k: Kind| all.iter().find(|(x, _)| *x == k).map(|(_, f)| f.clone()).unwrap_or_default();
    let (dp, envoy) = (get(Kind::Dp), get(Kind::Envoy));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "HTTP/1.1 through each proxy to one nginx backend (`return 200`, {} bytes), proxy pinned to one core. \
         Throughput: `h2load --h1 -c {} -t 1 -D {}` over kept-alive connections; requests per core = 2xx answers / \
         the proxy's CPU seconds (utime+stime) during the run. Latency: `h2load --h1 -c {} --rps {} -D {}` \
         ({} requests/s in all), percentiles of h2load's per-request log. Memory: VmRSS after one request, and with \
         {} kept-alive connections that have each carried one request, idle. Medians of {} run(s).\n",
        BODY.len(),
        o.conns,
        o.secs,
        o.rate_conns,
        (o.rate / o.rate_conns).max(1),
        o.secs,
        (o.rate / o.rate_conns).max(1) * o.rate_conns,
        o.idle,
        o.runs
    );
    md.push_str(
        "| proxy | req/s | proxy CPU | req/s per core | p50 (µs) | p99 (µs) | RSS, 1 conn (MiB) | RSS, idle conns (MiB) |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (k, f) in &all {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} % | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
            k.name(),
            f.rps,
            f.cpu_share * 100.0,
            f.rps_per_core,
            f.p50_us,
            f.p99_us,
            f.rss_base_kib as f64 / 1024.0,
            f.rss_idle_kib as f64 / 1024.0
        );
    }
    for f in &failed {
        let _ = writeln!(md, "\nNot measured: {f}");
    }
    let rps_ratio = dp.rps_per_core / envoy.rps_per_core;
    let p99_ratio = dp.p99_us / envoy.p99_us;
    let rss_ratio = dp.rss_idle_kib as f64 / envoy.rss_idle_kib as f64;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let _ = writeln!(
        md,
        "\nTargets (dp at `--log-level warn`, no access log, as Envoy with none configured):\n\n\
         | target | figure | verdict |\n|---|---:|---|\n\
         | req/s per core ≥ 1.5× Envoy's | {rps_ratio:.2}× | {} |\n\
         | p99 at {} req/s ≤ 0.7× Envoy's | {p99_ratio:.2}× | {} |\n\
         | RSS with {} idle connections ≤ 0.3× Envoy's | {rss_ratio:.2}× | {} |",
        verdict(rps_ratio >= 1.5),
        (o.rate / o.rate_conns).max(1) * o.rate_conns,
        verdict(p99_ratio <= 0.7),
        o.idle,
        verdict(rss_ratio <= 0.3),
    );
    md.push_str(
        "\nIdle memory: hyper gives every HTTP/1 connection an 8 KiB read and an 8 KiB write buffer for its \
         whole life, so dp parks a kept-alive connection after 10 ms without a request (`proxy/src/hcm/park.rs`): \
         hyper is stopped without closing the socket, and a new hyper connection takes over at the next byte. A \
         parked connection holds its socket, its task and a few small objects (~4 KiB in use); the rest of the \
         per-connection figure is heap the parked connections' freed buffers leave behind (glibc keeps it).\n",
    );
    let json = json!({
        "opts": {"secs": o.secs, "conns": o.conns, "rate": o.rate, "rate_conns": o.rate_conns, "idle": o.idle, "runs": o.runs},
        "results": all.iter().map(|(k, f)| (k.name().to_string(), f.json())).collect::<serde_json::Map<_, _>>(),
        "ratios": {"rps_per_core": rps_ratio, "p99": p99_ratio, "rss_idle": rss_ratio},
    });
    Ok((md, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2load_summaries() {
        let out = "finished in 3.00s, 20433.33 req/s, 3.04MB/s\n\
                   requests: 61300 total, 61332 started, 61300 done, 61300 succeeded, 0 failed, 0 errored, 0 timeout\n\
                   status codes: 61300 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let (rps, ok, failed) = parse_h2load(out).unwrap();
        assert!((rps - 20433.33).abs() < 1e-6);
        assert_eq!((ok, failed), (61300, 0));
        let bad = out.replace("61300 2xx, 0 3xx, 0 4xx, 0 5xx", "61000 2xx, 0 3xx, 0 4xx, 300 5xx");
        assert_eq!(parse_h2load(&bad).unwrap().2, 300);
    }

    #[test]
    fn percentiles_of_sorted_samples() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
