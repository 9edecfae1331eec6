//! dp under overload and hostile clients: connection limits, running out of file
//! descriptors, slowloris, and one counted, logged record for every way a connection ends.

use e2e::xds::{sni_chain, static_cluster, tls_listener, write_file};
use e2e::{Backend, Dp, closed_without_data, hello, read_line, wait_until, who};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Lifts this test process's soft file limit (thousands of client sockets).
fn raise_nofile() {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// A connection through dp that got its backend's greeting (and so holds an upstream).
async fn held(addr: SocketAddr, sni: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&hello::client_hello(Some(sni), &[])).await.ok()?;
    read_line(&mut s).await.map(|_| s)
}

/// Echo through a held connection still works.
async fn still_serving(s: &mut TcpStream) -> bool {
    s.write_all(b"ping\n").await.is_ok() && read_line(s).await.as_deref() == Some("ping")
}

fn dp_with(backend: SocketAddr, chain_filters: Vec<serde_json::Value>, extra: &[&str]) -> (Dp, SocketAddr) {
    let file = write_file(vec![
        static_cluster("backend", &[backend], json!({})),
        tls_listener("l", vec![sni_chain(&["backend"], chain_filters, "backend")], json!({})),
    ]);
    let mut args = vec!["--xds-file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let dp = Dp::spawn(&args, &[]);
    dp.wait_ready();
    let addr = dp.listener("l");
    (dp, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_of_n_serves_n_refuses_the_rest_and_admits_again_when_some_close() {
    let backend = Backend::start("backend").await;
    let (dp, addr) = dp_with(backend.addr, vec![], &["--global-downstream-max-connections", "5"]);
    let mut admitted = vec![];
    for _ in 0..5 {
        admitted.push(held(addr, "backend").await.expect("within the limit"));
    }
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&hello::client_hello(Some("backend"), &[])).await;
        assert!(closed_without_data(&mut s).await, "over the limit: closed");
    }
    let overflow = "envoy_listener_downstream_global_cx_overflow{";
    assert_eq!(dp.stat(overflow), 5);
    for s in &mut admitted {
        assert!(still_serving(s).await, "the admitted ones keep working");
    }
    admitted.truncate(3);
    wait_until("dp to see two connections close", || {
        (dp.stat("envoy_listener_downstream_cx_active{") == 3).then_some(())
    });
    for _ in 0..2 {
        admitted.push(held(addr, "backend").await.expect("room again"));
    }
    assert!(held(addr, "backend").await.is_none());
    assert_eq!(dp.stat(overflow), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chains_connection_limit_filter_refuses_and_counts_over_its_max() {
    let backend = Backend::start("backend").await;
    let limit = json!({"name": "envoy.filters.network.connection_limit", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
        "statPrefix": "ingress_limit", "maxConnections": 2}});
    let (dp, addr) = dp_with(backend.addr, vec![limit], &[]);
    let mut first = held(addr, "backend").await.unwrap();
    let _second = held(addr, "backend").await.unwrap();
    assert!(held(addr, "backend").await.is_none());
    assert_eq!(
        dp.stat("envoy_connection_limit_limited_connections{envoy_connection_limit_prefix=\"ingress_limit\"}"),
        1
    );
    assert_eq!(dp.stat("envoy_connection_limit_active_connections{"), 2);
    dp.logs.wait_for(&["flag=\"LIMIT\""]);
    assert!(still_serving(&mut first).await);
    drop(first);
    wait_until("the limit to free a place", || {
        (dp.stat("envoy_connection_limit_active_connections{") == 1).then_some(())
    });
    assert!(held(addr, "backend").await.is_some());
}

/// user + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = &stat[stat.rfind(") ").unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_dp_keeps_serving_does_not_spin_and_recovers() {
    raise_nofile();
    let backend = Backend::start("backend").await;
    let file = write_file(vec![
        static_cluster("backend", &[backend.addr], json!({})),
        tls_listener("l", vec![sni_chain(&["backend"], vec![], "backend")], json!({})),
    ]);
    let dp =
        Dp::spawn_under(&["prlimit", "--nofile=256:256"], "127.0.0.1", &["--xds-file", file.to_str().unwrap()], &[]);
    dp.wait_ready();
    let addr = dp.listener("l");
    // 400 connections: 30 proxied (two descriptors each in dp), then 370 that send
    // nothing, so dp holds one descriptor for each it accepts until it has none left
    // and the rest wait in the listen backlog.
    let started = Instant::now();
    let mut served = vec![];
    for _ in 0..30 {
        served.push(held(addr, "backend").await.expect("room for the first ones"));
    }
    let mut waiting = vec![];
    for _ in 0..370 {
        waiting.push(TcpStream::connect(addr).await.unwrap());
    }
    wait_until("dp to run out of descriptors", || {
        dp.logs.lines().iter().any(|l| l.contains("accept failed")).then_some(())
    });
    // A window of measurement, not synchronisation: how much CPU dp burns while it cannot
    // accept.
    let pid = dp.child.id();
    let (t0, c0) = (Instant::now(), cpu_seconds(pid));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let core_share = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    assert!(core_share < 0.2, "dp used {core_share:.2} of a core while out of descriptors");
    for s in served.iter_mut().take(20) {
        assert!(still_serving(s).await, "held connections keep being served");
    }
    let logged = dp.logs.count(&["accept failed"]);
    let bound = started.elapsed().as_secs() + 1;
    assert!(
        logged >= 1 && logged as u64 <= bound,
        "{logged} accept-failure lines in {bound} s: at most one per second"
    );
    // Descriptors free up: dp accepts again (the admin API too: it had none either).
    drop(served);
    drop(waiting);
    let deadline = Instant::now() + e2e::WAIT;
    while who(addr, Some("backend")).await.as_deref() != Some("backend") {
        assert!(Instant::now() < deadline, "dp never accepted again");
    }
    assert!(dp.stat("envoy_listener_downstream_cx_accept_error{") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_do_not_delay_legitimate_ones() {
    raise_nofile();
    let backend = Backend::start("backend").await;
    let (dp, addr) = dp_with(backend.addr, vec![], &[]);
    let hello_bytes = hello::client_hello(Some("backend"), &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (bytes, stop) = (hello_bytes.clone(), stop.clone());
        slow.spawn(async move {
            // One byte of the ClientHello per second (pacing the attacker).
            for b in bytes.iter().take(bytes.len() - 1) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    wait_until("dp to hold the 2,000 slow connections", || {
        (dp.stat("envoy_listener_downstream_cx_active{") >= 2000).then_some(())
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let t = Instant::now();
        assert_eq!(who(addr, Some("backend")).await.as_deref(), Some("backend"));
        slowest = slowest.max(t.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "a legitimate connection took {slowest:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_early_exit_counts_one_destroy_and_writes_one_access_log_line() {
    let backend = Backend::start("backend").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let deny_all = json!({"name": "envoy.filters.network.rbac", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "statPrefix": "deny.", "rules": {}}});
    let limit_one = json!({"name": "envoy.filters.network.connection_limit", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
        "statPrefix": "one", "maxConnections": 1}});
    let file = write_file(vec![
        static_cluster("backend", &[backend.addr], json!({})),
        static_cluster("empty", &[], json!({})),
        static_cluster("dead", &[dead], json!({})),
        static_cluster("full", &[backend.addr], json!({"circuitBreakers": {"thresholds": [{"maxConnections": 0}]}})),
        tls_listener(
            "l",
            vec![
                sni_chain(&["backend"], vec![], "backend"),
                sni_chain(&["nc"], vec![], "no-such-cluster"),
                sni_chain(&["uh"], vec![], "empty"),
                sni_chain(&["uf"], vec![], "dead"),
                sni_chain(&["uo"], vec![], "full"),
                sni_chain(&["rbac"], vec![deny_all], "backend"),
                sni_chain(&["limit"], vec![limit_one], "backend"),
            ],
            json!({"listenerFiltersTimeout": "1s"}),
        ),
    ]);
    let dp = Dp::start(&file, &[]);
    let addr = dp.listener("l");
    let destroyed = || dp.stat("envoy_listener_downstream_cx_destroy{");
    let mut expected = 0;
    for (sni, flag) in
        [("unknown-name", "NR"), ("nc", "NC"), ("uh", "UH"), ("uf", "UF"), ("uo", "UO"), ("rbac", "RBAC")]
    {
        refused_once(&dp, addr, sni, flag).await;
        expected += 1;
        wait_until(&format!("{flag}: counted as destroyed"), || (destroyed() == expected).then_some(()));
    }
    // The ClientHello never completes: the listener filter timeout ends it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello::client_hello(Some("backend"), &[])[..10]).await.unwrap();
    assert!(closed_without_data(&mut s).await);
    dp.logs.wait_for(&["flag=\"DETECT\""]);
    expected += 1;
    // Over the chain's connection limit.
    let mut holder = held(addr, "limit").await.unwrap();
    refused_once(&dp, addr, "limit", "LIMIT").await;
    expected += 1;
    assert!(still_serving(&mut holder).await);
    drop(holder);
    expected += 1;
    wait_until("every connection counted once", || (destroyed() == expected).then_some(()));
    assert_eq!(dp.logs.count(&["flag=\"DETECT\""]), 1);
    // And a normal connection: one line with no flag.
    let before = dp.logs.count(&["flag=\"-\""]);
    assert_eq!(who(addr, Some("backend")).await.as_deref(), Some("backend"));
    dp.logs.wait_count(&["flag=\"-\""], before + 1);
    assert_eq!(dp.stat("envoy_log_lines_dropped"), 0, "no log line was dropped");
}

/// A connection for `sni` is closed without an answer and logged exactly once with `flag`.
async fn refused_once(dp: &Dp, addr: SocketAddr, sni: &str, flag: &str) {
    let pattern = format!("flag=\"{flag}\"");
    let before = dp.logs.count(&[&pattern]);
    assert_eq!(who(addr, Some(sni)).await, None, "{flag}: closed without an answer");
    dp.logs.wait_count(&[&pattern], before + 1);
    assert_eq!(dp.logs.count(&[&pattern]), before + 1, "{flag}: exactly one line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_when_the_drain_time_runs_out_are_each_logged() {
    let backend = Backend::start("backend").await;
    let (mut dp, addr) = dp_with(backend.addr, vec![], &["--drain-time", "1s"]);
    let mut conns = vec![];
    for _ in 0..3 {
        conns.push(held(addr, "backend").await.unwrap());
    }
    dp.signal(libc::SIGTERM);
    let status = dp.wait_exit();
    assert!(status.success(), "dp exited with {status}:\n{}", dp.logs.lines().join("\n"));
    assert_eq!(dp.logs.count(&["flag=\"DRAIN\""]), 3, "{}", dp.logs.lines().join("\n"));
    for s in &mut conns {
        assert!(closed_without_data(s).await, "cut");
    }
}
