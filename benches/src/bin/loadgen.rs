//! `loadgen`: the load generator, TLS backend and orchestrator of the side-by-side
//! benchmark. Run it through `scripts/bench.sh`, which installs the other proxies.
//!
//! ```text
//! loadgen suite [--quick] --dp PATH [--envoy PATH] [--haproxy PATH] [--nginx PATH]
//!               [--nginx-module PATH] [--proxy-cpu N] [--out FILE] [--json FILE]
//!               [--header FILE] [--notes FILE] [--scales 2,1000] [--runs N] [--no-copy]
//! loadgen copy [--quick]      # only the copy-strategy comparison (issue 2)
//! loadgen config --names N --backend ADDR --port P --dir D   # every target's configuration
//! loadgen backend [--secs S] [--backend-port P]  # only the backend (prints its address)
//! loadgen handshakes|bulk|latency --addr A [--names N] [--secs S]   # one load, for profiling
//!
//! # The sidecar mTLS benchmark's client side (benches/mtls_bench.py; each prints one JSON line):
//! loadgen mtls-echo [--secs S]          # plain echo app; prints its address, serves for S s
//! loadgen mtls-handshakes --addr A --sni S --cert PEM --key PEM [--ca PEM] [--alpn kuma]
//!                         [--curves LIST] [--tls13] [--workers N] [--secs S]
//! loadgen mtls-latency --addr A [--conns N] [--rate R] [--secs S] [--new-conn] [--samples FILE]
//! ```

use anyhow::{Context, bail};
use benches::suite::{self, Plan, Suite};
use benches::targets::Programs;
use benches::{backend, tls};
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    cmd: String,
    quick: bool,
    opts: std::collections::HashMap<String, String>,
    flags: Vec<String>,
}

fn parse() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().context("usage: loadgen suite|copy [options] (see the source header)")?;
    let mut a = Args { cmd, quick: false, opts: Default::default(), flags: vec![] };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--no-copy" | "--no-proxies" | "--tls13" | "--new-conn" => a.flags.push(arg),
            s if s.starts_with("--") => {
                let v = it.next().with_context(|| format!("{s} needs a value"))?;
                a.opts.insert(s.trim_start_matches("--").to_string(), v);
            }
            other => bail!("unexpected argument `{other}`"),
        }
    }
    Ok(a)
}

fn raise_fd_limit() {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    raise_fd_limit();
    if a.cmd.starts_with("mtls-") {
        return mtls(&a);
    }
    let mut plan = if a.quick { Plan::quick() } else { Plan::full() };
    if let Some(r) = a.opts.get("runs") {
        plan.runs = r.parse().context("--runs")?;
    }
    if let Some(s) = a.opts.get("scales") {
        plan.scales = s.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().context("--scales")?;
    }
    let cpu: usize = a.opts.get("proxy-cpu").map(|s| s.parse()).transpose().context("--proxy-cpu")?.unwrap_or(0);
    let path = |k: &str| a.opts.get(k).map(PathBuf::from);
    let programs = Programs {
        dp: path("dp").unwrap_or_else(|| PathBuf::from("dp")),
        envoy: path("envoy"),
        haproxy: path("haproxy"),
        nginx: path("nginx"),
        nginx_stream_module: path("nginx-module"),
        cpu,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let (server_cfg, client) = tls::pair()?;
    let backend_port: u16 = a.opts.get("backend-port").map_or(Ok(0), |s| s.parse())?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", backend_port)))?;
    let backend_addr = listener.local_addr()?;
    rt.spawn(backend::serve(listener, server_cfg));
    let work = std::env::temp_dir().join(format!("dp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let s = Suite { plan: plan.clone(), programs, work: work.clone(), rt, backend: backend_addr, client };

    match a.cmd.as_str() {
        "handshakes" | "latency" | "bulk" => {
            // Load against a running target, for profiling: --addr A [--names N] [--secs S]
            let addr: std::net::SocketAddr = a.opts.get("addr").context("--addr")?.parse()?;
            let names: usize = a.opts.get("names").map_or(Ok(2), |s| s.parse())?;
            let secs: f64 = a.opts.get("secs").map_or(Ok(5.0), |s| s.parse())?;
            let dur = std::time::Duration::from_secs_f64(secs.min(600.0));
            let (b, client) = (s.backend, s.client.clone());
            let out = match a.cmd.as_str() {
                "handshakes" => format!("{:?}", s.rt.block_on(benches::load::handshakes(addr, names, client, 16, dur))),
                "bulk" => format!("{:?}", s.rt.block_on(benches::load::bulk(addr, names, 16, dur))),
                _ => {
                    let (l, e) = s.rt.block_on(benches::load::latency(addr, names, 10, 2000, dur));
                    format!(
                        "p50 {} p99 {} errors {e}",
                        benches::load::quantile(&l, 0.5),
                        benches::load::quantile(&l, 0.99)
                    )
                }
            };
            println!("backend {b}: {out}");
        }
        "backend" => {
            // Only the backend, for trying targets by hand: prints its address, serves for --secs.
            let secs: u64 = a.opts.get("secs").map_or(Ok(600), |s| s.parse())?;
            println!("{}", s.backend);
            std::thread::sleep(std::time::Duration::from_secs(secs.min(3600)));
        }
        "config" => {
            // Writes the configurations of every target into --dir, for trying them by hand:
            // --names N --backend ADDR --port P --dir D
            let names: usize = a.opts.get("names").map_or(Ok(2), |s| s.parse())?;
            let backend: std::net::SocketAddr = a.opts.get("backend").context("--backend")?.parse()?;
            let port: u16 = a.opts.get("port").context("--port")?.parse()?;
            let dir = PathBuf::from(a.opts.get("dir").context("--dir")?);
            std::fs::create_dir_all(&dir)?;
            let r = benches::targets::Routes::new(names, backend);
            std::fs::write(dir.join("xds.json"), serde_json::to_vec(&r.dp_file())?)?;
            std::fs::write(dir.join("envoy.json"), serde_json::to_vec(&r.envoy_bootstrap(port))?)?;
            std::fs::write(dir.join("sni.map"), r.haproxy_map())?;
            std::fs::write(dir.join("haproxy.cfg"), r.haproxy(port, &dir.join("sni.map")))?;
            std::fs::write(dir.join("nginx.conf"), r.nginx(port, &dir, path("nginx-module").as_deref()))?;
        }
        "copy" => {
            let copies = s.copies();
            println!("{}", suite::copy_table(&copies));
        }
        "suite" => {
            let started = Instant::now();
            let mut results = vec![];
            if !a.flags.iter().any(|f| f == "--no-proxies") {
                for &n in &plan.scales {
                    results.push(s.scale(n));
                }
            }
            let copies = if a.flags.iter().any(|f| f == "--no-copy") { vec![] } else { s.copies() };
            let elapsed = started.elapsed();
            let header = a.opts.get("header").and_then(|h| std::fs::read_to_string(h).ok()).unwrap_or_default();
            let mut md = report(&plan, &results, &copies, &header, elapsed);
            if let Some(notes) = a.opts.get("notes").and_then(|n| std::fs::read_to_string(n).ok()) {
                md.push('\n');
                md.push_str(&notes);
            }
            match a.opts.get("out") {
                Some(out) => std::fs::write(out, &md).with_context(|| format!("writing {out}"))?,
                None => println!("{md}"),
            }
            if let Some(j) = a.opts.get("json") {
                std::fs::write(j, serde_json::to_string_pretty(&suite::raw_json(&results))?)?;
            }
            eprintln!("{}", suite::tables(&results, &plan));
            eprintln!("{}", suite::verdicts(&results));
            eprintln!("{}", suite::copy_table(&copies));
            eprintln!("bench: done in {:.0?}", elapsed);
        }
        other => bail!("unknown command `{other}`: use suite or copy"),
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The sidecar mTLS benchmark's client side, on a one-worker runtime (the load core).
fn mtls(a: &Args) -> anyhow::Result<()> {
    use benches::mtls;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let secs: f64 = a.opts.get("secs").map_or(Ok(3.0), |s| s.parse()).context("--secs")?;
    let dur = std::time::Duration::from_secs_f64(secs.clamp(0.0, 3600.0));
    let addr = || -> anyhow::Result<std::net::SocketAddr> { Ok(a.opts.get("addr").context("--addr")?.parse()?) };
    match a.cmd.as_str() {
        "mtls-echo" => {
            let l = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))?;
            println!("{}", l.local_addr()?);
            use std::io::Write;
            std::io::stdout().flush()?;
            rt.spawn(mtls::echo_app(l));
            std::thread::sleep(dur);
        }
        "mtls-handshakes" => {
            let o = mtls::ClientOpts {
                sni: a.opts.get("sni").context("--sni")?.clone(),
                alpn: a.opts.get("alpn").map(|s| s.split(',').map(str::to_string).collect()).unwrap_or_default(),
                curves: a.opts.get("curves").cloned(),
                ca: a.opts.get("ca").map(std::fs::read).transpose().context("--ca")?,
                tls13_only: a.flags.iter().any(|f| f == "--tls13"),
            };
            let cert = PathBuf::from(a.opts.get("cert").context("--cert")?);
            let key = PathBuf::from(a.opts.get("key").context("--key")?);
            let ctx = mtls::client_context(&cert, &key, &o)?;
            let workers: usize = a.opts.get("workers").map_or(Ok(16), |s| s.parse()).context("--workers")?;
            let r = rt.block_on(mtls::handshakes(addr()?, ctx, o.sni, workers.max(1), dur));
            println!("{}", r.json());
        }
        "mtls-latency" => {
            let rate: u32 = a.opts.get("rate").map_or(Ok(2000), |s| s.parse()).context("--rate")?;
            let r = if a.flags.iter().any(|f| f == "--new-conn") {
                rt.block_on(mtls::latency_new(addr()?, rate, dur))
            } else {
                let conns: usize = a.opts.get("conns").map_or(Ok(10), |s| s.parse()).context("--conns")?;
                rt.block_on(mtls::latency_kept(addr()?, conns.max(1), rate, dur))
            };
            if let Some(path) = a.opts.get("samples") {
                // Every latency, µs as u32 little-endian: mtls_bench.py pools the samples of
                // interleaved slices before it takes percentiles.
                let bytes: Vec<u8> = r.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
                std::fs::write(path, bytes).with_context(|| format!("--samples {path}"))?;
            }
            println!("{}", r.json());
        }
        other => bail!("unknown command `{other}`"),
    }
    Ok(())
}

fn report(
    plan: &Plan,
    results: &[suite::ScaleResult],
    copies: &[(benches::copyproxy::Strategy, usize, Vec<benches::copyproxy::CopyResult>)],
    header: &str,
    elapsed: std::time::Duration,
) -> String {
    let mut md = String::from("# Benchmark results\n\n");
    md.push_str(header);
    md.push_str(&format!(
        "\nPlan: {} ({} runs per figure; handshake test {:.1?} with {} concurrent clients; bulk {:.1?}; \
         latency {:.1?} at {} req/s over {} connections, 64-byte echo; RSS with {} open connections). \
         The whole run took {:.0?}.\n",
        if plan.quick { "quick" } else { "full" },
        plan.runs,
        plan.handshake,
        plan.handshake_workers,
        plan.bulk,
        plan.latency,
        plan.latency_rate,
        plan.latency_conns,
        plan.hold_conns,
        elapsed
    ));
    md.push_str(
        "\nWhat is measured. Every target routes `n<i>.svc.bench` (i < names) to cluster `c<i mod 1000>`, every \
         cluster holding the one backend (in the load generator's process, on the load core). *New TLS conn/s*: \
         concurrent clients loop over connect, full TLS 1.3 handshake with rustls (X25519MLKEM768, ECDSA P-256 \
         certificate, no resumption; the ClientHello is ~1.5 KB), one byte echoed, close; names are spread over \
         all routes. *Bulk* and *latency*: the client sends a well-formed ClientHello (routed by SNI like any \
         other) followed by plain bytes, so that TLS record encryption in the load generator does not bound the \
         result; the proxies only look at the hello and copy bytes either way. Bulk: the backend streams to 1 or \
         16 connections. Latency: a 64-byte echo at a fixed total rate.\n",
    );
    md.push_str(
        "\nEach figure is the median of the runs. In parentheses: the median over runs of the ratio to the \
         direct connection (D) and to Envoy (E) measured in the same run. `added p99` is the target's p99 minus \
         the direct connection's p99 in the same run. Proxy CPU is utime+stime from /proc/<pid>/stat over the \
         test, divided by the connections completed (or the GiB moved); RSS is VmRSS (idle, and with the open \
         connections held) and VmHWM (peak) from /proc/<pid>/status.\n",
    );
    md.push_str(&suite::tables(results, plan));
    md.push_str("\n## Targets (issue 5)\n\n");
    md.push_str(&suite::verdicts(results));
    if !copies.is_empty() {
        md.push_str(
            "\n## Copy strategies (issue 2)\n\nIn-process loopback proxy (`benches/src/copyproxy.rs`) on its own \
             thread pinned to the proxy core; a source and a sink on the other core; ",
        );
        md.push_str(&format!(
            "{} MiB moved per measurement, split over the connections. Proxy CPU is the proxy thread's \
             CLOCK_THREAD_CPUTIME_ID (user + system).\n\n",
            plan.copy_bytes >> 20
        ));
        md.push_str(&suite::copy_table(copies));
    }
    md
}
