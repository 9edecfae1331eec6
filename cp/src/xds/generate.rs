//! xDS generation for zone ingresses, in the shape of Kuma 2.14's ingress goldens
//! (`fixtures/kuma-2.14/ingress/*.yaml`).
//!
//! Generation first builds a deterministic plan (ordered maps only), then turns it into
//! Envoy protos. Resource versions are hashes of the plan, because prost encodes
//! `google.protobuf.Struct` maps in random order, so encoded bytes are not stable.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbSubsetConfig,
    lb_subset_config::{LbSubsetFallbackPolicy, LbSubsetSelector, lb_subset_selector::LbSubsetSelectorFallbackPolicy},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, Metadata, SocketAddress, TrafficDirection,
    address, config_source, data_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::direct_response::v3::Config as DirectResponse;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, Struct, UInt32Value, Value, value};
use envoy_types::util::pack_any;
use prost::Name;

use super::sni::sni_from_tags;
use crate::dataplanes::{DataplaneView, Dataplanes, ServiceOffer};
use crate::model::{Resource, SERVICE_TAG, ZoneIngressSpec, mesh_mtls_enabled};

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// One generated resource with its version (hash of its plan). Shared, so a copy is cheap:
/// a zone ingress's snapshot and the memo it keeps for the next one hold the same 20,000.
#[derive(Clone, Debug)]
pub struct Named(std::sync::Arc<NamedParts>);

#[derive(Debug)]
pub struct NamedParts {
    pub name: String,
    pub version: String,
    pub any: Any,
}

impl Named {
    pub fn new(name: impl Into<String>, version: impl Into<String>, any: Any) -> Self {
        Named(std::sync::Arc::new(NamedParts { name: name.into(), version: version.into(), any }))
    }
}

impl Named {
    /// Whether both are the same resource, not only equal (one was cloned from the other).
    pub fn same(a: &Named, b: &Named) -> bool {
        std::sync::Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for Named {
    type Target = NamedParts;
    fn deref(&self) -> &NamedParts {
        &self.0
    }
}

/// Everything one proxy gets, by type URL; names are sorted within a type.
#[derive(Clone, Debug, Default)]
pub struct ProxySnapshot {
    /// Shared, so that a Delta stream can keep what it sent without copying it.
    by_type: BTreeMap<String, std::sync::Arc<Vec<Named>>>,
    /// When the snapshot must be rebuilt even without a store change (certificate rotation).
    pub refresh_at: Option<std::time::SystemTime>,
    /// What the next generation of a zone ingress can reuse from this one.
    pub ingress_memo: Option<std::sync::Arc<IngressMemo>>,
}

impl ProxySnapshot {
    pub fn resources(&self, type_url: &str) -> &[Named] {
        self.by_type.get(type_url).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The resources of a type, shared.
    pub fn shared(&self, type_url: &str) -> Option<&std::sync::Arc<Vec<Named>>> {
        self.by_type.get(type_url)
    }

    /// Sets the resources of a type (sorted by name).
    pub fn set(&mut self, type_url: impl Into<String>, resources: Vec<Named>) {
        self.by_type.insert(type_url.into(), std::sync::Arc::new(resources));
    }
}

/// The plans behind a zone ingress's resources, with what they generated: a service whose
/// offer did not change is reused as it is, and one that changed regenerates only the
/// resources whose plan changed (at 10,000 services, planning, encoding and hashing every
/// service was most of the cost of a one-endpoint change).
#[derive(Debug, Default)]
pub struct IngressMemo {
    /// What the snapshot was generated from: the Dataplanes' generation and the rest.
    inputs: (u64, String),
    listener: Option<(String, Named)>,
    /// By (mesh, service), as the offers are.
    services: Vec<std::sync::Arc<IngressService>>,
}

/// What one service of a mesh gives a zone ingress, generated from the offer with `stamp`.
#[derive(Debug)]
struct IngressService {
    /// (mesh, service).
    key: (String, String),
    stamp: u64,
    /// The routes' subsets of the service, each a chain too.
    subsets: BTreeSet<BTreeMap<String, String>>,
    chains: Vec<ChainPlan>,
    cluster: (ClusterPlan, Named),
    /// The endpoints; the resource's version includes the cluster's.
    load: (Vec<EndpointPlan>, Named),
}

/// A local endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointPlan {
    pub address: String,
    pub port: u32,
    /// Endpoint metadata for `envoy.lb` / `envoy.transport_socket_match`: inbound tags without
    /// `kuma.io/service`, plus `mesh`.
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainPlan {
    sni: String,
    cluster: String,
    stat_prefix: String,
    metadata_match: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterPlan {
    name: String,
    alt_stat_name: String,
    subset_selectors: BTreeSet<Vec<String>>,
}

/// Inputs of ingress generation (a consistent read of the store).
pub struct IngressInputs<'a> {
    pub zone: &'a str,
    pub node_id: &'a str,
    pub ingress: &'a ZoneIngressSpec,
    pub meshes: &'a [Resource],
    /// The zone's Dataplanes (of which generation reads what the serving ones offer).
    pub dataplanes: &'a Dataplanes,
    /// The tag subsets MeshTCPRoutes send to, by (mesh, service).
    pub route_subsets: &'a super::tcp_route::Subsets,
}

/// The endpoints one Dataplane gives its services: one per healthy inbound with a service.
pub fn inbound_endpoints(dp: &DataplaneView) -> Vec<(String, EndpointPlan)> {
    let Some(net) = &dp.spec.networking else { return Vec::new() };
    let mut out = Vec::new();
    for inb in net.inbound.iter().filter(|i| i.is_healthy()) {
        let Some(service) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
        let Ok(port) = u32::try_from(inb.port) else { continue };
        // Kuma: the inbound's own address, else the advertised, else the Dataplane address.
        let address = inb
            .address
            .clone()
            .filter(|a| !a.is_empty())
            .or_else(|| Some(net.advertised_address.clone()).filter(|a| !a.is_empty()))
            .unwrap_or_else(|| net.address.clone());
        let mut tags: BTreeMap<String, String> =
            inb.tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG).map(|(k, v)| (k.clone(), v.clone())).collect();
        tags.insert("mesh".into(), dp.mesh().to_string());
        out.push((service.clone(), EndpointPlan { address, port, tags }));
    }
    out
}

/// The services one Dataplane offers: the full tag set of each healthy inbound with a service.
pub fn inbound_services(dp: &DataplaneView) -> impl Iterator<Item = &BTreeMap<String, String>> {
    dp.inbounds()
        .iter()
        .filter(|i| i.is_healthy())
        .map(|i| &i.tags)
        .filter(|t| t.get(SERVICE_TAG).is_some_and(|s| !s.is_empty()))
}

/// Tags of a destination that actually split the endpoints (Kuma's "relevant tags").
fn relevant_tags(destination: &BTreeMap<String, String>, endpoints: &[EndpointPlan]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in destination {
        if k == SERVICE_TAG || k == "mesh" {
            continue;
        }
        let all: BTreeSet<(&str, u32)> = endpoints.iter().map(|e| (e.address.as_str(), e.port)).collect();
        let matched: BTreeSet<(&str, u32)> =
            endpoints.iter().filter(|e| e.tags.get(k) == Some(v)).map(|e| (e.address.as_str(), e.port)).collect();
        if matched.len() < all.len() {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

pub(crate) fn version_of(plan: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, plan.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn socket_address(addr: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// An endpoint's tags as Envoy reads them: for subset load balancing (`envoy.lb`) and for
/// choosing a cluster's transport socket (`envoy.transport_socket_match`).
pub(crate) fn endpoint_metadata(tags: &BTreeMap<String, String>) -> Metadata {
    let md = string_struct(tags);
    Metadata {
        filter_metadata: [("envoy.lb".to_string(), md.clone()), ("envoy.transport_socket_match".to_string(), md)]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// Other zones' ZoneIngresses that advertise where to reach them, with their port.
pub(crate) fn remote_ingresses<'a>(
    ingresses: &'a [Resource],
    zone: &'a str,
) -> impl Iterator<Item = (ZoneIngressSpec, u32)> + 'a {
    ingresses.iter().filter_map(move |zi| {
        let spec = zi.typed::<ZoneIngressSpec>().ok()?;
        if spec.zone.is_empty() || spec.zone == zone {
            return None;
        }
        let n = &spec.networking;
        let port = u32::try_from(n.advertised_port).ok().filter(|p| *p != 0)?;
        (!n.advertised_address.is_empty()).then_some((spec, port))
    })
}

pub(crate) fn string_struct(m: &BTreeMap<String, String>) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), Value { kind: Some(value::Kind::StringValue(v.clone())) })).collect(),
    }
}

pub(crate) fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn cluster_proto(p: &ClusterPlan) -> Cluster {
    let lb_subset_config = if p.subset_selectors.is_empty() {
        None
    } else {
        Some(LbSubsetConfig {
            fallback_policy: LbSubsetFallbackPolicy::AnyEndpoint as i32,
            subset_selectors: p
                .subset_selectors
                .iter()
                .map(|keys| LbSubsetSelector {
                    keys: keys.clone(),
                    fallback_policy: LbSubsetSelectorFallbackPolicy::NoFallback as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    Cluster {
        name: p.name.clone(),
        alt_stat_name: p.alt_stat_name.clone(),
        connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        lb_subset_config,
        ..Default::default()
    }
}

fn cla_proto(name: &str, endpoints: &[EndpointPlan]) -> ClusterLoadAssignment {
    let lb_endpoints = endpoints
        .iter()
        .map(|e| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(&e.address, e.port)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            metadata: Some(endpoint_metadata(&e.tags)),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: if lb_endpoints.is_empty() {
            Vec::new()
        } else {
            vec![LocalityLbEndpoints { lb_endpoints, ..Default::default() }]
        },
        ..Default::default()
    }
}

pub(crate) fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(TlsInspector::default()))),
        ..Default::default()
    }
}

fn chain_proto(c: &ChainPlan) -> FilterChain {
    let metadata_match = if c.metadata_match.is_empty() {
        None
    } else {
        Some(Metadata {
            filter_metadata: [("envoy.lb".to_string(), string_struct(&c.metadata_match))].into_iter().collect(),
            ..Default::default()
        })
    };
    let tcp = TcpProxy {
        stat_prefix: c.stat_prefix.clone(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(c.cluster.clone())),
        metadata_match,
        ..Default::default()
    };
    FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            server_names: vec![c.sni.clone()],
            transport_protocol: "tls".into(),
            ..Default::default()
        }),
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(tcp))),
        }],
        ..Default::default()
    }
}

fn direct_response_chain(body: &str) -> FilterChain {
    FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.direct_response".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(DirectResponse {
                response: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(body.as_bytes().to_vec())),
                    ..Default::default()
                }),
            }))),
        }],
        ..Default::default()
    }
}

/// What an ingress's configuration depends on besides the Dataplanes: its listener, who it
/// is, and which meshes have mTLS.
fn ingress_inputs(inputs: &IngressInputs<'_>) -> (u64, String) {
    let mtls: Vec<&str> = inputs.meshes.iter().filter(|m| mesh_mtls_enabled(m)).map(|m| m.name.as_str()).collect();
    let net = &inputs.ingress.networking;
    let rest =
        format!("{}|{}|{}|{}|{mtls:?}|{:?}", net.address, net.port, inputs.node_id, inputs.zone, inputs.route_subsets);
    (inputs.dataplanes.generation(), rest)
}

/// Whether `previous` was generated from the same inputs (a change elsewhere, such as the
/// ingress's own `availableServices` being rewritten, needs no new generation).
pub fn ingress_unchanged(inputs: &IngressInputs<'_>, previous: Option<&ProxySnapshot>) -> bool {
    previous.and_then(|p| p.ingress_memo.as_deref()).is_some_and(|m| m.inputs == ingress_inputs(inputs))
}

/// Generate the Listener, Clusters and ClusterLoadAssignments of a ZoneIngress.
///
/// * one listener `inbound:<address>:<port>` with `tls_inspector`;
/// * per mTLS-enabled mesh and service with local endpoints: a chain for `svc{mesh=m}`
///   (Kuma's match-all destination) and one chain per distinct tag combination of the
///   service's available services (`svc{mesh=m,k=v,...}`), with `metadata_match` on the
///   tags that split the endpoints, and the cluster's subset selectors for them;
/// * no chain at all: a `direct_response` chain `{"proxy":"<node id>","zone":"<zone>"}`.
///
/// `previous`: the last snapshot of this proxy, whose unchanged resources are reused.
pub fn ingress(inputs: &IngressInputs<'_>, previous: Option<&ProxySnapshot>) -> ProxySnapshot {
    let old = previous.and_then(|p| p.ingress_memo.as_deref());
    let mut memo = IngressMemo { inputs: ingress_inputs(inputs), ..Default::default() };
    let net = &inputs.ingress.networking;
    let address = if net.address.is_empty() { "0.0.0.0".to_string() } else { net.address.clone() };
    let port = u32::try_from(net.port).unwrap_or(0);
    let listener_name = format!("inbound:{address}:{port}");

    let mtls_meshes: BTreeSet<&str> =
        inputs.meshes.iter().filter(|m| mesh_mtls_enabled(m)).map(|m| m.name.as_str()).collect();
    let mut chains_changed = false;
    let mut cds = Vec::new();
    let mut eds = Vec::new();
    // The previous services, walked along with the offers (both by mesh, then service).
    let mut previous = old.map(|m| m.services.as_slice()).unwrap_or_default().iter().peekable();
    for (key, offer) in inputs.dataplanes.offers(|m| mtls_meshes.contains(m)) {
        if offer.tag_sets.is_empty() {
            continue; // endpoints without a healthy inbound to offer: not a destination
        }
        let before = loop {
            match previous.peek() {
                Some(p) if p.key < *key => {
                    previous.next();
                }
                Some(p) if p.key == *key => break previous.next(),
                _ => break None,
            }
        };
        let no_subsets = BTreeSet::new();
        let subsets = inputs.route_subsets.get(key).unwrap_or(&no_subsets);
        let service = match before {
            Some(b) if b.stamp == offer.stamp && b.subsets == *subsets => b.clone(),
            _ => {
                let s = std::sync::Arc::new(ingress_service(key, offer, subsets, before.map(|b| b.as_ref())));
                chains_changed |= before.is_none_or(|b| b.chains != s.chains);
                s
            }
        };
        cds.push(service.cluster.1.clone());
        eds.push(service.load.1.clone());
        memo.services.push(service);
    }
    // A service gone changes the chains too (one added was seen above).
    chains_changed |= old.is_none_or(|m| m.services.len() != memo.services.len());

    let mut snap = ProxySnapshot::default();
    let listener = match old.and_then(|m| m.listener.as_ref()) {
        Some((name, named)) if *name == listener_name && !chains_changed => named.clone(),
        _ => {
            // Each SNI once, the first service to claim it keeping it.
            let mut seen = BTreeSet::new();
            let chains: Vec<&ChainPlan> =
                memo.services.iter().flat_map(|s| s.chains.iter()).filter(|c| seen.insert(c.sni.as_str())).collect();
            ingress_listener(inputs, &listener_name, &address, port, &chains)
        }
    };
    memo.listener = Some((listener_name, listener.clone()));
    snap.set(LISTENER_TYPE, vec![listener]);
    snap.set(CLUSTER_TYPE, cds);
    snap.set(ENDPOINT_TYPE, eds);
    snap.ingress_memo = Some(std::sync::Arc::new(memo));
    snap
}

/// One service's chains, cluster and endpoints: a chain for `svc{mesh=m}` and one per
/// distinct tag combination (`svc{mesh=m,k=v,...}`) with `metadata_match` on the tags that
/// split the endpoints, and the cluster's subset selectors for them. Resources whose plan is
/// the same as `before`'s are reused.
fn ingress_service(
    key: &(String, String),
    offer: &ServiceOffer,
    subsets: &BTreeSet<BTreeMap<String, String>>,
    before: Option<&IngressService>,
) -> IngressService {
    let (mesh, svc) = (key.0.as_str(), key.1.as_str());
    let cluster_name = format!("{mesh}:{svc}");
    let stat = format!("{mesh}_{svc}");
    let eps = offer.endpoints();
    let mut selectors = BTreeSet::new();
    let mut chains = Vec::new();
    let mut sni_used = BTreeSet::new();
    for tags in offer.tag_sets.keys() {
        if tags.len() <= 1 {
            continue; // only kuma.io/service: the plain chain below covers it
        }
        let mut with_mesh = tags.clone();
        with_mesh.insert("mesh".into(), mesh.to_string());
        let sni = sni_from_tags(svc, &with_mesh);
        if !sni_used.insert(sni.clone()) {
            continue;
        }
        let rel = relevant_tags(tags, &eps);
        if !rel.is_empty() {
            selectors.insert(rel.keys().cloned().collect::<Vec<_>>());
        }
        chains.push(ChainPlan { sni, cluster: cluster_name.clone(), stat_prefix: stat.clone(), metadata_match: rel });
    }
    // The routes' subsets that some endpoint here carries: `svc{mesh=m,<subset>}`.
    for subset in subsets {
        let mut with_mesh = subset.clone();
        with_mesh.insert("mesh".into(), mesh.to_string());
        let sni = sni_from_tags(svc, &with_mesh);
        if !eps.iter().any(|e| subset.iter().all(|(k, v)| e.tags.get(k) == Some(v))) || !sni_used.insert(sni.clone()) {
            continue;
        }
        selectors.insert(subset.keys().cloned().collect::<Vec<_>>());
        chains.push(ChainPlan {
            sni,
            cluster: cluster_name.clone(),
            stat_prefix: stat.clone(),
            metadata_match: subset.clone(),
        });
    }
    chains.sort_by(|a, b| a.sni.cmp(&b.sni));
    let plain_tags: BTreeMap<String, String> = [("mesh".to_string(), mesh.to_string())].into_iter().collect();
    let plain = sni_from_tags(svc, &plain_tags);
    if sni_used.insert(plain.clone()) {
        chains.push(ChainPlan {
            sni: plain,
            cluster: cluster_name.clone(),
            stat_prefix: stat.clone(),
            metadata_match: BTreeMap::new(),
        });
    }
    let plan = ClusterPlan { name: cluster_name.clone(), alt_stat_name: stat, subset_selectors: selectors };
    let cluster = match before {
        Some(b) if b.cluster.0 == plan => b.cluster.1.clone(),
        _ => Named::new(cluster_name.clone(), version_of(&format!("{plan:?}")), pack_any(cluster_proto(&plan))),
    };
    // A CLA's version includes its cluster's: when a cluster changes, Envoy re-warms it and
    // needs its endpoints again, so they must be re-sent even if unchanged (as Kuma does).
    let load = match before {
        Some(b) if b.load.0 == eps && b.cluster.1.version == cluster.version => b.load.1.clone(),
        _ => Named::new(
            cluster_name.clone(),
            version_of(&format!("{cluster_name}|{eps:?}|{}", cluster.version)),
            pack_any(cla_proto(&cluster_name, &eps)),
        ),
    };
    IngressService {
        key: key.clone(),
        stamp: offer.stamp,
        subsets: subsets.clone(),
        chains,
        cluster: (plan, cluster),
        load: (eps, load),
    }
}

/// The ingress listener: one chain per plan, or a `direct_response` saying who answers.
fn ingress_listener(
    inputs: &IngressInputs<'_>,
    listener_name: &str,
    address: &str,
    port: u32,
    chains: &[&ChainPlan],
) -> Named {
    let mut listener = Listener {
        name: listener_name.to_string(),
        address: Some(socket_address(address, port)),
        enable_reuse_port: Some(BoolValue { value: false }),
        listener_filters: vec![tls_inspector()],
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    };
    let listener_plan;
    if chains.is_empty() {
        let body = format!(r#"{{"proxy":"{}","zone":"{}"}}"#, inputs.node_id, inputs.zone);
        listener.filter_chains = vec![direct_response_chain(&body)];
        listener_plan = format!("{listener_name}|direct|{body}");
    } else {
        listener.filter_chains = chains.iter().map(|c| chain_proto(c)).collect();
        listener_plan = format!("{listener_name}|{chains:?}");
    }
    Named::new(listener_name.to_string(), version_of(&listener_plan), pack_any(listener))
}

/// What other proxy kinds get for now: nothing (empty resource sets, which Envoy accepts).
pub fn empty() -> ProxySnapshot {
    let mut snap = ProxySnapshot::default();
    for t in [LISTENER_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE] {
        snap.set(t, Vec::new());
    }
    snap
}

/// Decode helper used by tests and diagnostics.
pub fn unpack<T: prost::Message + Default + Name>(any: &Any) -> Option<T> {
    if any.type_url != T::type_url() {
        return None;
    }
    T::decode(any.value.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(v: serde_json::Value) -> Resource {
        Resource::from_json(&v).unwrap()
    }

    fn mesh(name: &str, mtls: bool) -> Resource {
        if mtls {
            res(
                json!({"type":"Mesh","name":name,"mtls":{"enabledBackend":"ca-1","backends":[{"name":"ca-1","type":"builtin"}]}}),
            )
        } else {
            res(json!({"type":"Mesh","name":name}))
        }
    }

    fn dp(mesh: &str, name: &str, addr: &str, tags: serde_json::Value) -> Resource {
        res(json!({"type":"Dataplane","mesh":mesh,"name":name,
            "networking":{"address":addr,"inbound":[{"port":2521,"tags":tags}]}}))
    }

    fn ingress_spec() -> ZoneIngressSpec {
        serde_json::from_value(json!({"networking":{"address":"10.0.0.1","port":10001}})).unwrap()
    }

    #[test]
    fn empty_ingress_is_direct_response() {
        let spec = ingress_spec();
        let s = ingress(
            &IngressInputs {
                zone: "zone-main",
                node_id: "default.ingress",
                ingress: &spec,
                meshes: &[],
                dataplanes: &Dataplanes::default(),
                route_subsets: &Default::default(),
            },
            None,
        );
        let l: Listener = unpack(&s.resources(LISTENER_TYPE)[0].any).unwrap();
        assert_eq!(l.name, "inbound:10.0.0.1:10001");
        let f = &l.filter_chains[0].filters[0];
        assert_eq!(f.name, "envoy.filters.network.direct_response");
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
        let dr: DirectResponse = unpack(any).unwrap();
        let Some(data_source::Specifier::InlineBytes(b)) = dr.response.unwrap().specifier else { panic!() };
        // Same bytes as golden 02's inlineBytes.
        assert_eq!(String::from_utf8(b).unwrap(), r#"{"proxy":"default.ingress","zone":"zone-main"}"#);
    }

    #[test]
    fn subsets_like_golden_03() {
        let meshes = vec![mesh("mesh1", true), mesh("plain", false)];
        let dps = vec![
            dp("mesh1", "a", "192.168.0.1", json!({"kuma.io/service":"backend","version":"v1","region":"eu"})),
            dp("mesh1", "b", "192.168.0.2", json!({"kuma.io/service":"backend","version":"v2","region":"us"})),
            dp("plain", "c", "192.168.0.3", json!({"kuma.io/service":"web"})),
        ];
        let dps = Dataplanes::from_resources(dps);
        let spec = ingress_spec();
        let inputs = IngressInputs {
            zone: "z",
            node_id: ".ingress",
            ingress: &spec,
            meshes: &meshes,
            dataplanes: &dps,
            route_subsets: &Default::default(),
        };
        let s = ingress(&inputs, None);
        let l: Listener = unpack(&s.resources(LISTENER_TYPE)[0].any).unwrap();
        let snis: Vec<&str> =
            l.filter_chains.iter().map(|c| c.filter_chain_match.as_ref().unwrap().server_names[0].as_str()).collect();
        assert_eq!(
            snis,
            vec![
                "backend{mesh=mesh1,region=eu,version=v1}",
                "backend{mesh=mesh1,region=us,version=v2}",
                "backend{mesh=mesh1}"
            ]
        );
        let c: Cluster = unpack(&s.resources(CLUSTER_TYPE)[0].any).unwrap();
        assert_eq!(c.name, "mesh1:backend");
        let sel: Vec<Vec<String>> = c.lb_subset_config.unwrap().subset_selectors.into_iter().map(|s| s.keys).collect();
        assert_eq!(sel, vec![vec!["region".to_string(), "version".to_string()]]);
        let cla: ClusterLoadAssignment = unpack(&s.resources(ENDPOINT_TYPE)[0].any).unwrap();
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
        let md = &cla.endpoints[0].lb_endpoints[0].metadata.as_ref().unwrap().filter_metadata["envoy.lb"];
        assert!(md.fields.contains_key("mesh") && !md.fields.contains_key(SERVICE_TAG));
        // The non-mTLS mesh is not exposed.
        assert_eq!(s.resources(CLUSTER_TYPE).len(), 1);
        // Versions are stable across generations.
        let s2 = ingress(&inputs, Some(&s));
        assert_eq!(s.resources(ENDPOINT_TYPE)[0].version, s2.resources(ENDPOINT_TYPE)[0].version);
        assert_eq!(s.resources(LISTENER_TYPE)[0].version, s2.resources(LISTENER_TYPE)[0].version);
    }

    /// A generation that reuses the previous snapshot gives exactly what one from scratch
    /// gives, for what changed and for what did not.
    #[test]
    fn reusing_the_previous_snapshot_equals_generating_afresh() {
        let meshes = vec![mesh("mesh1", true)];
        let spec = ingress_spec();
        let gen_ = |dps: &[Resource], previous: Option<&ProxySnapshot>| {
            let refs = Dataplanes::from_resources(dps.iter().cloned());
            let inputs = IngressInputs {
                zone: "z",
                node_id: ".ingress",
                ingress: &spec,
                meshes: &meshes,
                dataplanes: &refs,
                route_subsets: &Default::default(),
            };
            ingress(&inputs, previous)
        };
        // Encoded bytes are not stable (protobuf Struct maps), decoded messages are.
        let flat = |s: &ProxySnapshot| {
            let names =
                |t: &str| s.resources(t).iter().map(|n| (n.name.clone(), n.version.clone())).collect::<Vec<_>>();
            let listeners: Vec<Listener> = s.resources(LISTENER_TYPE).iter().map(|n| unpack(&n.any).unwrap()).collect();
            let clusters: Vec<Cluster> = s.resources(CLUSTER_TYPE).iter().map(|n| unpack(&n.any).unwrap()).collect();
            let loads: Vec<ClusterLoadAssignment> =
                s.resources(ENDPOINT_TYPE).iter().map(|n| unpack(&n.any).unwrap()).collect();
            (names(LISTENER_TYPE), names(CLUSTER_TYPE), names(ENDPOINT_TYPE), listeners, clusters, loads)
        };
        let before = vec![
            dp("mesh1", "a", "192.168.0.1", json!({"kuma.io/service":"backend","version":"v1"})),
            dp("mesh1", "b", "192.168.0.2", json!({"kuma.io/service":"web"})),
            dp("mesh1", "c", "192.168.0.3", json!({"kuma.io/service":"api"})),
        ];
        let s0 = gen_(&before, None);
        // One endpoint moves, one service gains a version, one service is new.
        let after = vec![
            dp("mesh1", "a", "192.168.0.1", json!({"kuma.io/service":"backend","version":"v1"})),
            dp("mesh1", "a2", "192.168.0.9", json!({"kuma.io/service":"backend","version":"v2"})),
            dp("mesh1", "b", "192.168.0.7", json!({"kuma.io/service":"web"})),
            dp("mesh1", "c", "192.168.0.3", json!({"kuma.io/service":"api"})),
            dp("mesh1", "d", "192.168.0.4", json!({"kuma.io/service":"db"})),
        ];
        let reused = gen_(&after, Some(&s0));
        assert_eq!(flat(&reused), flat(&gen_(&after, None)));
        // Only what changed has a new version: api's cluster and endpoints are untouched.
        let version = |s: &ProxySnapshot, t: &str, n: &str| {
            s.resources(t).iter().find(|r| r.name == n).map(|r| r.version.clone())
        };
        assert_eq!(version(&s0, ENDPOINT_TYPE, "mesh1:api"), version(&reused, ENDPOINT_TYPE, "mesh1:api"));
        assert_ne!(version(&s0, ENDPOINT_TYPE, "mesh1:web"), version(&reused, ENDPOINT_TYPE, "mesh1:web"));
        assert_ne!(
            version(&s0, LISTENER_TYPE, "inbound:10.0.0.1:10001"),
            version(&reused, LISTENER_TYPE, "inbound:10.0.0.1:10001")
        );
        // Nothing changed: the previous snapshot stands; a changed Dataplane set does not.
        let same = Dataplanes::from_resources(after.iter().cloned());
        let inputs = IngressInputs {
            zone: "z",
            node_id: ".ingress",
            ingress: &spec,
            meshes: &meshes,
            dataplanes: &same,
            route_subsets: &Default::default(),
        };
        assert!(ingress_unchanged(&inputs, Some(&ingress(&inputs, None))));
        assert!(!ingress_unchanged(&inputs, Some(&s0)), "s0 came from other Dataplanes");
        // And back: the first configuration again, from the second.
        assert_eq!(flat(&gen_(&before, Some(&reused))), flat(&s0));
    }
}
