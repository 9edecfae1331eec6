//! Sidecar (Dataplane) generation over real ADS streams: mesh mTLS secrets, inbound and
//! outbound listeners/clusters, cross-zone endpoints, `.mesh` DNS, certificate rotation.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use cp::config::DpProxyAuth;
use cp::model::ResourceType;
use cp::xds::generate::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE, unpack};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::data_source;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter, listener_filter};
use envoy_types::pb::envoy::data::dns::v3::dns_table;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::{DnsFilterConfig, dns_filter_config};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, Secret, UpstreamTlsContext, common_tls_context, secret,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use envoy_types::pb::google::protobuf::Any;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const STEP: Duration = Duration::from_secs(10);

fn mesh_yaml(name: &str, expiration: Option<&str>) -> String {
    let mut m = json!({"type": "Mesh", "name": name,
        "mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}});
    if let Some(e) = expiration {
        m["mtls"]["backends"][0]["dpCert"] = json!({"rotation": {"expiration": e}});
    }
    m.to_string()
}

fn dp_json(mesh: &str, name: &str, inbound: (u16, u16, &str), outbound: Option<(u16, &str)>) -> String {
    let mut dp = json!({
        "type": "Dataplane", "mesh": mesh, "name": name,
        "networking": {"address": "127.0.0.1",
            "inbound": [{"port": inbound.0, "servicePort": inbound.1, "tags": {"kuma.io/service": inbound.2, "version": "v1"}}]}
    });
    if let Some((port, svc)) = outbound {
        dp["networking"]["outbound"] = json!([{"port": port, "tags": {"kuma.io/service": svc}}]);
    }
    dp.to_string()
}

fn remote_ingress_json(name: &str, zone: &str, addr: &str, services: serde_json::Value) -> String {
    json!({"type": "ZoneIngress", "name": name, "zone": zone,
        "networking": {"address": "10.9.0.1", "port": 10001, "advertisedAddress": addr, "advertisedPort": 10001},
        "availableServices": services})
    .to_string()
}

async fn start_cp(tag: &str) -> TestCp {
    TestCp::start_with(tag, |c| c.dp_proxy_auth = DpProxyAuth::None).await
}

/// A SotW ADS client that ACKs everything and remembers the names it subscribed to.
struct Client {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    names: HashMap<String, Vec<String>>,
    /// Type URLs of every response received, in order.
    seen: Vec<String>,
}

impl Client {
    async fn open(cp: &TestCp, mesh: &str, name: &str, resource: &str, dns_port: u32) -> Client {
        let (tx, rx) = mpsc::channel(16);
        tx.send(DiscoveryRequest {
            node: Some(dataplane_node(mesh, name, resource, dns_port, false)),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = cp.ads().await.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let mut names = HashMap::new();
        names.insert(CLUSTER_TYPE.to_string(), Vec::new());
        Client { tx, rx, names, seen: Vec::new() }
    }

    async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        self.names.insert(type_url.to_string(), names.clone());
        self.tx
            .send(DiscoveryRequest { type_url: type_url.into(), resource_names: names, ..Default::default() })
            .await
            .unwrap();
    }

    /// Next response (ACKed).
    async fn next(&mut self) -> DiscoveryResponse {
        let r = tokio::time::timeout(STEP, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("stream open");
        self.seen.push(r.type_url.clone());
        self.tx
            .send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: r.type_url.clone(),
                resource_names: self.names.get(&r.type_url).cloned().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .unwrap();
        r
    }

    /// The first response of `type_url` for which `ok` holds (others are ACKed and skipped).
    async fn wait_for(&mut self, type_url: &str, mut ok: impl FnMut(&DiscoveryResponse) -> bool) -> DiscoveryResponse {
        loop {
            let r = self.next().await;
            if r.type_url == type_url && ok(&r) {
                return r;
            }
        }
    }
}

fn by_name<T: prost::Message + prost::Name + Default>(
    resources: &[Any],
    name_of: impl Fn(&T) -> String,
) -> BTreeMap<String, T> {
    resources.iter().map(|a| unpack::<T>(a).expect("decodes")).map(|t| (name_of(&t), t)).collect()
}

fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else { return None };
            let address::Address::SocketAddress(sa) = ep.address.as_ref()?.address.as_ref()? else { return None };
            let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else { return None };
            Some((format!("{}:{p}", sa.address), e.load_balancing_weight.as_ref().map_or(1, |w| w.value)))
        })
        .collect();
    out.sort();
    out
}

fn tls_of<T: prost::Message + prost::Name + Default>(
    ts: &Option<envoy_types::pb::envoy::config::core::v3::TransportSocket>,
) -> Option<T> {
    let ts = ts.as_ref()?;
    assert_eq!(ts.name, "envoy.transport_sockets.tls");
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else { panic!("typed config") };
    Some(unpack::<T>(any).expect("TLS context decodes"))
}

/// (identity SDS names, validation SDS name, SAN matchers as "prefix:..."/"exact:...").
fn common_parts(c: &CommonTlsContext) -> (Vec<String>, String, Vec<String>) {
    let ids = c.tls_certificate_sds_secret_configs.iter().map(|s| s.name.clone()).collect();
    for s in &c.tls_certificate_sds_secret_configs {
        assert!(s.sds_config.as_ref().is_some_and(|c| c.config_source_specifier.is_some()), "SDS over ADS");
    }
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(cv)) = &c.validation_context_type
    else {
        panic!("combined validation context expected")
    };
    let sans = cv
        .default_validation_context
        .as_ref()
        .unwrap()
        .match_typed_subject_alt_names
        .iter()
        .map(|m| {
            assert_eq!(m.san_type, subject_alt_name_matcher::SanType::Uri as i32);
            match m.matcher.as_ref().unwrap().match_pattern.as_ref().unwrap() {
                string_matcher::MatchPattern::Prefix(p) => format!("prefix:{p}"),
                string_matcher::MatchPattern::Exact(p) => format!("exact:{p}"),
                other => panic!("unexpected matcher {other:?}"),
            }
        })
        .collect();
    (ids, cv.validation_context_sds_secret_config.as_ref().unwrap().name.clone(), sans)
}

/// The cluster of the chain's tcp_proxy, its last filter (an mTLS inbound has RBAC first).
fn tcp_cluster(l: &Listener) -> String {
    let f = l.filter_chains[0].filters.last().unwrap();
    assert_eq!(f.name, "envoy.filters.network.tcp_proxy");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
    let t: TcpProxy = unpack(any).unwrap();
    let Some(tcp_proxy::ClusterSpecifier::Cluster(c)) = t.cluster_specifier else { panic!() };
    c
}

fn dns_records(l: &Listener) -> BTreeMap<String, Vec<String>> {
    let f = &l.listener_filters[0];
    assert_eq!(f.name, "envoy.filters.udp.dns_filter");
    let Some(listener_filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
    let cfg: DnsFilterConfig = unpack(any).unwrap();
    let Some(dns_filter_config::server_context_config::ConfigSource::InlineDnsTable(t)) =
        cfg.server_config.unwrap().config_source
    else {
        panic!("inline table")
    };
    t.virtual_domains
        .into_iter()
        .map(|d| {
            assert_eq!(d.answer_ttl.as_ref().map(|t| t.seconds), Some(30));
            let Some(dns_table::dns_endpoint::EndpointConfig::AddressList(a)) = d.endpoint.unwrap().endpoint_config
            else {
                panic!()
            };
            (d.name, a.address)
        })
        .collect()
}

fn secret_pems(resources: &[Any]) -> (String, String, String) {
    let secrets = by_name::<Secret>(resources, |s| s.name.clone());
    let bytes = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| {
        let Some(data_source::Specifier::InlineBytes(b)) = d.as_ref().unwrap().specifier.clone() else { panic!() };
        String::from_utf8(b).unwrap()
    };
    let Some(secret::Type::TlsCertificate(tc)) = secrets["identity_cert:secret:default"].r#type.clone() else {
        panic!("identity secret is a tls_certificate")
    };
    let Some(secret::Type::ValidationContext(vc)) = secrets["mesh_ca:secret:default"].r#type.clone() else {
        panic!("mesh_ca secret is a validation_context")
    };
    (bytes(&tc.certificate_chain), bytes(&tc.private_key), bytes(&vc.trusted_ca))
}

/// Checks the identity certificate against the CA; returns (URI SANs, lifetime in seconds).
fn check_cert(cert_pem: &str, ca_pem: &str) -> (Vec<String>, i64) {
    let (_, cert) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
    let cert = cert.parse_x509().unwrap();
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
    let ca = ca.parse_x509().unwrap();
    cert.verify_signature(Some(ca.public_key())).expect("identity certificate signed by the mesh CA");
    assert!(ca.is_ca());
    assert_eq!(cert.issuer(), ca.subject());
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    let v = cert.validity();
    (sans, v.not_after.timestamp() - v.not_before.timestamp())
}

#[tokio::test]
async fn mtls_sidecar_gets_secrets_listeners_clusters_endpoints_and_dns() {
    let cp = start_cp("sidecar").await;
    assert_eq!(cp.put("/meshes/default", &mesh_yaml("default", None)).await.0, 201);
    // The server sidecar (same zone) and a remote zone's ingress advertising the service.
    let (s, e) = cp
        .put("/meshes/default/dataplanes/backend-1", &dp_json("default", "backend-1", (18080, 18081, "backend"), None))
        .await;
    assert_eq!(s, 201, "{e}");
    let remote = remote_ingress_json(
        "zi-remote",
        "zone-2",
        "10.1.1.1",
        json!([{"tags": {"kuma.io/service": "backend", "kuma.io/zone": "zone-2"}, "instances": 3, "mesh": "default"},
               {"tags": {"kuma.io/service": "echo_ns_svc_1010", "kuma.io/zone": "zone-2"}, "instances": 1, "mesh": "default"}]),
    );
    let (s, e) = cp.put("/zoneingresses/zi-remote", &remote).await;
    assert_eq!(s, 201, "{e}");

    let web = dp_json("default", "web-1", (28080, 28081, "web"), Some((20012, "backend")));
    let mut c = Client::open(&cp, "default", "web-1", &web, 15054).await;

    // CDS: the outbound cluster with client-side mTLS, and the inbound's local cluster.
    let r = c.wait_for(CLUSTER_TYPE, |_| true).await;
    let clusters = by_name::<Cluster>(&r.resources, |c| c.name.clone());
    assert_eq!(clusters.keys().cloned().collect::<Vec<_>>(), vec!["backend", "localhost:28081"]);
    let up: UpstreamTlsContext = tls_of(&clusters["backend"].transport_socket).expect("upstream TLS");
    assert_eq!(up.sni, "backend{mesh=default}");
    let common = up.common_tls_context.unwrap();
    assert_eq!(common.alpn_protocols, vec!["kuma"]);
    assert_eq!(
        common_parts(&common),
        (
            vec!["identity_cert:secret:default".to_string()],
            "mesh_ca:secret:default".to_string(),
            vec!["exact:spiffe://default/backend".to_string()]
        )
    );
    let local = &clusters["localhost:28081"];
    assert!(local.transport_socket.is_none());
    let local_cla = local.load_assignment.as_ref().unwrap();
    assert_eq!(endpoints(local_cla), vec![("127.0.0.1:28081".to_string(), 1)]);

    // LDS: inbound with server-side mTLS, outbound to the cluster, DNS listener.
    c.subscribe(LISTENER_TYPE, &[]).await;
    let r = c
        .wait_for(LISTENER_TYPE, |r| {
            let ls = by_name::<Listener>(&r.resources, |l| l.name.clone());
            ls.get("kuma:dns").is_some_and(|l| dns_records(l).len() == 4)
        })
        .await;
    let ls = by_name::<Listener>(&r.resources, |l| l.name.clone());
    assert_eq!(
        ls.keys().cloned().collect::<Vec<_>>(),
        vec!["inbound:127.0.0.1:28080", "kuma:dns", "outbound:127.0.0.1:20012"]
    );
    let inbound = &ls["inbound:127.0.0.1:28080"];
    assert_eq!(tcp_cluster(inbound), "localhost:28081");
    // MeshTrafficPermission's RBAC comes first (the mesh has none: nobody gets in).
    assert_eq!(inbound.filter_chains[0].filters[0].name, "envoy.filters.network.rbac");
    let down: DownstreamTlsContext = tls_of(&inbound.filter_chains[0].transport_socket).expect("downstream TLS");
    assert_eq!(down.require_client_certificate.map(|b| b.value), Some(true));
    assert_eq!(
        common_parts(&down.common_tls_context.unwrap()),
        (
            vec!["identity_cert:secret:default".to_string()],
            "mesh_ca:secret:default".to_string(),
            vec!["prefix:spiffe://default/".to_string()]
        )
    );
    let outbound = &ls["outbound:127.0.0.1:20012"];
    assert_eq!(tcp_cluster(outbound), "backend");
    assert!(outbound.filter_chains[0].transport_socket.is_none());

    // DNS: both name forms of a service resolve to the same VIP; UDP on 127.0.0.1:15054.
    let dns = &ls["kuma:dns"];
    let Some(address::Address::SocketAddress(sa)) = dns.address.as_ref().unwrap().address.as_ref() else { panic!() };
    assert_eq!((sa.address.as_str(), sa.protocol), ("127.0.0.1", socket_address::Protocol::Udp as i32));
    assert_eq!(sa.port_specifier, Some(socket_address::PortSpecifier::PortValue(15054)));
    let records = dns_records(dns);
    assert_eq!(
        records.keys().cloned().collect::<Vec<_>>(),
        vec!["backend.mesh", "echo.ns.svc.1010.mesh", "echo_ns_svc_1010.mesh", "web.mesh"]
    );
    assert_eq!(records["echo.ns.svc.1010.mesh"], records["echo_ns_svc_1010.mesh"]);
    let vips: Vec<&String> = records.values().flatten().collect();
    assert!(vips.iter().all(|v| v.starts_with("240.")), "{vips:?}");
    assert_ne!(records["backend.mesh"], records["web.mesh"]);

    // EDS: the local server inbound (weight = 1 remote ingress coordinate) and the remote
    // ingress's advertised address weighted by its instances.
    c.subscribe(ENDPOINT_TYPE, &["backend"]).await;
    let r = c.wait_for(ENDPOINT_TYPE, |_| true).await;
    let cla: ClusterLoadAssignment = unpack(&r.resources[0]).unwrap();
    assert_eq!(cla.cluster_name, "backend");
    assert_eq!(endpoints(&cla), vec![("10.1.1.1:10001".to_string(), 3), ("127.0.0.1:18080".to_string(), 1)]);
    // Every endpoint has its zone as locality (Kuma's `GetLocality`).
    let zones: Vec<&str> = cla.endpoints.iter().map(|l| l.locality.as_ref().unwrap().zone.as_str()).collect();
    assert_eq!(zones, vec!["zone-1", "zone-2"]);

    // SDS: the identity certificate (spiffe + kuma SANs, signed by the mesh CA) and the CA.
    c.subscribe(SECRET_TYPE, &["identity_cert:secret:default", "mesh_ca:secret:default"]).await;
    let r = c.wait_for(SECRET_TYPE, |_| true).await;
    assert_eq!(r.resources.len(), 2);
    let (cert, key, ca) = secret_pems(&r.resources);
    assert!(key.contains("PRIVATE KEY"));
    let (sans, lifetime) = check_cert(&cert, &ca);
    assert_eq!(sans, vec!["spiffe://default/web", "kuma://kuma.io/service/web", "kuma://version/v1"]);
    assert_eq!(lifetime, 24 * 3600 + 10, "default 24h (+10s clock skew)");
    // The CA is Kuma's secret in the store.
    let stored =
        cp.running.cp.store.get(ResourceType::Secret, "default", "default.ca-builtin-cert-ca-1").await.unwrap();
    assert!(stored.is_some_and(|r| r.spec.contains_key("data")));
    assert!(
        cp.running
            .cp
            .store
            .get(ResourceType::Secret, "default", "default.ca-builtin-key-ca-1")
            .await
            .unwrap()
            .is_some()
    );

    // VIPs are stable: a new service gets a new VIP, existing ones keep theirs.
    cp.put("/meshes/default/dataplanes/db-1", &dp_json("default", "db-1", (19090, 19091, "db"), None)).await;
    let r = c
        .wait_for(LISTENER_TYPE, |r| {
            by_name::<Listener>(&r.resources, |l| l.name.clone())
                .get("kuma:dns")
                .is_some_and(|l| dns_records(l).len() == 5)
        })
        .await;
    let after = dns_records(&by_name::<Listener>(&r.resources, |l| l.name.clone())["kuma:dns"]);
    for (name, ips) in &records {
        assert_eq!(&after[name], ips, "VIP of {name} changed");
    }
    assert!(!records.values().any(|v| v == &after["db.mesh"]));
}

#[tokio::test]
async fn transparent_proxy_gets_vip_outbounds() {
    let cp = start_cp("tproxy").await;
    assert_eq!(cp.put("/meshes/default", &mesh_yaml("default", None)).await.0, 201);
    cp.put("/meshes/default/dataplanes/backend-1", &dp_json("default", "backend-1", (18080, 18081, "backend"), None))
        .await;
    let mut web: serde_json::Value =
        serde_json::from_str(&dp_json("default", "web-1", (28080, 28081, "web"), None)).unwrap();
    web["networking"]["transparentProxying"] = json!({"redirectPortInbound": 15006, "redirectPortOutbound": 15001});
    let mut c = Client::open(&cp, "default", "web-1", &web.to_string(), 15054).await;
    c.subscribe(LISTENER_TYPE, &[]).await;
    let r = c
        .wait_for(LISTENER_TYPE, |r| {
            by_name::<Listener>(&r.resources, |l| l.name.clone())
                .get("kuma:dns")
                .is_some_and(|l| dns_records(l).len() == 2)
        })
        .await;
    let ls = by_name::<Listener>(&r.resources, |l| l.name.clone());
    let records = dns_records(&ls["kuma:dns"]);
    let backend_vip = &records["backend.mesh"][0];
    // IPv4-mapped IPv6 form as well (dual stack by default), as in Kuma's DNS golden.
    assert_eq!(records["backend.mesh"].len(), 2);
    assert!(records["backend.mesh"][1].starts_with("::ffff:f000:"));
    let vip_listener = &ls[&format!("outbound:{backend_vip}:80")];
    assert_eq!(tcp_cluster(vip_listener), "backend");
    assert_eq!(vip_listener.bind_to_port.as_ref().map(|b| b.value), Some(false));
}

#[tokio::test]
async fn mesh_without_mtls_gets_plain_tcp() {
    let cp = start_cp("plain").await;
    assert_eq!(cp.put("/meshes/plain", r#"{"type":"Mesh","name":"plain"}"#).await.0, 201);
    cp.put("/meshes/plain/dataplanes/backend-1", &dp_json("plain", "backend-1", (18080, 18081, "backend"), None)).await;
    // Remote ingresses are ignored without mTLS (SNI routing needs TLS).
    cp.put(
        "/zoneingresses/zi-remote",
        &remote_ingress_json(
            "zi-remote",
            "zone-2",
            "10.1.1.1",
            json!([{"tags": {"kuma.io/service": "backend"}, "instances": 2, "mesh": "plain"}]),
        ),
    )
    .await;
    let web = dp_json("plain", "web-1", (28080, 28081, "web"), Some((20012, "backend")));
    let mut c = Client::open(&cp, "plain", "web-1", &web, 0).await;
    let r = c.wait_for(CLUSTER_TYPE, |_| true).await;
    for cl in by_name::<Cluster>(&r.resources, |c| c.name.clone()).values() {
        assert!(cl.transport_socket.is_none(), "{} has a transport socket", cl.name);
    }
    c.subscribe(LISTENER_TYPE, &[]).await;
    let r = c.wait_for(LISTENER_TYPE, |_| true).await;
    let ls = by_name::<Listener>(&r.resources, |l| l.name.clone());
    assert_eq!(ls.keys().cloned().collect::<Vec<_>>(), vec!["inbound:127.0.0.1:28080", "outbound:127.0.0.1:20012"]);
    for l in ls.values() {
        assert!(l.filter_chains.iter().all(|fc| fc.transport_socket.is_none()), "{} has TLS", l.name);
    }
    c.subscribe(ENDPOINT_TYPE, &["backend"]).await;
    let r = c.wait_for(ENDPOINT_TYPE, |_| true).await;
    assert_eq!(endpoints(&unpack(&r.resources[0]).unwrap()), vec![("127.0.0.1:18080".to_string(), 1)]);
    c.subscribe(SECRET_TYPE, &[]).await;
    let r = c.wait_for(SECRET_TYPE, |_| true).await;
    assert!(r.resources.is_empty());
    // No mesh CA (the mesh's dataplane-token signing key is its only Secret).
    let secrets = cp.running.cp.store.list(ResourceType::Secret, Some("plain")).await.unwrap();
    assert!(secrets.iter().all(|s| !s.name.contains("ca-builtin")), "{secrets:?}");
}

#[tokio::test]
async fn short_expiration_rotates_the_identity_secret_alone() {
    let cp = start_cp("rotation").await;
    assert_eq!(cp.put("/meshes/default", &mesh_yaml("default", Some("2s"))).await.0, 201);
    let web = dp_json("default", "web-1", (28080, 28081, "web"), None);
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(dataplane_node("default", "web-1", &web, 0, true)),
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: vec!["identity_cert:secret:default".into(), "mesh_ca:secret:default".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx: Streaming<DeltaDiscoveryResponse> =
        cp.ads().await.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut next = async || {
        let r = tokio::time::timeout(STEP, rx.message()).await.expect("delta response in time").unwrap().unwrap();
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        r
    };
    let first = next().await;
    assert_eq!(first.type_url, SECRET_TYPE);
    assert_eq!(first.resources.len(), 2);
    let anys: Vec<Any> = first.resources.iter().map(|r| r.resource.clone().unwrap()).collect();
    let (cert1, _, ca) = secret_pems(&anys);
    let (_, lifetime) = check_cert(&cert1, &ca);
    assert_eq!(lifetime, 2 + 10);
    let v1 = first.resources.iter().find(|r| r.name == "identity_cert:secret:default").unwrap().version.clone();

    // After 4/5 of 2s a new identity certificate is pushed; nothing else changes.
    let started = tokio::time::Instant::now();
    let rotated = next().await;
    assert!(started.elapsed() < Duration::from_secs(3), "rotation took {:?}", started.elapsed());
    assert_eq!(rotated.type_url, SECRET_TYPE);
    assert_eq!(rotated.resources.len(), 1, "only the identity secret changes");
    assert_eq!(rotated.resources[0].name, "identity_cert:secret:default");
    assert_ne!(rotated.resources[0].version, v1);
    assert!(rotated.removed_resources.is_empty());
    let Some(secret::Type::TlsCertificate(tc)) =
        unpack::<Secret>(rotated.resources[0].resource.as_ref().unwrap()).unwrap().r#type
    else {
        panic!()
    };
    let Some(data_source::Specifier::InlineBytes(b)) = tc.certificate_chain.unwrap().specifier else { panic!() };
    let cert2 = String::from_utf8(b).unwrap();
    assert_ne!(cert2, cert1);
    let (sans, _) = check_cert(&cert2, &ca);
    assert_eq!(sans[0], "spiffe://default/web");
}

#[tokio::test]
async fn mesh_ca_and_vips_survive_a_restart_of_the_memory_store() {
    let first = start_cp("restart").await;
    let work = first.running.cp.cfg.work_dir();
    first.put("/meshes/default", &mesh_yaml("default", None)).await;
    first
        .put("/meshes/default/dataplanes/backend-1", &dp_json("default", "backend-1", (18080, 18081, "backend"), None))
        .await;
    first.put("/meshes/default/dataplanes/web-1", &dp_json("default", "web-1", (28080, 28081, "web"), None)).await;
    let cp1 = first.running.cp.clone();
    let ready =
        first.wait_store(STEP, || async { cp::vips::load(cp1.store.as_ref(), "default").await.len() == 2 }).await;
    assert!(ready, "VIPs allocated");
    let vips1 = cp::vips::load(cp1.store.as_ref(), "default").await;
    let ca1 = cp1.ca.ensure_ca(&cp1.store, "default", "ca-1").await.unwrap();
    first.running.shutdown();

    // A new control plane on the same work directory, with an empty store. Services are
    // added in the other order: they keep their VIPs anyway.
    let second = TestCp::start_with("restart2", |c| {
        c.dp_proxy_auth = DpProxyAuth::None;
        c.work_dir = Some(work.clone());
    })
    .await;
    second.put("/meshes/default", &mesh_yaml("default", None)).await;
    second.put("/meshes/default/dataplanes/web-1", &dp_json("default", "web-1", (28080, 28081, "web"), None)).await;
    second
        .put("/meshes/default/dataplanes/backend-1", &dp_json("default", "backend-1", (18080, 18081, "backend"), None))
        .await;
    let cp2 = second.running.cp.clone();
    let ready =
        second.wait_store(STEP, || async { cp::vips::load(cp2.store.as_ref(), "default").await.len() == 2 }).await;
    assert!(ready);
    assert_eq!(cp::vips::load(cp2.store.as_ref(), "default").await, vips1);
    assert_eq!(cp2.ca.ensure_ca(&cp2.store, "default", "ca-1").await.unwrap(), ca1);
}
