//! Load balancing under failure, in dp and (where the figures are Envoy's own) against
//! real Envoy with the same configuration: weighted round robin, priority spill-over,
//! outlier detection.

use e2e::pair::{Pair, tcp_listener};
use e2e::{Backend, Dp, temp_dir};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn endpoint(addr: SocketAddr, weight: u32, health: &str) -> Value {
    json!({
        "endpoint": {"address": {"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}}},
        "loadBalancingWeight": weight,
        "healthStatus": health,
    })
}

/// A STATIC cluster over localities `(priority, endpoints)`.
fn cluster(name: &str, localities: Vec<(u32, Vec<Value>)>, extra: Value) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "1s",
        "loadAssignment": {"clusterName": name, "endpoints": localities.into_iter()
            .map(|(p, eps)| json!({"priority": p, "lbEndpoints": eps})).collect::<Vec<_>>()}
    });
    if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
        c.extend(extra);
    }
    c
}

/// Who answers one connection through `addr`: the backend's name, or `None` when the
/// proxy closed it (the upstream connection failed).
async fn who(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"hi\n").await.ok()?;
    e2e::read_line(&mut s).await
}

async fn tally(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        *m.entry(who(addr).await.unwrap_or_else(|| "-".into())).or_default() += 1;
    }
    m
}

async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut v = vec![];
    for n in names {
        v.push(Backend::start(n).await);
    }
    v
}

/// A loopback port nothing listens on.
fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn start_dp(resources: Vec<Value>) -> Dp {
    let file = temp_dir("resilience").join("xds.json");
    std::fs::write(&file, serde_json::to_vec(&json!({"version_info": "1", "resources": resources})).unwrap()).unwrap();
    Dp::start(&file, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_honours_weights_1_2_7_exactly() {
    let b: Vec<Backend> = backends(&["w1", "w2", "w7"]).await;
    let eps =
        vec![endpoint(b[0].addr, 1, "HEALTHY"), endpoint(b[1].addr, 2, "HEALTHY"), endpoint(b[2].addr, 7, "HEALTHY")];
    let dp = start_dp(vec![tcp_listener("l", "c"), cluster("c", vec![(0, eps)], json!({}))]);
    let got = tally(dp.listener("l"), 1000).await;
    // Earliest-deadline-first: exact over every cycle of 10.
    assert_eq!((got["w1"], got["w2"], got["w7"]), (100, 200, 700), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_level_half_unhealthy_spills_what_envoys_overprovisioning_says() {
    let b: Vec<Backend> = backends(&["p0", "p1a", "p1b"]).await;
    let localities = vec![
        (0, vec![endpoint(b[0].addr, 1, "HEALTHY"), endpoint(dead_port(), 1, "UNHEALTHY")]),
        (1, vec![endpoint(b[1].addr, 1, "HEALTHY"), endpoint(b[2].addr, 1, "HEALTHY")]),
    ];
    let pair = Pair::start(vec![tcp_listener("l", "c"), cluster("c", localities, json!({}))]);
    let (dp, envoy) = pair.listener("l");
    let n = 1000;
    let (ours, theirs) = (tally(dp, n).await, tally(envoy, n).await);
    let p0 = |m: &BTreeMap<String, usize>| m.get("p0").copied().unwrap_or(0);
    assert!(!ours.contains_key("-") && !theirs.contains_key("-"), "dp {ours:?}, Envoy {theirs:?}");
    // 1 healthy of 2 at 140 % overprovisioning: P0 keeps 70 %, 30 % spills to P1. The
    // level is drawn at random per connection in both proxies: 4.5 standard deviations
    // of 1,000 draws is 65.
    for (who, m) in [("dp", &ours), ("Envoy", &theirs)] {
        assert!((635..=765).contains(&p0(m)), "{who}: {m:?}");
    }
    assert!(p0(&ours).abs_diff(p0(&theirs)) <= 92, "dp {ours:?}, Envoy {theirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_dead_host_after_n_failures_and_tries_it_again() {
    let b: Vec<Backend> = backends(&["a", "b"]).await;
    let dead = dead_port();
    let eps = vec![endpoint(b[0].addr, 1, "HEALTHY"), endpoint(b[1].addr, 1, "HEALTHY"), endpoint(dead, 1, "HEALTHY")];
    let od = json!({"outlierDetection": {"consecutive5xx": 3, "interval": "1s", "baseEjectionTime": "1s",
        "maxEjectionPercent": 50}});
    let dp = start_dp(vec![tcp_listener("l", "c"), cluster("c", vec![(0, eps)], od)]);
    let addr = dp.listener("l");
    let got = tally(addr, 60).await;
    assert_eq!(got.get("-"), Some(&3), "exactly the 3 failures that eject the dead host: {got:?}");
    assert_eq!(dp.stat("envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{"), 1);
    let (_, clusters) = dp.get("/clusters");
    assert!(clusters.contains(&format!("c::{dead}::health_flags::/failed_outlier_check")), "{clusters}");
    // After the ejection time the host is tried again (and fails again): connections
    // go on until one fails.
    let deadline = std::time::Instant::now() + e2e::WAIT;
    while who(addr).await.is_some() {
        assert!(std::time::Instant::now() < deadline, "the ejected host was never tried again");
    }
    // Two more failures in a row eject it a second time; the others keep serving.
    let mut failed = 1;
    for _ in 0..30 {
        if who(addr).await.is_none() {
            failed += 1;
        }
    }
    assert_eq!(failed, 3, "the streak starts again after an ejection");
    assert_eq!(dp.stat("envoy_cluster_outlier_detection_ejections_enforced_total{"), 2);
}

// --- Across zones, through our cp -------------------------------------------------------

use e2e::Cp;
use e2e::mesh::{MESH, SYNC, Traffic, free_port, request, start_ingress, start_sidecar, wait_answered_by};

/// Outlier detection for every outbound: three connection failures in a row eject a host
/// for 5 s (then 10, ...); every host may be ejected. Long enough that a dead endpoint is
/// not tried again before the control plane takes it out.
const BREAKER: &str = "type: MeshCircuitBreaker\nname: eject-fast\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
    to:\n  - targetRef:\n      kind: Mesh\n    default:\n      outlierDetection:\n        interval: 1s\n        \
    baseEjectionTime: 5s\n        maxEjectionPercent: 100\n        detectors:\n          totalFailures:\n            \
    consecutive: 3\n";

/// Waits until the client's `echo` cluster has `n` hosts (every zone's endpoint arrived).
fn wait_hosts(client: &Dp, n: usize) {
    e2e::wait_within(SYNC, &format!("{n} hosts in the client's echo cluster"), || {
        let (_, body) = client.get("/clusters");
        (body.lines().filter(|l| l.starts_with("echo::") && l.contains("::priority::")).count() == n).then_some(())
    });
}

/// The client's view of its echo cluster, for failure messages.
fn clusters(client: &Dp) -> String {
    client.get("/clusters").1.lines().filter(|l| l.starts_with("echo::")).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_aware_traffic_stays_local_fails_over_to_the_other_zone_and_comes_back() {
    let global = Cp::global();
    global.apply(MESH);
    global.apply(
        "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n\
         routing:\n  localityAwareLoadBalancing: true\n",
    );
    global.apply(BREAKER);
    let zone1 = Cp::federated(&global, "zone-1", &[]);
    let zone2 = Cp::federated(&global, "zone-2", &[]);
    zone1.wait_federated();
    zone2.wait_federated();
    let _ingresses =
        [start_ingress(&global, &zone1, "zone-1", free_port()), start_ingress(&global, &zone2, "zone-2", free_port())];
    let echo1 = Backend::start("echo-zone-1").await;
    let echo2 = Backend::start("echo-zone-2").await;
    let echo1_dp = start_sidecar(&zone1, "echo-1", "echo", &echo1, &[], &[]);
    let _echo2_dp = start_sidecar(&zone2, "echo-2", "echo", &echo2, &[], &[]);
    let web = Backend::start("web").await;
    let out_port = free_port();
    let client = start_sidecar(&zone1, "web-1", "web", &web, &[(out_port, "echo")], &[]);
    let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    wait_hosts(&client, 2);
    wait_answered_by(outbound, "echo-zone-1", &[&client]).await;
    let (_, c) = client.get("/clusters");
    assert!(c.lines().any(|l| l.starts_with("echo::") && l.ends_with("::priority::1")), "zone-2 is the fallback:\n{c}");
    for _ in 0..100 {
        assert_eq!(request(outbound).await.as_deref(), Ok("echo-zone-1"), "{}", clusters(&client));
    }

    // zone-1's only echo instance goes away: after at most 3 failed connections its
    // endpoint is ejected and zone-2 serves.
    let traffic = Traffic::start(outbound);
    traffic.wait_more(20).await;
    drop(echo1_dp);
    traffic.wait_more(200).await;
    let outcomes = traffic.finish().await;
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    let errors: Vec<(usize, &String)> =
        outcomes.iter().enumerate().filter_map(|(i, o)| Some((i, o.as_ref().err()?))).collect();
    assert!(failed < 5, "{errors:?} of {} requests failed during the move:\n{}", outcomes.len(), clusters(&client));
    assert!(
        outcomes.iter().rev().take(100).all(|o| o.as_deref() == Ok("echo-zone-2")),
        "after the move zone-2 serves:\n{}",
        clusters(&client)
    );

    // zone-1's instance is back: traffic returns to it.
    let _echo1_back = start_sidecar(&zone1, "echo-1", "echo", &echo1, &[], &[]);
    wait_answered_by(outbound, "echo-zone-1", &[&client]).await;
    for _ in 0..50 {
        assert_eq!(request(outbound).await.as_deref(), Ok("echo-zone-1"), "{}", clusters(&client));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_zone_ingress_is_ejected_after_n_failures_and_tried_again_later() {
    let global = Cp::global();
    global.apply(MESH);
    global.apply(BREAKER);
    let zones: Vec<Cp> = ["zone-1", "zone-2", "zone-3"].iter().map(|z| Cp::federated(&global, z, &[])).collect();
    for z in &zones {
        z.wait_federated();
    }
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut ingresses: Vec<Option<Dp>> = zones
        .iter()
        .zip(&ports)
        .enumerate()
        .map(|(i, (z, p))| Some(start_ingress(&global, z, &format!("zone-{}", i + 1), *p)))
        .collect();
    let mut echoes = vec![];
    for (i, z) in zones.iter().enumerate() {
        let app = Backend::start(&format!("echo-zone-{}", i + 1)).await;
        let dp = start_sidecar(z, &format!("echo-{}", i + 1), "echo", &app, &[], &[]);
        echoes.push((app, dp));
    }
    let web = Backend::start("web").await;
    let out_port = free_port();
    let client = start_sidecar(&zones[0], "web-1", "web", &web, &[(out_port, "echo")], &[]);
    let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    wait_hosts(&client, 3);
    for app in ["echo-zone-1", "echo-zone-2", "echo-zone-3"] {
        wait_answered_by(outbound, app, &[&client]).await;
    }

    // zone-3's ingress dies: at most 3 connections fail, then zones 1 and 2 serve all.
    let traffic = Traffic::start(outbound);
    traffic.wait_more(20).await;
    ingresses[2] = None;
    traffic.wait_more(150).await;
    let outcomes = traffic.finish().await;
    let failed: Vec<usize> = (0..outcomes.len()).filter(|&i| outcomes[i].is_err()).collect();
    assert!(failed.len() <= 3, "{} failed:\n{}", failed.len(), clusters(&client));
    let after = failed.last().map_or(0, |i| i + 1);
    assert!(
        outcomes[after..].iter().all(|o| matches!(o.as_deref(), Ok("echo-zone-1" | "echo-zone-2"))),
        "{:?}",
        &outcomes[after..]
    );
    assert!(client.stat("envoy_cluster_outlier_detection_ejections_enforced_total{envoy_cluster_name=\"echo\"}") >= 1);

    // The ingress comes back on its address: once the ejection time is over, zone-3
    // takes traffic again.
    ingresses[2] = Some(start_ingress(&global, &zones[2], "zone-3", ports[2]));
    wait_answered_by(outbound, "echo-zone-3", &[&client]).await;

    // With MeshRetry's TCP connect attempts, the same failure costs no request at all:
    // a failed connect moves on to another zone.
    global.apply(
        "type: MeshRetry\nname: connect-again\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  \
         - targetRef:\n      kind: Mesh\n    default:\n      tcp:\n        maxConnectAttempt: 3\n",
    );
    e2e::wait_within(SYNC, "the retry policy to reach the client", || {
        client.get("/config_dump").1.contains("\"maxConnectAttempts\": 3").then_some(())
    });
    let traffic = Traffic::start(outbound);
    traffic.wait_more(20).await;
    ingresses[2] = None;
    traffic.wait_more(100).await;
    let outcomes = traffic.finish().await;
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    // A request whose connection was already through the ingress when it died cannot be
    // retried at connect time: at most that one fails.
    assert!(failed.len() <= 1, "{} of {} failed with retries: {failed:?}", failed.len(), outcomes.len());
}
