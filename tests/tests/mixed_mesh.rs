//! A mesh in migration: `dp` and real Envoy 1.40 sidecars side by side, both fed by our
//! `cp` (Envoy bootstrapped from `POST /bootstrap` as kuma-dp would start it), speaking
//! mesh mTLS with Kuma's tag SNI (`backend{mesh=default}`) in every direction, directly
//! and across zones through a `dp` zone ingress that routes by that SNI without decrypting.

use e2e::mesh::free_port;
use std::net::SocketAddr;

use e2e::mesh::{request, write};
use e2e::sidecars::{Sidecar, dataplane, start, until_answer};
use e2e::{Backend, Cp, Dp, temp_dir};
use tokio::net::TcpStream;

/// mTLS, and Kuma's Prometheus metrics backend: every sidecar gets the metrics listener
/// (each on the port its Dataplane sets), which Envoy must accept as well.
const MESH: &str = concat!(
    "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n\
                    metrics:\n  enabledBackend: prom\n  backends:\n  - name: prom\n    type: prometheus\n",
    e2e::allow_all!()
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_and_envoy_sidecars_reach_each_other_directly_and_through_a_dp_ingress() {
    let global = Cp::global();
    global.apply(MESH);
    let zone1 = Cp::federated(&global, "zone-1", &[]);
    let zone2 = Cp::federated(&global, "zone-2", &[]);
    // zone-2's services arrive through its `dp` ingress.
    let zone_token = global.ctl(&["generate", "zone-token", "--zone", "zone-2", "--scope", "ingress"]);
    let ingress_port = free_port();
    let dir = temp_dir("mixed-ingress");
    let ingress_res = format!(
        "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {ingress_port}\n  \
         advertisedAddress: 127.0.0.1\n  advertisedPort: {ingress_port}\n"
    );
    zone1.wait_federated();
    zone2.wait_federated();
    let ingress = Dp::against(
        &zone2,
        "ingress",
        &write(&dir, "t", zone_token.trim()),
        &write(&dir, "zi.yaml", &ingress_res),
        &[],
    );
    ingress.wait_ready();

    // Servers: in zone-1 (reached directly) and in zone-2 (through the ingress), each once
    // behind dp and once behind Envoy.
    let mut servers = vec![];
    for (zone, zname) in [(&zone1, "z1"), (&zone2, "z2")] {
        for (kind, envoy) in [("dp", false), ("envoy", true)] {
            let svc = format!("srv-{kind}-{zname}");
            let app = Backend::start(&svc).await;
            let side = start(zone, envoy, dataplane(&svc, &svc, &app, &[])).await;
            servers.push((svc, app, side));
        }
    }
    // Clients in zone-1, dp and Envoy, each with an outbound to every server.
    let mut clients = vec![];
    for (kind, envoy) in [("dp", false), ("envoy", true)] {
        let outs: Vec<(u16, String)> = servers.iter().map(|(svc, _, _)| (free_port(), svc.clone())).collect();
        let refs: Vec<(u16, &str)> = outs.iter().map(|(p, s)| (*p, s.as_str())).collect();
        let web = Backend::start("web").await;
        let res = dataplane(&format!("client-{kind}"), &format!("client-{kind}"), &web, &refs);
        let metrics_port = res["metrics"]["conf"]["port"].as_u64().unwrap() as u16;
        let side = start(&zone1, envoy, res).await;
        clients.push((kind, outs, side, (web, metrics_port)));
    }

    // Every client/server pair answers every request.
    for (kind, outs, _, _) in &clients {
        for (port, svc) in outs {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            until_answer(addr, Ok(svc), &format!("client-{kind} -> {svc}")).await;
            for i in 0..5 {
                assert_eq!(request(addr).await.as_deref(), Ok(svc.as_str()), "client-{kind} -> {svc}, request {i}");
            }
        }
    }
    // dp servers saw each client's SPIFFE identity, through the ingress too.
    for (svc, _, side) in &servers {
        if let Sidecar::Dp(dp) = side {
            for client in ["client-dp", "client-envoy"] {
                dp.logs.wait_for(&[&format!("peer_identity=\"spiffe://default/{client}\"")]);
            }
            assert!(svc.starts_with("srv-dp"));
        }
    }
    // The ingress routed zone-2's services by Kuma's tag SNI, without decrypting.
    ingress.logs.wait_for(&["sni=\"srv-envoy-z2{mesh=default}\""]);
    ingress.logs.wait_for(&["sni=\"srv-dp-z2{mesh=default}\""]);
    // Kuma's names only: the dp client sends the tag SNI, there is no DNS-name alias.
    for (_, _, side, _) in &clients {
        if let Sidecar::Dp(dp) = side {
            let (_, dump) = dp.get("/config_dump");
            assert!(dump.contains("srv-envoy-z2{mesh=default}"), "no tag SNI in the client's config");
            assert!(!dump.contains(".sni\""), "an alias SNI is still generated");
        }
    }
    // Envoy took every configuration our cp sent, the metrics listener among it.
    for side in clients.iter().map(|c| &c.2).chain(servers.iter().map(|s| &s.2)) {
        if let Sidecar::Envoy(e) = side {
            assert_eq!(e.stat("listener_manager.lds.update_rejected"), 0, "{}", e.logs.lines().join("\n"));
            assert_eq!(e.stat("cluster_manager.cds.update_rejected"), 0);
        }
    }
    // The dp client's metrics port, scraped from its own address, answers with its stats
    // (through kuma-dp's metrics socket, which dp serves itself); Envoy's is bound.
    for (kind, _, side, (_, metrics_port)) in &clients {
        let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
        if let Sidecar::Envoy(_) = side {
            TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("Envoy's metrics listener {addr}: {e}"));
        }
        if let Sidecar::Dp(_) = side {
            let got = e2e::http::get(addr, "127.0.0.1", "/metrics", &[]).await;
            assert_eq!(got.status, 200, "client-{kind}: {}", got.body);
            assert!(got.body.contains("envoy_cluster_upstream_cx_total{"), "client-{kind}: {}", got.body);
        }
    }
}
