//! The seed guide's Universal path: `cp run`, `ctl apply`, `ctl generate zone-token`,
//! `dp run --proxy-type=ingress --cp-address ... --dataplane-token-file ...
//! --ca-cert-file ... --dataplane-file ...`, then TLS by SNI to the Dataplanes.

use e2e::mesh::free_port;
use e2e::{Backend, Cp, Dp, WAIT, hello, read_line, temp_dir, who};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use e2e::mesh::MESH;

fn dataplane(name: &str, backend: &Backend, version: &str) -> String {
    format!(
        "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  - port: {}\n    \
         tags:\n      kuma.io/service: backend\n      version: {version}\n",
        backend.addr.port()
    )
}

struct Zone {
    cp: Cp,
    dp: Dp,
    ingress: SocketAddr,
    backends: Vec<Backend>,
}

/// One zone: cp, two Dataplanes (v1, v2) and an ingress `dp` bootstrapped as the seed says.
async fn zone(variant: &str) -> Zone {
    let cp = Cp::start("zone-1");
    zone_with(cp, variant).await
}

async fn zone_with(cp: Cp, variant: &str) -> Zone {
    cp.apply(MESH);
    let backends = vec![Backend::start("b1").await, Backend::start("b2").await, Backend::start("b3").await];
    cp.apply(&dataplane("backend-1", &backends[0], "v1"));
    cp.apply(&dataplane("backend-2", &backends[1], "v2"));
    let token = cp.ctl(&["generate", "zone-token", "--zone", "zone-1", "--scope", "ingress", "--scope", "egress"]);
    let dir = temp_dir("zone");
    let token_file = dir.join("zone-token");
    std::fs::write(&token_file, token).unwrap();
    let ingress_file = dir.join("ingress-dp.yaml");
    let port = free_port();
    std::fs::write(
        &ingress_file,
        format!(
            "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n  \
             advertisedAddress: 127.0.0.1\n  advertisedPort: {port}\n"
        ),
    )
    .unwrap();
    let dp = Dp::against(
        &cp,
        "ingress",
        &token_file,
        &ingress_file,
        &[("KUMA_DATAPLANE_RUNTIME_ENVOY_XDS_TRANSPORT_PROTOCOL_VARIANT", variant)],
    );
    dp.wait_ready();
    let ingress = dp.only_listener();
    assert_eq!(ingress.port(), port);
    Zone { cp, dp, ingress, backends }
}

/// Backends reached by `tries` connections with `sni` (refused connections count as "-").
async fn reached(addr: SocketAddr, sni: &str, tries: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..tries {
        seen.insert(who(addr, Some(sni)).await.unwrap_or_else(|| "-".into()));
    }
    seen
}

/// Polls until `tries` connections reach exactly `want`.
async fn wait_reached(addr: SocketAddr, sni: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = reached(addr, sni, want.len() * 3).await;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sni}: reached {got:?}, want {want:?}");
        tokio::task::yield_now().await;
    }
}

async fn routes_and_follows_dataplane_changes(variant: &str) {
    let z = zone(variant).await;
    assert_eq!(reached(z.ingress, "backend{mesh=default}", 6).await, BTreeSet::from(["b1".into(), "b2".into()]));
    assert_eq!(reached(z.ingress, "backend{mesh=default,version=v2}", 4).await, BTreeSet::from(["b2".into()]));

    // A live connection to b1, opened before b1 goes away.
    let mut live = TcpStream::connect(z.ingress).await.unwrap();
    live.write_all(&hello::client_hello(Some("backend{mesh=default,version=v1}"), &[])).await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("b1"));

    // A Dataplane added later becomes routable; a removed one stops receiving.
    z.cp.apply(&dataplane("backend-3", &z.backends[2], "v1"));
    wait_reached(z.ingress, "backend{mesh=default,version=v1}", &["b1", "b3"]).await;
    z.cp.ctl(&["delete", "dataplane", "backend-1", "-m", "default"]);
    wait_reached(z.ingress, "backend{mesh=default,version=v1}", &["b3"]).await;
    live.write_all(b"still routed\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("still routed"), "the live connection is untouched");

    // The CP lists the ingress with what it serves (recomputed after a short debounce).
    e2e::wait_until("the ingress's available services", || {
        let out = z.cp.ctl(&["get", "zone-ingresses", "-o", "json"]);
        (out.contains("ingress-01") && out.contains("\"backend\"")).then_some(())
    });
    drop(z.dp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_ingress_routes_dataplanes_by_sni() {
    routes_and_follows_dataplane_changes("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ingress_routes_dataplanes_by_sni() {
    routes_and_follows_dataplane_changes("DELTA_GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_the_wrong_scope_or_zone_is_refused_clearly() {
    let cp = Cp::start("zone-1");
    let dir = temp_dir("badtoken");
    let ingress_file = dir.join("ingress.yaml");
    std::fs::write(
        &ingress_file,
        format!("type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {}\n", free_port()),
    )
    .unwrap();
    for (args, want) in [
        (vec!["--zone", "zone-1", "--scope", "egress"], "scope"),
        (vec!["--zone", "zone-2", "--scope", "ingress"], "zone-2"),
    ] {
        let mut ctl_args = vec!["generate", "zone-token"];
        ctl_args.extend_from_slice(&args);
        let token_file = dir.join("token");
        std::fs::write(&token_file, cp.ctl(&ctl_args)).unwrap();
        let dp = Dp::against(&cp, "ingress", &token_file, &ingress_file, &[]);
        let line = dp.logs.wait_for(&["Unauthenticated"]);
        assert!(line.contains(want), "{args:?}: {line}");
        assert_eq!(e2e::http_get(dp.admin, "/ready").unwrap().0, 503, "not ready without configuration");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keeps_flowing_while_the_control_plane_is_down_and_resumes_after() {
    let mut z = zone("GRPC").await;
    let mut live = TcpStream::connect(z.ingress).await.unwrap();
    live.write_all(&hello::client_hello(Some("backend{mesh=default,version=v2}"), &[])).await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("b2"));

    let (dir, dp_port) = (z.cp.dir.clone(), z.cp.dp_server.port());
    z.cp.kill();
    // Frozen, not broken: every new connection still routes on the last configuration.
    for i in 0..20 {
        let sni = if i % 2 == 0 { "backend{mesh=default}" } else { "backend{mesh=default,version=v1}" };
        let got = who(z.ingress, Some(sni)).await;
        assert!(matches!(got.as_deref(), Some("b1" | "b2")), "connection {i} with the CP down: {got:?}");
    }
    live.write_all(b"cp is down\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("cp is down"));

    // The CP comes back (same work dir, same port; its in-memory store starts empty):
    // dp reconnects with the same zone token and picks up what is applied now.
    z.cp = Cp::start_in(dir, "zone-1", dp_port);
    z.cp.apply(MESH);
    z.cp.apply(&dataplane("backend-3", &z.backends[2], "v3"));
    wait_reached(z.ingress, "backend{mesh=default,version=v3}", &["b3"]).await;
    live.write_all(b"cp is back\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("cp is back"));
}
