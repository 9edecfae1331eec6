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
//!
//! `inbound` makes the inbound listeners and the applications' clusters, `outbound` the
//! outbound listeners and the clusters and endpoints they reach, `tls` the mesh mTLS
//! contexts both use; this module holds what they share, the secrets and DNS.

mod inbound;
mod outbound;
mod tls;

pub(crate) use tls::tls_socket;
pub use tls::{downstream_tls, upstream_tls, upstream_tls_via};

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Metadata, SocketAddress, TrafficDirection, TransportSocket, address, data_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::data::dns::v3::{DnsTable, dns_table};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::{DnsFilterConfig, dns_filter_config};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::google::protobuf::{BoolValue, Duration};
use envoy_types::util::pack_any;

use super::dynconf;
use super::generate::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, Named, ProxySnapshot, SECRET_TYPE, string_struct, version_of,
};
use crate::ca::{identity_secret_name, mesh_ca_secret_name};
use crate::dataplanes::DataplaneView;
use crate::model::{DataplaneNetworking, DataplaneSpec, Resource, TransparentProxying};
use crate::vips::{VipMap, domains, to_v6};

use kuma_model::proxy::features::REUSE_PORT as FEATURE_REUSE_PORT;
/// Name of the DNS listener (`names.GetDNSListenerName()`).
pub const DNS_LISTENER: &str = "kuma:dns";
/// ALPN Kuma's client side sets on mesh mTLS (`KumaALPNProtocols`).
pub const KUMA_ALPN: &str = "kuma";
const ZONE_TAG: &str = "kuma.io/zone";

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

/// What the parts of one proxy's generation read.
struct Proxy<'a> {
    inputs: &'a SidecarInputs<'a>,
    dp: &'a Resource,
    mesh: &'a str,
    net: &'a DataplaneNetworking,
    /// Transparent proxying, when enabled.
    tproxy: Option<TransparentProxying>,
    reuse_port: bool,
    /// The mesh has mTLS.
    mtls: bool,
    /// MeshAccessLog's TCP backends log into the proxy's pipe.
    al_pipe: String,
}

/// The resources generated so far.
#[derive(Default)]
struct Resources {
    listeners: Vec<Named>,
    clusters: Vec<Named>,
    loads: Vec<Named>,
}

/// Generate the Listeners, Clusters, ClusterLoadAssignments and Secrets of a Dataplane.
pub fn sidecar(inputs: &SidecarInputs<'_>) -> ProxySnapshot {
    let dp = inputs.dataplane;
    let mesh = dp.mesh.as_str();
    let spec: DataplaneSpec = dp.typed().unwrap_or_default();
    let net = spec.networking.unwrap_or_default();
    let proxy = Proxy {
        inputs,
        dp,
        mesh,
        net: &net,
        tproxy: net.transparent_proxying.clone().filter(|t| t.enabled()),
        reuse_port: inputs.features.contains(FEATURE_REUSE_PORT),
        mtls: inputs.tls.is_some(),
        al_pipe: access_log_pipe(inputs.workdir, &dp.name, mesh),
    };
    let mut out = Resources::default();
    // Routes of the dynamic-config listener (MeshMetric's configuration, DNS records).
    let mut dynconf_routes: Vec<(&str, &str, Vec<u8>)> = vec![];
    inbound::generate(&proxy, &mut out, &mut dynconf_routes);
    if let Some(tp) = &proxy.tproxy {
        super::tproxy::capture(tp, &mut out.listeners, &mut out.clusters);
    }
    outbound::generate(&proxy, &mut out);
    let Resources { mut listeners, clusters, loads } = out;
    let mut secrets: Vec<Named> = Vec::new();
    let (tproxy, reuse_port) = (&proxy.tproxy, proxy.reuse_port);

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
