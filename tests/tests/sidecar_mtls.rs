//! Sidecar mTLS in `dp`, from Envoy resources in files: a client sidecar originates
//! mTLS (SDS identity, ALPN `kuma`, server SAN check), a server sidecar terminates it
//! (client certificate required, SAN prefix `spiffe://default/`) and hands plain bytes
//! to the app. Certificates rotate without touching live connections.

use e2e::tls::{Identity, MeshCa, client_with_identity};
use e2e::{Backend, Dp, read_line, temp_dir};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn secrets(ca: &MeshCa, id: &Identity) -> Vec<Value> {
    vec![
        json!({"@type": SDS, "name": "identity_cert:secret:default",
               "tlsCertificate": {"certificateChain": {"inlineString": id.cert_pem},
                                  "privateKey": {"inlineString": id.key_pem}}}),
        json!({"@type": SDS, "name": "mesh_ca:secret:default",
               "validationContext": {"trustedCa": {"inlineString": ca.pem}}}),
    ]
}

fn common(san: Value) -> Value {
    json!({
        "alpnProtocols": ["kuma"],
        "tlsCertificateSdsSecretConfigs": [{"name": "identity_cert:secret:default", "sdsConfig": {"ads": {}}}],
        "combinedValidationContext": {
            "defaultValidationContext": {"matchTypedSubjectAltNames": [{"sanType": "URI", "matcher": san}]},
            "validationContextSdsSecretConfig": {"name": "mesh_ca:secret:default", "sdsConfig": {"ads": {}}}
        }
    })
}

fn static_cluster(name: &str, addr: SocketAddr, tls: Option<Value>) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "1s",
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": [{"endpoint": {"address":
            {"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}}}}]}]}
    });
    if let Some(t) = tls {
        c["transportSocket"] = json!({"name": "envoy.transport_sockets.tls", "typedConfig": t});
    }
    c
}

fn listener(name: &str, port: u16, cluster: &str, tls: Option<Value>) -> Value {
    let mut chain = json!({"filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "cluster": cluster, "statPrefix": cluster}}]});
    let mut l = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": name,
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
    });
    if let Some(t) = tls {
        chain["transportSocket"] = json!({"name": "envoy.transport_sockets.tls", "typedConfig": t});
        chain["filterChainMatch"] = json!({"transportProtocol": "tls"});
        l["listenerFilters"] = json!([{"name": "envoy.filters.listener.tls_inspector", "typedConfig":
            {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
    }
    l["filterChains"] = json!([chain]);
    l
}

fn write(path: &Path, version: &str, resources: Vec<Value>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&json!({"version_info": version, "resources": resources})).unwrap())
        .unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// The server sidecar's resources: inbound mTLS listener -> the app.
fn server_side(ca: &MeshCa, id: &Identity, app: SocketAddr) -> Vec<Value> {
    let inbound_tls = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "requireClientCertificate": true,
        "commonTlsContext": common(json!({"prefix": "spiffe://default/"})),
    });
    let mut r = secrets(ca, id);
    r.push(static_cluster("localhost:app", app, None));
    r.push(listener("inbound:backend", 0, "localhost:app", Some(inbound_tls)));
    r
}

/// Handshakes directly with the inbound; returns the app's greeting, or None if refused.
async fn direct(inbound: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Option<String> {
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("backend.default.mesh").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.ok()?;
    tls.write_all(b"hi\n").await.ok()?;
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    let n = tokio::io::BufReader::new(tls).read_line(&mut line).await.ok()?;
    (n > 0).then(|| line.trim_end().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_and_check_identities() {
    let ca = MeshCa::new("mesh default");
    let (backend_id, web_id) = (ca.identity("spiffe://default/backend"), ca.identity("spiffe://default/web"));
    let app = Backend::start("app").await;

    let server_file = temp_dir("sidecar-server").join("xds.json");
    write(&server_file, "1", server_side(&ca, &backend_id, app.addr));
    let server = Dp::start(&server_file, &["--proxy-type", "dataplane"]);
    let inbound = server.listener("inbound:backend");

    // The client sidecar: a plain outbound listener -> mTLS to the server's inbound.
    let upstream_tls = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "backend.default.mesh",
        "commonTlsContext": common(json!({"exact": "spiffe://default/backend"})),
    });
    let client_file = temp_dir("sidecar-client").join("xds.json");
    let mut r = secrets(&ca, &web_id);
    r.push(static_cluster("backend", inbound, Some(upstream_tls)));
    r.push(listener("outbound:20012", 0, "backend", None));
    write(&client_file, "1", r);
    let client = Dp::start(&client_file, &["--proxy-type", "dataplane"]);
    let outbound = client.listener("outbound:20012");

    // The app's plain request reaches the server app through mTLS.
    let mut c = TcpStream::connect(outbound).await.unwrap();
    c.write_all(b"hello\n").await.unwrap();
    assert_eq!(read_line(&mut c).await.as_deref(), Some("app"));
    c.write_all(b"over mtls\n").await.unwrap();
    assert_eq!(read_line(&mut c).await.as_deref(), Some("over mtls"));
    // The server sidecar saw the client's SPIFFE identity.
    drop(c);
    server.logs.wait_for(&["peer_identity=\"spiffe://default/web\""]);

    // A certificate from another CA, or none, is refused at the handshake.
    let other = MeshCa::new("other");
    let intruder = other.identity("spiffe://default/web");
    assert_eq!(direct(inbound, client_with_identity(Some(&intruder))).await, None, "foreign CA");
    assert_eq!(direct(inbound, client_with_identity(None)).await, None, "no client certificate");
    assert!(app.connections() == 1, "refused clients never reach the app");
    // Envoy's `ssl.*` stats: the outbound's cluster and the inbound's listener count the
    // handshake, and the inbound tells its refusals apart (polled: a refused client can
    // see the alert a moment before the server counts it).
    assert_eq!(client.stat("envoy_cluster_ssl_handshake{envoy_cluster_name=\"backend\"}"), 1);
    e2e::wait_until("the inbound's ssl stats", || {
        let got = ["handshake", "fail_verify_error", "fail_verify_no_cert", "fail_verify_san"]
            .map(|s| server.stat(&format!("envoy_listener_ssl_{s}{{")));
        (got == [1, 1, 1, 0]).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_mesh_prefix_is_refused() {
    let ca = MeshCa::new("mesh default");
    let app = Backend::start("app").await;
    let file = temp_dir("sidecar-prefix").join("xds.json");
    write(&file, "1", server_side(&ca, &ca.identity("spiffe://default/backend"), app.addr));
    let server = Dp::start(&file, &[]);
    let inbound = server.listener("inbound:backend");
    let foreign_mesh = ca.identity("spiffe://other-mesh/web");
    assert_eq!(direct(inbound, client_with_identity(Some(&foreign_mesh))).await, None);
    let ok = ca.identity("spiffe://default/web");
    assert_eq!(direct(inbound, client_with_identity(Some(&ok))).await.as_deref(), Some("app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_apply_to_new_handshakes_only() {
    let ca = MeshCa::new("mesh default");
    let app = Backend::start("app").await;
    let file = temp_dir("sidecar-rotate").join("xds.json");
    let first = ca.identity("spiffe://default/backend");
    write(&file, "1", server_side(&ca, &first, app.addr));
    let server = Dp::start(&file, &[]);
    let inbound = server.listener("inbound:backend");
    let client = ca.identity("spiffe://default/web");

    let name = rustls::pki_types::ServerName::try_from("backend.default.mesh").unwrap();
    let presented = || async {
        let tcp = TcpStream::connect(inbound).await.unwrap();
        let cfg = client_with_identity(Some(&client));
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name.clone(), tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = presented().await;
    // A long connection on the first certificate.
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let cfg = client_with_identity(Some(&client));
    let mut long = tokio_rustls::TlsConnector::from(cfg).connect(name.clone(), tcp).await.unwrap();
    long.write_all(b"first\n").await.unwrap();

    let second = ca.identity("spiffe://default/backend");
    write(&file, "2", server_side(&ca, &second, app.addr));
    server.wait_version("2");
    let after = presented().await;
    assert_ne!(before, after, "new handshakes present the rotated certificate");
    // The long connection is untouched.
    long.write_all(b"still here\n").await.unwrap();
    let mut lines = tokio::io::BufReader::new(long);
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    lines.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), "app");
    line.clear();
    lines.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), "still here");
}

/// Kuma's TrafficPermission on an inbound: a network RBAC filter before `tcp_proxy`
/// that allows one SPIFFE identity. Others complete the handshake and are closed
/// before a byte reaches the app; the decisions are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rbac_filter_lets_only_the_permitted_identity_through() {
    let ca = MeshCa::new("mesh default");
    let app = Backend::start("app").await;
    let file = temp_dir("sidecar-rbac").join("xds.json");
    let mut r = server_side(&ca, &ca.identity("spiffe://default/backend"), app.addr);
    let l = r.last_mut().unwrap();
    let filters = l["filterChains"][0]["filters"].as_array_mut().unwrap();
    filters.insert(
        0,
        json!({"name": "envoy.filters.network.rbac", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "statPrefix": "inbound_backend.",
            "rules": {"policies": {"allow-web": {
                "permissions": [{"any": true}],
                "principals": [{"authenticated": {"principalName": {"exact": "spiffe://default/web"}}}]
            }}}
        }}),
    );
    write(&file, "1", r);
    let server = Dp::start(&file, &[]);
    let inbound = server.listener("inbound:backend");

    let web = ca.identity("spiffe://default/web");
    assert_eq!(direct(inbound, client_with_identity(Some(&web))).await.as_deref(), Some("app"));
    let api = ca.identity("spiffe://default/api");
    assert_eq!(direct(inbound, client_with_identity(Some(&api))).await, None, "api is not permitted");
    server.logs.wait_for(&["flag=\"RBAC\"", "peer_identity=\"spiffe://default/api\""]);
    assert_eq!(app.connections(), 1, "the refused client never reached the app");
    assert_eq!(server.stat("envoy_rbac_allowed{envoy_rbac_prefix=\"inbound_backend.\"}"), 1);
    assert_eq!(server.stat("envoy_rbac_denied{envoy_rbac_prefix=\"inbound_backend.\"}"), 1);
}

/// `openssl s_client` against `addr` with Kuma's tag SNI, ALPN `kuma` and `identity`,
/// sending one line; killed on drop.
struct SClient {
    child: std::process::Child,
}

impl SClient {
    fn start(addr: SocketAddr, ca: &MeshCa, identity: &Identity, extra: &[&str]) -> SClient {
        use std::io::Write;
        let dir = temp_dir("s-client");
        let (cert, key, ca_file) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("ca.pem"));
        std::fs::write(&cert, &identity.cert_pem).unwrap();
        std::fs::write(&key, &identity.key_pem).unwrap();
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-servername", "backend{mesh=default}", "-alpn", "kuma"])
            .args([
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
                "-CAfile",
                ca_file.to_str().unwrap(),
            ])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (scripts/setup.sh installs it)");
        child.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
        SClient { child }
    }

    /// Waits for openssl to give up on its own (a refused handshake): what it printed.
    fn refused(mut self) -> String {
        let deadline = std::time::Instant::now() + e2e::WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "openssl kept the connection: it was not refused");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut out = String::new();
        use std::io::Read;
        let _ = self.child.stdout.take().unwrap().read_to_string(&mut out);
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut out);
        out
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kuma's tag SNI is not a DNS name; Envoy (BoringSSL) sends and accepts it, and so does
/// dp's inbound: `openssl s_client -servername 'backend{mesh=default}'` with a mesh client
/// certificate gets through to the app, and foreign certificates are refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_with_kumas_tag_sni_and_a_mesh_certificate_reaches_the_app() {
    let ca = MeshCa::new("mesh default");
    let app = Backend::start("app").await;
    let file = temp_dir("sidecar-openssl").join("xds.json");
    write(&file, "1", server_side(&ca, &ca.identity("spiffe://default/backend"), app.addr));
    let server = Dp::start(&file, &[]);
    let inbound = server.listener("inbound:backend");

    let client = SClient::start(inbound, &ca, &ca.identity("spiffe://default/web"), &[]);
    e2e::wait_until("openssl's line to reach the app", || {
        app.received.lock().unwrap().iter().any(|r| r.starts_with(b"hello\n")).then_some(())
    });
    drop(client);
    server.logs.wait_for(&["sni=\"backend{mesh=default}\"", "peer_identity=\"spiffe://default/web\""]);

    // TLS 1.2, where the server checks the client certificate before the handshake ends.
    let other = MeshCa::new("other");
    let out = SClient::start(inbound, &ca, &other.identity("spiffe://default/web"), &["-tls1_2"]).refused();
    assert!(out.to_lowercase().contains("alert"), "a foreign CA got through:\n{out}");
    let out = SClient::start(inbound, &ca, &ca.identity("spiffe://other-mesh/web"), &["-tls1_2"]).refused();
    assert!(out.to_lowercase().contains("alert"), "another mesh got through:\n{out}");
    assert_eq!(app.connections(), 1, "refused clients never reach the app");
}
