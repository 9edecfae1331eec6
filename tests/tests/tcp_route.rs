//! MeshTCPRoute from our `cp` on dp and Envoy client sidecars alike: the outbound to
//! `backend` first reaches both versions, then only the `version: v2` subset, then splits
//! between the `v1` subset and another service.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use e2e::mesh::{MESH, SYNC, free_port, request};
use e2e::sidecars::{Sidecar, dataplane, start, until_answer};
use e2e::{Backend, Cp};

const ONLY_V2: &str = "type: MeshTCPRoute\nname: backend-route\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
                       to:\n  - targetRef:\n      kind: MeshService\n      name: backend\n    rules:\n    - default:\n        \
                       backendRefs:\n        - kind: MeshServiceSubset\n          name: backend\n          tags:\n            \
                       version: v2\n";

/// `n` answers through `addr`.
async fn answers(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut out = vec![];
    for _ in 0..n {
        out.push(request(addr).await.unwrap_or_else(|e| format!("error: {e}")));
    }
    out
}

/// Polls until `n` answers in a row through `addr` all satisfy `ok`.
async fn until_all(addr: SocketAddr, n: usize, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        let got = answers(addr, n).await;
        if got.iter().all(|a| ok(a)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {got:?}");
    }
}

/// Client sidecars in `zone`, dp and Envoy, each with an outbound to `backend`: (kind, the
/// outbound's address, the sidecar).
async fn clients_of_backend(zone: &Cp) -> Vec<(&'static str, SocketAddr, Sidecar)> {
    let mut clients = vec![];
    for (kind, envoy) in [("dp", false), ("envoy", true)] {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let web = Backend::start("web").await;
        let res = dataplane(&format!("client-{kind}"), &format!("client-{kind}"), &web, &[(addr.port(), "backend")]);
        clients.push((kind, addr, start(zone, envoy, res).await));
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_an_outbound_to_a_subset_then_split_it() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    // backend: v1 and v2 behind dp sidecars; other: a second service.
    let mut servers: Vec<(Sidecar, Backend)> = vec![];
    for (name, service, version) in
        [("v1", "backend", Some("v1")), ("v2", "backend", Some("v2")), ("other", "other", None)]
    {
        let app = Backend::start(name).await;
        let mut res = dataplane(&format!("{name}-1"), service, &app, &[]);
        if let Some(v) = version {
            res["networking"]["inbound"][0]["tags"]["version"] = v.into();
        }
        servers.push((start(&zone, false, res).await, app));
    }
    let clients = clients_of_backend(&zone).await;

    // No route: both versions answer.
    for (kind, addr, _) in &clients {
        until_answer(*addr, Ok("v1"), &format!("client-{kind} -> backend")).await;
        until_answer(*addr, Ok("v2"), &format!("client-{kind} -> backend")).await;
    }
    // Only the v2 subset (round robin over both versions never gives 20 v2 in a row).
    zone.apply(ONLY_V2);
    for (kind, addr, _) in &clients {
        until_all(*addr, 20, &format!("client-{kind} -> backend v2"), |a| a == "v2").await;
        assert!(answers(*addr, 20).await.iter().all(|a| a == "v2"), "client-{kind}: v1 after the route");
    }
    // Split: half to the v1 subset, half to another service.
    let split = ONLY_V2.replace("version: v2\n", "version: v1\n          weight: 1\n")
        + "        - kind: MeshService\n          name: other\n          weight: 1\n";
    zone.apply(&split);
    for (kind, addr, _) in &clients {
        until_answer(*addr, Ok("other"), &format!("client-{kind} -> backend split")).await;
        let got: BTreeSet<String> = answers(*addr, 40).await.into_iter().collect();
        let want: BTreeSet<String> = ["other", "v1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "client-{kind}: the split's answers");
    }
    drop(servers);
}

/// Across zones: `v1` here in zone-1, `v2` in zone-2 behind its `dp` ingress, which routes
/// the route's subset SNI (`backend{mesh=default,version=v2}`) to the v2 endpoints only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_in_another_zone_is_reached_through_its_ingress() {
    let (global, zone1, zone2) = e2e::mesh::global_and_two_zones();
    let ingress = e2e::mesh::start_ingress(&global, &zone2, "zone-2", free_port());
    let mut servers = vec![];
    // zone-2 also runs a v1, so only the subset's SNI keeps its connections off it; each
    // instance has a tag of its own, so no instance's full tag set is the subset's.
    for (zone, name, version) in [(&zone1, "v1", "v1"), (&zone2, "v2", "v2"), (&zone2, "v1-z2", "v1")] {
        let app = Backend::start(name).await;
        let mut res = dataplane(&format!("{name}-1"), "backend", &app, &[]);
        res["networking"]["inbound"][0]["tags"]["version"] = version.into();
        res["networking"]["inbound"][0]["tags"]["instance"] = name.into();
        servers.push((start(zone, false, res).await, app));
    }
    let clients = clients_of_backend(&zone1).await;
    for (kind, addr, _) in &clients {
        until_answer(*addr, Ok("v2"), &format!("client-{kind} -> backend in zone-2")).await;
    }
    global.apply(ONLY_V2);
    for (kind, addr, _) in &clients {
        until_all(*addr, 20, &format!("client-{kind} -> backend v2 across zones"), |a| a == "v2").await;
        assert!(answers(*addr, 20).await.iter().all(|a| a == "v2"), "client-{kind}: not v2 after the route");
    }
    ingress.logs.wait_for(&["sni=\"backend{mesh=default,version=v2}\""]);
}
