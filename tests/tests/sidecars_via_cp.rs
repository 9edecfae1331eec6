//! The seed guide's cross-zone path with our control plane: a client app calls its
//! sidecar's outbound `127.0.0.1:<port>`; the bytes travel as mTLS (SPIFFE identities
//! from the mesh's builtin CA, delivered over SDS) to the server's sidecar, directly or
//! through a zone ingress that routes by SNI without decrypting, and reach the app.

use e2e::mesh::free_port;
use e2e::{Backend, Cp, Dp, read_line, temp_dir};
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use e2e::mesh::MESH;

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts `dp run` against `cp` with a token and a resource file; its `.mesh` DNS
/// listener (sidecars) goes on `dns_port`.
fn dp(cp: &Cp, proxy_type: &str, token: &str, resource: &str, dns_port: u16) -> Dp {
    dp_with_env(cp, proxy_type, token, resource, &[("KUMA_DNS_ENVOY_DNS_PORT", &dns_port.to_string())])
}

fn dp_with_env(cp: &Cp, proxy_type: &str, token: &str, resource: &str, env: &[(&str, &str)]) -> Dp {
    let dir = temp_dir("sidecar-dp");
    let token_file = write(&dir, "token", token);
    let resource_file = write(&dir, "resource.yaml", resource);
    let dp = Dp::against(cp, proxy_type, &token_file, &resource_file, env);
    dp.wait_ready();
    dp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_sidecar_to_sidecar_and_through_the_ingress_over_mtls() {
    let cp = Cp::start("zone-1");
    cp.apply(MESH);
    let app = Backend::start("server-app").await;
    let (inbound, web_inbound, outbound, ingress_port) = (free_port(), free_port(), free_port(), free_port());

    // The server's sidecar: inbound `inbound` -> the app.
    let backend_dp = format!(
        "type: Dataplane\nmesh: default\nname: backend-1\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: {inbound}\n    servicePort: {}\n    tags:\n      kuma.io/service: backend\n",
        app.addr.port()
    );
    let token = cp.ctl(&["generate", "dataplane-token", "--name", "backend-1", "-m", "default"]);
    let server = dp(&cp, "dataplane", &token, &backend_dp, free_port());

    // A zone ingress in front of the server's zone, advertised to the client as a
    // remote zone's ingress.
    let zone_token = cp.ctl(&["generate", "zone-token", "--zone", "zone-1", "--scope", "ingress"]);
    let ingress = dp(
        &cp,
        "ingress",
        &zone_token,
        &format!(
            "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {ingress_port}\n  advertisedAddress: 127.0.0.1\n  advertisedPort: {ingress_port}\n"
        ),
        free_port(),
    );
    cp.apply(&format!(
        "type: ZoneIngress\nname: zone-2-ingress\nzone: zone-2\nnetworking:\n  address: 127.0.0.1\n  port: {ingress_port}\n  \
         advertisedAddress: 127.0.0.1\n  advertisedPort: {ingress_port}\navailableServices:\n- instances: 1\n  mesh: default\n  \
         tags:\n    kuma.io/service: backend\n"
    ));

    // The client's sidecar: outbound 127.0.0.1:`outbound` -> service backend.
    let web_dp = format!(
        "type: Dataplane\nmesh: default\nname: web-1\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: {web_inbound}\n    servicePort: 1\n    tags:\n      kuma.io/service: web\n  outbound:\n  \
         - port: {outbound}\n    tags:\n      kuma.io/service: backend\n"
    );
    let token = cp.ctl(&["generate", "dataplane-token", "--name", "web-1", "-m", "default"]);
    let dns_port = free_port();
    let client = dp(&cp, "dataplane", &token, &web_dp, dns_port);

    // Enough requests to use both endpoints of `backend`: the server's inbound and the
    // ingress (equal weights).
    for i in 0..6 {
        let mut c = TcpStream::connect(("127.0.0.1", outbound)).await.unwrap();
        c.write_all(format!("request {i}\n").as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut c).await.as_deref(), Some("server-app"), "request {i}");
    }
    // Every request arrived at the server sidecar as mTLS from the web identity...
    server.logs.wait_count(&["listener=\"inbound:127.0.0.1", "peer_identity=\"spiffe://default/web\""], 6);
    // ...and some went through the ingress, routed by SNI to the server's inbound.
    ingress.logs.wait_for(&["access", &format!("upstream=127.0.0.1:{inbound}")]);
    assert_eq!(app.connections(), 6);

    // kuma-dp's metrics socket, where a kuma-cp's Prometheus listener sends `/metrics`:
    // the server sidecar's own stats, its inbound's six connections among them.
    let metrics = scrape(&server.dir.join("kuma-mh-backend-1-default.sock")).await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{metrics}");
    let inbound_cx = format!("envoy_listener_downstream_cx_total{{envoy_listener_address=\"127.0.0.1_{inbound}\"}} 6");
    assert!(metrics.lines().any(|l| l == inbound_cx), "no `{inbound_cx}` in:\n{metrics}");

    // The client sidecar answers `.mesh` names (both forms) with the service's VIP.
    let vip = dig(dns_port, "backend.mesh");
    assert!(vip.starts_with("240."), "backend.mesh -> {vip:?}");
    assert_eq!(dig(dns_port, "BACKEND.mesh"), vip);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_prometheus_backend_exposes_each_sidecars_stats_on_its_metrics_port() {
    let cp = Cp::start("zone-1");
    let metrics_port = free_port();
    // The application's own metrics, which the proxy serves after its stats.
    let app_metrics = e2e::http::HttpBackend::start("app_requests_total 7").await;
    cp.apply(MESH);
    cp.apply(&format!(
        "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n\
         metrics:\n  enabledBackend: prom\n  backends:\n  - name: prom\n    type: prometheus\n    conf:\n      \
         port: {metrics_port}\n      path: /metrics\n      aggregate:\n      - name: app\n        address: 127.0.0.1\n        \
         port: {}\n        path: /app/metrics\n",
        app_metrics.addr.port()
    ));
    let app = Backend::start("app").await;
    let _server = backend_sidecar(&cp, &app);

    // Prometheus beside the proxy (from its own address) scrapes in plain text: the route
    // leads through the metrics socket to the proxy's stats, this very connection counted.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let got = e2e::http::get(addr, "127.0.0.1", "/metrics", &[("x-prometheus-scrape-timeout-seconds", "5")]).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.lines().any(|l| l == "app_requests_total 7"), "no application metrics in:\n{}", got.body);
    let seen = app_metrics.last();
    assert_eq!(seen.path, "/app/metrics");
    assert_eq!(seen.headers.get("x-prometheus-scrape-timeout-seconds").map(String::as_str), Some("5"));
    let own = format!("envoy_listener_downstream_cx_total{{envoy_listener_address=\"127.0.0.1_{metrics_port}\"}} ");
    let counted = got.body.lines().find_map(|l| l.strip_prefix(own.as_str())).map(|v| v.parse::<u64>().unwrap());
    assert!(counted.is_some_and(|n| n >= 1), "no `{own}<n>` with n >= 1 in:\n{}", got.body);
    // `usedonly` (kuma-dp passes a scrape's query on) leaves out the stats at zero.
    // (A stat that stays at zero: no connection to the app fails here.)
    let zero = got.body.lines().find(|l| l.starts_with("envoy_cluster_upstream_cx_connect_fail{") && l.ends_with(" 0"));
    let zero = zero.unwrap_or_else(|| panic!("no cluster's connect_fail at 0 in:\n{}", got.body));
    let used = e2e::http::get(addr, "127.0.0.1", "/metrics?usedonly", &[]).await;
    assert_eq!(used.status, 200, "{}", used.body);
    assert!(used.body.contains(&own) && !used.body.lines().any(|l| l == zero), "`{zero}` kept:\n{}", used.body);

    // Anyone else must bring a mesh certificate (the backend does not skip mTLS): plain text
    // from another address gets no metrics.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut c = sock.connect(addr).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_end(&mut c, &mut answer),
    );
    let _ = read.await.expect("the TLS chain should close a plain-text client");
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshmetric_policy_exposes_the_sidecars_used_stats_and_its_applications_metrics() {
    let cp = Cp::start("zone-1");
    cp.apply(MESH);
    let (metrics_port, app) = (free_port(), Backend::start("app").await);
    let app_metrics = e2e::http::HttpBackend::start("app_orders_total 12").await;
    cp.apply(&format!(
        "type: MeshMetric\nname: metrics\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  default:\n    \
         applications:\n    - port: {}\n      path: /app/metrics\n    backends:\n    - type: Prometheus\n      \
         prometheus:\n        port: {metrics_port}\n        path: /metrics\n        clientId: main\n",
        app_metrics.addr.port()
    ));
    let _server = backend_sidecar(&cp, &app);

    // The policy's Prometheus listener leads to the metrics socket: the proxy's stats in
    // use only (the policy does not include unused ones), then the application's.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let got = e2e::http::get(addr, "127.0.0.1", "/metrics", &[]).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.lines().any(|l| l == "app_orders_total 12"), "no application metrics in:\n{}", got.body);
    assert_eq!(app_metrics.last().path, "/app/metrics");
    assert!(got.body.contains("envoy_listener_downstream_cx_total{"), "no proxy stats in:\n{}", got.body);
    let zero = got.body.lines().find(|l| l.starts_with("envoy_") && l.ends_with(" 0"));
    assert_eq!(zero, None, "an unused stat is served");
}

/// The sidecar `backend-1` of service `backend` in front of `app`, ready.
fn backend_sidecar(cp: &Cp, app: &Backend) -> Dp {
    let backend_dp = format!(
        "type: Dataplane\nmesh: default\nname: backend-1\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: {}\n    servicePort: {}\n    tags:\n      kuma.io/service: backend\n",
        free_port(),
        app.addr.port()
    );
    let token = cp.ctl(&["generate", "dataplane-token", "--name", "backend-1", "-m", "default"]);
    dp(cp, "dataplane", &token, &backend_dp, free_port())
}

/// The sidecar `web-1` of service `web`, with an outbound to `backend` on the returned
/// port, ready and with `backend-1` as an endpoint.
fn web_sidecar(cp: &Cp) -> (Dp, u16) {
    let outbound = free_port();
    let web_dp = format!(
        "type: Dataplane\nmesh: default\nname: web-1\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: {}\n    servicePort: 1\n    tags:\n      kuma.io/service: web\n  outbound:\n  \
         - port: {outbound}\n    tags:\n      kuma.io/service: backend\n",
        free_port()
    );
    let token = cp.ctl(&["generate", "dataplane-token", "--name", "web-1", "-m", "default"]);
    let web = dp(cp, "dataplane", &token, &web_dp, free_port());
    // Ready, and `backend-1` among its endpoints (cp records a new server serving a moment
    // after the server's own readiness; a client's first snapshot may come before it).
    web.wait_endpoints("backend", 1);
    (web, outbound)
}

/// `GET /metrics` on a Unix socket, as the Prometheus listener's cluster sends it: the
/// whole response.
async fn scrape(socket: &std::path::Path) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_string(&mut out)).await;
    read.unwrap_or_else(|_| panic!("{}: no answer within 30 s", socket.display())).unwrap();
    out
}

/// `dig @127.0.0.1 -p <port> +short <name> A`.
fn dig(port: u16, name: &str) -> String {
    let out = std::process::Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+time=5", "+tries=1", name, "A"])
        .output()
        .expect("dig (scripts/setup.sh installs dnsutils)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Kuma 2.14's embedded DNS mode (`KUMA_DNS_PROXY_PORT`): dp asks for it with
/// `feature-embedded-dns`, the control plane puts the records in the dynamic-config
/// listener's `/dns` body instead of a `dns_filter` listener, and dp serves them on its
/// own DNS proxy, following changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_dns_proxy_answers_with_the_records_of_the_dynamic_config() {
    let cp = Cp::start("zone-1");
    cp.apply(MESH);
    let dataplane = |name: &str, service: &str, port: u16, outbound: &str| {
        format!(
            "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
             - port: {port}\n    servicePort: 1\n    tags:\n      kuma.io/service: {service}\n{outbound}"
        )
    };
    cp.apply(&dataplane("backend-1", "echo-server_echo-example_svc_1010", free_port(), ""));
    // cp allocates VIPs in a reconciler, after the Dataplane is stored (as Kuma's VIP
    // allocator does): the proxy's first configuration has the record only once it exists.
    e2e::wait_until("the service's VIP", || {
        let (status, body) = e2e::http_get(cp.api, "/configs/kuma-default-dns-vips").ok()?;
        (status == 200 && body.contains("echo-server_echo-example_svc_1010")).then_some(())
    });
    let outbound = format!(
        "  outbound:\n  - port: {}\n    tags:\n      kuma.io/service: echo-server_echo-example_svc_1010\n",
        free_port()
    );
    let web = dataplane("web-1", "web", free_port(), &outbound);
    let token = cp.ctl(&["generate", "dataplane-token", "--name", "web-1", "-m", "default"]);
    let (proxy_port, envoy_dns_port) = (free_port(), free_port());
    let client = dp_with_env(
        &cp,
        "dataplane",
        &token,
        &web,
        &[("KUMA_DNS_PROXY_PORT", &proxy_port.to_string()), ("KUMA_DNS_ENVOY_DNS_PORT", &envoy_dns_port.to_string())],
    );
    // Ready only once the DNS proxy has its records, so the first query already answers.
    let vip = dig(proxy_port, "echo-server_echo-example_svc_1010.mesh");
    assert!(vip.starts_with("240."), "echo-server_echo-example_svc_1010.mesh -> {vip:?}");
    assert_eq!(dig(proxy_port, "echo-server.echo-example.svc.1010.mesh"), vip);
    client.logs.wait_for(&["DNS proxy: first records received"]);
    // The records came from the dynamic-config listener, not from a `dns_filter` one.
    let (_, dump) = client.get("/config_dump");
    assert!(dump.contains("_kuma:dynamicconfig"), "no dynamic-config listener in the config dump");
    assert!(!dump.contains("kuma:dns\""), "the control plane also sent the dns_filter listener");
    let other = dig(envoy_dns_port, "echo-server_echo-example_svc_1010.mesh");
    assert!(!other.contains(&vip), "the Envoy DNS port answered too: {other:?}");

    // A new service: its name reaches the DNS proxy with the next configuration.
    cp.apply(&dataplane("api-1", "api", free_port(), ""));
    let api_vip =
        e2e::wait_until("api.mesh in the DNS proxy", || Some(dig(proxy_port, "api.mesh")).filter(|v| !v.is_empty()));
    assert!(api_vip.starts_with("240.") && api_vip != vip, "api.mesh -> {api_vip:?}");
}

/// MeshAccessLog from the user's side: a mesh-wide policy with a `File` backend for the
/// outbounds (Kuma's default TCP line) and a `Tcp` backend for the inbounds (a JSON
/// format). The client sidecar writes the file; the server sidecar logs into its
/// access-log pipe and sends each line on to the TCP collector, as kuma-dp does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshaccesslog_policy_writes_outbound_lines_to_a_file_and_sends_inbound_lines_to_a_tcp_collector() {
    use tokio::io::AsyncBufReadExt;
    let cp = Cp::start("zone-1");
    cp.apply(MESH);
    let dir = temp_dir("meshaccesslog");
    let file = dir.join("outbound.log");
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cp.apply(&format!(
        "type: MeshAccessLog\nname: logs\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  \
         - targetRef:\n      kind: Mesh\n    default:\n      backends:\n      - type: File\n        file:\n          \
         path: {}\n  rules:\n  - default:\n      backends:\n      - type: Tcp\n        tcp:\n          address: {}\n          \
         format:\n            type: Json\n            json:\n            - key: mesh\n              value: \"%KUMA_MESH%\"\n            \
         - key: to\n              value: \"%KUMA_DESTINATION_SERVICE%\"\n            - key: sent\n              value: \"%BYTES_SENT%\"\n",
        file.display(),
        collector.local_addr().unwrap()
    ));
    let app = Backend::start("server-app").await;
    let _server = backend_sidecar(&cp, &app);
    let (_client, outbound) = web_sidecar(&cp);

    let mut c = TcpStream::connect(("127.0.0.1", outbound)).await.unwrap();
    c.write_all(b"request\n").await.unwrap();
    assert_eq!(read_line(&mut c).await.as_deref(), Some("server-app"));
    drop(c);

    // The server's inbound line reaches the collector: `server-app\n` is 11 bytes.
    let (s, _) = tokio::time::timeout(e2e::WAIT, collector.accept()).await.expect("the proxy connects").unwrap();
    let mut line = String::new();
    tokio::time::timeout(e2e::WAIT, tokio::io::BufReader::new(s).read_line(&mut line)).await.expect("a line").unwrap();
    let got: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(got, serde_json::json!({"mesh": "default", "to": "backend", "sent": 11}), "{line}");
    // The client's outbound line, in Kuma's default format.
    let written = e2e::wait_until("the outbound access-log line", || {
        std::fs::read_to_string(&file).ok().filter(|s| s.ends_with('\n'))
    });
    assert!(written.starts_with('[') && written.contains(" - default 127.0.0.1(web)->127.0.0.1:"), "{written}");
    assert!(written.contains("(backend) took ") && written.ends_with(" bytes, received: 8 bytes\n"), "{written}");
}

/// MeshLoadBalancingStrategy from the user's side: Maglev for `backend`. The client
/// sidecar's cluster takes it (as its `/config_dump` shows) and requests still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshloadbalancingstrategy_policy_sets_the_outbound_clusters_balancer() {
    let cp = Cp::start("zone-1");
    cp.apply(MESH);
    cp.apply(
        "type: MeshLoadBalancingStrategy\nname: lb\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  \
         - targetRef:\n      kind: MeshService\n      name: backend\n    default:\n      loadBalancer:\n        \
         type: Maglev\n        maglev:\n          tableSize: 251\n",
    );
    let app = Backend::start("server-app").await;
    let _server = backend_sidecar(&cp, &app);
    let (client, outbound) = web_sidecar(&cp);
    let (_, dump) = e2e::http_get(client.admin, "/config_dump").expect("GET /config_dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let text = dump.to_string();
    assert!(text.contains("\"lbPolicy\":\"MAGLEV\"") || text.contains("\"lb_policy\":\"MAGLEV\""), "{text}");
    for i in 0..3 {
        let mut c = TcpStream::connect(("127.0.0.1", outbound)).await.unwrap();
        c.write_all(format!("request {i}\n").as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut c).await.as_deref(), Some("server-app"), "request {i}");
    }
}
