//! `POST /bootstrap` to the control plane, as kuma-dp 2.14 does it: the request JSON,
//! TLS verified with `--ca-cert-file` (or the system roots, or not at all with
//! `--skip-verify`), constant-backoff retries, and the Envoy node taken from the
//! bootstrap the control plane returns.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as PbValue, value::Kind};
use http_body_util::{BodyExt, Full};
use kuma_model::proxy::{BootstrapRequest, ProxyType, features};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// Where the control plane is, parsed from `--cp-address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl CpAddress {
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--cp-address {url:?} {why}");
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with https:// or http://"));
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| bad("has an unclosed '['"))?;
            (h, p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("has an invalid port"))?,
            None if tls => 443,
            None => 80,
        };
        Ok(CpAddress { tls, host: host.to_string(), port })
    }

    pub fn url(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("{}://{host}:{}", if self.tls { "https" } else { "http" }, self.port)
    }
}

/// How to trust the control plane's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// PEM bundle from `--ca-cert-file`.
    Ca(Vec<u8>),
    /// The system trust store.
    System,
    /// `--skip-verify`.
    SkipVerify,
}

pub fn client_tls(trust: &Trust, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut cfg = match trust {
        Trust::SkipVerify => {
            builder.dangerous().with_custom_certificate_verifier(xds_client::accept_any_server()).with_no_client_auth()
        }
        Trust::Ca(_) | Trust::System => {
            let bundle = match trust {
                Trust::Ca(pem) => pem.clone(),
                _ => ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"]
                    .iter()
                    .find_map(|p| std::fs::read(p).ok())
                    .unwrap_or_default(),
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&bundle).flatten() {
                let _ = roots.add(c);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// What `dp` sends in `POST /bootstrap`.
#[derive(Debug, Clone)]
pub struct Request {
    pub mesh: String,
    pub name: String,
    pub proxy_type: ProxyType,
    pub token: String,
    pub token_path: String,
    pub resource: Value,
    pub ca_pem: String,
    pub readiness_port: u16,
    pub workdir: String,
    pub delta: bool,
    /// Where the control plane should put the `.mesh` DNS listener (none: no DNS).
    pub dns_port: Option<u16>,
    /// dp runs the embedded DNS proxy: ask for the `/dns` records.
    pub embedded_dns: bool,
    /// `--bind-outbounds`: VIP outbounds bound on this host.
    pub bind_outbounds: bool,
    /// `--transparent-proxy`: kumactl's default redirect ports are in force.
    pub transparent_proxy: bool,
}

impl Request {
    pub fn to_json(&self) -> Value {
        let features = [
            (self.delta, features::DELTA_GRPC),
            (self.embedded_dns, features::EMBEDDED_DNS),
            (self.bind_outbounds, features::BIND_OUTBOUNDS),
            (self.transparent_proxy, features::TRANSPARENT_PROXY_IN_METADATA),
        ];
        let dataplane_config = if self.transparent_proxy {
            let dns = self.dns_port.is_some();
            json!({"ipFamilyMode": "ipv4", "redirect": {
                "inbound": {"enabled": true, "port": 15006},
                "outbound": {"enabled": true, "port": 15001},
                "dns": {"enabled": dns, "port": 15053}}})
        } else {
            Value::Null
        };
        let body = BootstrapRequest {
            mesh: self.mesh.clone(),
            name: self.name.clone(),
            proxy_type: self.proxy_type.to_string(),
            dataplane_token: self.token.clone(),
            dataplane_token_path: self.token_path.clone(),
            dataplane_resource: self.resource.to_string(),
            version: json!({
                "kumaDp": {"version": env!("CARGO_PKG_VERSION"), "gitTag": "", "gitCommit": "", "buildDate": ""},
                // dp is the proxy itself and implements the Envoy 1.40 subset Kuma 2.14 generates.
                "envoy": {"version": "1.40.0", "build": concat!("dp/", env!("CARGO_PKG_VERSION")), "kumaDpCompatible": true}
            }),
            ca_cert: self.ca_pem.clone(),
            dynamic_metadata: Some(Default::default()),
            readiness_port: u32::from(self.readiness_port),
            operating_system: "linux".into(),
            features: features.iter().filter(|(on, _)| *on).map(|(_, f)| f.to_string()).collect(),
            resources: json!({"maxHeapSizeBytes": 0}),
            workdir: self.workdir.clone(),
            dns_port: u32::from(self.dns_port.unwrap_or(0)), // 0: no DNS (Kuma omits it)
            ipv6_enabled: Some(false),
            dataplane_config,
            ..Default::default()
        };
        serde_json::to_value(body).unwrap_or_default()
    }
}

/// What `dp` needs from the bootstrap response.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub node: Node,
    /// The control plane asked for Delta xDS (`ads_config.api_type: DELTA_GRPC`).
    pub delta: bool,
    /// `kumaSidecarConfiguration.metrics.aggregate`: the applications whose metrics the
    /// metrics socket serves beside the proxy's.
    pub apps: Vec<crate::metrics_socket::App>,
}

#[derive(Debug)]
enum Attempt {
    /// Not worth retrying (Kuma's "Invalid request" class).
    Fatal(String),
    Retry(String),
}

/// Requests the bootstrap, retrying transport errors, 5xx and "not found yet" every
/// `backoff` for at most `max_duration`.
pub async fn fetch(
    cp: &CpAddress,
    trust: &Trust,
    req: &Request,
    backoff: Duration,
    max_duration: Duration,
) -> Result<Bootstrap, String> {
    let started = Instant::now();
    let body = serde_json::to_vec_pretty(&req.to_json()).map_err(|e| e.to_string())?;
    loop {
        match attempt(cp, trust, &body).await {
            Ok(b) => return Ok(b),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => {
                if started.elapsed() + backoff > max_duration {
                    return Err(format!("{e} (gave up after {}s)", started.elapsed().as_secs()));
                }
                warn!(control_plane = %cp.url(), "bootstrap failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

async fn attempt(cp: &CpAddress, trust: &Trust, body: &[u8]) -> Result<Bootstrap, Attempt> {
    let url = cp.url();
    let retry = |e: String| Attempt::Retry(format!("cannot reach the control plane at {url}: {e}"));
    let tcp =
        tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect((cp.host.as_str(), cp.port)))
            .await
            .map_err(|_| retry("connect timed out".into()))?
            .map_err(|e| retry(e.to_string()))?;
    let request = hyper::Request::post("/bootstrap")
        .header("host", format!("{}:{}", cp.host, cp.port))
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| Attempt::Fatal(e.to_string()))?;
    let response = if cp.tls {
        let cfg = client_tls(trust, &[b"http/1.1"]).map_err(Attempt::Fatal)?;
        let name =
            ServerName::try_from(cp.host.clone()).map_err(|e| Attempt::Fatal(format!("--cp-address host: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| {
            let hint = match trust {
                Trust::Ca(_) => " (is --ca-cert-file the control plane's CA? cp writes it to <work dir>/kuma-cp.crt)",
                Trust::System => " (pass the control plane's CA with --ca-cert-file)",
                Trust::SkipVerify => "",
            };
            retry(format!("TLS handshake failed: {e}{hint}"))
        })?;
        send(tls, request).await.map_err(retry)?
    } else {
        send(tcp, request).await.map_err(retry)?
    };
    let (status, text) = response;
    match status {
        200 => parse_response(&text).map_err(Attempt::Fatal),
        404 if text.contains("404: Page Not Found") => Err(Attempt::Retry(format!(
            "{url} answered 404 for /bootstrap; double check --cp-address points at the DP server port (5678 by \
             default), not the HTTP API (5681 by default)"
        ))),
        404 => Err(Attempt::Retry(format!("{url}: the dataplane is not known to the control plane yet"))),
        400..=499 => {
            Err(Attempt::Fatal(format!("the control plane refused the bootstrap request ({status}): {}", text.trim())))
        }
        _ => Err(Attempt::Retry(format!("the control plane answered {status}: {}", text.trim()))),
    }
}

async fn send<S>(io: S, req: hyper::Request<Full<Bytes>>) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "request timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
        .collect()
        .await
        .map_err(|e| format!("reading the response: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Takes the node (id, cluster, metadata) and the xDS variant from the bootstrap.
pub fn parse_response(text: &str) -> Result<Bootstrap, String> {
    use base64::Engine;
    let bad = |why: String| format!("the control plane's bootstrap response is not usable: {why}");
    let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let b64 = v["bootstrap"].as_str().ok_or_else(|| bad("no `bootstrap` field".into()))?;
    let yaml = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| bad(e.to_string()))?;
    let yaml = String::from_utf8(yaml).map_err(|e| bad(e.to_string()))?;
    let boot: Value = serde_saphyr::from_str(&yaml).map_err(|e| bad(e.to_string()))?;
    let node = &boot["node"];
    let id = node["id"].as_str().ok_or_else(|| bad("no node.id".into()))?;
    let metadata = match &node["metadata"] {
        Value::Object(m) => Some(to_struct(m)),
        _ => None,
    };
    let api_type = boot["dynamicResources"]["adsConfig"]["apiType"]
        .as_str()
        .or(boot["dynamic_resources"]["ads_config"]["api_type"].as_str())
        .unwrap_or("GRPC");
    Ok(Bootstrap {
        node: Node {
            id: id.to_string(),
            cluster: node["cluster"].as_str().unwrap_or_default().to_string(),
            metadata,
            user_agent_name: "dp".into(),
            ..Default::default()
        },
        delta: api_type == "DELTA_GRPC",
        apps: crate::metrics_socket::apps(&v["kumaSidecarConfiguration"]["metrics"]["aggregate"]),
    })
}

/// JSON object -> protobuf `Struct`.
pub fn to_struct(m: &serde_json::Map<String, Value>) -> Struct {
    Struct { fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

fn to_value(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue { values: a.iter().map(to_value).collect() }),
        Value::Object(m) => Kind::StructValue(to_struct(m)),
    };
    PbValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_addresses() {
        let a = CpAddress::parse("https://cp.example:5678").unwrap();
        assert_eq!((a.tls, a.host.as_str(), a.port), (true, "cp.example", 5678));
        assert_eq!(CpAddress::parse("http://[::1]:5678/x").unwrap().host, "::1");
        assert_eq!(CpAddress::parse("https://cp").unwrap().port, 443);
        for bad in ["cp:5678", "grpcs://cp:5685", "https://:5678", "https://cp:port"] {
            assert!(CpAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bootstrap_response_gives_the_node() {
        use base64::Engine;
        let yaml = "node:\n  id: .ingress-01\n  cluster: ingress\n  metadata:\n    dataplane.proxyType: ingress\n    \
                    dataplane.admin.port: \"9901\"\ndynamicResources:\n  adsConfig:\n    apiType: DELTA_GRPC\n";
        let body = json!({"bootstrap": base64::engine::general_purpose::STANDARD.encode(yaml)}).to_string();
        let b = parse_response(&body).unwrap();
        assert_eq!((b.node.id.as_str(), b.node.cluster.as_str(), b.delta), (".ingress-01", "ingress", true));
        let md = b.node.metadata.unwrap();
        assert_eq!(md.fields["dataplane.admin.port"].kind, Some(Kind::StringValue("9901".into())));
        assert!(parse_response("{}").unwrap_err().contains("no `bootstrap`"));
    }
}
