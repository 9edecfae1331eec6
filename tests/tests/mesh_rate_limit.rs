//! MeshRateLimit's TCP connection rate from our `cp` on dp and Envoy servers alike: once
//! the policy arrives, an inbound lets one connection in per interval and closes the rest.

use std::net::SocketAddr;

use e2e::Cp;
use e2e::mesh::{MESH, SYNC, request};
use e2e::sidecars::{Sidecar, dp_and_envoy, until_answer};

const ONE_PER_HOUR: &str = "type: MeshRateLimit\nname: one-per-hour\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
                            from:\n  - targetRef:\n      kind: Mesh\n    default:\n      local:\n        tcp:\n          \
                            connectionRate:\n            num: 1\n            interval: 1h\n";

/// Connections the server's inbound closed for the rate.
fn rate_limited(server: &Sidecar) -> u64 {
    match server {
        Sidecar::Envoy(e) => e.stat("local_rate_limit.tcp_rate_limit.rate_limited"),
        Sidecar::Dp(d) => {
            d.stat("envoy_local_rate_limit_rate_limited{envoy_local_rate_limit_prefix=\"tcp_rate_limit\"}")
        }
    }
}

/// Polls until a request through `addr` fails because `server` limited it.
async fn until_limited(addr: SocketAddr, server: &Sidecar, what: &str) {
    e2e::poll_within(SYNC, &format!("{what} rate limited"), async || {
        let before = if has_limiter(server) { rate_limited(server) } else { 0 };
        let got = request(addr).await;
        if got.is_err() && has_limiter(server) && rate_limited(server) > before {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await
}

/// Whether the server has the filter yet (dp lists the stat from then on).
fn has_limiter(server: &Sidecar) -> bool {
    match server {
        Sidecar::Envoy(_) => true,
        Sidecar::Dp(d) => d.get("/stats/prometheus").1.contains("envoy_local_rate_limit_prefix=\"tcp_rate_limit\""),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_rate_closes_the_connections_over_it() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (servers, clients) = dp_and_envoy(&zone, &[]).await;
    let client = &clients[0];
    for (addr, svc) in &client.outbounds {
        until_answer(*addr, Ok(svc), &format!("{} -> {svc}", client.name)).await;
    }
    zone.apply(ONE_PER_HOUR);
    for (s, server) in servers.iter().enumerate() {
        let addr = client.outbounds[s].0;
        until_limited(addr, &server.side, &format!("-> {}", server.service)).await;
        for i in 0..3 {
            assert!(request(addr).await.is_err(), "-> {}: request {i} within the hour got through", server.service);
        }
    }
}

#[test]
fn a_rate_without_a_valid_interval_is_refused_naming_the_field() {
    let zone = Cp::start("zone-1");
    let out = zone.apply_refused(&ONE_PER_HOUR.replace("interval: 1h", "interval: an hour"));
    assert!(out.contains("spec.from[0].default.local.tcp.connectionRate.interval"), "{out}");
    assert!(zone.names("/meshes/default/meshratelimits").is_empty());
}
