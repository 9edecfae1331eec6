//! The seed guide's multi-zone deployment with the real binaries: a global `cp`, two zone
//! `cp`s federated with it over KDS, a `dp` zone ingress per zone, an `echo` app behind a
//! `dp` sidecar in zone-2 and a client sidecar in zone-1; then each failure the guide
//! lists, with requests flowing throughout.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::mesh::*;
use e2e::{Backend, Cp, Dp, temp_dir, wait_within};
use tokio::net::{TcpListener, TcpStream};

/// Names of the ZoneIngresses a zone knows (its own and the synced ones) with their zone.
fn ingresses(zone: &Cp) -> Vec<(String, String)> {
    let v = zone.get_json("/zoneingresses");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), i["zone"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// Global, two federated zones, an ingress in each, `echo` in zone-2 and a client in
/// zone-1 whose outbound `echo` answers from zone-2.
struct World {
    global: Cp,
    zone1: Cp,
    zone2: Cp,
    _ingresses: Vec<Dp>,
    _echo2: (Backend, Dp),
    client: Dp,
    /// The client's outbound to `echo`.
    outbound: SocketAddr,
    /// zone-1's VIP port (the client binds every VIP of zone-1's loopback range: no
    /// transparent proxy needed).
    vip_port: u16,
    /// The client's `.mesh` DNS port.
    dns_port: u16,
}

impl World {
    async fn start() -> World {
        let global = Cp::global();
        global.apply(MESH);
        let kds = global.kds_address();
        Self::start_with(global, &kds).await
    }

    /// zone-1 dials global at `zone1_global` (global's own KDS address, or a relay to it).
    async fn start_with(global: Cp, zone1_global: &str) -> World {
        // A VIP range of zone-1's own in 127.0.0.0/8 (several tests run at once).
        let n = std::process::id() % 200 + 20;
        let m = free_port() % 250;
        let cidr = format!("127.{n}.{m}.0/24");
        let vip_port = free_port();
        let vip_port_s = vip_port.to_string();
        let env = [("KUMA_DNS_SERVER_CIDR", cidr.as_str()), ("KUMA_DNS_SERVER_SERVICE_VIP_PORT", vip_port_s.as_str())];
        let zone1 = Cp::federated_via(temp_dir("zone-1"), "zone-1", zone1_global, &global.ca_file, 0, &env);
        let zone2 = Cp::federated(&global, "zone-2", &[]);
        zone1.wait_federated();
        zone2.wait_federated();
        let ingresses = vec![
            start_ingress(&global, &zone1, "zone-1", free_port()),
            start_ingress(&global, &zone2, "zone-2", free_port()),
        ];
        let echo2 = Backend::start("echo-zone-2").await;
        let echo2_dp = start_sidecar(&zone2, "echo-1", "echo", &echo2, &[], &[]);
        let out_port = free_port();
        let dns_port = free_port();
        let web = Backend::start("web").await;
        let client = start_sidecar(
            &zone1,
            "web-1",
            "web",
            &web,
            &[(out_port, "echo")],
            &[("KUMA_DATAPLANE_RUNTIME_BIND_OUTBOUNDS", "true"), ("KUMA_DNS_ENVOY_DNS_PORT", &dns_port.to_string())],
        );
        let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
        wait_answered_by(outbound, "echo-zone-2", &[&client, &ingresses[1], &echo2_dp]).await;
        World {
            global,
            zone1,
            zone2,
            _ingresses: ingresses,
            _echo2: (echo2, echo2_dp),
            client,
            outbound,
            vip_port,
            dns_port,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_walkthrough_reaches_a_service_in_another_zone() {
    let w = World::start().await;

    // Both zones Online on global; each zone lists only itself.
    wait_zone_status(&w.global, "zone-1", "Online");
    wait_zone_status(&w.global, "zone-2", "Online");
    assert_eq!(w.zone1.names("/zones"), vec!["zone-1"]);

    // The request went client sidecar -> zone-2's ingress (by SNI, still encrypted) ->
    // echo's sidecar, which saw the client's mesh identity.
    w._echo2.1.logs.wait_for(&["peer_identity=\"spiffe://default/web\""]);

    // `.mesh` DNS on the client knows the remote service, in both name forms, and the
    // VIP answers (the client binds zone-1's loopback VIPs).
    let port = w.dns_port;
    // The remote service's VIP is allocated once its ingress reached zone-1.
    let vip =
        wait_within(SYNC, "echo.mesh in the client's DNS", || Some(dig(port, "echo.mesh")).filter(|v| !v.is_empty()));
    assert!(vip.starts_with("127."), "echo.mesh -> {vip:?}");
    assert_eq!(dig(port, "ECHO.mesh"), vip);
    let vip_addr: SocketAddr = format!("{vip}:{}", w.vip_port).parse().unwrap();
    wait_answered_by(vip_addr, "echo-zone-2", &[&w.client]).await;

    // zone-1's `inspect services` shows the remote service (global's insight, synced down).
    wait_within(SYNC, "echo Online in zone-1's inspect services", || {
        let out = w.zone1.ctl(&["inspect", "services"]);
        out.lines().any(|l| l.starts_with("echo ") && l.contains("Online") && l.contains("1/1")).then_some(())
    });
    // Global lists every zone's Dataplanes, with their zone.
    let dps = w.global.ctl(&["get", "dataplanes"]);
    assert!(dps.lines().any(|l| l.contains("echo-1-") && l.contains("zone-2")), "{dps}");
    assert!(dps.lines().any(|l| l.contains("web-1-") && l.contains("zone-1")), "{dps}");
    // And the ingresses, Online, with their connection.
    let zi = w.global.ctl(&["inspect", "zone-ingresses"]);
    assert_eq!(zi.lines().filter(|l| l.contains("Online")).count(), 2, "{zi}");
}

/// zone-1's copy of zone-2's ingress lists `service` among its available services.
fn zone2_offers(zone: &Cp, service: &str) -> bool {
    let v = zone.get_json("/zoneingresses");
    v["items"].as_array().unwrap().iter().any(|i| {
        i["zone"] == "zone-2"
            && i["availableServices"]
                .as_array()
                .is_some_and(|a| a.iter().any(|s| s["tags"]["kuma.io/service"] == service))
    })
}

/// Waits until `n` requests in a row are answered by `app`.
async fn wait_only(addr: SocketAddr, app: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + SYNC;
    let mut run = 0;
    while run < n {
        run = if request(addr).await.as_deref() == Ok(app) { run + 1 } else { 0 };
        assert!(tokio::time::Instant::now() < deadline, "requests to {addr} never went only to {app}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_zone_takes_its_ingress_out_of_the_other_zones_and_enabling_brings_it_back() {
    let w = World::start().await;
    // A local echo in zone-1 as well: requests go to both zones.
    let echo1 = Backend::start("echo-zone-1").await;
    let echo1_dp = start_sidecar(&w.zone1, "echo-2", "echo", &echo1, &[], &[]);
    wait_answered_by(w.outbound, "echo-zone-1", &[&w.client, &echo1_dp]).await;
    wait_answered_by(w.outbound, "echo-zone-2", &[&w.client]).await;

    // Disable zone-2 on global, in the seed guide's (nested `spec:`) form.
    w.global.apply("type: Zone\nname: zone-2\nspec:\n  enabled: false\n");
    assert_eq!(w.global.get_json("/zones/zone-2")["enabled"], false);
    wait_within(SYNC, "zone-2's ingress to leave zone-1", || {
        (!ingresses(&w.zone1).iter().any(|(_, z)| z == "zone-2")).then_some(())
    });
    wait_only(w.outbound, "echo-zone-1", 20).await;
    // A disabled zone shows Offline, though its CP is still connected.
    wait_zone_status(&w.global, "zone-2", "Offline");

    // Enabled again (Kuma's flat form): zone-2 serves again.
    w.global.apply("type: Zone\nname: zone-2\nenabled: true\n");
    wait_answered_by(w.outbound, "echo-zone-2", &[&w.client]).await;
    wait_zone_status(&w.global, "zone-2", "Online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_can_be_deleted_only_once_its_cp_is_gone_and_what_it_owned_goes_with_it() {
    let global = Cp::global();
    global.apply(MESH);
    let zone1 = Cp::federated(&global, "zone-1", &[]);
    let mut zone2 = Cp::federated(&global, "zone-2", &[]);
    zone2.wait_federated();
    let _ingress2 = start_ingress(&global, &zone2, "zone-2", free_port());
    wait_within(SYNC, "zone-2's ingress in zone-1", || {
        ingresses(&zone1).iter().any(|(_, z)| z == "zone-2").then_some(())
    });

    let (status, out) = global.ctl_status(&["delete", "zone", "zone-2"]);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("zone: unable to delete Zone, Zone CP is still connected, please shut it down first"),
        "{out}"
    );

    zone2.kill();
    // Streams that drop mark the zone Offline at once (well within 10 s).
    wait_within(Duration::from_secs(10), "zone-2 Offline", || {
        zone_status(&global).iter().any(|(z, s)| z == "zone-2" && s == "Offline").then_some(())
    });
    global.ctl(&["delete", "zone", "zone-2"]);
    assert_eq!(global.names("/zones"), vec!["zone-1"]);
    assert_eq!(global.names("/zone-insights"), vec!["zone-1"]);
    // Its ingress went with it, on global and, through the sync, in zone-1.
    assert!(!ingresses(&global).iter().any(|(_, z)| z == "zone-2"));
    wait_within(SYNC, "zone-2's ingress to leave zone-1", || {
        (!ingresses(&zone1).iter().any(|(_, z)| z == "zone-2")).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keeps_flowing_when_global_goes_away_and_zones_keep_working() {
    let mut w = World::start().await;
    let traffic = Traffic::start(w.outbound);
    traffic.wait_more(10).await;
    w.global.kill();
    traffic.wait_more(30).await;
    // zone-1 still runs its own proxies: a new echo instance there joins the client's endpoints.
    let echo1 = Backend::start("echo-zone-1").await;
    let echo1_dp = start_sidecar(&w.zone1, "echo-2", "echo", &echo1, &[], &[]);
    wait_answered_by(w.outbound, "echo-zone-1", &[&w.client, &echo1_dp]).await;
    traffic.wait_more(20).await;
    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-zone-2", "echo-zone-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_into_a_zone_keeps_flowing_when_its_cp_dies_and_global_shows_it_offline() {
    let mut w = World::start().await;
    let traffic = Traffic::start(w.outbound);
    traffic.wait_more(10).await;
    w.zone2.kill();
    wait_within(Duration::from_secs(10), "zone-2 Offline", || {
        zone_status(&w.global).iter().any(|(z, s)| z == "zone-2" && s == "Offline").then_some(())
    });
    traffic.wait_more(50).await;
    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-zone-2"]);
    assert_eq!(zone_status(&w.global).iter().find(|(z, _)| z == "zone-1").map(|(_, s)| s.as_str()), Some("Online"));
}

/// A TCP relay the test can cut and restore: the link between zone-1 and global.
struct Relay {
    port: u16,
    upstream: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let mut r = Relay { port: free_port(), upstream, task: None };
        r.restore().await;
        r
    }

    /// (Re)opens the link on the same port.
    async fn restore(&mut self) {
        let l = TcpListener::bind(("127.0.0.1", self.port)).await.expect("relay port");
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut down, _)) = l.accept().await {
                conns.spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        }));
    }

    /// Cuts the link: no new connections, and every open one is closed.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort(); // drops the listener and the JoinSet, which aborts every connection
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_link_to_global_freezes_zone_sync_but_not_traffic_and_heals_when_it_returns() {
    let global = Cp::global();
    global.apply(MESH);
    let mut relay = Relay::start(global.kds.unwrap()).await;
    let w = World::start_with(global, &format!("grpcs://localhost:{}", relay.port)).await;
    let traffic = Traffic::start(w.outbound);
    traffic.wait_more(10).await;

    relay.cut();
    wait_zone_status(&w.global, "zone-1", "Offline");
    // A service added in zone-2 meanwhile reaches global but not zone-1.
    let late = Backend::start("late").await;
    let _late_dp = start_sidecar(&w.zone2, "late-1", "late", &late, &[], &[]);
    wait_within(SYNC, "global to see zone-2's new service", || zone2_offers(&w.global, "late").then_some(()));
    traffic.wait_more(30).await;
    assert!(!zone2_offers(&w.zone1, "late"), "zone-1 learned of `late` without a link to global");

    relay.restore().await;
    wait_within(SYNC, "zone-1 to learn of `late` once the link is back", || {
        zone2_offers(&w.zone1, "late").then_some(())
    });
    wait_zone_status(&w.global, "zone-1", "Online");
    let outcomes = traffic.finish().await;
    assert_no_failures(&outcomes, &["echo-zone-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_global_gets_every_zones_proxies_back() {
    let mut w = World::start().await;
    let (dir, kds_port) = (w.global.dir.clone(), w.global.kds.unwrap().port());
    w.global.kill();
    // The memory store starts empty (as Kuma's): the zones fill it again when they reconnect.
    w.global = Cp::global_in(dir, kds_port);
    wait_within(SYNC, "every zone's Dataplanes and ZoneIngresses on the new global", || {
        let dps = w.global.names("/meshes/default/dataplanes");
        let zis = ingresses(&w.global);
        let ok = dps.iter().any(|n| n.starts_with("echo-1-"))
            && dps.iter().any(|n| n.starts_with("web-1-"))
            && zis.iter().any(|(_, z)| z == "zone-1")
            && zis.iter().any(|(_, z)| z == "zone-2");
        ok.then_some(())
    });
    wait_zone_status(&w.global, "zone-1", "Online");
    wait_zone_status(&w.global, "zone-2", "Online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_tokens_minted_on_global_work_only_for_their_zone_and_scope() {
    let (global, zone1, zone2) = e2e::mesh::global_and_two_zones();
    // zone-1's CP accepts global's token for its ingress (it verifies with the public key
    // global sent; it cannot mint zone tokens itself).
    let _ingress = start_ingress(&global, &zone1, "zone-1", free_port());
    let (status, out) = zone1.ctl_status(&["generate", "zone-token", "--zone", "zone-1", "--scope", "ingress"]);
    assert!(!status.success() && out.contains("issued by the global control plane"), "{out}");

    let token = zone_token(&global, "zone-1", &["ingress"]);
    let ingress = "type: ZoneIngress\nname: ingress-x\nnetworking:\n  address: 127.0.0.1\n  port: 1\n";
    let wrong_zone = start_dp(&zone2, "ingress", &token, ingress, &[]);
    wrong_zone.logs.wait_for(&["token is for zone zone-1, this is zone-2"]);
    let egress = "type: ZoneEgress\nname: egress-x\nnetworking:\n  address: 127.0.0.1\n  port: 2\n";
    let wrong_scope = start_dp(&zone1, "egress", &token, egress, &[]);
    wrong_scope.logs.wait_for(&["zone token scope does not include egress"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_pointed_at_global_is_told_to_use_a_zone() {
    let global = Cp::global();
    let dir = temp_dir("dp-at-global");
    let token = write(&dir, "token", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln");
    let resource = write(&dir, "dp.yaml", "type: ZoneIngress\nname: i\nnetworking:\n  address: 127.0.0.1\n  port: 1\n");
    let (status, out) = e2e::run(
        &e2e::bin("dp"),
        &[
            "run",
            "--proxy-type=ingress",
            &format!("--cp-address=https://localhost:{}", global.kds.unwrap().port()),
            "--dataplane-token-file",
            token.to_str().unwrap(),
            "--ca-cert-file",
            global.ca_file.to_str().unwrap(),
            "--dataplane-file",
            resource.to_str().unwrap(),
            "--admin-address",
            "127.0.0.1:0",
            "--readiness-port",
            "0",
        ],
        &[],
    );
    assert!(!status.success());
    assert!(out.contains("global control plane") && out.contains("zone control plane"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_zone_takes_global_resources_from_global_only() {
    let global = Cp::global();
    global.apply(MESH);
    let zone1 = Cp::federated(&global, "zone-1", &[]);
    zone1.wait_federated();
    // The Mesh came from global, labelled so; writing one on the zone is refused with Kuma's sentence.
    assert_eq!(zone1.get_json("/meshes/default")["labels"]["kuma.io/origin"], "global");
    let f = zone1.dir.join("mesh.yaml");
    std::fs::write(&f, "type: Mesh\nname: other\n").unwrap();
    let (status, out) = zone1.ctl_status(&["apply", "-f", f.to_str().unwrap()]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("On zone control plane you can only modify zone resources"), "{out}");
    // A policy applied on global reaches the zone under its hashed name.
    global.apply("type: TrafficPermission\nmesh: default\nname: allow-all\nsources:\n- match:\n    kuma.io/service: '*'\ndestinations:\n- match:\n    kuma.io/service: '*'\n");
    let names = wait_within(SYNC, "the policy in the zone", || {
        Some(zone1.names("/meshes/default/traffic-permissions")).filter(|n| !n.is_empty())
    });
    assert_eq!(names.len(), 1);
    assert!(names[0].starts_with("allow-all-"), "{names:?}");
    // And Dataplanes are written on zones, not on global.
    let dp = global.dir.join("dp.yaml");
    std::fs::write(&dp, "type: Dataplane\nmesh: default\nname: d\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  - port: 1\n    tags:\n      kuma.io/service: s\n").unwrap();
    let (status, out) = global.ctl_status(&["apply", "-f", dp.to_str().unwrap()]);
    assert!(
        !status.success() && out.contains("On global control plane you can not modify dataplane resources"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_with_a_bad_global_address_or_ca_says_which_variable_to_fix() {
    let dir = temp_dir("bad-global");
    let work = dir.display().to_string();
    let (status, out) = e2e::run(
        &e2e::bin("cp"),
        &["run", "--api-port", "0", "--dp-server-port", "0"],
        &[("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS", "https://global:5685"), ("KUMA_GENERAL_WORK_DIR", &work)],
    );
    assert!(!status.success());
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].contains("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS") && errors[0].contains("grpcs://"), "{out}");

    // A CA file that is not there.
    let (status, out) = e2e::run(
        &e2e::bin("cp"),
        &["run", "--api-port", "0", "--dp-server-port", "0"],
        &[
            ("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS", "grpcs://localhost:5685"),
            ("KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE", "/nonexistent/kuma-cp.crt"),
            ("KUMA_GENERAL_WORK_DIR", &work),
        ],
    );
    assert!(!status.success());
    assert!(out.contains("Error: cannot read KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE=/nonexistent/kuma-cp.crt"), "{out}");

    // A global whose certificate the zone cannot verify (another CA): one warning that
    // names both ways out, however often the zone retries.
    let global = Cp::global();
    let other = Cp::global();
    let other_ca = write(&dir, "other-ca.pem", &std::fs::read_to_string(&other.ca_file).unwrap());
    let zone = Cp::federated_via(temp_dir("zone-wrong-ca"), "zone-1", &global.kds_address(), &other_ca, 0, &[]);
    let line = zone.logs.wait_for(&["cannot sync with global"]);
    assert!(
        line.contains("KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE")
            && line.contains("KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY"),
        "{line}"
    );
    // Still not Online on global, and the zone keeps running.
    assert!(global.names("/zones").is_empty());
}
