//! xDS generation for data plane proxies (`Dataplane` sidecars), in the shape of Kuma 2.14's
//! generator goldens (`pkg/xds/generator/testdata/{inbound-proxy,outbound-proxy,dns}`):
//!
//! * per inbound: listener `inbound:<address>:<port>` (tcp_proxy to the STATIC cluster
//!   `localhost:<servicePort>`, server-side mTLS when the mesh has mTLS);
//! * per outbound (tag form): listener `outbound:<address>:<port>` (tcp_proxy to the EDS
//!   cluster `<service>`, whose UpstreamTlsContext carries SNI `<service>{mesh=<mesh>}`, ALPN
//!   `kuma` and the SAN `spiffe://<mesh>/<service>`); endpoints are the local inbounds of the
//!   service plus remote ZoneIngresses advertising it (weight = instances);
//! * SDS secrets `identity_cert:secret:<mesh>` and `mesh_ca:secret:<mesh>`;
//! * DNS: UDP listener `kuma:dns` with `envoy.filters.udp.dns_filter` answering the `.mesh`
//!   names with the service VIPs, or, for a proxy with `feature-embedded-dns`, the same
//!   records in the dynamic-config listener's `/dns` body; transparent-proxy Dataplanes
//!   also get `outbound:<vip>:80`.

use std::collections::{BTreeMap, BTreeSet};

use super::access_log::KumaValues;
use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig};
use envoy_types::pb::envoy::config::core::v3::{
    ConfigSource, DataSource, Locality, Metadata, SocketAddress, TrafficDirection, TransportSocket, address,
    data_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::data::dns::v3::{DnsTable, dns_table};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::{DnsFilterConfig, dns_filter_config};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext, common_tls_context, secret, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};
use envoy_types::util::pack_any;

use super::dynconf;
use super::egress::{ZONE_EGRESS_SERVICE, external_cluster};
use super::generate::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, Named, ProxySnapshot, SECRET_TYPE, ads_config_source, socket_address,
    string_struct, version_of,
};
use super::http::{HttpTimeouts, PROTOCOL_TAG, Protocol};
use super::meshtls::{MeshTls, Mode};
use super::sni::sni_from_tags;
use crate::ca::{identity_secret_name, mesh_ca_secret_name};
use crate::dataplanes::DataplaneView;
use crate::model::{DataplaneSpec, ExternalServiceSpec, Resource, SERVICE_TAG, ZoneIngressSpec};
use crate::vips::{VipMap, domains, to_v6};

use kuma_model::proxy::features::{BIND_OUTBOUNDS as FEATURE_BIND_OUTBOUNDS, REUSE_PORT as FEATURE_REUSE_PORT};
/// Name of the DNS listener (`names.GetDNSListenerName()`).
pub const DNS_LISTENER: &str = "kuma:dns";
/// ALPN Kuma's client side sets on mesh mTLS (`KumaALPNProtocols`).
pub const KUMA_ALPN: &str = "kuma";
const ZONE_TAG: &str = "kuma.io/zone";

/// An inbound's application, as its `localhost:<port>` cluster reaches it.
struct LocalApp {
    ip: String,
    port: u32,
    /// MeshTimeout's connect timeout.
    connect: Option<Duration>,
    protocol: Protocol,
    /// MeshTimeout's HTTP timeouts (HTTP applications).
    http: HttpTimeouts,
}

/// TLS material of a proxy of an mTLS mesh.
pub struct SidecarTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Inputs of sidecar generation (a consistent read of the store).
pub struct SidecarInputs<'a> {
    pub zone: &'a str,
    pub dataplane: &'a Resource,
    /// Dataplanes of the proxy's mesh (including itself).
    /// The serving Dataplanes of the mesh.
    pub dataplanes: &'a [&'a DataplaneView],
    /// All ZoneIngresses (local and of other zones).
    pub ingresses: &'a [Resource],
    pub vips: &'a VipMap,
    /// `KUMA_DNS_SERVER_SERVICE_VIP_PORT`: the port of VIP outbounds.
    pub vip_port: u32,
    /// The VIP range is in 127.0.0.0/8: a proxy with `feature-bind-outbounds` binds them.
    pub vips_bindable: bool,
    /// `dataplane.dns.port` from the node metadata (0 = the proxy did not ask for DNS).
    pub dns_port: u32,
    pub features: &'a BTreeSet<String>,
    /// `workdir` from the node metadata.
    pub workdir: &'a str,
    /// Set when the mesh has mTLS enabled.
    pub tls: Option<SidecarTls>,
    /// The enabled mTLS backend's `mode` (`STRICT`/`PERMISSIVE`).
    pub mtls_mode: Option<&'a str>,
    /// MeshTLS policies of the mesh.
    pub mesh_tls: &'a [Resource],
    /// MeshTrafficPermission policies of the mesh.
    pub traffic_permissions: &'a [Resource],
    /// MeshTimeout policies of the mesh.
    pub timeouts: &'a [Resource],
    /// MeshTCPRoute policies of the mesh.
    pub tcp_routes: &'a [Resource],
    /// MeshHTTPRoute policies of the mesh.
    pub http_routes: &'a [Resource],
    /// MeshFaultInjection policies of the mesh.
    pub fault_injections: &'a [Resource],
    /// MeshRateLimit policies of the mesh.
    pub rate_limits: &'a [Resource],
    /// The mesh's `routing.zoneEgress`.
    pub zone_egress: bool,
    /// The mesh's `routing.localityAwareLoadBalancing`.
    pub locality_aware: bool,
    /// `(address, port)` of the zone's online ZoneEgresses.
    pub egresses: &'a [(String, u32)],
    /// ExternalServices of the proxy's mesh.
    pub external_services: &'a [Resource],
    /// MeshCircuitBreakers of the proxy's mesh.
    pub circuit_breakers: &'a [Resource],
    /// MeshRetries of the proxy's mesh.
    pub retries: &'a [Resource],
    /// MeshHealthChecks of the proxy's mesh.
    pub health_checks: &'a [Resource],
    /// MeshAccessLog policies of the mesh.
    pub access_logs: &'a [Resource],
    /// MeshLoadBalancingStrategy policies of the mesh.
    pub load_balancing: &'a [Resource],
    /// The mesh's (or the Dataplane's) Prometheus metrics backend.
    pub metrics: Option<super::prometheus::MetricsEndpoint>,
    /// The merged MeshMetric policies of the mesh.
    pub mesh_metric: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct OutEndpoint {
    zone: Option<String>,
    address: String,
    port: u32,
    weight: u32,
    /// Endpoint tags without `kuma.io/service`.
    tags: BTreeMap<String, String>,
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig { name: name.to_string(), sds_config: Some(ConfigSource { ..ads_config_source() }) }
}

fn uri_san(m: string_matcher::MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher { match_pattern: Some(m), ignore_case: false }),
        oid: String::new(),
    }
}

/// `CommonTlsContext` of Kuma's mesh mTLS: identity from SDS, validation = mesh CA from SDS
/// combined with a URI SAN matcher.
fn common_tls(mesh: &str, san: string_matcher::MatchPattern, alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(&identity_secret_name(mesh))],
        validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: vec![uri_san(san)],
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(&mesh_ca_secret_name(mesh))),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

pub(crate) fn tls_socket<T: prost::Message + prost::Name>(ctx: T) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    }
}

/// Server side (inbound): client certificate required, peer SAN URI prefix `spiffe://<mesh>/`.
pub fn downstream_tls(mesh: &str) -> DownstreamTlsContext {
    DownstreamTlsContext {
        common_tls_context: Some(common_tls(
            mesh,
            string_matcher::MatchPattern::Prefix(format!("spiffe://{mesh}/")),
            &[],
        )),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

/// Client side (outbound): SNI from tags, ALPN `kuma`, peer SAN URI exactly `spiffe://<mesh>/<service>`.
pub fn upstream_tls(mesh: &str, service: &str) -> UpstreamTlsContext {
    upstream_tls_via(mesh, service, service)
}

/// Client side to `service` through a proxy that presents `peer`'s identity: the SNI
/// names the service, the certificate must be `peer`'s (a ZoneEgress terminating the
/// mTLS of an ExternalService presents `zone-egress`).
pub fn upstream_tls_via(mesh: &str, service: &str, peer: &str) -> UpstreamTlsContext {
    upstream_tls_subset(mesh, service, peer, &BTreeMap::new())
}

/// Client side to the endpoints of `service` that carry `subset`'s tags: Kuma's tag SNI
/// names them (`backend{mesh=default,version=v2}`).
fn upstream_tls_subset(mesh: &str, service: &str, peer: &str, subset: &BTreeMap<String, String>) -> UpstreamTlsContext {
    let mut tags = subset.clone();
    tags.insert("mesh".to_string(), mesh.to_string());
    let tag_sni = sni_from_tags(service, &tags);
    UpstreamTlsContext {
        common_tls_context: Some(common_tls(
            mesh,
            string_matcher::MatchPattern::Exact(format!("spiffe://{mesh}/{peer}")),
            &[KUMA_ALPN],
        )),
        sni: tag_sni,
        ..Default::default()
    }
}

pub(crate) fn inline(bytes: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.as_bytes().to_vec())),
        ..Default::default()
    })
}

fn tags_metadata(tags: &BTreeMap<String, String>) -> Option<Metadata> {
    Some(Metadata {
        filter_metadata: [("io.kuma.tags".to_string(), string_struct(tags))].into_iter().collect(),
        ..Default::default()
    })
}

pub(crate) fn tcp_proxy_chain(
    cluster: &str,
    stat_prefix: &str,
    idle_secs: i64,
    tls: Option<TransportSocket>,
) -> FilterChain {
    tcp_chain(tcp_proxy(cluster, stat_prefix, idle_secs), tls)
}

/// What an inbound's chains end in: a tcp_proxy (with MeshTrafficPermission as the network
/// `rbac` filter before it), or an HTTP connection manager (with it as the HTTP `rbac`).
enum Terminal<'a> {
    Tcp(Box<TcpProxy>, Filter),
    Http(Box<super::http::Inbound<'a>>, HttpFilter),
}

impl Terminal<'_> {
    /// The chain's filters; `rbac` on the chain that terminates mesh mTLS.
    fn filters(&self, rbac: bool) -> Vec<Filter> {
        match self {
            Terminal::Tcp(tcp, filter) => {
                let mut filters = tcp_chain(tcp.as_ref().clone(), None).filters;
                if rbac {
                    filters.insert(0, filter.clone());
                }
                filters
            }
            Terminal::Http(i, filter) => vec![super::http::inbound(i, rbac.then(|| filter.clone()))],
        }
    }
}

/// An inbound's filter chains and listener filters. Without mTLS, one plaintext chain. With
/// it, strict: one chain terminating mesh mTLS, `rbac` first; permissive (Kuma's order):
/// plaintext, then the application's own TLS passed through as it is, then mesh mTLS,
/// which the TLS inspector tells from the application's TLS by ALPN `kuma`.
fn inbound_chains(
    inputs: &SidecarInputs<'_>,
    settings: &MeshTls,
    terminal: &Terminal<'_>,
) -> (Vec<FilterChain>, Vec<ListenerFilter>) {
    let chain = |rbac: bool, tls: Option<TransportSocket>| FilterChain {
        filters: terminal.filters(rbac),
        transport_socket: tls,
        ..Default::default()
    };
    let Some(_) = &inputs.tls else { return (vec![chain(false, None)], vec![]) };
    let mut ctx = downstream_tls(&inputs.dataplane.mesh);
    with_params(&mut ctx.common_tls_context, settings);
    let mesh_tls = chain(true, Some(tls_socket(ctx)));
    if settings.mode == Mode::Strict {
        return (vec![mesh_tls], vec![]);
    }
    let matching = |mut chain: FilterChain, transport: &str, alpn: &[&str]| {
        chain.filter_chain_match = Some(FilterChainMatch {
            transport_protocol: transport.to_string(),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        chain
    };
    let chains = vec![
        matching(chain(false, None), "raw_buffer", &[]),
        matching(chain(false, None), "tls", &[]),
        matching(mesh_tls, "tls", &[KUMA_ALPN]),
    ];
    (chains, vec![super::generate::tls_inspector()])
}

/// MeshTLS's versions and ciphers on a mesh mTLS context, server or client side.
fn with_params(ctx: &mut Option<CommonTlsContext>, tls: &MeshTls) {
    if let (Some(ctx), Some(p)) = (ctx.as_mut(), &tls.params) {
        ctx.tls_params = Some(p.clone());
    }
}

fn tcp_proxy(cluster: &str, stat_prefix: &str, idle_secs: i64) -> TcpProxy {
    TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        idle_timeout: Some(Duration { seconds: idle_secs, nanos: 0 }),
        ..Default::default()
    }
}

/// A filter chain of one tcp_proxy.
fn tcp_chain(tcp: TcpProxy, tls: Option<TransportSocket>) -> FilterChain {
    FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(tcp))),
        }],
        transport_socket: tls,
        ..Default::default()
    }
}

/// An outbound's tcp_proxy, with MeshRetry's connect attempts and MeshTimeout's idle
/// timeout when policies set them, and MeshAccessLog's loggers.
fn outbound_chain(svc: &str, inputs: &SidecarInputs<'_>, access_log: Vec<AccessLog>) -> FilterChain {
    let attempts =
        super::resilience::merged_conf(inputs.retries, svc).and_then(|c| super::resilience::connect_attempts(&c));
    let idle = super::timeout::outbound(inputs.timeouts, svc).map_or(Duration { seconds: 3600, nanos: 0 }, |t| t.idle);
    let mut tcp = TcpProxy {
        max_connect_attempts: attempts.map(|value| UInt32Value { value }),
        access_log,
        idle_timeout: Some(idle),
        ..tcp_proxy(svc, svc, 3600)
    };
    match super::tcp_route::backends(inputs.tcp_routes, svc).as_deref() {
        Some([one]) => tcp.cluster_specifier = Some(tcp_proxy::ClusterSpecifier::Cluster(one.cluster())),
        Some(split) => {
            let clusters = split
                .iter()
                .map(|b| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: b.cluster(),
                    weight: b.weight,
                    ..Default::default()
                })
                .collect();
            tcp.cluster_specifier =
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster { clusters }));
        }
        None => {}
    }
    tcp_chain(tcp, None)
}

/// Kuma's `AccessLogSocketName`: `<workdir>/kuma-al-<name>-<mesh>`, cut to 98 bytes, then
/// `.sock` (the proxy serves it).
fn access_log_pipe(workdir: &str, name: &str, mesh: &str) -> String {
    let mut joined =
        std::path::Path::new(workdir).join(format!("kuma-al-{name}-{mesh}")).to_string_lossy().into_owned();
    let mut cut = joined.len().min(98);
    while !joined.is_char_boundary(cut) {
        cut -= 1;
    }
    joined.truncate(cut);
    joined + ".sock"
}

/// Push a resource whose version is computed from its map-free Debug form plus `extra`
/// (prost encodes `Struct` maps in random order, so bytes are not a stable version).
pub(crate) fn push<T: prost::Message + prost::Name + std::fmt::Debug>(
    out: &mut Vec<Named>,
    name: &str,
    proto: T,
    extra: &str,
    finish: impl FnOnce(&mut T),
) {
    let version = version_of(&format!("{proto:?}|{extra}"));
    let mut proto = proto;
    finish(&mut proto);
    out.push(Named::new(name.to_string(), version, pack_any(proto)));
}

/// A STATIC cluster of one endpoint at `address` (an inbound's application, a pipe).
pub(crate) fn static_cluster(name: &str, address: envoy_types::pb::envoy::config::core::v3::Address) -> Cluster {
    Cluster {
        name: name.to_string(),
        alt_stat_name: name.replace(':', "_"),
        connect_timeout: Some(Duration { seconds: 10, nanos: 0 }),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(address),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn sorted(mut v: Vec<Named>) -> Vec<Named> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.dedup_by(|a, b| a.name == b.name);
    v
}

/// Generate the Listeners, Clusters, ClusterLoadAssignments and Secrets of a Dataplane.
pub fn sidecar(inputs: &SidecarInputs<'_>) -> ProxySnapshot {
    let dp = inputs.dataplane;
    let mesh = dp.mesh.as_str();
    let spec: DataplaneSpec = dp.typed().unwrap_or_default();
    let net = spec.networking.unwrap_or_default();
    let tproxy = net.transparent_proxying.clone().filter(|t| t.enabled());
    let reuse_port = inputs.features.contains(FEATURE_REUSE_PORT);
    let mtls = inputs.tls.is_some();

    let mut listeners: Vec<Named> = Vec::new();
    let mut clusters: Vec<Named> = Vec::new();
    let mut loads: Vec<Named> = Vec::new();
    let mut secrets: Vec<Named> = Vec::new();

    // MeshAccessLog's TCP backends log into the proxy's pipe.
    let al_pipe = access_log_pipe(inputs.workdir, &dp.name, mesh);

    // --- inbounds ---------------------------------------------------------------------
    // Application clusters: address, and MeshTimeout's connect timeout.
    let mut local_clusters: BTreeMap<String, LocalApp> = BTreeMap::new();
    for inb in &net.inbound {
        if inb.state.as_deref() == Some("Ignored") || inb.tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) {
            continue;
        }
        let (Ok(port), dp_ip) = (
            u32::try_from(inb.port),
            inb.address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| net.address.clone()),
        ) else {
            continue;
        };
        let workload_ip = inb.service_address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| dp_ip.clone());
        let workload_port = inb.service_port.and_then(|p| u32::try_from(p).ok()).filter(|p| *p != 0).unwrap_or(port);
        let cluster = format!("localhost:{workload_port}");
        let timeouts = super::timeout::inbound(inputs.timeouts, dp, inb);
        let protocol = Protocol::of_tag(inb.tags.get(PROTOCOL_TAG).map(String::as_str));
        let timeout_conf = super::inbound_policy::merged(inputs.timeouts, dp, Some(inb));
        let http_timeouts = HttpTimeouts::of(timeout_conf.as_ref());
        // Same name twice: the last inbound wins (as Kuma's resource set does).
        let app = LocalApp {
            ip: workload_ip,
            port: workload_port,
            connect: timeouts.as_ref().map(|t| t.connect),
            protocol,
            http: http_timeouts.clone(),
        };
        local_clusters.insert(cluster.clone(), app);

        let name = format!("inbound:{dp_ip}:{port}");
        let values = KumaValues {
            http: protocol.is_http(),
            mesh,
            source_ip: &net.address,
            source_service: "unknown",
            destination_service: inb.tags.get(SERVICE_TAG).map_or("", String::as_str),
            zone: inputs.zone,
        };
        let backends = super::access_log::inbound_backends(inputs.access_logs);
        let mut tcp = TcpProxy {
            access_log: super::access_log::loggers(&backends, &values, &al_pipe),
            ..tcp_proxy(&cluster, &format!("localhost_{workload_port}"), 7200)
        };
        if let Some(t) = &timeouts {
            tcp.idle_timeout = Some(t.idle);
        }
        let settings = super::meshtls::resolve(inputs.mtls_mode, inputs.mesh_tls, dp, Some(inb));
        let permissions = inputs.traffic_permissions;
        let terminal = if protocol.is_http() {
            // Kuma's order before the router: faults, then the request-rate limit.
            let mut filters = super::fault_injection::inbound_filters(inputs.fault_injections, dp, inb);
            let mut per_route = std::collections::HashMap::new();
            if let Some((filter, bucket)) = super::rate_limit::inbound_http(inputs.rate_limits, dp, inb) {
                per_route.insert(filter.name.clone(), bucket);
                filters.push(filter);
            }
            let http = super::http::Inbound {
                service: values.destination_service,
                cluster: &cluster,
                workload_port,
                protocol,
                timeouts: http_timeouts,
                access_log: tcp.access_log.clone(),
                filters,
                per_route,
            };
            Terminal::Http(Box::new(http), super::traffic_permission::inbound_http_filter(permissions, mesh, dp, inb))
        } else {
            Terminal::Tcp(Box::new(tcp), super::traffic_permission::inbound_filter(permissions, mesh, dp, inb, &name))
        };
        let (mut filter_chains, listener_filters) = inbound_chains(inputs, &settings, &terminal);
        if let Some(limit) = super::rate_limit::inbound_filter(inputs.rate_limits, dp, inb) {
            for chain in &mut filter_chains {
                chain.filters.insert(0, limit.clone());
            }
        }
        let l = Listener {
            name: name.clone(),
            address: Some(socket_address(&dp_ip, port)),
            enable_reuse_port: Some(BoolValue { value: reuse_port }),
            bind_to_port: tproxy.as_ref().map(|_| BoolValue { value: false }),
            filter_chains,
            listener_filters,
            traffic_direction: TrafficDirection::Inbound as i32,
            ..Default::default()
        };
        let tags = inb.tags.clone();
        push(&mut listeners, &name, l, &format!("{tags:?}"), |l| l.metadata = tags_metadata(&tags));
    }
    // Metrics endpoints: the mesh's Prometheus backend, and MeshMetric's. Kuma leaves an
    // endpoint out rather than shadow an inbound on the same address.
    let shadows = |ep: &super::prometheus::MetricsEndpoint| {
        net.inbound.iter().any(|i| {
            i.port == i64::from(ep.port)
                && i.address.as_deref().filter(|a| !a.is_empty()).is_none_or(|a| a == net.address)
        })
    };
    let mut endpoints = vec![];
    if let Some(ep) = inputs.metrics.as_ref().filter(|ep| !shadows(ep)) {
        endpoints.push((super::prometheus::LISTENER.to_string(), ep.clone(), mtls.then_some(mesh)));
    }
    let mut dynconf_routes: Vec<(&str, &str, Vec<u8>)> = vec![];
    if let Some(conf) = &inputs.mesh_metric {
        dynconf_routes.push(("meshmetric", "/meshmetric", super::meshmetric::body(conf)));
        for (name, ep) in super::meshmetric::prometheus_backends(conf).into_iter().filter(|(_, ep)| !shadows(ep)) {
            endpoints.push((name, ep, None));
        }
    }
    for (name, ep, mtls_mesh) in &endpoints {
        let l = super::prometheus::listener(name, &net.address, ep, *mtls_mesh);
        push(&mut listeners, name, l, "", |_| {});
    }
    if !endpoints.is_empty() {
        use super::prometheus::{CLUSTER, cluster};
        push(&mut clusters, CLUSTER, cluster(inputs.workdir, &dp.name, mesh), "", |_| {});
    }
    for (name, app) in &local_clusters {
        let mut c = static_cluster(name, socket_address(&app.ip, app.port));
        if let Some(t) = app.connect {
            c.connect_timeout = Some(t);
        }
        if app.protocol.is_http() {
            // The application's own protocol; gRPC keeps no idle timeout (as Kuma's).
            let timeouts = (app.protocol != Protocol::Grpc).then_some(&app.http);
            c.typed_extension_protocol_options =
                super::http::protocol_options(app.protocol != Protocol::Http, timeouts);
        }
        push(&mut clusters, name, c, "", |_| {});
    }

    if let Some(tp) = &tproxy {
        super::tproxy::capture(tp, &mut listeners, &mut clusters);
    }

    // --- outbounds --------------------------------------------------------------------
    // (address, port) -> (service, tags)
    let mut outbounds: BTreeMap<(String, u32), (String, BTreeMap<String, String>)> = BTreeMap::new();
    for ob in &net.outbound {
        let Some(svc) = ob.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else {
            continue; // backendRef (MeshService) outbounds are not served yet
        };
        let Ok(port) = u32::try_from(ob.port) else { continue };
        let addr = ob.address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| "127.0.0.1".into());
        outbounds.insert((addr, port), (svc.clone(), ob.tags.clone()));
    }
    // VIP outbounds: captured by transparent proxying, or bound on this host when the
    // proxy binds outbounds and the VIPs are loopback addresses (no iptables needed).
    let bind_outbounds = inputs.features.contains(FEATURE_BIND_OUTBOUNDS);
    if (tproxy.is_some() && !bind_outbounds) || (bind_outbounds && inputs.vips_bindable) {
        for (svc, vip) in inputs.vips {
            let tags: BTreeMap<String, String> = [(SERVICE_TAG.to_string(), svc.clone())].into_iter().collect();
            outbounds.entry((vip.to_string(), inputs.vip_port)).or_insert((svc.clone(), tags));
        }
    }
    let services: BTreeSet<String> = outbounds.values().map(|(s, _)| s.clone()).collect();
    let external: BTreeMap<String, ExternalServiceSpec> = inputs
        .external_services
        .iter()
        .filter_map(|r| r.typed::<ExternalServiceSpec>().ok())
        .filter_map(|s| Some((s.tags.get(SERVICE_TAG).filter(|v| !v.is_empty())?.clone(), s)))
        .collect();
    // The services spoken to over HTTP: what their endpoints speak (an ExternalService:
    // its tag), unless only a MeshTCPRoute routes them (Kuma's MeshTCPRoute then takes an
    // HTTP service over).
    let protocols = service_protocols(inputs);
    let http_protocol = |svc: &str| -> Option<Protocol> {
        let p = match external.get(svc) {
            Some(es) => Protocol::of_tag(es.tags.get(PROTOCOL_TAG).map(String::as_str)),
            None => protocols.get(svc).copied().unwrap_or(Protocol::Tcp),
        };
        let p = Some(p).filter(|p| p.is_http())?;
        let tcp_only = super::tcp_route::backends(inputs.tcp_routes, svc).is_some()
            && super::http_route::backends(inputs.http_routes, svc).is_none();
        (!tcp_only).then_some(p)
    };
    // The proxy's tags (each tag's values over its inbounds, sorted and comma-joined), as
    // Kuma's `x-kuma-tags` carries them.
    let mut tag_values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (k, v) in net.inbound.iter().flat_map(|i| i.tags.iter()) {
        tag_values.entry(k.clone()).or_default().insert(v.clone());
    }
    let own_tags: BTreeMap<String, String> =
        tag_values.into_iter().map(|(k, vs)| (k, vs.into_iter().collect::<Vec<_>>().join(","))).collect();
    // Kuma's source service: the first inbound's.
    let own_service = net.inbound.iter().find_map(|i| i.tags.get(SERVICE_TAG)).map_or("unknown", String::as_str);
    for ((addr, port), (svc, tags)) in &outbounds {
        let name = format!("outbound:{addr}:{port}");
        let protocol = http_protocol(svc);
        let values = KumaValues {
            http: protocol.is_some(),
            mesh,
            source_ip: &net.address,
            source_service: own_service,
            destination_service: svc,
            zone: inputs.zone,
        };
        let backends = super::access_log::outbound_backends(inputs.access_logs, svc);
        let access_log = super::access_log::loggers(&backends, &values, &al_pipe);
        let chain = match protocol {
            Some(p) => {
                let timeouts = HttpTimeouts::of(super::resilience::merged_conf(inputs.timeouts, svc).as_ref());
                let retry = super::http::retry_policy(super::resilience::merged_conf(inputs.retries, svc).as_ref(), p);
                let mut routes = super::http_route::routes(inputs.http_routes, svc, &timeouts, retry.as_ref());
                if external.contains_key(svc) {
                    // The external host's name, not the mesh's, goes upstream (Kuma's
                    // `auto_host_rewrite` on splits to an ExternalService).
                    super::http_route::auto_host_rewrite(&mut routes);
                }
                let tags = super::fault_injection::tags_header(inputs.fault_injections, &own_tags);
                let hcm = super::http::outbound(svc, p, routes, &timeouts, tags, access_log);
                FilterChain { filters: vec![hcm], ..Default::default() }
            }
            None => outbound_chain(svc, inputs, access_log),
        };
        let l = Listener {
            name: name.clone(),
            address: Some(socket_address(addr, *port)),
            bind_to_port: tproxy.as_ref().filter(|_| !bind_outbounds).map(|_| BoolValue { value: false }),
            filter_chains: vec![chain],
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        };
        push(&mut listeners, &name, l, &format!("{tags:?}"), |l| l.metadata = tags_metadata(tags));
    }

    let endpoints = outbound_endpoints(inputs, mtls);
    let outbound_tls = super::meshtls::resolve(inputs.mtls_mode, inputs.mesh_tls, dp, None);
    let via_egress = inputs.zone_egress && mtls;
    // The clusters the outbounds' connections go to: each service's own, or its route's
    // backends (whole services, or subsets of one).
    let mut targets: BTreeMap<String, super::tcp_route::Backend> = BTreeMap::new();
    for svc in &services {
        let whole = || vec![super::tcp_route::Backend { service: svc.clone(), tags: BTreeMap::new(), weight: 1 }];
        let routed = match http_protocol(svc) {
            Some(_) => super::http_route::backends(inputs.http_routes, svc),
            None => super::tcp_route::backends(inputs.tcp_routes, svc),
        };
        for b in routed.unwrap_or_else(whole) {
            targets.insert(b.cluster(), b);
        }
    }
    for (name, target) in &targets {
        let (svc, subset) = (&target.service, &target.tags);
        if let Some(es) = external.get(svc) {
            if !subset.is_empty() {
                tracing::debug!(service = %svc, "a route's subset of an ExternalService is not served");
                continue;
            }
            if via_egress {
                // To the zone's egresses, which terminate this mTLS as `zone-egress`.
                let c = Cluster {
                    name: svc.clone(),
                    connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
                    cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                    eds_cluster_config: Some(EdsClusterConfig {
                        eds_config: Some(ads_config_source()),
                        service_name: String::new(),
                    }),
                    transport_socket: Some(tls_socket(upstream_tls_via(mesh, svc, ZONE_EGRESS_SERVICE))),
                    ..Default::default()
                };
                let cluster_version = version_of(&format!("{c:?}"));
                push(&mut clusters, svc, c, "", |_| {});
                let eps = egress_endpoints(inputs.egresses);
                let v = version_of(&format!("{svc}|{eps:?}|{cluster_version}"));
                loads.push(Named::new(svc.clone(), v, pack_any(cla_proto(svc, &eps))));
            } else if let Some((host, port)) = es.host_port() {
                // Straight to the external address.
                let protocol = es.tags.get("kuma.io/protocol").map(String::as_str).unwrap_or("tcp");
                let c = external_cluster(svc, mesh, &host, port, protocol, es);
                push(&mut clusters, svc, c, "", |_| {});
            }
            continue;
        }
        let connect = super::timeout::outbound(inputs.timeouts, svc).map(|t| t.connect);
        let mut c = Cluster {
            name: name.clone(),
            connect_timeout: Some(connect.unwrap_or(Duration { seconds: 5, nanos: 0 })),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                service_name: String::new(),
            }),
            transport_socket: inputs.tls.as_ref().map(|_| {
                let mut ctx = upstream_tls_subset(mesh, svc, svc, subset);
                with_params(&mut ctx.common_tls_context, &outbound_tls);
                tls_socket(ctx)
            }),
            ..Default::default()
        };
        if let Some(p) = http_protocol(svc) {
            // Sidecars speak HTTP/2 to each other, whatever the application speaks.
            let conf = super::resilience::merged_conf(inputs.timeouts, svc);
            let timeouts = HttpTimeouts::of(conf.as_ref());
            c.typed_extension_protocol_options =
                super::http::protocol_options(true, (p != Protocol::Grpc).then_some(&timeouts));
        }
        if let Some(conf) = super::resilience::merged_conf(inputs.circuit_breakers, svc) {
            super::resilience::apply(&mut c, &conf);
        }
        if let Some(conf) = super::resilience::merged_conf(inputs.health_checks, svc) {
            let protocol = http_protocol(svc).unwrap_or(Protocol::Tcp);
            super::resilience::apply_health_check(&mut c, &conf, protocol, &own_tags);
        }
        if let Some(conf) = super::resilience::merged_conf(inputs.load_balancing, svc) {
            super::resilience::apply_load_balancer(&mut c, &conf);
        }
        let cluster_version = version_of(&format!("{c:?}"));
        push(&mut clusters, name, c, "", |_| {});
        // A subset: the endpoints that carry its tags, other zones' ingresses among them
        // (they route the subset's SNI; see tcp_route).
        let in_subset = |e: &&OutEndpoint| subset.iter().all(|(k, v)| e.tags.get(k) == Some(v));
        let eps: Vec<OutEndpoint> = endpoints.get(svc).into_iter().flatten().filter(in_subset).cloned().collect();
        let mut cla = cla_proto(name, &eps);
        if inputs.locality_aware {
            // Kuma's locality awareness: other zones' endpoints are the fallback level.
            for l in &mut cla.endpoints {
                if l.locality.as_ref().is_some_and(|z| z.zone != inputs.zone) {
                    l.priority = 1;
                }
            }
        }
        // The version includes the cluster's: a changed cluster needs its endpoints again.
        let v = version_of(&format!("{name}|{eps:?}|{cluster_version}"));
        loads.push(Named::new(name.clone(), v, pack_any(cla)));
    }

    // --- secrets ----------------------------------------------------------------------
    if let Some(t) = &inputs.tls {
        let id = Secret {
            name: identity_secret_name(mesh),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&t.cert_pem),
                private_key: inline(&t.key_pem),
                ..Default::default()
            })),
        };
        let ca = Secret {
            name: mesh_ca_secret_name(mesh),
            r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(&t.ca_pem),
                ..Default::default()
            })),
        };
        secrets.push(Named::new(
            identity_secret_name(mesh),
            version_of(&format!("{}|{}", t.cert_pem, t.key_pem)),
            pack_any(id),
        ));
        secrets.push(Named::new(mesh_ca_secret_name(mesh), version_of(&t.ca_pem), pack_any(ca)));
    }

    // --- DNS --------------------------------------------------------------------------
    // Kuma leaves the VIP records out for bind-outbounds proxies (they resolve MeshService
    // hostnames instead); here they resolve to the bound VIPs, which is what makes them work.
    if inputs.dns_port > 0 {
        let with_v6 = tproxy.as_ref().is_some_and(|t| t.ip_family_mode.as_deref() != Some("IPv4"));
        let mut records: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (svc, vip) in inputs.vips {
            let mut ips = vec![vip.to_string()];
            if with_v6 {
                ips.push(to_v6(*vip));
            }
            for d in domains(svc) {
                records.insert(d, ips.clone());
            }
        }
        if inputs.features.contains(dynconf::FEATURE_EMBEDDED_DNS) {
            // The proxy runs its own DNS server and reads the records from here.
            dynconf_routes.push(("dns", "/dns", dynconf::dns_body(&records)));
        } else {
            let l = dns_listener(inputs.dns_port, reuse_port, &records);
            push(&mut listeners, DNS_LISTENER, l, "", |_| {});
        }
    }

    if !dynconf_routes.is_empty() {
        let l = dynconf::listener(inputs.workdir, &dynconf_routes);
        push(&mut listeners, dynconf::LISTENER, l, "", |_| {});
    }

    let mut snap = ProxySnapshot::default();
    snap.set(LISTENER_TYPE, sorted(listeners));
    snap.set(CLUSTER_TYPE, sorted(clusters));
    snap.set(ENDPOINT_TYPE, sorted(loads));
    snap.set(SECRET_TYPE, sorted(secrets));
    snap
}

/// The `kuma:dns` UDP listener (Kuma's `DNSConfigurer`; no `known_suffixes`, deprecated
/// in Envoy and not set by Kuma).
pub fn dns_listener(port: u32, reuse_port: bool, records: &BTreeMap<String, Vec<String>>) -> Listener {
    let virtual_domains = records
        .iter()
        .map(|(name, ips)| dns_table::DnsVirtualDomain {
            name: name.clone(),
            endpoint: Some(dns_table::DnsEndpoint {
                endpoint_config: Some(dns_table::dns_endpoint::EndpointConfig::AddressList(dns_table::AddressList {
                    address: ips.clone(),
                })),
            }),
            answer_ttl: Some(Duration { seconds: 30, nanos: 0 }),
        })
        .collect();
    let cfg = DnsFilterConfig {
        stat_prefix: "kuma_dns".into(),
        server_config: Some(dns_filter_config::ServerContextConfig {
            config_source: Some(dns_filter_config::server_context_config::ConfigSource::InlineDnsTable(DnsTable {
                external_retry_count: 0,
                virtual_domains,
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    Listener {
        name: DNS_LISTENER.into(),
        address: Some(envoy_types::pb::envoy::config::core::v3::Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                protocol: socket_address::Protocol::Udp as i32,
                ..Default::default()
            })),
        }),
        enable_reuse_port: Some(BoolValue { value: reuse_port }),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.udp.dns_filter".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(cfg))),
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// One endpoint per online egress of the zone.
fn egress_endpoints(egresses: &[(String, u32)]) -> Vec<OutEndpoint> {
    egresses
        .iter()
        .map(|(address, port)| OutEndpoint {
            zone: None,
            address: address.clone(),
            port: *port,
            weight: 1,
            tags: BTreeMap::new(),
        })
        .collect()
}

/// Endpoints per service of the proxy's mesh: healthy local inbounds (weight = number of
/// distinct remote ingress coordinates, or 1) and, with mTLS, one endpoint per remote
/// ZoneIngress advertising the service (weight = its instance count), or with
/// `routing.zoneEgress` one per online egress of the zone instead.
fn outbound_endpoints(inputs: &SidecarInputs<'_>, mtls: bool) -> BTreeMap<String, Vec<OutEndpoint>> {
    let mesh = inputs.dataplane.mesh.as_str();
    let mut out: BTreeMap<String, Vec<OutEndpoint>> = BTreeMap::new();
    let mut coordinates: BTreeSet<(String, i64)> = BTreeSet::new();
    let via_egress = inputs.zone_egress && mtls;
    if mtls {
        for zi in inputs.ingresses {
            let Ok(spec) = zi.typed::<ZoneIngressSpec>() else { continue };
            if spec.zone.is_empty() || spec.zone == inputs.zone {
                continue;
            }
            let n = &spec.networking;
            let Ok(port) = u32::try_from(n.advertised_port) else { continue };
            if n.advertised_address.is_empty() || port == 0 {
                continue;
            }
            let coord = (n.advertised_address.clone(), n.advertised_port);
            if coordinates.contains(&coord) {
                continue; // several ingress instances behind one load balancer
            }
            if !spec.available_services.is_empty() {
                coordinates.insert(coord);
            }
            for a in &spec.available_services {
                if a.mesh != mesh || a.external_service {
                    continue;
                }
                let Some(svc) = a.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
                if via_egress {
                    // The egress passes the mTLS through to this ingress by SNI.
                    out.entry(svc.clone()).or_default().extend(egress_endpoints(inputs.egresses));
                    continue;
                }
                let tags: BTreeMap<String, String> = a
                    .tags
                    .iter()
                    .filter(|(k, _)| k.as_str() != SERVICE_TAG)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                out.entry(svc.clone()).or_default().push(OutEndpoint {
                    zone: Some(tags.get(ZONE_TAG).cloned().unwrap_or_else(|| spec.zone.clone())),
                    address: n.advertised_address.clone(),
                    port,
                    weight: a.instances.max(1),
                    tags,
                });
            }
        }
    }
    let local_weight = u32::try_from(coordinates.len()).unwrap_or(u32::MAX).max(1);
    for d in inputs.dataplanes.iter().filter(|d| d.mesh() == mesh) {
        let Some(net) = &d.spec.networking else { continue };
        for inb in net.inbound.iter().filter(|i| i.is_healthy()) {
            let Some(svc) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
            let Ok(port) = u32::try_from(inb.port) else { continue };
            let address = Some(net.advertised_address.clone())
                .filter(|a| !a.is_empty())
                .or_else(|| inb.address.clone().filter(|a| !a.is_empty()))
                .unwrap_or_else(|| net.address.clone());
            let tags: BTreeMap<String, String> = inb
                .tags
                .iter()
                .filter(|(k, _)| k.as_str() != SERVICE_TAG)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            out.entry(svc.clone()).or_default().push(OutEndpoint {
                zone: tags.get(ZONE_TAG).cloned().or_else(|| d.resource.labels.get(ZONE_TAG).cloned()),
                address,
                port,
                weight: local_weight,
                tags,
            });
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// Each service's protocol, from the `kuma.io/protocol` of its instances here and in other
/// zones (as Kuma's mesh context infers it).
fn service_protocols(inputs: &SidecarInputs<'_>) -> BTreeMap<String, Protocol> {
    let mesh = inputs.dataplane.mesh.as_str();
    let mut seen: BTreeMap<String, Vec<Protocol>> = BTreeMap::new();
    let mut add = |tags: &BTreeMap<String, String>| {
        if let Some(svc) = tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) {
            seen.entry(svc.clone()).or_default().push(Protocol::of_tag(tags.get(PROTOCOL_TAG).map(String::as_str)));
        }
    };
    for d in inputs.dataplanes.iter().filter(|d| d.mesh() == mesh) {
        for inb in d.spec.networking.iter().flat_map(|n| n.inbound.iter()) {
            add(&inb.tags);
        }
    }
    for zi in inputs.ingresses {
        let Ok(spec) = zi.typed::<ZoneIngressSpec>() else { continue };
        if spec.zone == inputs.zone {
            continue;
        }
        for a in spec.available_services.iter().filter(|a| a.mesh == mesh && !a.external_service) {
            add(&a.tags);
        }
    }
    seen.into_iter().map(|(svc, all)| (svc, Protocol::common(all.into_iter()))).collect()
}

fn cla_proto(name: &str, endpoints: &[OutEndpoint]) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<Option<String>, Vec<LbEndpoint>> = BTreeMap::new();
    for e in endpoints {
        let metadata = if e.tags.is_empty() {
            None
        } else {
            let md = string_struct(&e.tags);
            Some(Metadata {
                filter_metadata: [
                    ("envoy.lb".to_string(), md.clone()),
                    ("envoy.transport_socket_match".to_string(), md),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            })
        };
        by_zone.entry(e.zone.clone()).or_default().push(LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(&e.address, e.port)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            metadata,
            ..Default::default()
        });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_zone
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: zone.map(|z| Locality { zone: z, ..Default::default() }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
