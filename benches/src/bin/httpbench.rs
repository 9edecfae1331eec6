//! `httpbench`: the HTTP data-path comparison, dp vs Envoy vs nginx (benches/src/http_bench.rs).
//! Run it through `scripts/bench-http.sh`, which pins it to the load core.
//!
//! ```text
//! httpbench --dp PATH --envoy PATH --nginx PATH --out-md FILE --json FILE
//!           [--proxy-cpu N] [--quick] [--secs S] [--runs N] [--rate R] [--idle N]
//! ```

use anyhow::{Context, bail};
use benches::http_bench::{Opts, run};
use std::collections::HashMap;
use std::path::PathBuf;

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
    let mut opts: HashMap<String, String> = HashMap::new();
    let mut quick = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            s if s.starts_with("--") => {
                let v = it.next().with_context(|| format!("{s} needs a value"))?;
                opts.insert(s.trim_start_matches("--").to_string(), v);
            }
            other => bail!("unexpected argument `{other}`"),
        }
    }
    raise_fd_limit();
    let path = |k: &str| opts.get(k).map(PathBuf::from).with_context(|| format!("--{k} PATH is required"));
    let mut o = Opts::full(path("dp")?, path("envoy")?, path("nginx")?);
    if quick {
        o = o.quick();
    }
    let num = |k: &str, d: u32| -> anyhow::Result<u32> {
        opts.get(k).map_or(Ok(d), |v| v.parse().with_context(|| format!("--{k}")))
    };
    o.cpu = num("proxy-cpu", 0)? as usize;
    o.secs = num("secs", o.secs)?.max(1);
    o.runs = num("runs", o.runs as u32)?.max(1) as usize;
    o.rate = num("rate", o.rate)?.max(o.rate_conns);
    o.idle = num("idle", o.idle as u32)?.max(1) as usize;
    let work = std::env::temp_dir().join(format!("bench-http-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run(&o, &work);
    let _ = std::fs::remove_dir_all(&work);
    let (md, json) = result?;
    std::fs::write(path("out-md")?, md)?;
    std::fs::write(path("json")?, serde_json::to_vec_pretty(&json)?)?;
    Ok(())
}
