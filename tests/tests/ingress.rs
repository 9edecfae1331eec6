//! Zone ingress data path: `dp run --xds-file` routes TLS by SNI without terminating it.

use e2e::xds::{sni_chain, tls_listener as listener};
use e2e::{Backend, Dp, closed_without_data, hello, read_line, temp_dir, who};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TAG_SNI: &str = "backend{mesh=default,version=v1}";
const HASH_SNI: &str = "a601e0c00295a9fbe.backend.80.default.ms";
const KRI_SNI: &str = "sni.msvc.default.east.web.8080";

fn endpoint(addr: SocketAddr, md: &[(&str, &str)]) -> Value {
    let lb: serde_json::Map<String, Value> = md.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    json!({
        "endpoint": {"address": {"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}}},
        "metadata": {"filterMetadata": {"envoy.lb": lb}}
    })
}

fn static_cluster(name: &str, eps: &[SocketAddr]) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "1s",
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints":
            eps.iter().map(|a| endpoint(*a, &[])).collect::<Vec<_>>()}]}
    })
}

fn eds_cluster(name: &str, eps: &[SocketAddr]) -> [Value; 2] {
    [
        json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name, "type": "EDS", "connectTimeout": "1s",
            "edsClusterConfig": {"edsConfig": {"ads": {}, "resourceApiVersion": "V3"}}
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "clusterName": name,
            "endpoints": [{"lbEndpoints": eps.iter().map(|a| endpoint(*a, &[])).collect::<Vec<_>>()}]
        }),
    ]
}

fn chain(names: &[&str], cluster: &str) -> Value {
    sni_chain(names, vec![], cluster)
}

fn write_config(path: &PathBuf, version: &str, resources: Vec<Value>) {
    let doc = json!({"version_info": version, "resources": resources});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Setup {
    dp: Dp,
    addr: SocketAddr,
    file: PathBuf,
    a: Backend,
    b: Backend,
    c: Backend,
    d: Backend,
}

/// Three SNI forms: tag SNI on a STATIC cluster with two endpoints, hash SNI on an EDS
/// cluster, KRI SNI on a STATIC cluster.
async fn setup(extra: Value) -> Setup {
    let (a, b, c, d) =
        (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await, Backend::start("d").await);
    let file = temp_dir("ingress").join("ingress.json");
    let [eds, cla] = eds_cluster("hash", &[c.addr]);
    write_config(
        &file,
        "1",
        vec![
            static_cluster("tag", &[a.addr, b.addr]),
            eds,
            cla,
            static_cluster("kri", &[d.addr]),
            listener(
                "ingress",
                vec![chain(&[TAG_SNI], "tag"), chain(&[HASH_SNI], "hash"), chain(&[KRI_SNI], "kri")],
                extra,
            ),
        ],
    );
    let dp = Dp::start(&file, &["--proxy-type", "ingress"]);
    let addr = dp.listener("ingress");
    Setup { dp, addr, file, a, b, c, d }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_kuma_sni_forms_and_round_robins() {
    let s = setup(json!({})).await;
    assert_eq!(who(s.addr, Some(HASH_SNI)).await.as_deref(), Some("c"));
    assert_eq!(who(s.addr, Some(KRI_SNI)).await.as_deref(), Some("d"));
    let mut seen = vec![];
    for _ in 0..4 {
        seen.push(who(s.addr, Some(TAG_SNI)).await.expect("tag SNI routes"));
    }
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"], "round robin spreads over both endpoints");
    // The backend got the ClientHello byte for byte: TLS was not terminated.
    let sent = hello::client_hello(Some(HASH_SNI), &[]);
    assert_eq!(s.c.received.lock().unwrap()[0], sent);
    assert_eq!(s.dp.stat("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"tag\"}"), 4);
    assert!(s.dp.stat("envoy_listener_downstream_cx_total{envoy_listener_address=\"127.0.0.1_0\"}") >= 6);
    let (_, clusters) = s.dp.get("/clusters");
    assert!(clusters.contains(&format!("tag::{}::cx_total::2", s.a.addr)), "{clusters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tls_handshake_passes_through() {
    let s = setup(json!({})).await;
    // Re-point the hash-SNI route (a DNS-valid name) at a real TLS server.
    let (server, client_cfg) = e2e::tls::pair(HASH_SNI);
    let tls_backend = e2e::tls::serve(server, "tls-c").await;
    let [eds, cla] = eds_cluster("hash", &[tls_backend]);
    write_config(&s.file, "2", vec![eds, cla, listener("ingress", vec![chain(&[HASH_SNI], "hash")], json!({}))]);
    s.dp.wait_version("2");
    let line = e2e::tls::request(s.addr, HASH_SNI, client_cfg, b"ping\n").await;
    assert_eq!(line, "tls-c: ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_sni_is_refused() {
    let s = setup(json!({})).await;
    for sni in [Some("nobody{mesh=default}"), None] {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(&hello::client_hello(sni, &[])).await.unwrap();
        assert!(closed_without_data(&mut c).await, "{sni:?} must be closed");
    }
    // Plain text is not TLS: no chain for it either.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(closed_without_data(&mut c).await);
    let total: usize = [&s.a, &s.b, &s.c, &s.d].iter().map(|b| b.connections()).sum();
    assert_eq!(total, 0, "no backend may see a refused connection");
    assert_eq!(s.dp.stat("envoy_listener_no_filter_chain_match"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_sent_one_byte_per_segment_still_routes() {
    let s = setup(json!({})).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    // Two records of 20 bytes each way: the hello spans records and segments.
    let bytes = hello::records(&hello::handshake(Some(HASH_SNI), &["h2"]), 20);
    for b in &bytes {
        c.write_all(std::slice::from_ref(b)).await.unwrap();
        c.flush().await.unwrap();
        // Pacing, not synchronisation: gives each byte its own TCP segment.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(read_line(&mut c).await.as_deref(), Some("c"));
    assert_eq!(s.c.received.lock().unwrap()[0], bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_listener_filter_timeout() {
    let s = setup(json!({"listenerFiltersTimeout": "0.3s"})).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    assert!(closed_without_data(&mut c).await);
    assert_eq!(s.dp.stat("envoy_listener_downstream_pre_cx_timeout"), 1);
    assert_eq!(s.c.connections() + s.d.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_connections_reach_the_right_backend() {
    let s = setup(json!({})).await;
    let mut tasks = vec![];
    for i in 0..200 {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let (sni, want) = [(HASH_SNI, "c"), (KRI_SNI, "d")][i % 2];
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&hello::client_hello(Some(sni), &[])).await.unwrap();
            assert_eq!(read_line(&mut c).await.as_deref(), Some(want));
            // The connection is still open both ways: an echo comes back.
            let msg = format!("conn-{i}\n");
            c.write_all(msg.as_bytes()).await.unwrap();
            assert_eq!(read_line(&mut c).await.unwrap(), msg.trim_end());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.c.connections() + s.d.connections(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_new_connections_and_keeps_live_ones() {
    let s = setup(json!({})).await;
    let mut live = TcpStream::connect(s.addr).await.unwrap();
    live.write_all(&hello::client_hello(Some(KRI_SNI), &[])).await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("d"));

    // Version 2: the KRI name now goes to backend c.
    let [eds, cla] = eds_cluster("hash", &[s.c.addr]);
    write_config(&s.file, "2", vec![eds, cla, listener("ingress", vec![chain(&[KRI_SNI], "hash")], json!({}))]);
    s.dp.wait_version("2");
    assert_eq!(who(s.addr, Some(KRI_SNI)).await.as_deref(), Some("c"));
    assert_eq!(who(s.addr, Some(TAG_SNI)).await, None, "removed route is gone");
    live.write_all(b"still here\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("still here"), "live connection keeps its route");

    // An invalid version is refused; version 2 keeps serving.
    std::fs::write(
        &s.file,
        b"resources: [{\"@type\": \"type.googleapis.com/envoy.config.cluster.v3.Cluster\", name: x, type: BOGUS}]",
    )
    .unwrap();
    let line = s.dp.logs.wait_for(&["configuration rejected"]);
    assert!(line.contains("resource #0 (x)") && line.contains("keeping=2"), "{line}");
    assert_eq!(who(s.addr, Some(KRI_SNI)).await.as_deref(), Some("c"));
    assert_eq!(s.dp.stat("envoy_config_update_rejected"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_open_connection_finish_then_exits_zero() {
    let mut s = setup(json!({})).await;
    let readiness = s.dp.readiness();
    assert_eq!(e2e::http_get(readiness, "/ready").unwrap(), (200, "READY".to_string()));
    let mut live = TcpStream::connect(s.addr).await.unwrap();
    live.write_all(&hello::client_hello(Some(HASH_SNI), &[])).await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("c"));

    s.dp.signal(libc::SIGTERM);
    s.dp.logs.wait_for(&["draining"]);
    assert_eq!(e2e::http_get(readiness, "/ready").unwrap(), (503, "TERMINATING".to_string()));
    // New connections are refused, the live one still works.
    assert!(TcpStream::connect(s.addr).await.is_err(), "the listener must stop accepting");
    live.write_all(b"after term\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("after term"));
    assert!(s.dp.child.try_wait().unwrap().is_none(), "dp must wait for the live connection");
    drop(live);
    let status = s.dp.wait_exit();
    assert!(status.success(), "{status:?}");
    s.dp.logs.wait_for(&["all connections finished"]);
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let dir = temp_dir("bad");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "resources:\n- '@type': type.googleapis.com/envoy.config.listener.v3.Listener\n  name: l\n  nope: 1\n",
    )
    .unwrap();
    let f = file.display().to_string();
    let dp = e2e::bin("dp");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--xds-file", &f, "--admin-address", "127.0.0.1:0", "--readiness-port", "0"], "resource #0 (l)"),
        (
            vec!["run", "--xds-file", "/nonexistent.yaml", "--admin-address", "127.0.0.1:0", "--readiness-port", "0"],
            "cannot read",
        ),
        (vec!["run", "--proxy-type", "gateway", "--xds-file", &f], "--proxy-type \"gateway\" is not valid"),
        (vec!["run", "--drain-time", "soon", "--xds-file", &f], "not a duration"),
    ];
    for (args, want) in cases {
        let (status, out) = e2e::run(&dp, &args, &[]);
        assert!(!status.success(), "{args:?} must fail");
        let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(out.contains(want), "{args:?}: want {want:?} in:\n{out}");
        assert!(last.len() < 400, "one line: {last}");
    }
    // A port in use is named (with a valid file: inputs are checked before anything binds).
    let good = dir.join("empty.yaml");
    std::fs::write(&good, "resources: []\n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let args = ["run", "--xds-file", good.to_str().unwrap(), "--admin-address", &format!("127.0.0.1:{port}")];
    let (status, out) = e2e::run(&dp, &args, &[]);
    assert!(!status.success());
    assert!(out.contains("cannot bind the admin API"), "{out}");
}

fn tcp_chain(names: &[&str], tcp_proxy: Value) -> Value {
    let mut tp = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "statPrefix": "t"
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut tp, tcp_proxy) {
        a.extend(b);
    }
    json!({
        "filterChainMatch": {"serverNames": names, "transportProtocol": "tls"},
        "filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": tp}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_retry_breakers_trip_and_idle_connections_close() {
    let live = Backend::start("live").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap() // closed when `l` drops: connections are refused
    };
    let (w1, w2) = (Backend::start("w1").await, Backend::start("w2").await);
    let mut limited = static_cluster("limited", &[live.addr]);
    limited["circuitBreakers"] = json!({"thresholds": [{"maxConnections": 1}]});
    let file = temp_dir("policies").join("policies.json");
    write_config(
        &file,
        "1",
        vec![
            static_cluster("flaky", &[dead, live.addr]),
            limited,
            static_cluster("idle", &[live.addr]),
            static_cluster("w1", &[w1.addr]),
            static_cluster("w2", &[w2.addr]),
            listener(
                "l",
                vec![
                    tcp_chain(&["retry.test"], json!({"cluster": "flaky", "maxConnectAttempts": 2})),
                    tcp_chain(&["noretry.test"], json!({"cluster": "flaky", "statPrefix": "noretry"})),
                    tcp_chain(&["limited.test"], json!({"cluster": "limited"})),
                    tcp_chain(&["idle.test"], json!({"cluster": "idle", "idleTimeout": "0.3s", "statPrefix": "idle"})),
                    tcp_chain(
                        &["weighted.test"],
                        json!({"weightedClusters": {"clusters": [{"name": "w1", "weight": 1}, {"name": "w2", "weight": 3}]}}),
                    ),
                ],
                json!({}),
            ),
        ],
    );
    let dp = Dp::start(&file, &[]);
    let addr = dp.listener("l");

    // A refused connect moves on to the next endpoint within max_connect_attempts.
    for _ in 0..4 {
        assert_eq!(who(addr, Some("retry.test")).await.as_deref(), Some("live"));
    }
    assert!(dp.stat("envoy_cluster_upstream_cx_connect_fail{envoy_cluster_name=\"flaky\"}") >= 1);
    // With one attempt, round robin sends every other connection to the dead endpoint.
    let mut outcomes = vec![];
    for _ in 0..4 {
        outcomes.push(who(addr, Some("noretry.test")).await);
    }
    assert!(outcomes.contains(&None) && outcomes.contains(&Some("live".into())), "{outcomes:?}");

    // max_connections 1: a second concurrent connection is refused and counted.
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(&hello::client_hello(Some("limited.test"), &[])).await.unwrap();
    assert_eq!(read_line(&mut first).await.as_deref(), Some("live"));
    assert_eq!(who(addr, Some("limited.test")).await, None);
    assert_eq!(dp.stat("envoy_cluster_upstream_cx_overflow{envoy_cluster_name=\"limited\"}"), 1);
    drop(first);

    // A silent connection is closed after the tcp_proxy idle timeout.
    let mut quiet = TcpStream::connect(addr).await.unwrap();
    quiet.write_all(&hello::client_hello(Some("idle.test"), &[])).await.unwrap();
    assert_eq!(read_line(&mut quiet).await.as_deref(), Some("live"));
    assert!(closed_without_data(&mut quiet).await);
    assert_eq!(dp.stat("envoy_tcp_idle_timeout{envoy_tcp_prefix=\"idle\"}"), 1);

    // Weighted clusters split 1:3.
    let mut w = std::collections::BTreeMap::new();
    for _ in 0..40 {
        *w.entry(who(addr, Some("weighted.test")).await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!((w["w1"], w["w2"]), (10, 30), "{w:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_place_in_slow_pieces_is_never_rejected() {
    let s = setup(json!({})).await;
    let text = std::fs::read_to_string(&s.file).unwrap().replace("\"version_info\": \"1\"", "\"version_info\": \"2\"");
    assert!(text.contains("\"version_info\": \"2\""));
    // An editor saving in place: truncate, then the content in pieces with pauses longer
    // than dp's poll interval (pacing the writer, not synchronising with dp).
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&s.file).unwrap();
    for piece in text.as_bytes().chunks(text.len() / 4 + 1) {
        std::io::Write::write_all(&mut f, piece).unwrap();
        std::io::Write::flush(&mut f).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    drop(f);
    s.dp.wait_version("2");
    assert_eq!(s.dp.stat("envoy_config_update_rejected"), 0, "a half-written file was reported as rejected");
    assert_eq!(who(s.addr, Some(KRI_SNI)).await.as_deref(), Some("d"));
}

/// A connection set up while dp swaps large configurations is routed by one of them, never
/// by a mix: the route and the clusters it names change together (issue 13). In version A
/// the name goes to cluster `one` (backend `v1`) and `two` holds `mixed-2`; in version B it
/// goes to `two` (backend `v2`) and `one` holds `mixed-1`. A route of one version with the
/// clusters of the other would reach a `mixed-*` backend. 2,000 more services make each
/// build take a while, and the client connects all through six swaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_during_large_updates_see_one_whole_version() {
    const NAME: &str = "x.svc.mesh";
    let (v1, v2, mixed1, mixed2) = (
        Backend::start("v1").await,
        Backend::start("v2").await,
        Backend::start("mixed-1").await,
        Backend::start("mixed-2").await,
    );
    let version = move |k: usize| {
        let a = k.is_multiple_of(2);
        let (route, one, two) = if a { ("one", v1.addr, mixed2.addr) } else { ("two", mixed1.addr, v2.addr) };
        let mut chains = vec![chain(&[NAME], route)];
        let mut resources = vec![static_cluster("one", &[one]), static_cluster("two", &[two])];
        for i in 0..2000 {
            let c = format!("filler-{i}-{}", k % 2);
            chains.push(chain(&[&format!("svc-{i}.filler")], &c));
            resources.push(static_cluster(&c, &[v1.addr]));
        }
        resources.push(listener("ingress", chains, json!({})));
        resources
    };
    let file = temp_dir("consistent").join("ingress.json");
    write_config(&file, "0", version(0));
    let dp = std::sync::Arc::new(Dp::start(&file, &["--proxy-type", "ingress"]));
    let addr = dp.listener("ingress");
    assert_eq!(who(addr, Some(NAME)).await.as_deref(), Some("v1"));

    let writer = {
        let dp = dp.clone();
        tokio::task::spawn_blocking(move || {
            for k in 1..=6 {
                write_config(&file, &k.to_string(), version(k));
                dp.wait_version(&k.to_string());
            }
        })
    };
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    while !writer.is_finished() {
        let got = who(addr, Some(NAME)).await.unwrap_or_else(|| "no answer".into());
        *answers.entry(got).or_default() += 1;
    }
    writer.await.unwrap();
    assert!(answers.keys().all(|k| k == "v1" || k == "v2"), "a connection saw a mixed or no route: {answers:?}");
    assert!(answers.contains_key("v1") && answers.contains_key("v2"), "connections spanned the swaps: {answers:?}");
    assert_eq!(who(addr, Some(NAME)).await.as_deref(), Some("v1"), "version 6 is A");
}

/// `prefix_ranges` (the destination address) picks the chain, the longest range first, as
/// MeshPassthrough's listener uses it; the other chain takes every other address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_address_picks_the_filter_chain() {
    let (one, two, other) = (Backend::start("one").await, Backend::start("two").await, Backend::start("other").await);
    let tcp = |cluster: &str| {
        json!([{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "cluster": cluster, "statPrefix": cluster}}])
    };
    let file = e2e::xds::write_file(vec![
        static_cluster("one", &[one.addr]),
        static_cluster("two", &[two.addr]),
        static_cluster("other", &[other.addr]),
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "passthrough",
            "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 0}},
            "filterChains": [
                {"filterChainMatch": {"prefixRanges": [{"addressPrefix": "127.0.0.0", "prefixLen": 30}]}, "filters": tcp("one")},
                {"filterChainMatch": {"prefixRanges": [{"addressPrefix": "127.0.0.2", "prefixLen": 32}]}, "filters": tcp("two")},
                {"filters": tcp("other")}
            ]
        }),
    ]);
    let dp = Dp::start(&file, &[]);
    let port = dp.only_listener().port();
    for (dest, want) in [("127.0.0.2", "two"), ("127.0.0.1", "one"), ("127.0.0.5", "other")] {
        let mut c = TcpStream::connect((dest, port)).await.unwrap();
        c.write_all(b"hi\n").await.unwrap();
        assert_eq!(read_line(&mut c).await.as_deref(), Some(want), "to {dest}");
    }
}

/// Kuma's transparent proxying binds `0.0.0.0:15001` and `[::]:15001` side by side: the
/// IPv6 listener takes IPv6 only (as Envoy's, unless `ipv4_compat`), so both bind and
/// each family reaches its own chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_and_ipv6_listeners_share_a_port() {
    let (four, six) = (Backend::start("four").await, Backend::start("six").await);
    let port = e2e::mesh::free_port();
    let on = |name: &str, ip: &str, cluster: &str| {
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": name,
            "address": {"socketAddress": {"address": ip, "portValue": port}},
            "filterChains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "cluster": cluster, "statPrefix": cluster}}]}]
        })
    };
    // With `ipv4_compat`, an IPv6 listener takes IPv4 as well.
    let dual_port = e2e::mesh::free_port();
    let mut dual = on("dual", "::", "six");
    dual["address"]["socketAddress"]["portValue"] = json!(dual_port);
    dual["address"]["socketAddress"]["ipv4Compat"] = json!(true);
    let file = e2e::xds::write_file(vec![
        static_cluster("four", &[four.addr]),
        static_cluster("six", &[six.addr]),
        on("passthrough_ipv4", "0.0.0.0", "four"),
        on("passthrough_ipv6", "::", "six"),
        dual,
    ]);
    let _dp = Dp::start(&file, &[]);
    for (dest, port, want) in [("127.0.0.1", port, "four"), ("::1", port, "six"), ("127.0.0.1", dual_port, "six")] {
        let mut c = TcpStream::connect((dest, port)).await.unwrap();
        c.write_all(b"hi\n").await.unwrap();
        assert_eq!(read_line(&mut c).await.as_deref(), Some(want), "to {dest}:{port}");
    }
}
