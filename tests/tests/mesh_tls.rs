//! How sidecars speak mesh mTLS, set from our `cp` for dp and Envoy alike: the Mesh
//! backend's `mode: PERMISSIVE` (inbounds also take plaintext and the application's own
//! TLS, as they are), and Kuma's MeshTLS policy, which here makes the mesh strict again
//! and pins TLS 1.3 on both ends of every connection.

use std::net::SocketAddr;

use e2e::mesh::request;
use e2e::sidecars::{Server, Sidecar, dp_and_envoy, until_answer};
use e2e::{Cp, who};

const PERMISSIVE_MESH: &str = concat!(
    "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n    \
     mode: PERMISSIVE\n",
    e2e::allow_all!()
);
const STRICT_TLS13: &str = "type: MeshTLS\nname: strict-tls13\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
                            rules:\n  - default:\n      mode: Strict\n      tlsVersion:\n        min: TLS13\n        max: TLS13\n";

/// What `openssl s_client` offering TLS 1.2 only (ALPN `kuma`, Kuma's tag SNI, no client
/// certificate) printed against `addr`.
fn openssl_tls12(addr: SocketAddr, service: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-tls1_2", "-alpn", "kuma"])
        .args(["-servername", &format!("{service}{{mesh=default}}")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (scripts/setup.sh installs it)");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).to_lowercase()
}

fn envoy_stat(side: &Sidecar, name: &str) -> u64 {
    match side {
        Sidecar::Envoy(e) => e.stat(name),
        Sidecar::Dp(_) => unreachable!("an Envoy stat of a dp sidecar"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_inbounds_take_plaintext_and_app_tls_until_meshtls_pins_strict_tls13() {
    let zone = Cp::start("zone-1");
    zone.apply(PERMISSIVE_MESH);
    let (servers, clients) = dp_and_envoy(&zone, &[]).await;

    // Permissive: mesh mTLS between every pair (TLS 1.2, the client default of both)...
    for c in &clients {
        for (addr, svc) in &c.outbounds {
            until_answer(*addr, Ok(svc), &format!("{} -> {svc}", c.name)).await;
        }
    }
    // ...and plaintext and the application's own TLS (no ALPN `kuma`) reach the app as sent.
    let envoy_server = &servers[1];
    let tls13 = format!("listener.{}_{}.ssl.versions.TLSv1.3", envoy_server.inbound.ip(), envoy_server.inbound.port());
    assert_eq!(envoy_stat(&envoy_server.side, &tls13), 0, "no client offered TLS 1.3 yet");
    for Server { service: svc, app, inbound: addr, .. } in &servers {
        assert_eq!(request(*addr).await.as_deref(), Ok(svc.as_str()), "plaintext to {svc}");
        assert_eq!(who(*addr, Some("app.example")).await.as_deref(), Some(svc.as_str()), "app TLS to {svc}");
        let hellos = app.received.lock().unwrap().iter().filter(|r| r.first() == Some(&0x16)).count();
        assert_eq!(hellos, 1, "{svc}'s app got the application's ClientHello untouched");
        let out = openssl_tls12(*addr, svc);
        assert!(!out.contains("protocol version"), "{svc} refused TLS 1.2 before any policy:\n{out}");
    }

    let envoy_client = &clients[1].side;
    assert!(envoy_stat(envoy_client, "cluster.srv-dp.ssl.versions.TLSv1.2") >= 1, "Envoy -> dp on TLS 1.2 first");

    // MeshTLS: strict, TLS 1.3 only, on the servers' inbounds and the clients' outbounds.
    zone.apply(STRICT_TLS13);
    for Server { service: svc, inbound: addr, .. } in &servers {
        until_answer(*addr, Err(()), &format!("plaintext to {svc} once strict")).await;
        let out = openssl_tls12(*addr, svc);
        assert!(out.contains("protocol version"), "{svc} took TLS 1.2 under min TLS13:\n{out}");
    }
    // Every pair gets through again, so every client offers TLS 1.3 now, dp as Envoy.
    for c in &clients {
        for (addr, svc) in &c.outbounds {
            until_answer(*addr, Ok(svc), &format!("{} -> {svc} on TLS 1.3", c.name)).await;
            for i in 0..3 {
                assert_eq!(request(*addr).await.as_deref(), Ok(svc.as_str()), "{} -> {svc}, request {i}", c.name);
            }
        }
    }
    assert!(envoy_stat(&envoy_server.side, &tls13) >= 6, "the Envoy server saw TLS 1.3 from both clients");
    assert!(envoy_stat(envoy_client, "cluster.srv-dp.ssl.versions.TLSv1.3") >= 3, "Envoy -> dp on TLS 1.3");
}

#[test]
fn a_meshtls_policy_with_a_bad_value_is_refused_naming_the_field() {
    let zone = Cp::start("zone-1");
    let out = zone.apply_refused(&STRICT_TLS13.replace("min: TLS13", "min: TLS14").replace("Strict", "Lenient"));
    assert!(out.contains("spec.rules[0].default.mode"), "{out}");
    assert!(out.contains("spec.rules[0].default.tlsVersion.min"), "{out}");
    assert!(zone.names("/meshes/default/meshtlses").is_empty());
}
