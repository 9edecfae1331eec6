//! Zone egress end to end: global and two zones, each with a `dp` ingress, zone-1 with a
//! `dp` egress (`dp run --proxy-type=egress`), the Mesh with `routing.zoneEgress`. Cross-zone
//! traffic from zone-1 leaves through the egress, ExternalServices are reached through it
//! by `<name>.mesh` under the mesh's MeshTrafficPermissions, and traffic survives the egress
//! going away and coming back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::http::HttpBackend;
use e2e::mesh::*;
use e2e::{Backend, Cp, Dp, wait_within};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const EGRESS_MESH: &str = concat!(
    "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\nrouting:\n  zoneEgress: true\n",
    e2e::allow_all!()
);

fn start_egress(global: &Cp, zone: &Cp, port: u16) -> Dp {
    let token = zone_token(global, "zone-1", &["egress"]);
    let resource = format!("type: ZoneEgress\nname: egress-01\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n");
    let dp = start_dp(zone, "egress", &token, &resource, &[]);
    dp.wait_ready();
    dp
}

/// Connections the egress opened to zone-2's ingress for `echo` (Envoy's
/// `cluster.default_echo.upstream_cx_total`).
fn egress_cx(egress: &Dp) -> u64 {
    egress.stat("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"default_echo\"}")
}

/// A line sent through a plain-TCP outbound: the TLS external backend's echo.
async fn line_through(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"hello\n").await.map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        match BufReader::new(s).read_line(&mut line).await {
            Ok(0) | Err(_) => Err("closed without an answer".to_string()),
            Ok(_) => Ok(line.trim_end().to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.unwrap_or_else(|_| Err("no answer within 10s".into()))
}

struct World {
    global: Cp,
    zone1: Cp,
    _zone2: Cp,
    _ingresses: Vec<Dp>,
    _echo: (Backend, Dp),
    _local: (Backend, Dp),
    egress_port: u16,
    egress: Option<Dp>,
    client: Dp,
    /// The client's outbounds: `echo` in zone-2, `local` in zone-1.
    to_echo: SocketAddr,
    to_local: SocketAddr,
    dns_port: u16,
    vip_port: u16,
}

async fn world() -> World {
    let global = Cp::global();
    global.apply(EGRESS_MESH);
    let n = std::process::id() % 200 + 20;
    let m = free_port() % 250;
    let cidr = format!("127.{n}.{m}.0/24");
    let vip_port = free_port();
    let vip_port_s = vip_port.to_string();
    let env = [("KUMA_DNS_SERVER_CIDR", cidr.as_str()), ("KUMA_DNS_SERVER_SERVICE_VIP_PORT", vip_port_s.as_str())];
    let zone1 = Cp::federated_via(e2e::temp_dir("zone-1"), "zone-1", &global.kds_address(), &global.ca_file, 0, &env);
    let zone2 = Cp::federated(&global, "zone-2", &[]);
    zone1.wait_federated();
    zone2.wait_federated();
    let ingresses = vec![
        start_ingress(&global, &zone1, "zone-1", free_port()),
        start_ingress(&global, &zone2, "zone-2", free_port()),
    ];
    let egress_port = free_port();
    let egress = start_egress(&global, &zone1, egress_port);
    let echo = Backend::start("echo-zone-2").await;
    let echo_dp = start_sidecar(&zone2, "echo-1", "echo", &echo, &[], &[]);
    let local = Backend::start("local-zone-1").await;
    let local_dp = start_sidecar(&zone1, "local-1", "local", &local, &[], &[]);
    let (to_echo, to_local, dns_port) = (free_port(), free_port(), free_port());
    let web = Backend::start("web").await;
    let client = start_sidecar(
        &zone1,
        "web-1",
        "web",
        &web,
        &[(to_echo, "echo"), (to_local, "local")],
        &[("KUMA_DATAPLANE_RUNTIME_BIND_OUTBOUNDS", "true"), ("KUMA_DNS_ENVOY_DNS_PORT", &dns_port.to_string())],
    );
    let to_echo: SocketAddr = format!("127.0.0.1:{to_echo}").parse().unwrap();
    let to_local: SocketAddr = format!("127.0.0.1:{to_local}").parse().unwrap();
    wait_answered_by(to_echo, "echo-zone-2", &[&client, &egress, &ingresses[1], &echo_dp]).await;
    wait_answered_by(to_local, "local-zone-1", &[&client, &local_dp]).await;
    World {
        global,
        zone1,
        _zone2: zone2,
        _ingresses: ingresses,
        _echo: (echo, echo_dp),
        _local: (local, local_dp),
        egress_port,
        egress: Some(egress),
        client,
        to_echo,
        to_local,
        dns_port,
        vip_port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_zone_traffic_leaves_through_the_egress_and_survives_it_going_away() {
    let mut w = world().await;
    // The request went client -> zone-1's egress (by SNI, still encrypted) -> zone-2's
    // ingress -> echo: the egress counted its connections to zone-2.
    let egress = w.egress.as_ref().unwrap();
    let before = egress_cx(egress);
    assert!(before > 0, "the egress carried the cross-zone request");
    assert_eq!(request(w.to_echo).await.as_deref(), Ok("echo-zone-2"));
    assert_eq!(egress_cx(egress), before + 1);
    let zones = w.global.ctl(&["inspect", "zone-egresses"]);
    assert!(zones.lines().any(|l| l.contains("egress-01") && l.contains("Online")), "{zones}");

    // Every egress of zone-1 gone: cross-zone requests fail fast, local ones go on.
    w.egress.take().unwrap().signal(libc::SIGKILL);
    wait_within(SYNC, "cross-zone requests refused once the egress is gone", || {
        let rt = tokio::runtime::Handle::current();
        let started = Instant::now();
        let r = tokio::task::block_in_place(|| rt.block_on(request(w.to_echo)));
        (r.is_err() && started.elapsed() < Duration::from_secs(5)).then_some(())
    });
    for _ in 0..5 {
        let started = Instant::now();
        assert!(request(w.to_echo).await.is_err(), "no egress: no way out of the zone");
        assert!(started.elapsed() < Duration::from_secs(5), "a refused request fails fast");
        assert_eq!(request(w.to_local).await.as_deref(), Ok("local-zone-1"), "zone-local traffic is untouched");
    }

    // An egress again: cross-zone requests succeed, no sidecar restarted.
    let egress = start_egress(&w.global, &w.zone1, w.egress_port);
    wait_answered_by(w.to_echo, "echo-zone-2", &[&w.client, &egress]).await;
    assert!(egress_cx(&egress) > 0);

    // zoneEgress off: straight to zone-2's ingress again, the egress sees nothing more.
    w.global.apply(&EGRESS_MESH.replace("zoneEgress: true", "zoneEgress: false"));
    wait_within(SYNC, "traffic to bypass the egress", || {
        let rt = tokio::runtime::Handle::current();
        let n = egress_cx(&egress);
        let ok = tokio::task::block_in_place(|| rt.block_on(request(w.to_echo))).as_deref() == Ok("echo-zone-2");
        (ok && egress_cx(&egress) == n).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_services_through_the_egress_by_mesh_name_under_mesh_traffic_permissions() {
    let w = world().await;
    let http = HttpBackend::start("ext-http").await;
    let (tls_cfg, tls_ca) = e2e::tls::self_signed("localhost");
    let tls = e2e::tls::serve(tls_cfg, "ext-tls").await;
    w.global.apply(&format!(
        "type: ExternalService\nmesh: default\nname: ext-http\ntags:\n  kuma.io/service: ext-http\n  \
         kuma.io/protocol: http\nnetworking:\n  address: 127.0.0.1:{}\n",
        http.addr.port()
    ));
    let ca = tls_ca.lines().map(|l| format!("        {l}")).collect::<Vec<_>>().join("\n");
    w.global.apply(&format!(
        "type: ExternalService\nmesh: default\nname: ext-tls\ntags:\n  kuma.io/service: ext-tls\n  \
         kuma.io/protocol: tcp\nnetworking:\n  address: localhost:{}\n  tls:\n    enabled: true\n    caCert:\n      \
         inlineString: |\n{ca}\n",
        tls.port()
    ));
    // Both names resolve to VIPs the client binds.
    let vip = |name: &str| -> SocketAddr {
        let v = wait_within(SYNC, &format!("{name} in the client's DNS"), || {
            Some(dig(w.dns_port, name)).filter(|v| !v.is_empty())
        });
        format!("{v}:{}", w.vip_port).parse().unwrap()
    };
    let (http_vip, tls_vip) = (vip("ext-http.mesh"), vip("ext-tls.mesh"));
    wait_within(SYNC, "ext-http through the egress", || {
        let rt = tokio::runtime::Handle::current();
        let got = tokio::task::block_in_place(|| rt.block_on(try_get(http_vip, "ext-http.mesh", "/x")));
        got.ok().filter(|g| g.status == 200 && g.body == "ext-http").map(|_| ())
    });
    // The egress terminated the client's mTLS and sent plain HTTP with the external host.
    let seen = http.last();
    assert_eq!(seen.path, "/x");
    // auto_host_rewrite has no DNS name to use for an IP address: the host stays.
    assert_eq!(seen.headers["host"], "ext-http.mesh");
    wait_within(SYNC, "ext-tls through the egress", || {
        let rt = tokio::runtime::Handle::current();
        let got = tokio::task::block_in_place(|| rt.block_on(line_through(tls_vip)));
        (got.as_deref() == Ok("ext-tls: hello")).then_some(())
    });

    // A MeshTrafficPermission that lets only `other` reach ext-http (its Mesh Deny outranks
    // the mesh-wide allow-all): web gets 403 from the egress for HTTP, while ext-tls, under
    // the allow-all alone, still answers.
    w.global.apply(
        "type: MeshTrafficPermission\nmesh: default\nname: only-other\nspec:\n  targetRef:\n    kind: MeshService\n    \
         name: ext-http\n  from:\n  - targetRef:\n      kind: Mesh\n    default:\n      action: Deny\n  - targetRef:\n      \
         kind: MeshService\n      name: other\n    default:\n      action: Allow\n",
    );
    wait_within(SYNC, "the egress to refuse web", || {
        let rt = tokio::runtime::Handle::current();
        let got = tokio::task::block_in_place(|| rt.block_on(try_get(http_vip, "ext-http.mesh", "/y")));
        got.ok().filter(|g| g.status == 403).map(|_| ())
    });
    let before = http.requests();
    assert_eq!(try_get(http_vip, "ext-http.mesh", "/z").await.map(|g| g.status), Ok(403));
    assert_eq!(http.requests(), before, "a refused request never reaches the external service");
    assert_eq!(line_through(tls_vip).await.as_deref(), Ok("ext-tls: hello"));
}
