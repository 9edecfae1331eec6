//! MeshTimeout from our `cp` on dp and Envoy sidecars alike: an outbound's `idleTimeout`
//! (a `to` entry for one service) closes the clients' idle connections to it, an inbound's
//! (a `from` entry of a policy for the other service) the server's.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::mesh::MESH;
use e2e::sidecars::{Sidecar, dp_and_envoy, until_answer};
use e2e::{Cp, read_line};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUTS: &str = "type: MeshTimeout\nname: short-idle\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
                        to:\n  - targetRef:\n      kind: MeshService\n      name: srv-dp\n    default:\n      \
                        idleTimeout: 1s\n---\ntype: MeshTimeout\nname: srv-envoy-idle\nmesh: default\nspec:\n  \
                        targetRef:\n    kind: MeshService\n    name: srv-envoy\n  from:\n  - targetRef:\n      kind: Mesh\n    \
                        default:\n      idleTimeout: 1s\n";

/// A tcp_proxy's `idle_timeout` counter (stat prefix `prefix`).
fn idle_timeouts(side: &Sidecar, prefix: &str) -> u64 {
    match side {
        Sidecar::Envoy(e) => e.stat(&format!("tcp.{prefix}.idle_timeout")),
        Sidecar::Dp(d) => d.stat(&format!("envoy_tcp_idle_timeout{{envoy_tcp_prefix=\"{prefix}\"}}")),
    }
}

/// Opens a connection through `addr`, has one line answered, then waits for the proxy to
/// close it while it idles (the application never closes).
async fn closed_when_idle(addr: SocketAddr, what: &str) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello\n").await.unwrap();
    assert!(read_line(&mut s).await.is_some(), "{what}: no answer");
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{what}: still open after 20s idle ({closed:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeouts_close_idle_connections_on_both_sides() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    zone.apply(TIMEOUTS);
    let (servers, clients) = dp_and_envoy(&zone, &[]).await;
    for c in &clients {
        for (addr, svc) in &c.outbounds {
            until_answer(*addr, Ok(svc), &format!("{} -> {svc}", c.name)).await;
        }
    }
    // srv-dp: the clients' outbound closes.
    for c in &clients {
        let before = idle_timeouts(&c.side, "srv-dp");
        closed_when_idle(c.outbounds[0].0, &format!("{} -> srv-dp", c.name)).await;
        assert!(idle_timeouts(&c.side, "srv-dp") > before, "{}'s outbound did not time out", c.name);
    }
    // srv-envoy: its inbound closes.
    let srv_envoy = &servers[1];
    let prefix = format!("localhost_{}", srv_envoy.app.addr.port());
    for c in &clients {
        let before = idle_timeouts(&srv_envoy.side, &prefix);
        closed_when_idle(c.outbounds[1].0, &format!("{} -> srv-envoy", c.name)).await;
        assert!(idle_timeouts(&srv_envoy.side, &prefix) > before, "srv-envoy's inbound did not time out");
    }
}

#[test]
fn a_timeout_that_is_no_duration_is_refused_naming_the_field() {
    let zone = Cp::start("zone-1");
    let out = zone.apply_refused(&TIMEOUTS.replacen("idleTimeout: 1s", "idleTimeout: 10", 1));
    assert!(out.contains("spec.to[0].default.idleTimeout"), "{out}");
    assert!(zone.names("/meshes/default/meshtimeouts").is_empty());
}
