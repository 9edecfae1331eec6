//! Helpers shared by the integration tests: an in-process control plane on ephemeral
//! ports, plain and TLS HTTP clients, and an ADS client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cp::components::Running;
use cp::config::RunConfig;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub const MESH_YAML: &str =
    "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n";

pub fn dataplane_json(name: &str, address: &str, port: u16, version: &str) -> String {
    serde_json::json!({
        "type": "Dataplane", "mesh": "default", "name": name,
        "networking": {"address": address, "inbound": [{"port": port, "tags": {"kuma.io/service": "backend", "version": version}}]}
    })
    .to_string()
}

pub fn ingress_json(name: &str) -> String {
    serde_json::json!({
        "type": "ZoneIngress", "name": name,
        "networking": {"address": "127.0.0.1", "port": 10001, "advertisedAddress": "10.0.0.1", "advertisedPort": 10001}
    })
    .to_string()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let d = std::env::temp_dir().join(format!(
        "cp-test-{tag}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct TestCp {
    pub running: Running,
    pub dir: PathBuf,
}

impl TestCp {
    pub async fn start(tag: &str) -> Self {
        Self::start_with(tag, |_| {}).await
    }

    pub async fn start_with(tag: &str, f: impl FnOnce(&mut RunConfig)) -> Self {
        cp::install_crypto_provider();
        let dir = temp_dir(tag);
        let mut cfg = RunConfig::for_tests(dir.join("work"));
        f(&mut cfg);
        let running = cp::components::start(cfg).await.expect("cp starts");
        TestCp { running, dir }
    }

    pub fn api(&self) -> String {
        format!("http://{}", self.running.api)
    }

    pub fn dp(&self) -> SocketAddr {
        self.running.dp_server.expect("dp server")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.running.ca_cert_file).expect("CA file written")
    }

    pub async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        http(&format!("{}{path}", self.api()), "PUT", body).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http(&format!("{}{path}", self.api()), "GET", "").await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        http(&format!("{}{path}", self.api()), "DELETE", "").await
    }

    pub async fn zone_token(&self, zone: &str, scopes: &[&str]) -> String {
        let body = serde_json::json!({"zone": zone, "scope": scopes}).to_string();
        let (status, text) = http_text(&format!("{}/tokens/zone", self.api()), "POST", &body).await;
        assert_eq!(status, 200, "{text}");
        text
    }

    pub async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca_pem())).domain_name("localhost");
        Endpoint::from_shared(format!("https://{}", self.dp()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("ADS channel connects with the CA from kuma-cp.crt")
    }

    pub async fn ads(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        AggregatedDiscoveryServiceClient::new(self.channel().await)
    }

    /// Wait (on store change notifications, not sleeps) until `cond` holds, at most `max`.
    pub async fn wait_store<F, Fut>(&self, max: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut rx = self.running.cp.store.subscribe();
        let deadline = tokio::time::Instant::now() + max;
        loop {
            rx.borrow_and_update();
            if cond().await {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return cond().await;
            }
        }
    }
}

impl Drop for TestCp {
    fn drop(&mut self) {
        self.running.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn http_text(url: &str, method: &str, body: &str) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.expect("API reachable");
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&b).to_string())
}

pub async fn http(url: &str, method: &str, body: &str) -> (u16, Value) {
    let (s, t) = http_text(url, method, body).await;
    (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

/// POST over TLS (HTTP/1.1) to the DP server, verifying it with `ca_pem` for `host`.
pub async fn https_post(
    addr: SocketAddr,
    ca_pem: &str,
    host: &str,
    path: &str,
    body: &str,
    accept_json: bool,
) -> (u16, String) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake with the DP server");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", format!("{host}:{}", addr.port()))
        .header("content-type", "application/json");
    if accept_json {
        b = b.header("accept", "application/json");
    }
    let resp = sender.send_request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).to_string())
}

fn s(v: &str) -> PbValue {
    PbValue { kind: Some(value::Kind::StringValue(v.to_string())) }
}

/// Node of a kuma-dp zone ingress (`.name`, metadata as kuma-dp 2.14 sends it).
pub fn ingress_node(name: &str, resource_json: &str, delta: bool) -> Node {
    let mut md = Struct::default();
    md.fields.insert("dataplane.proxyType".into(), s("ingress"));
    md.fields.insert("dataplane.resource".into(), s(resource_json));
    md.fields.insert("dataplane.admin.port".into(), s("9901"));
    let mut features = vec![s("feature-tcp-accesslog-via-named-pipe")];
    if delta {
        features.push(s("feature-delta-grpc"));
    }
    md.fields.insert(
        "features".into(),
        PbValue {
            kind: Some(value::Kind::ListValue(envoy_types::pb::google::protobuf::ListValue { values: features })),
        },
    );
    Node { id: format!(".{name}"), cluster: "ingress".into(), metadata: Some(md), ..Default::default() }
}

pub fn authorized<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", token.parse().unwrap());
    r
}

/// Node of a kuma-dp sidecar (`<mesh>.<name>`, metadata as kuma-dp 2.14 sends it through the
/// bootstrap), with the Dataplane inline and an optional DNS port.
pub fn dataplane_node(mesh: &str, name: &str, resource_json: &str, dns_port: u32, delta: bool) -> Node {
    let mut md = Struct::default();
    md.fields.insert("dataplane.proxyType".into(), s("dataplane"));
    md.fields.insert("dataplane.resource".into(), s(resource_json));
    md.fields.insert("dataplane.admin.port".into(), s("9901"));
    if dns_port > 0 {
        md.fields.insert("dataplane.dns.port".into(), s(&dns_port.to_string()));
    }
    let mut features = vec![s("feature-tcp-accesslog-via-named-pipe"), s("feature-reuse-port")];
    if delta {
        features.push(s("feature-delta-grpc"));
    }
    md.fields.insert(
        "features".into(),
        PbValue {
            kind: Some(value::Kind::ListValue(envoy_types::pb::google::protobuf::ListValue { values: features })),
        },
    );
    Node { id: format!("{mesh}.{name}"), cluster: name.into(), metadata: Some(md), ..Default::default() }
}
