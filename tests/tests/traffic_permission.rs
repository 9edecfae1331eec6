//! MeshTrafficPermission from our `cp`, enforced by dp and Envoy sidecars alike: with mTLS
//! on and no permission an inbound lets nobody in (Kuma fails closed); an allow-all opens
//! every pair; a MeshSubset Deny shuts out the clients whose certificate carries the tag
//! (`kuma://team/a`); a MeshService Allow outranks it for one server; a `rules` SPIFFE ID
//! deny holds against all of them.

use std::net::SocketAddr;

use e2e::Cp;
use e2e::mesh::{SYNC, request};
use e2e::sidecars::{Sidecar, dp_and_envoy, until_answer};

const MESH: &str =
    "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n";
const DENY_TEAM_A: &str = "type: MeshTrafficPermission\nname: deny-team-a\nmesh: default\nspec:\n  targetRef:\n    \
                           kind: Mesh\n  from:\n  - targetRef:\n      kind: MeshSubset\n      tags:\n        team: a\n    \
                           default:\n      action: Deny\n";
const CLIENT_DP_TO_SRV_DP: &str = "type: MeshTrafficPermission\nname: client-dp-to-srv-dp\nmesh: default\nspec:\n  \
                                   targetRef:\n    kind: MeshService\n    name: srv-dp\n  from:\n  - targetRef:\n      \
                                   kind: MeshService\n      name: client-dp\n    default:\n      action: Allow\n";

const DENY_CLIENT_ENVOY: &str = "type: MeshTrafficPermission\nname: deny-client-envoy\nmesh: default\nspec:\n  \
                                 targetRef:\n    kind: Mesh\n  rules:\n  - default:\n      deny:\n      - spiffeID:\n          \
                                 type: Exact\n          value: spiffe://default/client-envoy\n";

/// Connections the server's mesh-mTLS inbound refused by RBAC (stat prefix `prefix`).
fn denied(server: &Sidecar, prefix: &str) -> u64 {
    match server {
        Sidecar::Envoy(e) => e.stat(&format!("{prefix}rbac.denied")),
        Sidecar::Dp(d) => d.stat(&format!("envoy_rbac_denied{{envoy_rbac_prefix=\"{prefix}\"}}")),
    }
}

/// Polls until a request through `addr` fails because `server` refused it by RBAC.
async fn until_refused(addr: SocketAddr, server: &Sidecar, prefix: &str, what: &str) {
    e2e::poll_within(SYNC, &format!("{what} refused by RBAC"), async || {
        let before = denied(server, prefix);
        let got = request(addr).await;
        if got.is_err() && denied(server, prefix) > before { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_decide_who_reaches_dp_and_envoy_servers() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    // client-dp's inbound carries `team: a`, so its certificate says kuma://team/a.
    let (servers, clients) = dp_and_envoy(&zone, &[("client-dp", "team", "a")]).await;
    // Client `c` to server `s`: the outbound, the server, its RBAC stat prefix, and a name.
    let pair = |c: usize, s: usize| {
        let (client, server) = (&clients[c], &servers[s]);
        let prefix = format!("inbound_127.0.0.1_{}.", server.inbound.port());
        (client.outbounds[s].0, server, prefix, format!("{} -> {}", client.name, server.service))
    };

    // No permission: nobody gets in.
    for c in 0..2 {
        for s in 0..2 {
            let (addr, server, prefix, what) = pair(c, s);
            until_refused(addr, &server.side, &prefix, &what).await;
        }
    }
    // (Envoy's tcp_proxy dials the application before RBAC, which judges the first bytes,
    // closes the connection: nothing may get through.)
    for s in &servers {
        let got = s.app.received.lock().unwrap().concat();
        assert!(got.is_empty(), "a refused client's bytes reached {}: {got:?}", s.service);
    }

    // Allow all: every pair.
    zone.apply(e2e::allow_all!().trim_start_matches("---\n"));
    for c in 0..2 {
        for s in 0..2 {
            let (addr, server, _, what) = pair(c, s);
            until_answer(addr, Ok(&server.service), &what).await;
        }
    }

    // Team a denied: client-dp is out everywhere, client-envoy still in.
    zone.apply(DENY_TEAM_A);
    for s in 0..2 {
        let (addr, server, prefix, what) = pair(0, s);
        until_refused(addr, &server.side, &prefix, &what).await;
        let (addr, server, _, what) = pair(1, s);
        assert_eq!(request(addr).await.as_deref(), Ok(server.service.as_str()), "{what}");
    }

    // A MeshService source outranks the MeshSubset one: client-dp back in to srv-dp only.
    zone.apply(CLIENT_DP_TO_SRV_DP);
    let (addr, server, _, what) = pair(0, 0);
    until_answer(addr, Ok(&server.service), &what).await;
    let (addr, server, prefix, what) = pair(0, 1);
    until_refused(addr, &server.side, &prefix, &what).await;

    // Kuma 2.12's `rules` form: a SPIFFE ID deny holds against every allow.
    zone.apply(DENY_CLIENT_ENVOY);
    for s in 0..2 {
        let (addr, server, prefix, what) = pair(1, s);
        until_refused(addr, &server.side, &prefix, &what).await;
    }
    let (addr, server, _, what) = pair(0, 0);
    assert_eq!(request(addr).await.as_deref(), Ok(server.service.as_str()), "{what}");
}

#[test]
fn a_permission_with_an_unknown_action_is_refused_naming_the_field() {
    let zone = Cp::start("zone-1");
    let out = zone.apply_refused(&DENY_TEAM_A.replace("action: Deny", "action: deny"));
    assert!(out.contains("spec.from[0].default.action"), "{out}");
    assert!(zone.names("/meshes/default/meshtrafficpermissions").is_empty());
}
