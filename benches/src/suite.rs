//! The side-by-side run: every target at every scale, the same load, several runs,
//! medians and same-run ratios, written as Markdown.

use crate::copyproxy::{self, Strategy};
use crate::load;
use crate::procstat;
use crate::targets::{Kind, Programs, Routes, Target};
use rustls::ClientConfig;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How much of everything to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub runs: usize,
    pub scales: Vec<usize>,
    /// Scales at which the bulk tests run (they do not depend on the route count).
    pub bulk_scales: Vec<usize>,
    pub handshake: Duration,
    pub handshake_workers: usize,
    pub bulk: Duration,
    pub latency: Duration,
    pub latency_rate: u32,
    pub latency_conns: usize,
    pub hold_conns: usize,
    pub warmup: Duration,
    pub copy_bytes: u64,
    pub start_timeout: Duration,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            quick: false,
            runs: 3,
            scales: vec![2, 1_000, 100_000],
            bulk_scales: vec![2],
            handshake: Duration::from_secs(2),
            handshake_workers: 16,
            bulk: Duration::from_secs(2),
            latency: Duration::from_secs(3),
            latency_rate: 2_000,
            latency_conns: 10,
            hold_conns: 1_000,
            warmup: Duration::from_millis(300),
            copy_bytes: 2 << 30,
            start_timeout: Duration::from_secs(180),
        }
    }

    pub fn quick() -> Plan {
        Plan {
            quick: true,
            // Two runs keep the quick variant (with the DNS and xDS parts) under 2 minutes.
            runs: 2,
            scales: vec![2, 1_000],
            handshake: Duration::from_millis(600),
            bulk: Duration::from_millis(500),
            latency: Duration::from_secs(1),
            hold_conns: 500,
            warmup: Duration::from_millis(150),
            copy_bytes: 512 << 20,
            ..Plan::full()
        }
    }
}

/// One run's figures for one target (None: not measured or not applicable).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub m: BTreeMap<&'static str, f64>,
}

pub const HS_RATE: &str = "conn_per_s";
pub const HS_CPU: &str = "cpu_us_per_conn";
pub const B1: &str = "gbit_1";
pub const B1_CPU: &str = "cpu_s_per_gib_1";
pub const B16: &str = "gbit_16";
pub const B16_CPU: &str = "cpu_s_per_gib_16";
pub const P50: &str = "p50_us";
pub const P99: &str = "p99_us";
pub const P999: &str = "p999_us";
pub const ADDED_P99: &str = "added_p99_us";

#[derive(Debug, Default)]
pub struct TargetResult {
    pub runs: Vec<Sample>,
    pub errors: u64,
    pub rss_idle_kib: Option<u64>,
    pub rss_hold_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    pub startup: Duration,
    pub failure: Option<String>,
}

#[derive(Debug, Default)]
pub struct ScaleResult {
    pub names: usize,
    pub targets: Vec<(Kind, TargetResult)>,
}

pub struct Suite {
    pub plan: Plan,
    pub programs: Programs,
    pub work: PathBuf,
    pub rt: tokio::runtime::Runtime,
    pub backend: SocketAddr,
    pub client: Arc<ClientConfig>,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

impl Suite {
    /// Runs `fut` on the load runtime's worker (the backend runs there too).
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.block_on(self.rt.spawn(fut)).expect("load task panicked")
    }

    pub fn scale(&self, names: usize) -> ScaleResult {
        let routes = Routes::new(names, self.backend);
        let mut targets: Vec<(Kind, Option<Target>, TargetResult)> = vec![];
        let kinds = [Kind::Direct, Kind::Dp, Kind::Envoy, Kind::Haproxy, Kind::Nginx];
        for kind in kinds {
            let mut r = TargetResult::default();
            let dir = self.work.join(format!("{}-{names}", kind.name()));
            let t = match Target::start(kind, &self.programs, &routes, &dir, self.plan.start_timeout) {
                Ok(t) => {
                    r.startup = t.startup;
                    match self.verify(&t, names) {
                        Ok(()) => Some(t),
                        Err(e) => {
                            r.failure = Some(format!("{e}; log: {}", t.log_tail()));
                            None
                        }
                    }
                }
                Err(e) => {
                    r.failure = Some(format!("{e:#}"));
                    None
                }
            };
            match &r.failure {
                Some(f) => log(format!("{names} names: {} failed: {f}", kind.name())),
                None => log(format!("{names} names: {} ready in {:.1?}", kind.name(), r.startup)),
            }
            targets.push((kind, t, r));
        }
        std::thread::sleep(Duration::from_millis(500));
        for (_, t, r) in &mut targets {
            r.rss_idle_kib = t.as_ref().and_then(Target::pid).and_then(procstat::memory_kib).map(|m| m.0);
        }
        // Warm-up: caches, allocator pools, lazily created state.
        for (_, t, _) in &targets {
            if let Some(t) = t {
                let (addr, cfg) = (t.addr, self.client.clone());
                self.run(load::handshakes(addr, names, cfg, self.plan.handshake_workers, self.plan.warmup));
                self.run(load::latency(addr, names, 2, 1000, self.plan.warmup));
            }
        }
        let bulk = self.plan.bulk_scales.contains(&names);
        for run in 0..self.plan.runs {
            log(format!("{names} names: run {}/{}", run + 1, self.plan.runs));
            for (_, t, r) in &mut targets {
                if let Some(t) = t {
                    let s = self.sample(t, names, bulk, &mut r.errors);
                    r.runs.push(s);
                }
            }
            // Added latency: this run's p99 minus the direct connection's.
            let direct_p99 = targets[0].2.runs.last().and_then(|s| s.m.get(P99).copied());
            if let Some(d) = direct_p99 {
                for (_, _, r) in &mut targets {
                    if let Some(s) = r.runs.last_mut()
                        && let Some(p) = s.m.get(P99).copied()
                    {
                        s.m.insert(ADDED_P99, p - d);
                    }
                }
            }
        }
        for (_, t, r) in &mut targets {
            if let Some(t) = t {
                let (addr, n) = (t.addr, self.plan.hold_conns);
                let pid = t.pid();
                let (held, errors) = self.run(async move {
                    let (open, errors) = load::hold(addr, names, n).await;
                    // Let the target settle with every connection open, then sample.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let rss = pid.and_then(procstat::memory_kib).map(|m| m.0);
                    drop(open);
                    (rss, errors)
                });
                r.rss_hold_kib = held;
                r.errors += errors;
                r.rss_peak_kib = t.pid().and_then(procstat::memory_kib).map(|m| m.1);
            }
        }
        let mut results = vec![];
        for (kind, t, r) in targets {
            if r.errors > 0 {
                log(format!("{names} names: {}: {} failed operations", kind.name(), r.errors));
            }
            drop(t);
            results.push((kind, r));
        }
        let result = ScaleResult { names, targets: results };
        // Let sockets in TIME_WAIT and the killed processes go before the next scale.
        std::thread::sleep(Duration::from_millis(500));
        result
    }

    /// One synthetic-hello echo and one real TLS handshake through the target.
    fn verify(&self, t: &Target, names: usize) -> anyhow::Result<()> {
        let addr = t.addr;
        let mut r = self.run(async move { load::hold(addr, names, 2).await.1 });
        let hs = self.run(load::handshakes(addr, names, self.client.clone(), 1, Duration::from_millis(100)));
        r += hs.errors;
        if r > 0 || hs.ok == 0 {
            anyhow::bail!("{} does not route: {r} failed exchanges", t.kind.name());
        }
        Ok(())
    }

    fn sample(&self, t: &Target, names: usize, bulk: bool, errors: &mut u64) -> Sample {
        let p = &self.plan;
        let mut s = Sample::default();
        let addr = t.addr;
        let pid = t.pid();
        let cpu = || pid.and_then(procstat::cpu_time);

        let before = cpu();
        let hs = self.run(load::handshakes(addr, names, self.client.clone(), p.handshake_workers, p.handshake));
        let after = cpu();
        *errors += hs.errors;
        s.m.insert(HS_RATE, hs.ok as f64 / hs.elapsed.as_secs_f64());
        if let (Some(b), Some(a)) = (before, after)
            && hs.ok > 0
        {
            s.m.insert(HS_CPU, (a - b).as_secs_f64() * 1e6 / hs.ok as f64);
        }

        if bulk {
            for (conns, key, key_cpu) in [(1, B1, B1_CPU), (16, B16, B16_CPU)] {
                let before = cpu();
                let b = self.run(load::bulk(addr, names, conns, p.bulk));
                let after = cpu();
                *errors += b.errors;
                s.m.insert(key, b.gbit_per_s());
                if let (Some(x), Some(y)) = (before, after)
                    && b.bytes > 0
                {
                    s.m.insert(key_cpu, (y - x).as_secs_f64() / (b.bytes as f64 / f64::from(1u32 << 30)));
                }
            }
        }

        let (lat, e) = self.run(load::latency(addr, names, p.latency_conns, p.latency_rate, p.latency));
        *errors += e;
        if !lat.is_empty() {
            s.m.insert(P50, load::quantile(&lat, 0.5));
            s.m.insert(P99, load::quantile(&lat, 0.99));
            s.m.insert(P999, load::quantile(&lat, 0.999));
        }
        s
    }

    /// The copy strategies of the in-process proxy, `runs` times each.
    pub fn copies(&self) -> Vec<(Strategy, usize, Vec<copyproxy::CopyResult>)> {
        let mut out = vec![];
        for conns in [1usize, 16] {
            let mut by: Vec<(Strategy, Vec<copyproxy::CopyResult>)> =
                Strategy::ALL.iter().map(|s| (*s, vec![])).collect();
            for _ in 0..self.plan.runs {
                for (s, v) in &mut by {
                    let per = self.plan.copy_bytes / conns as u64;
                    match copyproxy::measure(*s, conns, per, Duration::from_secs(30), Some(self.programs.cpu)) {
                        Ok(r) => v.push(r),
                        Err(e) => log(format!("copy {}: {e:#}", s.name())),
                    }
                }
            }
            for (s, v) in by {
                out.push((s, conns, v));
            }
        }
        out
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

impl ScaleResult {
    fn get(&self, k: Kind) -> Option<&TargetResult> {
        self.targets.iter().find(|(x, _)| *x == k).map(|(_, r)| r).filter(|r| r.failure.is_none())
    }

    /// Median over runs of `metric`.
    pub fn value(&self, k: Kind, metric: &str) -> Option<f64> {
        median(self.get(k)?.runs.iter().filter_map(|s| s.m.get(metric).copied()).collect())
    }

    /// Median over runs of `metric(k) / metric(reference)` from the same run.
    pub fn ratio(&self, k: Kind, reference: Kind, metric: &str) -> Option<f64> {
        let a = self.get(k)?;
        let b = self.get(reference)?;
        median(a.runs.iter().zip(&b.runs).filter_map(|(x, y)| Some(x.m.get(metric)? / y.m.get(metric)?)).collect())
    }

    fn mem(&self, k: Kind, f: impl Fn(&TargetResult) -> Option<u64>) -> Option<f64> {
        self.get(k).and_then(f).map(|kib| kib as f64 / 1024.0)
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(v: Option<f64>, ratios: &[(&str, Option<f64>)]) -> String {
    let Some(v) = v else { return "–".into() };
    let mut s = fmt_num(v);
    let rs: Vec<String> =
        ratios.iter().filter_map(|(n, r)| r.filter(|r| r.is_finite()).map(|r| format!("{n} {r:.2}"))).collect();
    if !rs.is_empty() {
        let _ = write!(s, " ({})", rs.join(", "));
    }
    s
}

const ORDER: [Kind; 5] = [Kind::Direct, Kind::Dp, Kind::Envoy, Kind::Haproxy, Kind::Nginx];

/// The Markdown tables for all scales.
pub fn tables(results: &[ScaleResult], plan: &Plan) -> String {
    let mut out = String::new();
    for sr in results {
        let _ = writeln!(out, "\n### {} server names\n", sr.names);
        let bulk = plan.bulk_scales.contains(&sr.names);
        let mut head = vec!["target", "new TLS conn/s", "proxy CPU µs/conn"];
        if bulk {
            head.extend(["1 conn Gbit/s", "16 conn Gbit/s", "CPU s/GiB (16 conn)"]);
        }
        head.extend([
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "added p99 µs",
            "RSS idle MiB",
            "RSS 1k conns MiB",
            "RSS peak MiB",
        ]);
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
        for k in ORDER {
            let Some((_, r)) = sr.targets.iter().find(|(x, _)| *x == k) else { continue };
            if let Some(f) = &r.failure {
                let _ = writeln!(out, "| {} | failed: {} |", k.name(), f.lines().next().unwrap_or_default());
                continue;
            }
            let de = |m: &str| {
                cell(sr.value(k, m), &[("D", sr.ratio(k, Kind::Direct, m)), ("E", sr.ratio(k, Kind::Envoy, m))])
            };
            let e = |m: &str| cell(sr.value(k, m), &[("E", sr.ratio(k, Kind::Envoy, m))]);
            let mut row = vec![k.name().to_string(), de(HS_RATE)];
            row.push(if k == Kind::Direct { "–".into() } else { e(HS_CPU) });
            if bulk {
                row.extend([de(B1), de(B16)]);
                row.push(if k == Kind::Direct { "–".into() } else { e(B16_CPU) });
            }
            row.extend([de(P50), de(P99), de(P999)]);
            row.push(if k == Kind::Direct { "–".into() } else { e(ADDED_P99) });
            let mem = |f: &dyn Fn(&TargetResult) -> Option<u64>| {
                if k == Kind::Direct {
                    return "–".to_string();
                }
                let v = sr.mem(k, f);
                let env = sr.mem(Kind::Envoy, f);
                cell(v, &[("E", v.zip(env).map(|(a, b)| a / b))])
            };
            row.push(mem(&|r| r.rss_idle_kib));
            row.push(mem(&|r| r.rss_hold_kib));
            row.push(mem(&|r| r.rss_peak_kib));
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
    }
    out
}

/// Pass/fail of the targets, each with the ratio it was judged on.
pub fn verdicts(results: &[ScaleResult]) -> String {
    let mut out = String::new();
    let mut line = |what: String, v: Option<f64>, limit: f64, at_most: bool| {
        let verdict = match v {
            None => "not measured".to_string(),
            Some(v) if (at_most && v <= limit) || (!at_most && v >= limit) => format!("**met** ({})", fmt_num(v)),
            Some(v) => format!("**missed** ({})", fmt_num(v)),
        };
        let _ = writeln!(out, "| {what} | {} {} | {verdict} |", if at_most { "≤" } else { "≥" }, fmt_num(limit));
    };
    for sr in results {
        let n = sr.names;
        line(format!("{n} names: dp CPU/conn ÷ HAProxy's"), sr.ratio(Kind::Dp, Kind::Haproxy, HS_CPU), 0.5, true);
        line(format!("{n} names: dp CPU/conn ÷ Envoy's"), sr.ratio(Kind::Dp, Kind::Envoy, HS_CPU), 0.33, true);
        if sr.value(Kind::Dp, B16).is_some() {
            line(
                format!("{n} names: dp 16-conn throughput ÷ Direct"),
                sr.ratio(Kind::Dp, Kind::Direct, B16),
                0.95,
                false,
            );
        }
        line(format!("{n} names: dp added p99 ÷ HAProxy's"), sr.ratio(Kind::Dp, Kind::Haproxy, ADDED_P99), 0.5, true);
        let idle = sr.mem(Kind::Dp, |r| r.rss_idle_kib);
        line(format!("{n} names: dp RSS idle, MiB"), idle, if n >= 100_000 { 64.0 } else { 8.0 }, true);
        if n >= 100_000 {
            line(format!("{n} names: dp RSS peak, MiB"), sr.mem(Kind::Dp, |r| r.rss_peak_kib), 64.0, true);
        }
    }
    format!("| target | limit | result |\n|---|---|---|\n{out}")
}

pub fn copy_table(copies: &[(Strategy, usize, Vec<copyproxy::CopyResult>)]) -> String {
    let mut out = String::from(
        "| strategy | connections | Gbit/s | proxy CPU s/GiB | Gbit/s ÷ dp's | CPU ÷ dp's |\n|---|---|---|---|---|---|\n",
    );
    let stat = |s: Strategy, c: usize, f: &dyn Fn(&copyproxy::CopyResult) -> f64| {
        copies.iter().find(|(x, n, _)| *x == s && *n == c).and_then(|(_, _, v)| median(v.iter().map(f).collect()))
    };
    for (s, conns, _) in copies {
        let g = stat(*s, *conns, &|r| r.gbit_per_s());
        let c = stat(*s, *conns, &|r| r.cpu_s_per_gib());
        let gd = stat(Strategy::Dp, *conns, &|r| r.gbit_per_s());
        let cd = stat(Strategy::Dp, *conns, &|r| r.cpu_s_per_gib());
        let _ = writeln!(
            out,
            "| {} | {conns} | {} | {} | {} | {} |",
            s.name(),
            g.map_or("–".into(), fmt_num),
            c.map_or("–".into(), |v| format!("{v:.3}")),
            g.zip(gd).map_or("–".into(), |(a, b)| format!("{:.2}", a / b)),
            c.zip(cd).map_or("–".into(), |(a, b)| format!("{:.2}", a / b)),
        );
    }
    out
}

/// Every raw figure, for whoever wants to recompute.
pub fn raw_json(results: &[ScaleResult]) -> Value {
    let scales: Vec<Value> = results
        .iter()
        .map(|sr| {
            let targets: serde_json::Map<String, Value> = sr
                .targets
                .iter()
                .map(|(k, r)| {
                    let runs: Vec<Value> = r.runs.iter().map(|s| json!(s.m)).collect();
                    (
                        k.name().to_string(),
                        json!({
                            "runs": runs, "errors": r.errors, "failure": r.failure,
                            "rss_idle_kib": r.rss_idle_kib, "rss_hold_kib": r.rss_hold_kib,
                            "rss_peak_kib": r.rss_peak_kib, "startup_s": r.startup.as_secs_f64(),
                        }),
                    )
                })
                .collect();
            json!({"names": sr.names, "targets": targets})
        })
        .collect();
    json!({ "scales": scales })
}
