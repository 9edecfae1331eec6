//! Transparent proxying on Universal, in a network namespace with the rules
//! `ctl install transparent-proxy` writes: an app calls `echo.mesh` with no outbound in
//! its Dataplane, unknown destinations pass through, excluded ports bypass dp, inbound
//! traffic is captured and mTLS-terminated, and uninstalling leaves the rules as they
//! were. Needs root (CI runs as root).

use e2e::mesh::{MESH, dataplane_token, free_port, start_sidecar, write};
use e2e::netns::NetNs;
use e2e::{Backend, Cp, Dp, bin, temp_dir, wait_until};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A tiny HTTP server answering every request with `name`, counting the requests.
fn http_app(l: std::net::TcpListener, name: &'static str) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    let l = TcpListener::from_std(l).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::Relaxed);
                let resp =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}", name.len());
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    seen
}

fn bind(addr: &str) -> std::net::TcpListener {
    let l = std::net::TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// Forwards connections made to `listener` (inside the namespace) to `to` (on this host):
/// the namespace's dp reaches the control plane as `localhost`, which its certificate names.
fn relay(listener: std::net::TcpListener, to: SocketAddr) {
    let l = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
}

/// `iptables-save -t nat` inside the namespace, without comments and counters.
fn nat_rules(ns: &NetNs) -> String {
    let (ok, out) = ns.run("iptables-save", &["-t", "nat"]);
    assert!(ok, "{out}");
    out.lines().filter(|l| !l.starts_with('#') && !l.starts_with(':')).collect::<Vec<_>>().join("\n")
        + &out
            .lines()
            .filter(|l| l.starts_with(':'))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
}

/// `curl` inside the namespace as an unprivileged user (not dp's): (exit ok, body).
fn curl(ns: &NetNs, url: &str) -> (bool, String) {
    ns.run("setpriv", &["--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS", "--max-time", "5", url])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_calls_mesh_services_by_name_with_no_outbounds_and_is_reached_through_inbound_capture() {
    let ns = NetNs::new();
    let ctl = bin("ctl");
    let ctl = ctl.to_str().unwrap();
    let before = nat_rules(&ns);
    let install = [
        ctl,
        "install",
        "transparent-proxy",
        "--kuma-dp-user",
        "root",
        "--redirect-dns",
        "--exclude-outbound-ports",
        "",
        "--ip-family-mode",
        "ipv4",
    ];
    // The excluded port: a server on this host that dp must never see.
    let bypass_l = bind(&format!("{}:0", ns.host_ip));
    let bypass_port = bypass_l.local_addr().unwrap().port().to_string();
    let mut install: Vec<&str> = install.to_vec();
    install[7] = &bypass_port;
    let (ok, out) = ns.run(install[0], &install[1..]);
    assert!(ok, "{out}");
    let installed = nat_rules(&ns);
    let (ok, out) = ns.run(install[0], &install[1..]);
    assert!(ok, "{out}");
    assert_eq!(nat_rules(&ns), installed, "installing twice changes nothing");

    let cp = Cp::start("zone-1");
    cp.apply(MESH);
    // echo, on this host, behind its sidecar on the veth address the namespace reaches.
    let echo_l = bind("127.0.0.1:0");
    let echo_port = echo_l.local_addr().unwrap().port();
    let echo_seen = http_app(echo_l, "echo");
    let echo_inbound = free_port();
    let echo_resource = format!(
        "type: Dataplane\nmesh: default\nname: echo-1\nnetworking:\n  address: {}\n  inbound:\n  - port: {echo_inbound}\n    \
         servicePort: {echo_port}\n    serviceAddress: 127.0.0.1\n    tags:\n      kuma.io/service: echo\n",
        ns.host_ip
    );
    let echo_dp = e2e::mesh::start_dp(&cp, "dataplane", &dataplane_token(&cp, "echo-1"), &echo_resource, &[]);
    echo_dp.wait_ready();

    let app_port = free_port();
    let app_seen = http_app(ns.listen(SocketAddr::new(ns.ns_ip.into(), app_port)), "app");
    let app_dp = start_app_dp(&ns, &cp, app_port, true);

    // 1. By name: the DNS redirect brings the query to dp, the VIP connection to 15001.
    let (ok, body) = wait_until("echo.mesh to answer through the capture", || {
        let got = curl(&ns, "http://echo.mesh:80/");
        (got.0 && got.1 == "echo").then_some(got)
    });
    assert!(ok && body == "echo");
    let (_, ip) =
        ns.run("setpriv", &["--reuid=65534", "--regid=65534", "--clear-groups", "getent", "ahostsv4", "echo.mesh"]);
    let vip = ip.split_whitespace().next().unwrap_or("").to_string();
    assert!(vip.starts_with("240."), "echo.mesh resolves to its VIP: {ip:?}");
    let (ok, body) = curl(&ns, &format!("http://{vip}:80/"));
    assert!(ok && body == "echo", "by VIP: {body}");
    assert!(echo_seen.load(Ordering::Relaxed) >= 2);
    assert!(app_dp.stat("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"echo\"}") >= 2);

    // 2. A destination the mesh does not know goes out unchanged, through dp's
    // passthrough; an excluded port does not touch dp at all.
    let outside_l = bind(&format!("{}:0", ns.host_ip));
    let outside_addr = outside_l.local_addr().unwrap();
    let outside = http_app(outside_l, "outside");
    let passthrough = "envoy_cluster_upstream_cx_total{envoy_cluster_name=\"outbound_passthrough_ipv4\"}";
    let p0 = app_dp.stat(passthrough);
    // dp's own upstream connections (to echo's sidecar, to the control plane) left
    // directly: none came back into its outbound capture.
    assert_eq!(p0, 0, "dp's own connections were captured");
    let (ok, body) = curl(&ns, &format!("http://{outside_addr}/"));
    assert!(ok && body == "outside", "{body}");
    assert_eq!(outside.load(Ordering::Relaxed), 1);
    assert_eq!(app_dp.stat(passthrough), p0 + 1, "through dp's passthrough");
    let bypass = http_app(bypass_l, "bypass");
    let (ok, body) = curl(&ns, &format!("http://{}:{bypass_port}/", ns.host_ip));
    assert!(ok && body == "bypass", "{body}");
    assert_eq!(bypass.load(Ordering::Relaxed), 1);
    assert_eq!(app_dp.stat(passthrough), p0 + 1, "an excluded port bypasses dp");

    // 3. Inbound: a mesh client on this host reaches the app; the namespace's PREROUTING
    // sends the connection to dp's inbound capture, which terminates the mTLS.
    let web = Backend::start("web").await;
    let out_port = free_port();
    let client = start_sidecar(&cp, "web-1", "web", &web, &[(out_port, "app")], &[]);
    let outbound: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    let before_app = app_seen.load(Ordering::Relaxed);
    wait_until("the client to learn the app's endpoint", || {
        let (_, c) = client.get("/clusters");
        c.contains(&format!("app::{}:{app_port}", ns.ns_ip)).then_some(())
    });
    let got = request_http(outbound).await;
    assert_eq!(got.as_deref(), Ok("app"), "{}", app_dp.logs.lines().join("\n"));
    assert_eq!(app_seen.load(Ordering::Relaxed), before_app + 1, "the app saw the connection");
    // Handed to the inbound listener of its original destination, mTLS terminated there.
    let inbound = format!("listener=\"inbound:{}:{app_port}\"", ns.ns_ip);
    app_dp.logs.wait_for(&[&inbound, "peer_identity=\"spiffe://default/web\""]);

    // 4. Uninstall: the rules are what they were.
    drop(app_dp);
    let (ok, out) = ns.run(ctl, &["uninstall", "transparent-proxy", "--ip-family-mode", "ipv4"]);
    assert!(ok, "{out}");
    assert_eq!(nat_rules(&ns), before, "uninstall removes exactly what install added");
}

/// The app's dp in the namespace: a Dataplane with an inbound on `app_port`, no outbound,
/// `dp run --transparent-proxy`; the redirect ports in the Dataplane too when
/// `in_resource` (else the control plane takes them from the proxy's metadata). dp runs
/// as root (excluded by uid), the app's curl as nobody.
fn start_app_dp(ns: &NetNs, cp: &Cp, app_port: u16, in_resource: bool) -> Dp {
    let cp_port = cp.dp_server.port();
    relay(ns.listen(SocketAddr::from(([127, 0, 0, 1], cp_port))), cp.dp_server);
    let dir = temp_dir("tproxy-app");
    let mut resource = format!(
        "type: Dataplane\nmesh: default\nname: app-1\nnetworking:\n  address: {}\n  inbound:\n  - port: {app_port}\n    \
         tags:\n      kuma.io/service: app\n",
        ns.ns_ip
    );
    if in_resource {
        resource.push_str("  transparentProxying:\n    redirectPortInbound: 15006\n    redirectPortOutbound: 15001\n");
    }
    let token = write(&dir, "token", &dataplane_token(cp, "app-1"));
    let resource_file = write(&dir, "app.yaml", &resource);
    let cp_address = format!("--cp-address=https://localhost:{cp_port}");
    let exec = ns.exec();
    let exec: Vec<&str> = exec.iter().map(String::as_str).collect();
    let app_dp = Dp::spawn_under(
        &exec,
        &ns.ns_ip.to_string(),
        &[
            "--proxy-type=dataplane",
            &cp_address,
            "--dataplane-token-file",
            token.to_str().unwrap(),
            "--ca-cert-file",
            cp.ca_file.to_str().unwrap(),
            "--dataplane-file",
            resource_file.to_str().unwrap(),
            "--transparent-proxy",
        ],
        &[("KUMA_DNS_PROXY_PORT", "15053")],
    );
    app_dp.wait_ready();
    app_dp
}

/// `ctl install transparent-proxy` inside the namespace, dp's user root, DNS redirected.
fn install(ns: &NetNs, extra: &[&str]) {
    let ctl = bin("ctl");
    let mut args =
        vec!["install", "transparent-proxy", "--kuma-dp-user", "root", "--redirect-dns", "--ip-family-mode", "ipv4"];
    args.extend_from_slice(extra);
    let (ok, out) = ns.run(ctl.to_str().unwrap(), &args);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_in_another_zone_is_called_by_name_through_the_capture_and_its_ingress() {
    let ns = NetNs::new();
    install(&ns, &[]);
    let (global, zone1, zone2) = e2e::mesh::global_and_two_zones();
    // zone-2's ingress and echo on this host, on the address the namespace reaches.
    let port = free_port();
    let ingress = format!(
        "type: ZoneIngress\nname: ingress-02\nnetworking:\n  address: {ip}\n  port: {port}\n  \
         advertisedAddress: {ip}\n  advertisedPort: {port}\n",
        ip = ns.host_ip
    );
    let token = e2e::mesh::zone_token(&global, "zone-2", &["ingress"]);
    let ingress_dp = e2e::mesh::start_dp(&zone2, "ingress", &token, &ingress, &[]);
    ingress_dp.wait_ready();
    let echo = Backend::start("echo-zone-2").await;
    let _echo_dp = start_sidecar(&zone2, "echo-2", "echo2", &echo, &[], &[]);
    let app_port = free_port();
    let _app = http_app(ns.listen(SocketAddr::new(ns.ns_ip.into(), app_port)), "app");
    let app_dp = start_app_dp(&ns, &zone1, app_port, false);
    // echo2 is a line-echo service: bash's /dev/tcp resolves the name (through the DNS
    // redirect) and connects (through the capture), as any app would.
    let (ok, body) = e2e::wait_within(e2e::mesh::SYNC, "echo2.mesh to answer from zone-2", || {
        let got = ns.run(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "bash",
                "-c",
                "exec 3<>/dev/tcp/echo2.mesh/80; echo hello >&3; head -n1 <&3",
            ],
        );
        (got.0 && got.1.trim() == "echo-zone-2").then_some(got)
    });
    assert!(ok && body.trim() == "echo-zone-2");
    assert!(app_dp.stat("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"echo2\"}") >= 1);
}

/// One HTTP GET through a plain TCP outbound: the body.
async fn request_http(addr: SocketAddr) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).ok_or(out)
}
