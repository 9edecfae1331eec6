//! xDS generation for zone egresses, in the shape of Kuma 2.14's egress goldens
//! (`fixtures/kuma-2.14/egress/*.yaml`): one listener `inbound:<address>:<port>` with
//!
//! * a passthrough chain per service other zones' ingresses advertise (tag SNI
//!   `<service>{mesh=<mesh>}`, `tcp_proxy` to the EDS cluster `<mesh>:<service>` whose
//!   endpoints are those ingresses, weight = instances): the sidecar's mTLS goes through
//!   untouched to the remote zone;
//! * a chain per ExternalService that terminates the sidecar's mTLS (the egress holds a
//!   `zone-egress` identity of the mesh), applies the mesh's TrafficPermissions, and sends
//!   the traffic to the external address over HTTP (`http_connection_manager`,
//!   `auto_host_rewrite`) or TCP, originating TLS when the ExternalService asks for it.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::{
    CidrRange, DataSource, Http1ProtocolOptions, Http2ProtocolOptions, TrafficDirection, data_source,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3::{self as rbac_pb, Permission, Policy, Principal, permission, principal};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value, UInt32Value as U32};
use envoy_types::util::pack_any;

use super::generate::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, Named, ProxySnapshot, SECRET_TYPE, ads_config_source, socket_address,
    version_of,
};
use super::sidecar::{SidecarTls, downstream_tls, inline, push, sorted, tcp_proxy_chain, tls_socket};
use super::sni::sni_from_tags;
use crate::ca::{identity_secret_name, mesh_ca_secret_name};
use crate::model::{
    DataSource as KumaDataSource, ExternalServiceSpec, Resource, SERVICE_TAG, TrafficPermissionSpec, ZoneEgressSpec,
};

/// The service name of a zone egress's identity (Kuma's `ZoneEgressServiceName`).
pub const ZONE_EGRESS_SERVICE: &str = "zone-egress";
const PROTOCOL_TAG: &str = "kuma.io/protocol";

/// One mesh the egress serves: its mTLS material for the egress, its ExternalServices,
/// TrafficPermissions and MeshTrafficPermissions.
pub struct EgressMesh<'a> {
    pub name: &'a str,
    pub tls: SidecarTls,
    pub external_services: &'a [Resource],
    pub permissions: &'a [Resource],
    /// A MeshTrafficPermission that selects an ExternalService takes over its rules.
    pub mesh_permissions: &'a [Resource],
}

pub struct EgressInputs<'a> {
    pub zone: &'a str,
    pub egress: &'a ZoneEgressSpec,
    /// Meshes with mTLS (an egress serves nothing else).
    pub meshes: Vec<EgressMesh<'a>>,
    /// All ZoneIngresses (the remote ones are the passthrough targets).
    pub ingresses: &'a [Resource],
}

/// A remote endpoint: (address, port, weight, tags without the service).
type RemoteEndpoint = (String, u32, u32, BTreeMap<String, String>);

pub fn egress(inputs: &EgressInputs<'_>) -> ProxySnapshot {
    let n = &inputs.egress.networking;
    let port = u32::try_from(n.port).unwrap_or(0);
    let mut chains: Vec<FilterChain> = vec![];
    let mut clusters: Vec<Named> = vec![];
    let mut loads: Vec<Named> = vec![];
    let mut secrets: Vec<Named> = vec![];
    let mut plan = String::new();

    for m in &inputs.meshes {
        // Passthrough: services of other zones.
        for (svc, eps) in remote_services(inputs, m.name) {
            let cluster = format!("{}:{svc}", m.name);
            let stat = format!("{}_{svc}", m.name);
            let tags: BTreeMap<String, String> = [("mesh".to_string(), m.name.to_string())].into_iter().collect();
            let mut chain = tcp_proxy_chain(&cluster, &stat, 3600, None);
            chain.filter_chain_match = Some(FilterChainMatch {
                server_names: vec![sni_from_tags(&svc, &tags)],
                transport_protocol: "tls".into(),
                ..Default::default()
            });
            chains.push(chain);
            let c = Cluster {
                name: cluster.clone(),
                alt_stat_name: stat,
                connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                eds_cluster_config: Some(EdsClusterConfig {
                    eds_config: Some(ads_config_source()),
                    service_name: String::new(),
                }),
                ..Default::default()
            };
            push(&mut clusters, &cluster, c, "", |_| {});
            let v = version_of(&format!("{cluster}|{eps:?}"));
            plan.push_str(&format!("{cluster}={eps:?};"));
            loads.push(Named::new(cluster.clone(), v, pack_any(remote_cla(&cluster, m.name, &eps))));
        }
        // ExternalServices.
        for es in m.external_services {
            let Ok(spec) = es.typed::<ExternalServiceSpec>() else { continue };
            let Some(svc) = spec.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()).cloned() else { continue };
            let Some((host, es_port)) = spec.host_port() else { continue };
            let cluster = format!("{}:{svc}", m.name);
            let protocol = spec.tags.get(PROTOCOL_TAG).map(String::as_str).unwrap_or("tcp");
            let http = matches!(protocol, "http" | "http2" | "grpc");
            let (rules, shadow_rules) =
                super::traffic_permission::external_service_rules(m.mesh_permissions, m.name, &svc)
                    .unwrap_or_else(|| (permissions(m, &spec.tags), None));
            let tags: BTreeMap<String, String> = [("mesh".to_string(), m.name.to_string())].into_iter().collect();
            let mut filters = vec![];
            if !http {
                filters.push(Filter {
                    name: "envoy.filters.network.rbac".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(NetworkRbac {
                        rules: Some(rules.clone()),
                        shadow_rules: shadow_rules.clone(),
                        stat_prefix: format!("{svc}."),
                        ..Default::default()
                    }))),
                });
                filters.push(tcp_proxy_chain(&cluster, &svc, 3600, None).filters.remove(0));
            } else {
                filters.push(Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm(
                        &svc,
                        &cluster,
                        rules,
                        shadow_rules,
                    )))),
                });
            }
            chains.push(FilterChain {
                name: format!("{svc}_{}", m.name),
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![sni_from_tags(&svc, &tags)],
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                filters,
                transport_socket: Some(tls_socket(downstream_tls(m.name))),
                ..Default::default()
            });
            let c = external_cluster(&cluster, m.name, &host, es_port, protocol, &spec);
            push(&mut clusters, &cluster, c, "", |_| {});
        }
        // The egress's identity in the mesh, and the mesh CA.
        secrets.push(Named::new(
            identity_secret_name(m.name),
            version_of(&format!("{}|{}", m.tls.cert_pem, m.tls.key_pem)),
            pack_any(envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
                name: identity_secret_name(m.name),
                r#type: Some(
                    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type::TlsCertificate(
                        TlsCertificate {
                            certificate_chain: inline(&m.tls.cert_pem),
                            private_key: inline(&m.tls.key_pem),
                            ..Default::default()
                        },
                    ),
                ),
            }),
        ));
        secrets.push(Named::new(
            mesh_ca_secret_name(m.name),
            version_of(&m.tls.ca_pem),
            pack_any(envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
                name: mesh_ca_secret_name(m.name),
                r#type: Some(
                    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type::ValidationContext(
                        CertificateValidationContext { trusted_ca: inline(&m.tls.ca_pem), ..Default::default() },
                    ),
                ),
            }),
        ));
    }

    let name = format!("inbound:{}:{port}", n.address);
    let listener = Listener {
        name: name.clone(),
        address: Some(socket_address(&n.address, port)),
        enable_reuse_port: Some(BoolValue { value: false }),
        listener_filters: vec![super::generate::tls_inspector()],
        filter_chains: chains,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    };
    let mut listeners = vec![];
    if port != 0 {
        push(&mut listeners, &name, listener, &plan, |_| {});
    }
    let mut snap = ProxySnapshot::default();
    snap.set(LISTENER_TYPE, sorted(listeners));
    snap.set(CLUSTER_TYPE, sorted(clusters));
    snap.set(ENDPOINT_TYPE, sorted(loads));
    snap.set(SECRET_TYPE, sorted(secrets));
    snap
}

/// Services other zones' ingresses advertise in `mesh`, with one endpoint per ingress.
fn remote_services(inputs: &EgressInputs<'_>, mesh: &str) -> BTreeMap<String, Vec<RemoteEndpoint>> {
    let mut out: BTreeMap<String, Vec<RemoteEndpoint>> = BTreeMap::new();
    for (spec, port) in super::generate::remote_ingresses(inputs.ingresses, inputs.zone) {
        let n = &spec.networking;
        for a in spec.available_services.iter().filter(|a| a.mesh == mesh && !a.external_service) {
            let Some(svc) = a.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
            let mut tags: BTreeMap<String, String> =
                a.tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG).map(|(k, v)| (k.clone(), v.clone())).collect();
            tags.insert("mesh".into(), mesh.to_string());
            out.entry(svc.clone()).or_default().push((n.advertised_address.clone(), port, a.instances.max(1), tags));
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

fn endpoint(address: &str, port: u32, weight: u32, tags: &BTreeMap<String, String>) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(address, port)),
            ..Default::default()
        })),
        load_balancing_weight: Some(UInt32Value { value: weight }),
        metadata: Some(super::generate::endpoint_metadata(tags)),
        ..Default::default()
    }
}

fn remote_cla(cluster: &str, _mesh: &str, eps: &[RemoteEndpoint]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: eps.iter().map(|(a, p, w, t)| endpoint(a, *p, *w, t)).collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The TrafficPermissions of the mesh that select `destination`, as RBAC rules (a policy
/// per permission: any permission, principals by source service). With no
/// TrafficPermission in the mesh at all, everything is allowed, as dp sidecars do.
fn permissions(m: &EgressMesh<'_>, destination: &BTreeMap<String, String>) -> rbac_pb::Rbac {
    let mut policies = std::collections::HashMap::new();
    let any_permission = || Permission { rule: Some(permission::Rule::Any(true)) };
    if m.permissions.is_empty() {
        policies.insert(
            "allow-all".to_string(),
            Policy {
                permissions: vec![any_permission()],
                principals: vec![Principal { identifier: Some(principal::Identifier::Any(true)) }],
                ..Default::default()
            },
        );
    }
    for tp in m.permissions {
        let Ok(spec) = tp.typed::<TrafficPermissionSpec>() else { continue };
        if !spec.destinations.iter().any(|d| d.selects(destination)) {
            continue;
        }
        let mut principals = vec![];
        for s in &spec.sources {
            match s.matches.get(SERVICE_TAG).map(String::as_str) {
                None | Some("*") => principals.push(Principal { identifier: Some(principal::Identifier::Any(true)) }),
                Some(svc) => principals.push(Principal {
                    identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
                        principal_name: Some(StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact(format!(
                                "spiffe://{}/{svc}",
                                m.name
                            ))),
                            ignore_case: false,
                        }),
                    })),
                }),
            }
        }
        if !principals.is_empty() {
            policies.insert(
                tp.name.clone(),
                Policy { permissions: vec![any_permission()], principals, ..Default::default() },
            );
        }
    }
    rbac_pb::Rbac { action: rbac_pb::rbac::Action::Allow as i32, policies, ..Default::default() }
}

/// The HTTP side of an ExternalService chain: RBAC (403 for a refused identity), then
/// every request to the service's cluster with the external host as authority.
fn hcm(svc: &str, cluster: &str, rules: rbac_pb::Rbac, shadow_rules: Option<rbac_pb::Rbac>) -> HttpConnectionManager {
    let filter = |name: &str, any| HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any)),
        ..Default::default()
    };
    HttpConnectionManager {
        stat_prefix: svc.to_string(),
        http_filters: vec![
            filter(
                "envoy.filters.http.rbac",
                pack_any(HttpRbac { rules: Some(rules), shadow_rules, ..Default::default() }),
            ),
            filter("envoy.filters.http.router", pack_any(Router::default())),
        ],
        internal_address_config: Some(http_connection_manager::InternalAddressConfig {
            cidr_ranges: vec![CidrRange { address_prefix: "127.0.0.1".into(), prefix_len: Some(U32 { value: 32 }) }],
            ..Default::default()
        }),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
            name: format!("outbound:{svc}"),
            validate_clusters: Some(BoolValue { value: false }),
            virtual_hosts: vec![VirtualHost {
                name: svc.to_string(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
                        host_rewrite_specifier: Some(route_action::HostRewriteSpecifier::AutoHostRewrite(BoolValue {
                            value: true,
                        })),
                        timeout: Some(Duration { seconds: 0, nanos: 0 }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn data_source(d: &KumaDataSource) -> Option<DataSource> {
    use base64::Engine;
    let bytes = match (&d.inline, &d.inline_string) {
        (Some(b64), _) => base64::engine::general_purpose::STANDARD.decode(b64).ok()?,
        (None, Some(s)) => s.clone().into_bytes(),
        _ => return None,
    };
    Some(DataSource { specifier: Some(data_source::Specifier::InlineBytes(bytes)), ..Default::default() })
}

/// The cluster of an ExternalService: its address (STRICT_DNS for a name), HTTP/1.1 or
/// HTTP/2 by protocol, and TLS origination when the service asks for it. Shared by the
/// egress and by sidecars that reach the service directly.
pub fn external_cluster(
    cluster: &str,
    mesh: &str,
    host: &str,
    port: u32,
    protocol: &str,
    spec: &ExternalServiceSpec,
) -> Cluster {
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let mut tags: BTreeMap<String, String> =
        spec.tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG).map(|(k, v)| (k.clone(), v.clone())).collect();
    tags.insert("mesh".into(), mesh.to_string());
    let mut c = Cluster {
        name: cluster.to_string(),
        alt_stat_name: cluster.replace(':', "_"),
        connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(if is_ip {
            DiscoveryType::Static as i32
        } else {
            DiscoveryType::StrictDns as i32
        })),
        dns_lookup_family: DnsLookupFamily::V4Only as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: cluster.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint(host, port, 1, &tags)],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let protocol_config = match protocol {
        "http2" | "grpc" => {
            Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default()))
        }
        "http" => Some(explicit_http_config::ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())),
        _ => None,
    };
    if let Some(pc) = protocol_config {
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            pack_any(HttpProtocolOptions {
                upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                    protocol_config: Some(pc),
                })),
                ..Default::default()
            }),
        );
    }
    if let Some(tls) = spec.networking.tls.as_ref().filter(|t| t.enabled) {
        let server = tls.server_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| host.to_string());
        let mut sans = vec![];
        if !tls.skip_hostname_verification {
            for t in [subject_alt_name_matcher::SanType::Dns, subject_alt_name_matcher::SanType::IpAddress] {
                sans.push(SubjectAltNameMatcher {
                    san_type: t as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(server.clone())),
                        ignore_case: false,
                    }),
                    oid: String::new(),
                });
            }
        }
        let validation = CertificateValidationContext {
            trusted_ca: tls.ca_cert.as_ref().and_then(data_source).or_else(|| {
                // Without a CA of its own, the system's trust store (Kuma: systemCaPath).
                Some(DataSource {
                    specifier: Some(data_source::Specifier::Filename("/etc/ssl/certs/ca-certificates.crt".into())),
                    ..Default::default()
                })
            }),
            match_typed_subject_alt_names: sans,
            ..Default::default()
        };
        let client =
            match (tls.client_cert.as_ref().and_then(data_source), tls.client_key.as_ref().and_then(data_source)) {
                (Some(cert), Some(key)) => {
                    vec![TlsCertificate { certificate_chain: Some(cert), private_key: Some(key), ..Default::default() }]
                }
                _ => vec![],
            };
        let ctx = UpstreamTlsContext {
            sni: tls
                .sni
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| if is_ip { String::new() } else { server.clone() }),
            allow_renegotiation: tls.allow_renegotiation,
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: client,
                validation_context_type: Some(common_tls_context::ValidationContextType::ValidationContext(validation)),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.transport_socket = Some(tls_socket(ctx));
    }
    c
}
