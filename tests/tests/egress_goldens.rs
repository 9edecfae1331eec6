//! Kuma 2.14's own zone egress configs (`../shared/fixtures/kuma-2.14/egress/*.golden.yaml`
//! and `zone-proxy-listener/egress-*`) load in `dp --proxy-type=egress`, and every server
//! name they list routes as the config says:
//!
//! * passthrough chains (`tcp_proxy`, no TLS termination): a ClientHello with the name
//!   reaches the remote zone's ingress of the chain's cluster (every endpoint of the
//!   subset its `metadata_match` selects; none when the subset is empty), and the bytes
//!   arrive untouched both ways;
//! * TLS-terminating chains (ExternalService, MeshExternalService): an mTLS client holding a
//!   mesh identity reaches the external backend of the chain's cluster, over HTTP/1.1 and
//!   h2 (HTTP chains) or as bytes (TCP chains), with the upstream HTTP version, `Host`
//!   (`auto_host_rewrite`) and upstream TLS (SNI, trusted CA, SANs) the cluster asks for;
//!   identities the chain's RBAC refuses get the connection closed (network RBAC) or a 403
//!   (HTTP RBAC); clients without a certificate, with one from another CA or another mesh
//!   of the same egress, or with a SPIFFE ID outside the chain's SAN matchers are refused
//!   in the handshake;
//! * TLS origination checks the external service: behind a certificate for another name,
//!   or from a CA the cluster does not trust, no request gets through (503).
//!
//! The fixtures folder is read in place; when it is absent the test fails saying so
//! (`e2e::fixtures_dir`).
//!
//! What is rewritten before loading (the files are read in place, never copied):
//! * listeners listen on 127.0.0.1:0;
//! * every endpoint becomes a local backend named `<cluster>/<original address>`: an IP
//!   endpoint becomes 127.0.0.1:<port>, a STRICT_DNS name becomes `localhost:<port>` (which
//!   dp resolves itself, with the cluster's `dns_lookup_family`);
//! * secrets: the goldens carry placeholders (inline "CERT", "KEY", "CA", trusted CA "xyz")
//!   that no TLS library accepts, and Envoy refuses them too. Every mesh gets its own CA;
//!   every SDS secret a TLS context names gets real material (added when the golden does
//!   not carry it, as with MeshIdentity's `system_trust_bundle` and `my-identity-secret`);
//!   the external clusters' `trusted_ca` becomes an "external" CA, whose backends present
//!   certificates with exactly the SANs the cluster's matchers expect.
//!
//! What each name must do is computed here from the YAML, independently of dp's code:
//! chain, cluster, endpoints (EDS, subsets and their fallbacks), transport socket matches,
//! upstream protocol, `auto_host_rewrite` (Envoy sends a STRICT_DNS host's DNS name, or the
//! endpoint's `hostname`), and the RBAC decision for the client's identity.

use boring::pkey::PKey;
use boring::ssl::{Ssl, SslContext, SslMethod, SslVerifyMode};
use boring::x509::X509;
use bytes::Bytes;
use e2e::http::HttpBackend;
use e2e::tls::{Identity, MeshCa};
use e2e::{Backend, Dp, WAIT, fixtures_dir, hello, temp_dir};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// The goldens, as Kuma wrote them

fn golden_files() -> Vec<PathBuf> {
    let dir = fixtures_dir();
    let list = |sub: &str, keep: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        std::fs::read_dir(dir.join(sub))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(sub).display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && keep(&p.file_name().unwrap().to_string_lossy()))
            .collect()
    };
    let mut files = list("egress", &|n| n.ends_with(".golden.yaml"));
    files.extend(list("zone-proxy-listener", &|n| n.starts_with("egress-")));
    files.sort();
    files
}

fn type_is(r: &Value, suffix: &str) -> bool {
    r["@type"].as_str().is_some_and(|t| t.ends_with(suffix))
}

const CLUSTER: &str = ".config.cluster.v3.Cluster";
const CLA: &str = ".config.endpoint.v3.ClusterLoadAssignment";
const LISTENER: &str = ".config.listener.v3.Listener";
const SECRET: &str = ".transport_sockets.tls.v3.Secret";
const DOWNSTREAM_TLS: &str = ".tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS: &str = ".tls.v3.UpstreamTlsContext";

struct Golden {
    /// The resources as Kuma generated them.
    originals: Vec<Value>,
}

impl Golden {
    fn load(path: &Path) -> Golden {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let originals =
            doc["resources"].as_array().map(|a| a.iter().map(|i| i["resource"].clone()).collect()).unwrap_or_default();
        Golden { originals }
    }

    fn of<'a>(&'a self, suffix: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.originals.iter().filter(move |r| type_is(r, suffix))
    }

    fn cluster(&self, name: &str) -> &Value {
        self.of(CLUSTER).find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name}"))
    }

    /// The endpoints of a cluster: inline, or the EDS assignment of its service name.
    fn assignment<'a>(&'a self, cluster: &'a Value) -> Option<&'a Value> {
        if cluster.get("loadAssignment").is_some() {
            return Some(&cluster["loadAssignment"]);
        }
        let name = cluster["name"].as_str().unwrap();
        let service = cluster["edsClusterConfig"]["serviceName"].as_str().unwrap_or(name);
        self.of(CLA).find(|c| c["clusterName"] == service)
    }

    /// The cluster an EDS assignment belongs to.
    fn cluster_of_assignment(&self, cla: &Value) -> &Value {
        self.of(CLUSTER)
            .find(|c| {
                let name = c["name"].as_str().unwrap();
                c["type"] == "EDS"
                    && c["edsClusterConfig"]["serviceName"].as_str().unwrap_or(name) == cla["clusterName"]
            })
            .unwrap_or_else(|| panic!("no EDS cluster for assignment {}", cla["clusterName"]))
    }
}

fn addr_key(ep: &Value) -> String {
    let sa = &ep["endpoint"]["address"]["socketAddress"];
    format!("{}:{}", sa["address"].as_str().unwrap(), sa["portValue"])
}

fn strings(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

/// One endpoint of a cluster, as the golden has it.
struct Endpoint {
    /// `<cluster>/<original address>`: the name of its local backend.
    key: String,
    lb: BTreeMap<String, String>,
}

fn endpoints(g: &Golden, cluster: &Value) -> Vec<Endpoint> {
    let name = cluster["name"].as_str().unwrap();
    let mut out = vec![];
    for le in g.assignment(cluster).and_then(|a| a["endpoints"].as_array()).into_iter().flatten() {
        assert!(le["priority"].as_u64().unwrap_or(0) == 0, "{name}: endpoint priorities are not modelled here");
        for ep in le["lbEndpoints"].as_array().into_iter().flatten() {
            assert!(ep.get("healthStatus").is_none(), "{name}: health status is not modelled here");
            out.push(Endpoint {
                key: format!("{name}/{}", addr_key(ep)),
                lb: strings(&ep["metadata"]["filterMetadata"]["envoy.lb"]),
            });
        }
    }
    out
}

/// The backends a `tcp_proxy` with `metadata_match` may reach (Envoy's subset load
/// balancer: selectors, their fallback policies and the cluster's).
fn subset(g: &Golden, cluster: &Value, wanted: &BTreeMap<String, String>) -> BTreeSet<String> {
    let all = endpoints(g, cluster);
    let pick = |want: &BTreeMap<String, String>| -> BTreeSet<String> {
        all.iter().filter(|e| want.iter().all(|(k, v)| e.lb.get(k) == Some(v))).map(|e| e.key.clone()).collect()
    };
    let subsets = &cluster["lbSubsetConfig"];
    if wanted.is_empty() || subsets.is_null() {
        return all.iter().map(|e| e.key.clone()).collect();
    }
    let fallback = |policy: &str| match policy {
        "ANY_ENDPOINT" => all.iter().map(|e| e.key.clone()).collect(),
        "DEFAULT_SUBSET" => pick(&strings(&subsets["defaultSubset"])),
        "NO_FALLBACK" => BTreeSet::new(),
        p => panic!("fallback policy {p} is not modelled here"),
    };
    let cluster_fallback = subsets["fallbackPolicy"].as_str().unwrap_or("NO_FALLBACK");
    let keys: BTreeSet<&str> = wanted.keys().map(String::as_str).collect();
    let selector =
        subsets["subsetSelectors"].as_array().into_iter().flatten().find(|s| {
            s["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect::<BTreeSet<_>>() == keys
        });
    match selector {
        None => fallback(cluster_fallback),
        Some(sel) => {
            let hosts = pick(wanted);
            if !hosts.is_empty() {
                return hosts;
            }
            match sel["fallbackPolicy"].as_str().unwrap_or("NOT_DEFINED") {
                "NOT_DEFINED" => fallback(cluster_fallback),
                p => fallback(p),
            }
        }
    }
}

/// Envoy's `StringMatcher`, for the kinds the goldens use.
fn string_match(m: &Value, s: &str) -> bool {
    let ic = m["ignoreCase"].as_bool().unwrap_or(false);
    let norm = |x: &str| if ic { x.to_lowercase() } else { x.to_string() };
    let s = norm(s);
    if let Some(e) = m["exact"].as_str() {
        return s == norm(e);
    }
    if let Some(p) = m["prefix"].as_str() {
        return s.starts_with(&norm(p));
    }
    if let Some(p) = m["suffix"].as_str() {
        return s.ends_with(&norm(p));
    }
    if let Some(p) = m["contains"].as_str() {
        return s.contains(&norm(p));
    }
    panic!("string matcher {m} is not modelled here")
}

/// Whether a client certificate with these URI SANs passes `match_typed_subject_alt_names`.
fn sans_accept(matchers: &[Value], uris: &[String]) -> bool {
    matchers.is_empty()
        || matchers.iter().any(|m| m["sanType"] == "URI" && uris.iter().any(|u| string_match(&m["matcher"], u)))
}

/// The decision of an RBAC filter (network or HTTP) for a verified client with these URI
/// SANs. `rules` absent: no enforcement; present, `ALLOW` (the default) lets through only
/// what some policy matches, so empty rules deny everything; `DENY` the reverse.
fn rbac_allows(cfg: &Value, uris: &[String]) -> bool {
    assert!(cfg.get("matcher").is_none(), "the RBAC matcher API is not modelled here: {cfg}");
    assert!(cfg.get("shadowRules").is_none(), "shadow rules are not modelled here");
    let Some(rules) = cfg.get("rules") else { return true };
    let matched = rules["policies"].as_object().into_iter().flatten().any(|(_, p)| {
        p["permissions"].as_array().into_iter().flatten().any(permission)
            && p["principals"].as_array().into_iter().flatten().any(|pr| principal(pr, uris))
    });
    match rules["action"].as_str().unwrap_or("ALLOW") {
        "ALLOW" => matched,
        "DENY" => !matched,
        a => panic!("RBAC action {a} is not modelled here"),
    }
}

fn permission(p: &Value) -> bool {
    assert!(p["any"] == true, "RBAC permission {p} is not modelled here");
    true
}

/// Envoy's `authenticated.principal_name` matches any URI SAN of the verified peer
/// certificate (then DNS SANs, then the subject; our clients carry URIs only).
fn principal(p: &Value, uris: &[String]) -> bool {
    if p["any"] == true {
        return true;
    }
    if let Some(a) = p.get("authenticated") {
        return match a.get("principalName") {
            None => true,
            Some(m) => uris.iter().any(|u| string_match(m, u)),
        };
    }
    if let Some(ids) = p.get("orIds") {
        return ids["ids"].as_array().into_iter().flatten().any(|i| principal(i, uris));
    }
    if let Some(ids) = p.get("andIds") {
        return ids["ids"].as_array().into_iter().flatten().all(|i| principal(i, uris));
    }
    if let Some(i) = p.get("notId") {
        return !principal(i, uris);
    }
    panic!("RBAC principal {p} is not modelled here")
}

/// Every `principalName.exact` an RBAC config names: identities worth trying.
fn named_principals(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(e) = m.get("principalName").and_then(|p| p["exact"].as_str()) {
                out.insert(e.to_string());
            }
            m.values().for_each(|c| named_principals(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| named_principals(c, out)),
        _ => {}
    }
}

/// The HTTP version a cluster's upstream requests use.
fn upstream_version(cluster: &Value, downstream_h2: bool) -> &'static str {
    let o = &cluster["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    let h2 = if o["explicitHttpConfig"].get("http2ProtocolOptions").is_some() {
        true
    } else if o["explicitHttpConfig"].get("httpProtocolOptions").is_some() {
        false
    } else if o.get("useDownstreamProtocolConfig").is_some() {
        downstream_h2
    } else {
        assert!(o.get("autoConfig").is_none(), "ALPN-negotiated upstream HTTP is not modelled here");
        cluster.get("http2ProtocolOptions").is_some()
    };
    if h2 { "HTTP/2.0" } else { "HTTP/1.1" }
}

/// The `UpstreamTlsContext` a connection to an endpoint uses: the first
/// `transport_socket_matches` entry its metadata (then its locality's) matches, else the
/// cluster's `transport_socket`; `None`: plain TCP.
fn endpoint_tls<'a>(cluster: &'a Value, ep: &Value, locality: &Value) -> Option<&'a Value> {
    let of = |ts: &'a Value| -> Option<&'a Value> {
        let cfg = &ts["typedConfig"];
        if ts.is_null() || type_is(cfg, "RawBuffer") {
            return None;
        }
        assert!(type_is(cfg, UPSTREAM_TLS), "transport socket {ts} is not modelled here");
        Some(cfg)
    };
    if let Some(ms) = cluster["transportSocketMatches"].as_array() {
        for md in [&ep["metadata"], &locality["metadata"]] {
            if md.is_null() {
                continue;
            }
            let have = strings(&md["filterMetadata"]["envoy.transport_socket_match"]);
            if let Some(m) = ms.iter().find(|m| strings(&m["match"]).iter().all(|(k, v)| have.get(k) == Some(v))) {
                return of(&m["transportSocket"]);
            }
        }
    }
    of(&cluster["transportSocket"])
}

// ---------------------------------------------------------------------------------------
// Filter chains and what they route to

#[derive(Debug)]
struct ChainSpec {
    listener: String,
    server_names: Vec<String>,
    /// TLS termination: the mesh whose CA verifies clients, and the SAN matchers.
    termination: Option<Termination>,
    /// Network RBAC filters (typed configs), before the terminal filter.
    net_rbac: Vec<Value>,
    route: Route,
}

#[derive(Debug)]
struct Termination {
    mesh: String,
    san_matchers: Vec<Value>,
}

#[derive(Debug)]
enum Route {
    Tcp { cluster: String, metadata_match: BTreeMap<String, String> },
    Http { cluster: String, rbac: Vec<Value>, auto_host_rewrite: bool },
}

impl Route {
    fn cluster(&self) -> &str {
        match self {
            Route::Tcp { cluster, .. } | Route::Http { cluster, .. } => cluster,
        }
    }
}

/// Which mesh's CA a secret's material comes from. Kuma's names carry the mesh
/// (`identity_cert:secret:<mesh>`, `mesh_ca:secret:<mesh>`, and with unified resource
/// naming `system_mtls_identity_<mesh>`, `system_mtls_ca_<mesh>`); MeshIdentity's names
/// do not, and the goldens that use them are in mesh `default` (their KRI names say so).
fn secret_mesh(name: &str) -> String {
    for p in ["identity_cert:secret:", "mesh_ca:secret:", "system_mtls_identity_", "system_mtls_ca_"] {
        if let Some(mesh) = name.strip_prefix(p) {
            return mesh.to_string();
        }
    }
    match name {
        "system_trust_bundle" | "my-identity-secret" => "default".to_string(),
        other => panic!("secret `{other}`: which mesh it belongs to is not modelled here"),
    }
}

fn chains(g: &Golden) -> Vec<ChainSpec> {
    let mut out = vec![];
    for l in g.of(LISTENER) {
        let listener = l["name"].as_str().unwrap().to_string();
        for chain in l["filterChains"].as_array().into_iter().flatten() {
            let server_names: Vec<String> = chain["filterChainMatch"]["serverNames"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| n.as_str().unwrap().to_string())
                .collect();
            assert!(!server_names.is_empty(), "{listener}: a chain without server names: {chain}");
            let termination = match &chain["transportSocket"] {
                Value::Null => None,
                ts => {
                    let ctx = &ts["typedConfig"];
                    assert!(type_is(ctx, DOWNSTREAM_TLS), "{listener}: transport socket {ts}");
                    assert_eq!(ctx["requireClientCertificate"], true, "{listener}: egress chains require mTLS");
                    let common = &ctx["commonTlsContext"];
                    let combined = &common["combinedValidationContext"];
                    let ca = combined["validationContextSdsSecretConfig"]["name"]
                        .as_str()
                        .or(common["validationContextSdsSecretConfig"]["name"].as_str())
                        .unwrap_or_else(|| panic!("{listener}: no SDS validation context"));
                    let san_matchers = combined["defaultValidationContext"]["matchTypedSubjectAltNames"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    Some(Termination { mesh: secret_mesh(ca), san_matchers })
                }
            };
            let mut net_rbac = vec![];
            let mut route = None;
            for f in chain["filters"].as_array().unwrap() {
                let cfg = &f["typedConfig"];
                assert!(route.is_none(), "{listener}: a filter after the terminal one: {f}");
                if type_is(cfg, "network.rbac.v3.RBAC") {
                    net_rbac.push(cfg.clone());
                } else if type_is(cfg, "tcp_proxy.v3.TcpProxy") {
                    let cluster = cfg["cluster"].as_str().expect("tcp_proxy to one cluster").to_string();
                    let metadata_match = strings(&cfg["metadataMatch"]["filterMetadata"]["envoy.lb"]);
                    route = Some(Route::Tcp { cluster, metadata_match });
                } else if type_is(cfg, "HttpConnectionManager") {
                    route = Some(http_route(&listener, cfg));
                } else {
                    panic!("{listener}: filter {f} is not modelled here");
                }
            }
            let route = route.unwrap_or_else(|| panic!("{listener}: a chain without a terminal filter"));
            out.push(ChainSpec { listener: listener.clone(), server_names, termination, net_rbac, route });
        }
    }
    out
}

fn http_route(listener: &str, hcm: &Value) -> Route {
    let mut rbac = vec![];
    for f in hcm["httpFilters"].as_array().unwrap() {
        let cfg = &f["typedConfig"];
        if type_is(cfg, "http.rbac.v3.RBAC") {
            rbac.push(cfg.clone());
        } else {
            assert!(type_is(cfg, "router.v3.Router"), "{listener}: HTTP filter {f} is not modelled here");
        }
    }
    let vhosts = hcm["routeConfig"]["virtualHosts"].as_array().expect("an inline route config");
    assert_eq!(vhosts.len(), 1, "{listener}: one virtual host expected");
    assert_eq!(vhosts[0]["domains"], json!(["*"]), "{listener}: a catch-all virtual host expected");
    let routes = vhosts[0]["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 1, "{listener}: one route expected");
    assert_eq!(routes[0]["match"], json!({"prefix": "/"}), "{listener}: a catch-all route expected");
    let r = &routes[0]["route"];
    let cluster = r["cluster"].as_str().expect("a route to one cluster").to_string();
    Route::Http { cluster, rbac, auto_host_rewrite: r["autoHostRewrite"] == true }
}

// ---------------------------------------------------------------------------------------
// Certificates and backends

/// The certificate external services present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamCert {
    /// Signed by the cluster's trusted CA, with the SANs its matchers expect.
    Genuine,
    /// Signed by the trusted CA, for another name.
    WrongSan,
    /// The expected SANs, signed by a CA the cluster does not trust.
    UnknownCa,
}

struct Pki {
    upstream: UpstreamCert,
    meshes: BTreeMap<String, MeshCa>,
    /// Signs the external services' certificates (the clusters' `trusted_ca`).
    external: MeshCa,
    /// Trusted by nobody: its identities must be refused.
    rogue: MeshCa,
}

impl Pki {
    fn new(upstream: UpstreamCert) -> Pki {
        Pki { upstream, meshes: BTreeMap::new(), external: MeshCa::new("external CA"), rogue: MeshCa::new("rogue CA") }
    }

    fn mesh(&mut self, mesh: &str) -> &MeshCa {
        self.meshes.entry(mesh.to_string()).or_insert_with(|| MeshCa::new(&format!("mesh {mesh} CA")))
    }
}

fn uri_sans(uris: &[String]) -> Vec<rcgen::SanType> {
    uris.iter().map(|u| rcgen::SanType::URI(u.as_str().try_into().unwrap())).collect()
}

/// A TLS server in front of an HTTP backend, standing in for an external service that
/// speaks TLS; it records the SNI of every handshake.
#[derive(Clone)]
struct TlsFront {
    addr: SocketAddr,
    /// Connections accepted (handshakes tried).
    attempts: Arc<std::sync::atomic::AtomicUsize>,
    /// The SNI of every completed handshake.
    snis: Arc<Mutex<Vec<Option<String>>>>,
    /// The ALPN protocol every completed handshake negotiated.
    alpns: Arc<Mutex<Vec<Option<String>>>>,
}

impl TlsFront {
    async fn start(id: &Identity, to: SocketAddr) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
                )
                .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TlsFront {
            addr: l.local_addr().unwrap(),
            attempts: Default::default(),
            snis: Default::default(),
            alpns: Default::default(),
        };
        let (snis, alpns, attempts) = (front.snis.clone(), front.alpns.clone(), front.attempts.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (acceptor, snis, alpns) = (acceptor.clone(), snis.clone(), alpns.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else { return };
                    snis.lock().unwrap().push(tls.get_ref().1.server_name().map(str::to_string));
                    let alpn = tls.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                    alpns.lock().unwrap().push(alpn);
                    let Ok(mut up) = TcpStream::connect(to).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        front
    }

    fn attempts(&self) -> usize {
        self.attempts.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn last_sni(&self) -> Option<String> {
        self.snis.lock().unwrap().last().cloned().flatten()
    }

    fn last_alpn(&self) -> Option<String> {
        self.alpns.lock().unwrap().last().cloned().flatten()
    }
}

enum Be {
    /// Plain TCP: answers its name, then echoes (remote ingresses, TCP external services).
    Tcp(Backend),
    /// An HTTP server answering its name; behind TLS when the cluster originates it.
    Http { http: HttpBackend, front: Option<TlsFront> },
}

impl Be {
    /// Connections (TCP) or requests (HTTP) it has seen.
    fn seen(&self) -> usize {
        match self {
            Be::Tcp(b) => b.connections(),
            Be::Http { http, .. } => http.requests(),
        }
    }
}

/// What the backend of an endpoint must see of a request.
struct EpExpect {
    /// The `Host` Envoy's `auto_host_rewrite` sends: the endpoint's `hostname`, or the DNS
    /// name of a STRICT_DNS endpoint; `None`: the client's.
    hostname: Option<String>,
    /// Upstream TLS: the SNI the backend must get.
    sni: Option<String>,
    /// Its address as dp must list it under `/clusters`.
    local: SocketAddr,
}

/// A golden made loadable and local.
struct Local {
    doc: Value,
    backends: BTreeMap<String, Be>,
    eps: BTreeMap<String, EpExpect>,
}

impl Local {
    fn total_seen(&self) -> usize {
        self.backends.values().map(Be::seen).sum()
    }
}

async fn localize(g: &Golden, specs: &[ChainSpec], pki: &mut Pki) -> Local {
    let http_clusters: BTreeSet<&str> =
        specs.iter().filter(|c| matches!(c.route, Route::Http { .. })).map(|c| c.route.cluster()).collect();
    let mut local = Local { doc: json!({}), backends: BTreeMap::new(), eps: BTreeMap::new() };
    let mut resources = vec![];
    for r in &g.originals {
        let mut r = r.clone();
        if type_is(&r, LISTENER) {
            r["address"] = json!({"socketAddress": {"address": "127.0.0.1", "portValue": 0}});
        } else if type_is(&r, CLUSTER) {
            let original = r.clone();
            if r.get("loadAssignment").is_some() {
                let http = http_clusters.contains(original["name"].as_str().unwrap());
                localize_endpoints(&mut r["loadAssignment"], &original, http, pki, &mut local).await;
            }
            external_trust(&mut r, &pki.external.pem);
        } else if type_is(&r, CLA) {
            let cluster = g.cluster_of_assignment(&r);
            let http = http_clusters.contains(cluster["name"].as_str().unwrap());
            localize_endpoints(&mut r, cluster, http, pki, &mut local).await;
        }
        let name = r["name"].as_str().or(r["clusterName"].as_str()).unwrap().to_string();
        resources.push(json!({"name": name, "resource": r}));
    }
    mesh_secrets(&mut resources, pki);
    local.doc = json!({ "resources": resources });
    local
}

/// Points the endpoints of one assignment at local backends (started here).
async fn localize_endpoints(cla: &mut Value, cluster: &Value, http: bool, pki: &mut Pki, local: &mut Local) {
    let name = cluster["name"].as_str().unwrap();
    let strict_dns = cluster["type"] == "STRICT_DNS";
    for le in cla["endpoints"].as_array_mut().into_iter().flatten() {
        let locality = le.clone();
        for ep in le["lbEndpoints"].as_array_mut().into_iter().flatten() {
            let original = addr_key(ep);
            let key = format!("{name}/{original}");
            let host = ep["endpoint"]["address"]["socketAddress"]["address"].as_str().unwrap().to_string();
            let is_name = host.parse::<IpAddr>().is_err();
            if is_name {
                assert!(strict_dns, "{name}: `{host}` in a cluster that does not resolve names");
                let family = cluster["dnsLookupFamily"].as_str().unwrap_or("AUTO");
                assert!(
                    ["V4_ONLY", "V4_PREFERRED", "ALL"].contains(&family),
                    "{name}: dns_lookup_family {family} would pick ::1 for localhost; the backends here are IPv4"
                );
            }
            let tls = endpoint_tls(cluster, ep, &locality);
            let sni = tls.map(|t| t["sni"].as_str().unwrap_or_default().to_string()).filter(|s| !s.is_empty());
            if !local.backends.contains_key(&key) {
                let be = if http {
                    let backend = HttpBackend::start(&key).await;
                    let front = match tls {
                        None => None,
                        Some(t) => Some(TlsFront::start(&external_identity(t, pki), backend.addr).await),
                    };
                    Be::Http { http: backend, front }
                } else {
                    assert!(tls.is_none(), "{name}: TLS origination on a TCP route is not modelled here");
                    Be::Tcp(Backend::start(&key).await)
                };
                local.backends.insert(key.clone(), be);
            }
            let port = match &local.backends[&key] {
                Be::Tcp(b) => b.addr.port(),
                Be::Http { front: Some(f), .. } => f.addr.port(),
                Be::Http { http, .. } => http.addr.port(),
            };
            let address = if is_name { "localhost" } else { "127.0.0.1" };
            ep["endpoint"]["address"]["socketAddress"] = json!({"address": address, "portValue": port});
            let hostname = ep["endpoint"]["hostname"]
                .as_str()
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .or_else(|| strict_dns.then(|| address.to_string()));
            let local_addr = SocketAddr::from(([127, 0, 0, 1], port));
            local.eps.insert(key, EpExpect { hostname, sni, local: local_addr });
        }
    }
}

/// The certificate of an external service: signed by the external CA, with the SANs the
/// cluster's `match_typed_subject_alt_names` expect (or, without matchers, its SNI); or
/// an imposter's, as `pki.upstream` says.
fn external_identity(tls: &Value, pki: &Pki) -> Identity {
    let vc = &tls["commonTlsContext"]["validationContext"];
    let mut sans = vec![];
    for m in vc["matchTypedSubjectAltNames"].as_array().into_iter().flatten() {
        let Some(exact) = m["matcher"]["exact"].as_str() else { panic!("SAN matcher {m} is not modelled here") };
        match m["sanType"].as_str().unwrap() {
            "DNS" => sans.push(rcgen::SanType::DnsName(exact.try_into().unwrap())),
            // An IP matcher holding a name (Kuma lists the ExternalService's host under
            // both types) can match no certificate: nothing to add.
            "IP_ADDRESS" => {
                if let Ok(ip) = exact.parse::<IpAddr>() {
                    sans.push(rcgen::SanType::IpAddress(ip));
                }
            }
            "URI" => sans.push(rcgen::SanType::URI(exact.try_into().unwrap())),
            t => panic!("SAN type {t} is not modelled here"),
        }
    }
    if sans.is_empty() {
        let sni = tls["sni"].as_str().filter(|s| !s.is_empty()).unwrap_or("external.test");
        sans.push(rcgen::SanType::DnsName(sni.try_into().unwrap()));
    }
    match pki.upstream {
        UpstreamCert::Genuine => pki.external.leaf(sans),
        UpstreamCert::WrongSan => {
            pki.external.leaf(vec![rcgen::SanType::DnsName("imposter.example".try_into().unwrap())])
        }
        UpstreamCert::UnknownCa => pki.rogue.leaf(sans),
    }
}

/// The external clusters' `trusted_ca` becomes the external CA.
fn external_trust(v: &mut Value, ca_pem: &str) {
    match v {
        Value::Object(m) => {
            if m.get("@type").and_then(Value::as_str).is_some_and(|t| t.ends_with(UPSTREAM_TLS)) {
                let common = &mut m["commonTlsContext"];
                assert!(
                    common.get("tlsCertificates").is_none() && common.get("tlsCertificateSdsSecretConfigs").is_none(),
                    "client certificates to external services are not modelled here"
                );
                let vc = common.get_mut("validationContext").expect("an inline validation context");
                vc["trustedCa"] = json!({ "inlineString": ca_pem });
                return;
            }
            m.values_mut().for_each(|c| external_trust(c, ca_pem));
        }
        Value::Array(a) => a.iter_mut().for_each(|c| external_trust(c, ca_pem)),
        _ => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretKind {
    Identity,
    Ca,
}

fn secret_refs(v: &Value, out: &mut BTreeMap<String, SecretKind>) {
    let mut add = |name: &str, kind| {
        let prev = out.insert(name.to_string(), kind);
        assert!(prev.is_none_or(|p| p == kind), "secret {name} is used both as identity and as CA");
    };
    match v {
        Value::Object(m) => {
            if type_is(v, SECRET) {
                let name = m["name"].as_str().unwrap();
                add(name, if m.contains_key("tlsCertificate") { SecretKind::Identity } else { SecretKind::Ca });
            }
            for s in m.get("tlsCertificateSdsSecretConfigs").and_then(Value::as_array).into_iter().flatten() {
                add(s["name"].as_str().unwrap(), SecretKind::Identity);
            }
            if let Some(n) = m.get("validationContextSdsSecretConfig").and_then(|s| s["name"].as_str()) {
                add(n, SecretKind::Ca);
            }
            m.values().for_each(|c| secret_refs(c, out));
        }
        Value::Array(a) => a.iter().for_each(|c| secret_refs(c, out)),
        _ => {}
    }
}

/// Real material for every secret the golden has or names: each mesh's CA and the
/// egress's identity in that mesh.
fn mesh_secrets(resources: &mut Vec<Value>, pki: &mut Pki) {
    let mut refs = BTreeMap::new();
    secret_refs(&Value::Array(resources.clone()), &mut refs);
    for (name, kind) in refs {
        let mesh = secret_mesh(&name);
        let ca = pki.mesh(&mesh);
        let mut secret =
            json!({"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "name": name});
        match kind {
            SecretKind::Identity => {
                let id = ca.identity(&format!("spiffe://{mesh}/zone-egress"));
                secret["tlsCertificate"] = json!({
                    "certificateChain": {"inlineString": id.cert_pem},
                    "privateKey": {"inlineString": id.key_pem},
                });
            }
            SecretKind::Ca => secret["validationContext"] = json!({"trustedCa": {"inlineString": ca.pem}}),
        }
        let entry = json!({"name": name, "resource": secret});
        match resources.iter_mut().find(|r| type_is(&r["resource"], SECRET) && r["name"] == name) {
            Some(r) => *r = entry,
            None => resources.push(entry),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// A mesh client: BoringSSL, which sends Kuma's tag SNI as is; it verifies the egress's
/// certificate against the mesh CA.
fn client_ctx(trust_pem: &str, id: Option<&Identity>) -> SslContext {
    let mut b = SslContext::builder(SslMethod::tls()).unwrap();
    for c in X509::stack_from_pem(trust_pem.as_bytes()).unwrap() {
        b.cert_store_mut().add_cert(c).unwrap();
    }
    b.set_verify(SslVerifyMode::PEER);
    if let Some(id) = id {
        let chain = X509::stack_from_pem(id.cert_pem.as_bytes()).unwrap();
        b.set_certificate(&chain[0]).unwrap();
        b.set_private_key(&PKey::private_key_from_pem(id.key_pem.as_bytes()).unwrap()).unwrap();
    }
    b.build()
}

async fn mtls(addr: SocketAddr, sni: &str, ctx: &SslContext) -> Result<tokio_boring::SslStream<TcpStream>, String> {
    let s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut ssl = Ssl::new(ctx).map_err(|e| e.to_string())?;
    ssl.set_hostname(sni).map_err(|e| e.to_string())?;
    tokio_boring::SslStreamBuilder::new(ssl, s).connect().await.map_err(|e| format!("handshake: {e}"))
}

/// What a client got: an answer (HTTP status and body; for TCP, 0 and the first line),
/// or the connection refused / closed before one (with why).
#[derive(Debug)]
enum Outcome {
    Answer(u16, String),
    Refused(String),
}

async fn http_request(addr: SocketAddr, sni: &str, ctx: &SslContext, h2: bool, host: &str, path: &str) -> Outcome {
    let fut = async {
        let io = TokioIo::new(mtls(addr, sni, ctx).await?);
        let e = |e: hyper::Error| e.to_string();
        let res = if h2 {
            let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(e)?;
            tokio::spawn(conn);
            let req = hyper::Request::get(format!("https://{host}{path}")).body(Full::new(Bytes::new())).unwrap();
            tx.send_request(req).await.map_err(e)?
        } else {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.map_err(e)?;
            tokio::spawn(conn);
            let req = hyper::Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
            tx.send_request(req).await.map_err(e)?
        };
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.map_err(e)?.to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(WAIT, fut).await.expect("a request through dp hung") {
        Ok((status, body)) => Outcome::Answer(status, body),
        Err(e) => Outcome::Refused(e),
    }
}

async fn tcp_exchange(addr: SocketAddr, sni: &str, ctx: &SslContext) -> Outcome {
    let fut = async {
        let mut tls = mtls(addr, sni, ctx).await?;
        tls.write_all(b"hello through the egress\n").await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        let n = BufReader::new(tls).read_line(&mut line).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".to_string());
        }
        Ok(line.trim_end().to_string())
    };
    match tokio::time::timeout(WAIT, fut).await.expect("a TCP exchange through dp hung") {
        Ok(line) => Outcome::Answer(0, line),
        Err(e) => Outcome::Refused(e),
    }
}

/// Reads until `done` says what came so far is enough; `None` when the connection ends
/// first.
async fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) -> Option<()> {
    let mut buf = [0u8; 1024];
    while !done(got) {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("read timed out") {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(())
}

/// The bytes a passthrough client sends after its ClientHello; the backend echoes them.
const AFTER_HELLO: &[u8] = b"bytes after the ClientHello\n";

/// A ClientHello with `sni`, not terminated, then [`AFTER_HELLO`]: the first line the
/// backend answers (its name). Once the echo is back, the backend has recorded all of it.
async fn passthrough(addr: SocketAddr, sni: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello::client_hello(Some(sni), &[])).await.unwrap();
    let mut got = vec![];
    read_until(&mut s, &mut got, |g| g.contains(&b'\n')).await?;
    let eol = got.iter().position(|&b| b == b'\n').unwrap();
    let name = String::from_utf8_lossy(&got[..eol]).into_owned();
    // What follows the name is echoed (ClientHello bytes the backend read after its
    // first read, if any), and then these.
    let mut echo = got.split_off(eol + 1);
    s.write_all(AFTER_HELLO).await.unwrap();
    read_until(&mut s, &mut echo, |g| g.ends_with(AFTER_HELLO)).await?;
    Some(name)
}

// ---------------------------------------------------------------------------------------
// The checks

/// What a golden exercised, to make sure the suite as a whole covers every kind.
#[derive(Debug, Default)]
struct Tally {
    goldens: usize,
    names: usize,
    passthrough: usize,
    http_routed: usize,
    h2_upstream: usize,
    tls_upstream: usize,
    tcp_terminated: usize,
    net_denied: usize,
    http_denied: usize,
    tls_refused: usize,
    cross_mesh_refused: usize,
    unknown_refused: usize,
    upstream_refused: usize,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.goldens += o.goldens;
        self.names += o.names;
        self.passthrough += o.passthrough;
        self.http_routed += o.http_routed;
        self.h2_upstream += o.h2_upstream;
        self.tls_upstream += o.tls_upstream;
        self.tcp_terminated += o.tcp_terminated;
        self.net_denied += o.net_denied;
        self.http_denied += o.http_denied;
        self.tls_refused += o.tls_refused;
        self.cross_mesh_refused += o.cross_mesh_refused;
        self.unknown_refused += o.unknown_refused;
        self.upstream_refused += o.upstream_refused;
    }
}

/// A client of a terminating chain: its SPIFFE IDs and what the chain's RBAC says.
struct MeshClient {
    uris: Vec<String>,
    ctx: SslContext,
    net_allowed: bool,
    http_allowed: bool,
}

/// Localizes a golden and starts `dp --proxy-type=egress` on it.
async fn start(g: &Golden, specs: &[ChainSpec], pki: &mut Pki) -> (Local, Dp) {
    let local = localize(g, specs, pki).await;
    let file = temp_dir("egress-golden").join("golden.json");
    std::fs::write(&file, serde_json::to_vec(&local.doc).unwrap()).unwrap();
    let dp = Dp::start(&file, &["--proxy-type", "egress"]);
    (local, dp)
}

async fn check_golden(path: PathBuf) -> Tally {
    let g = Golden::load(&path);
    let at = path.display().to_string();
    let specs = chains(&g);
    let mut pki = Pki::new(UpstreamCert::Genuine);
    let (local, dp) = start(&g, &specs, &mut pki).await;
    let mut tally = Tally { goldens: 1, ..Tally::default() };

    // Every listener is up and every cluster lists exactly its (local, IPv4) endpoints.
    let (_, listeners) = dp.get("/listeners?format=json");
    let listeners: Value = serde_json::from_str(&listeners).unwrap();
    assert_eq!(
        listeners["listener_statuses"].as_array().map_or(0, Vec::len),
        g.of(LISTENER).count(),
        "{at}: listeners: {listeners}"
    );
    let (_, clusters) = dp.get("/clusters");
    for c in g.of(CLUSTER) {
        let name = c["name"].as_str().unwrap();
        let want: BTreeSet<String> =
            endpoints(&g, c).iter().map(|e| format!("{name}::{}::weight", local.eps[&e.key].local)).collect();
        let have: BTreeSet<String> = clusters
            .lines()
            .filter(|l| l.starts_with(&format!("{name}::")) && l.contains("::weight::"))
            .map(|l| l.rsplit_once("::").unwrap().0.to_string())
            .collect();
        assert_eq!(have, want, "{at}: hosts of cluster {name} in /clusters:\n{clusters}");
    }

    // A name no chain lists matches no chain: closed, nothing reached (Envoy's
    // `no_filter_chain_match`).
    for l in g.of(LISTENER) {
        let name = l["name"].as_str().unwrap();
        let before = local.total_seen();
        let got = passthrough(dp.listener(name), "not-in-the-config.example").await;
        assert_eq!(got, None, "{at}: listener {name}: an unknown server name was routed");
        assert_eq!(local.total_seen(), before, "{at}: listener {name}: an unknown server name reached a backend");
        tally.unknown_refused += 1;
    }

    for spec in &specs {
        let addr = dp.listener(&spec.listener);
        let cluster = g.cluster(spec.route.cluster());
        match (&spec.termination, &spec.route) {
            (None, Route::Tcp { cluster: name, metadata_match }) => {
                let want = subset(&g, cluster, metadata_match);
                for sni in &spec.server_names {
                    check_passthrough(&at, &local, addr, sni, &want, name).await;
                    tally.passthrough += 1;
                    tally.names += 1;
                }
            }
            (None, Route::Http { .. }) => panic!("{at}: plaintext HTTP on an egress chain is not modelled here"),
            (Some(term), route) => {
                let want = subset(&g, cluster, &BTreeMap::new());
                assert!(!want.is_empty(), "{at}: cluster {} has no endpoint", route.cluster());
                let clients = mesh_clients(spec, term, &mut pki);
                for sni in &spec.server_names {
                    for client in &clients {
                        check_terminated(&at, &g, &local, &dp, spec, addr, sni, client, &want, &mut tally).await;
                    }
                    check_refused_handshakes(&at, &local, spec, term, addr, sni, &mut pki, &mut tally).await;
                    tally.names += 1;
                }
            }
        }
    }
    drop(dp);
    check_upstream_imposters(&at, &g, &specs, &mut tally).await;
    tally
}

/// Whether connections to a cluster's endpoints originate TLS (all or none of them).
fn originates_tls(g: &Golden, cluster: &Value) -> bool {
    let mut kinds = BTreeSet::new();
    for le in g.assignment(cluster).and_then(|a| a["endpoints"].as_array()).into_iter().flatten() {
        for ep in le["lbEndpoints"].as_array().into_iter().flatten() {
            kinds.insert(endpoint_tls(cluster, ep, le).is_some());
        }
    }
    assert!(kinds.len() <= 1, "cluster {}: mixed upstream TLS is not modelled here", cluster["name"]);
    kinds.contains(&true)
}

/// TLS origination verifies the external service as the cluster says: behind an
/// imposter (a certificate for another name, or from a CA the cluster does not trust) dp
/// tries the handshake, sends no request, and answers 503.
async fn check_upstream_imposters(at: &str, g: &Golden, specs: &[ChainSpec], tally: &mut Tally) {
    let chains: Vec<&ChainSpec> = specs
        .iter()
        .filter(|s| s.termination.is_some() && matches!(s.route, Route::Http { .. }))
        .filter(|s| originates_tls(g, g.cluster(s.route.cluster())))
        .collect();
    if chains.is_empty() {
        return;
    }
    for variant in [UpstreamCert::WrongSan, UpstreamCert::UnknownCa] {
        let mut pki = Pki::new(variant);
        let (local, dp) = start(g, specs, &mut pki).await;
        for spec in &chains {
            let term = spec.termination.as_ref().unwrap();
            let Some(client) = mesh_clients(spec, term, &mut pki).into_iter().find(|c| c.net_allowed && c.http_allowed)
            else {
                continue;
            };
            let addr = dp.listener(&spec.listener);
            let want = subset(g, g.cluster(spec.route.cluster()), &BTreeMap::new());
            let fronts: Vec<&TlsFront> = want
                .iter()
                .map(|k| match &local.backends[k] {
                    Be::Http { front: Some(f), .. } => f,
                    _ => unreachable!(),
                })
                .collect();
            for sni in &spec.server_names {
                let who = format!("{at}: {sni} behind an upstream with a {variant:?} certificate");
                let tried: usize = fronts.iter().map(|f| f.attempts()).sum();
                let before = local.total_seen();
                for _ in 0..want.len() * 2 {
                    match http_request(addr, sni, &client.ctx, false, "client-host.example", "/imposter").await {
                        Outcome::Answer(503, _) => {}
                        got => panic!("{who}: want 503, got {got:?}"),
                    }
                }
                assert_eq!(local.total_seen(), before, "{who}: a request reached the imposter");
                let now: usize = fronts.iter().map(|f| f.attempts()).sum();
                assert!(now > tried, "{who}: dp did not even try the upstream");
                tally.upstream_refused += 1;
            }
        }
    }
}

async fn check_passthrough(
    at: &str,
    local: &Local,
    addr: SocketAddr,
    sni: &str,
    want: &BTreeSet<String>,
    cluster: &str,
) {
    if want.is_empty() {
        let before = local.total_seen();
        assert_eq!(passthrough(addr, sni).await, None, "{at}: {sni} must be refused (no endpoint in its subset)");
        assert_eq!(local.total_seen(), before, "{at}: {sni} reached a backend");
        return;
    }
    let mut reached = BTreeSet::new();
    let mut sent = 0;
    while another_round(sent, &reached, want) {
        let who = passthrough(addr, sni).await.unwrap_or_else(|| panic!("{at}: {sni} was refused"));
        assert!(want.contains(&who), "{at}: {sni} reached {who}, want one of {want:?} (cluster {cluster})");
        // Passthrough: the ClientHello and what follows arrive as the client sent them.
        let Be::Tcp(b) = &local.backends[&who] else { unreachable!() };
        let got = b.received.lock().unwrap().last().cloned().unwrap_or_default();
        let bytes = [hello::client_hello(Some(sni), &[]), AFTER_HELLO.to_vec()].concat();
        assert!(got == bytes, "{at}: {sni}: the bytes were altered on the way to {who}");
        reached.insert(who);
        sent += 1;
    }
    assert_eq!(&reached, want, "{at}: {sni} must reach every endpoint");
}

/// Whether to send another request to a cluster with the endpoints `want`: two rounds at
/// least, then until every endpoint was reached (bounded: one never reached fails the
/// check). Envoy's round robin reaches them all in the first round.
fn another_round(sent: usize, reached: &BTreeSet<String>, want: &BTreeSet<String>) -> bool {
    sent < want.len() * 2 || (reached != want && sent < want.len() * 20)
}

/// The identities to try on a terminating chain: a plain mesh client, and one holding each
/// principal the chain's RBAC names (with a SPIFFE ID its SAN matchers accept besides).
fn mesh_clients(spec: &ChainSpec, term: &Termination, pki: &mut Pki) -> Vec<MeshClient> {
    let mesh = &term.mesh;
    let plain = format!("spiffe://{mesh}/egress-client");
    let mut named = BTreeSet::new();
    spec.net_rbac.iter().for_each(|r| named_principals(r, &mut named));
    if let Route::Http { rbac, .. } = &spec.route {
        rbac.iter().for_each(|r| named_principals(r, &mut named));
    }
    let mut sets = vec![vec![plain]];
    for p in named {
        let p = vec![p];
        sets.push(if sans_accept(&term.san_matchers, &p) {
            p
        } else {
            vec![format!("spiffe://{mesh}/rbac-client"), p[0].clone()]
        });
    }
    let ca = pki.mesh(mesh);
    sets.into_iter()
        .map(|uris| {
            assert!(sans_accept(&term.san_matchers, &uris), "{uris:?} must pass the chain's SAN matchers");
            let id = ca.leaf(uri_sans(&uris));
            let net_allowed = spec.net_rbac.iter().all(|r| rbac_allows(r, &uris));
            let http_allowed = match &spec.route {
                Route::Http { rbac, .. } => rbac.iter().all(|r| rbac_allows(r, &uris)),
                Route::Tcp { .. } => true,
            };
            MeshClient { ctx: client_ctx(&ca.pem, Some(&id)), uris, net_allowed, http_allowed }
        })
        .collect()
}

fn rbac_denied(dp: &Dp, spec: &ChainSpec) -> u64 {
    spec.net_rbac
        .iter()
        .map(|r| {
            let prefix = r["statPrefix"].as_str().unwrap_or_default();
            dp.stat(&format!("envoy_rbac_denied{{envoy_rbac_prefix=\"{prefix}\"}}"))
        })
        .sum()
}

#[allow(clippy::too_many_arguments)]
async fn check_terminated(
    at: &str,
    g: &Golden,
    local: &Local,
    dp: &Dp,
    spec: &ChainSpec,
    addr: SocketAddr,
    sni: &str,
    client: &MeshClient,
    want: &BTreeSet<String>,
    tally: &mut Tally,
) {
    let who = format!("{at}: {sni} as {:?}", client.uris);
    let cluster = g.cluster(spec.route.cluster());
    match &spec.route {
        Route::Tcp { .. } => {
            let before = local.total_seen();
            if !client.net_allowed {
                let denied = rbac_denied(dp, spec);
                let got = tcp_exchange(addr, sni, &client.ctx).await;
                assert!(matches!(got, Outcome::Refused(_)), "{who}: RBAC denies, yet {got:?}");
                assert_eq!(local.total_seen(), before, "{who}: denied, yet a backend was reached");
                assert!(rbac_denied(dp, spec) > denied, "{who}: not refused by the RBAC filter");
                tally.net_denied += 1;
                return;
            }
            let mut reached = BTreeSet::new();
            let mut sent = 0;
            while another_round(sent, &reached, want) {
                match tcp_exchange(addr, sni, &client.ctx).await {
                    Outcome::Answer(_, name) => {
                        assert!(want.contains(&name), "{who}: reached {name}, want one of {want:?}");
                        reached.insert(name);
                    }
                    Outcome::Refused(e) => panic!("{who}: refused: {e}"),
                }
                sent += 1;
            }
            assert_eq!(&reached, want, "{who}: must reach every endpoint");
            tally.tcp_terminated += 1;
        }
        Route::Http { auto_host_rewrite, .. } => {
            for h2 in [false, true] {
                let proto = if h2 { "h2" } else { "HTTP/1.1" };
                let who = format!("{who} over {proto}");
                let path = format!("/egress/{}?h2={h2}", tally.names);
                let host = "client-host.example";
                let before = local.total_seen();
                if !client.net_allowed {
                    let denied = rbac_denied(dp, spec);
                    let got = http_request(addr, sni, &client.ctx, h2, host, &path).await;
                    assert!(matches!(got, Outcome::Refused(_)), "{who}: the network RBAC denies, yet {got:?}");
                    assert_eq!(local.total_seen(), before, "{who}: denied, yet a backend was reached");
                    assert!(rbac_denied(dp, spec) > denied, "{who}: not refused by the RBAC filter");
                    tally.net_denied += 1;
                    continue;
                }
                if !client.http_allowed {
                    match http_request(addr, sni, &client.ctx, h2, host, &path).await {
                        Outcome::Answer(403, _) => {}
                        got => panic!("{who}: the HTTP RBAC denies: want 403, got {got:?}"),
                    }
                    assert_eq!(local.total_seen(), before, "{who}: denied, yet a backend was reached");
                    tally.http_denied += 1;
                    continue;
                }
                let mut reached = BTreeSet::new();
                let mut sent = 0;
                while another_round(sent, &reached, want) {
                    let (status, name) = match http_request(addr, sni, &client.ctx, h2, host, &path).await {
                        Outcome::Answer(s, b) => (s, b),
                        Outcome::Refused(e) => panic!("{who}: refused: {e}"),
                    };
                    assert_eq!(status, 200, "{who}: status (body {name:?})");
                    assert!(want.contains(&name), "{who}: reached {name:?}, want one of {want:?}");
                    let Be::Http { http, front } = &local.backends[&name] else { unreachable!() };
                    let seen = http.last();
                    let ep = &local.eps[&name];
                    assert_eq!(seen.path, path, "{who}: path at {name}");
                    let version = upstream_version(cluster, h2);
                    assert_eq!(seen.version, version, "{who}: upstream HTTP version at {name}");
                    let want_host = ep.hostname.as_deref().filter(|_| *auto_host_rewrite).unwrap_or(host);
                    assert_eq!(seen.headers.get("host").map(String::as_str), Some(want_host), "{who}: Host at {name}");
                    if let Some(f) = front {
                        assert_eq!(f.last_sni(), ep.sni, "{who}: upstream SNI at {name}");
                        // The pool offers its protocol as ALPN when the context sets none,
                        // as Envoy's pools do (a server choosing by ALPN speaks it).
                        let alpn = if version == "HTTP/2.0" { "h2" } else { "http/1.1" };
                        assert_eq!(f.last_alpn().as_deref(), Some(alpn), "{who}: upstream ALPN at {name}");
                        tally.tls_upstream += 1;
                    } else {
                        assert!(ep.sni.is_none());
                    }
                    if version == "HTTP/2.0" {
                        tally.h2_upstream += 1;
                    }
                    reached.insert(name);
                    sent += 1;
                }
                assert_eq!(&reached, want, "{who}: must reach every endpoint");
                assert_eq!(local.total_seen(), before + sent, "{who}: one backend request per request");
                tally.http_routed += 1;
            }
        }
    }
}

/// Handshakes the chain must refuse: no client certificate, one from a CA the mesh does
/// not trust, and (when the chain matches SANs) a SPIFFE ID outside its matchers.
#[allow(clippy::too_many_arguments)]
async fn check_refused_handshakes(
    at: &str,
    local: &Local,
    spec: &ChainSpec,
    term: &Termination,
    addr: SocketAddr,
    sni: &str,
    pki: &mut Pki,
    tally: &mut Tally,
) {
    let mesh = &term.mesh;
    let ca_pem = pki.mesh(mesh).pem.clone();
    let inside = vec![format!("spiffe://{mesh}/egress-client")];
    let mut cases = vec![
        ("no client certificate".to_string(), client_ctx(&ca_pem, None)),
        ("a certificate from another CA".to_string(), client_ctx(&ca_pem, Some(&pki.rogue.leaf(uri_sans(&inside))))),
    ];
    if !term.san_matchers.is_empty() {
        let outside = vec![format!("spiffe://not-{mesh}/egress-client")];
        assert!(!sans_accept(&term.san_matchers, &outside));
        cases.push((
            "a SPIFFE ID outside the SAN matchers".to_string(),
            client_ctx(&ca_pem, Some(&pki.mesh(mesh).leaf(uri_sans(&outside)))),
        ));
    }
    // The egress serves several meshes: a client of another one (its CA, its SPIFFE ID)
    // must not get through this mesh's chain.
    let others: Vec<String> = pki.meshes.keys().filter(|m| *m != mesh).cloned().collect();
    for other in others {
        let id = pki.mesh(&other).leaf(uri_sans(&[format!("spiffe://{other}/egress-client")]));
        cases.push((format!("an identity of mesh {other}"), client_ctx(&ca_pem, Some(&id))));
        tally.cross_mesh_refused += 1;
    }
    for (what, ctx) in cases {
        let before = local.total_seen();
        let got = match spec.route {
            Route::Tcp { .. } => tcp_exchange(addr, sni, &ctx).await,
            Route::Http { .. } => http_request(addr, sni, &ctx, false, "client-host.example", "/refused").await,
        };
        assert!(matches!(got, Outcome::Refused(_)), "{at}: {sni} with {what}: want refused, got {got:?}");
        assert_eq!(local.total_seen(), before, "{at}: {sni} with {what}: a backend was reached");
        tally.tls_refused += 1;
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kuma_egress_golden_loads_and_routes() {
    let files = golden_files();
    assert!(files.len() >= 15, "expected the 11 egress and 4 zone-proxy egress goldens, found {files:?}");
    let mut tally = Tally::default();
    let mut failures = vec![];
    // Each golden in its own task, so one failure does not hide the others.
    for f in &files {
        match tokio::spawn(check_golden(f.clone())).await {
            Ok(t) => tally += t,
            Err(e) => failures.push(format!("{}: {}", f.display(), panic_message(e))),
        }
    }
    assert!(failures.is_empty(), "{} of {} goldens failed:\n{}", failures.len(), files.len(), failures.join("\n"));
    let non_empty = files.iter().filter(|f| !Golden::load(f).originals.is_empty()).count();
    assert!(non_empty >= 13, "expected 13 non-empty egress goldens, found {non_empty}");
    eprintln!("{tally:?}");
    // The suite as a whole exercised every kind of chain and decision.
    assert!(tally.names >= 25, "only {} server names were checked", tally.names);
    assert!(tally.passthrough >= 8, "{tally:?}");
    assert!(tally.http_routed >= 20, "{tally:?}");
    assert!(tally.h2_upstream >= 1 && tally.tls_upstream >= 1 && tally.tcp_terminated >= 1, "{tally:?}");
    assert!(tally.net_denied >= 1 && tally.http_denied >= 1 && tally.tls_refused >= 1, "{tally:?}");
    assert!(tally.upstream_refused >= 2 && tally.cross_mesh_refused >= 2, "{tally:?}");
    assert!(tally.unknown_refused >= 13, "{tally:?}");
}
