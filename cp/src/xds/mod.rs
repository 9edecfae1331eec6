//! ADS server (SotW and Delta) for zone proxies and data plane proxies: admit a proxy on
//! its first request, build its snapshot from the store, and push what changed.

pub mod access_log;
pub mod delta;
pub mod dynconf;
pub mod egress;
pub mod fault_injection;
pub mod generate;
pub mod http;
pub mod http_route;
pub mod inbound_policy;
pub mod meshmetric;
pub mod meshtls;
pub mod prometheus;
pub mod rate_limit;
pub mod resilience;
pub mod sidecar;
pub mod sni;
pub mod sotw;
pub mod tcp_route;
pub mod timeout;
pub mod tproxy;
pub mod traffic_permission;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, value};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::components::zone::ZoneCp;
use crate::config::{DpProxyAuth, ZoneProxyAuth};
use crate::dataplanes::DataplaneView;
use crate::lifecycle::{Connected, Lifecycle, Registration};
use crate::model::{
    DataplaneSpec, MeshSpec, Resource, ResourceType, ZoneEgressSpec, ZoneIngressNetworking, ZoneIngressSpec,
};
use crate::store::{Change, ChangeEvent, next_change};
use delta::Delta;
use generate::{IngressInputs, ProxySnapshot};
use serde::Deserialize;
use sotw::Sotw;

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Max gRPC message size accepted from proxies (requests are small; 4 MiB as gRPC default).
const MAX_DECODE: usize = 4 * 1024 * 1024;

/// The ADS gRPC service.
#[derive(Clone)]
pub struct Ads {
    cp: Arc<ZoneCp>,
}

pub fn service(cp: Arc<ZoneCp>) -> AggregatedDiscoveryServiceServer<Ads> {
    AggregatedDiscoveryServiceServer::new(Ads { cp }).max_decoding_message_size(MAX_DECODE)
}

/// Who is on the other end of a stream.
#[derive(Clone, Debug)]
pub struct ProxyId {
    pub rtype: ResourceType,
    pub mesh: String,
    pub name: String,
    pub node_id: String,
    /// `dataplane.dns.port` of the node metadata (0 when absent).
    pub dns_port: u32,
    /// `features` of the node metadata.
    pub features: BTreeSet<String>,
    /// `workdir` of the node metadata (where pipes such as the dynamic-config one live).
    pub workdir: String,
    /// The `transparentProxy` node metadata of a proxy started with `--transparent-proxy`.
    pub transparent_proxy: Option<serde_json::Value>,
}

/// kuma-dp's `dataplaneConfig` as the Dataplane's `networking.transparentProxying`.
fn tproxy_from_metadata(cfg: &serde_json::Value) -> Option<serde_json::Value> {
    let port = |side: &str| {
        let r = &cfg["redirect"][side];
        // Numbers come through protobuf's Struct as floats.
        let port = r["port"].as_f64().filter(|p| (0.0..=65535.0).contains(p)).unwrap_or(0.0) as u64;
        if r["enabled"].as_bool() == Some(false) { 0 } else { port }
    };
    let (inbound, outbound) = (port("inbound"), port("outbound"));
    if inbound == 0 && outbound == 0 {
        return None;
    }
    let family = if cfg["ipFamilyMode"].as_str() == Some("ipv4") { "IPv4" } else { "DualStack" };
    Some(serde_json::json!({"redirectPortInbound": inbound, "redirectPortOutbound": outbound, "ipFamilyMode": family}))
}

fn struct_strings(s: &Struct, key: &str) -> BTreeSet<String> {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn struct_string(s: &Struct, key: &str) -> Option<String> {
    match s.fields.get(key)?.kind.as_ref()? {
        value::Kind::StringValue(v) => Some(v.clone()),
        _ => None,
    }
}

fn token_from(req_meta: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    let values: Vec<_> = req_meta.get_all("authorization").iter().collect();
    match values.as_slice() {
        [] => Ok(String::new()),
        [v] => v
            .to_str()
            .map(|s| s.trim().to_string())
            .map_err(|_| Status::unauthenticated("authentication failed: the authorization metadata is not text")),
        _ => Err(Status::unauthenticated("authentication failed: more than one authorization metadata value")),
    }
}

/// Identify and authenticate the proxy from its first request; register its resource.
async fn admit(
    cp: &Arc<ZoneCp>,
    node: Option<&Node>,
    token: &str,
) -> Result<(ProxyId, Option<Registration>, Connected), Status> {
    let node = node.ok_or_else(|| Status::invalid_argument("the first discovery request must carry a node"))?;
    let (mesh, name) = node
        .id
        .split_once('.')
        .ok_or_else(|| Status::invalid_argument(format!("node id {:?} is not <mesh>.<name>", node.id)))?;
    let md = node.metadata.clone().unwrap_or_default();
    let proxy_type: kuma_model::proxy::ProxyType = struct_string(&md, "dataplane.proxyType")
        .unwrap_or_default()
        .parse()
        .map_err(|e| Status::invalid_argument(format!("dataplane.proxyType: {e}")))?;
    let rtype = crate::model::proxy_resource_type(proxy_type);
    let inline = match struct_string(&md, "dataplane.resource").filter(|s| !s.is_empty()) {
        Some(json) => {
            if json.len() > 1024 * 1024 {
                return Err(Status::invalid_argument("dataplane.resource is larger than 1 MiB"));
            }
            let v: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| Status::invalid_argument(format!("dataplane.resource is not JSON: {e}")))?;
            let r =
                Resource::from_json(&v).map_err(|e| Status::invalid_argument(format!("dataplane.resource: {e}")))?;
            if r.rtype != rtype {
                return Err(Status::invalid_argument(format!(
                    "dataplane.resource is a {} but dataplane.proxyType is {proxy_type}",
                    r.rtype.name()
                )));
            }
            crate::model::validate(&r).map_err(|c| {
                Status::invalid_argument(format!(
                    "dataplane.resource is not valid: {}",
                    crate::model::format_causes(&c)
                ))
            })?;
            Some(r)
        }
        None => None,
    };
    let (mesh, name) = match &inline {
        Some(r) => (r.mesh.clone(), r.name.clone()),
        None => (if rtype.is_mesh_scoped() { mesh.to_string() } else { String::new() }, name.to_string()),
    };
    let resource = match &inline {
        Some(r) => r.clone(),
        None => cp
            .store
            .get(rtype, &mesh, &name)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("{} {name:?} not found in mesh {mesh:?}", rtype.name())))?,
    };

    // Authentication.
    match rtype {
        ResourceType::ZoneIngress | ResourceType::ZoneEgress => {
            if cp.cfg.zone_proxy_auth == ZoneProxyAuth::ZoneToken {
                let scope = if rtype == ResourceType::ZoneIngress { "ingress" } else { "egress" };
                cp.tokens
                    .validate_zone(token, scope, &cp.cfg.zone_name)
                    .await
                    .map_err(|e| Status::unauthenticated(format!("authentication failed: {e}")))?;
            }
        }
        _ => {
            if cp.cfg.dp_proxy_auth == DpProxyAuth::DpToken {
                let spec: DataplaneSpec = resource.typed().unwrap_or_default();
                let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for inb in spec.networking.map(|n| n.inbound).unwrap_or_default() {
                    for (k, v) in inb.tags {
                        tags.entry(k).or_default().push(v);
                    }
                }
                cp.tokens
                    .validate_dataplane(token, &mesh, &name, &tags)
                    .await
                    .map_err(|e| Status::unauthenticated(format!("authentication failed: {e}")))?;
            }
        }
    }

    // The insight first: a proxy that registers is "joining" (no endpoint yet) until it
    // acknowledged its configuration.
    let version = md.fields.get("version").map(crate::kds::from_pb);
    let online = crate::lifecycle::connected(cp, &(rtype, mesh.clone(), name.clone()), version).await;
    let registration = match inline {
        Some(r) => Some(Lifecycle::register(cp, r).await.map_err(Status::failed_precondition)?),
        None => None,
    };
    let dns_port = struct_string(&md, "dataplane.dns.port").and_then(|p| p.trim().parse::<u32>().ok()).unwrap_or(0);
    let features = struct_strings(&md, "features");
    let workdir = struct_string(&md, "workdir").unwrap_or_default();
    let transparent_proxy = if features.contains(kuma_model::proxy::features::TRANSPARENT_PROXY_IN_METADATA) {
        md.fields.get("transparentProxy").map(crate::kds::from_pb).as_ref().and_then(tproxy_from_metadata)
    } else {
        None
    };
    let id = ProxyId { rtype, mesh, name, node_id: node.id.clone(), dns_port, features, workdir, transparent_proxy };
    tracing::info!(node = %id.node_id, kind = rtype.name(), "ADS stream authenticated");
    Ok((id, registration, online))
}

/// Build the current snapshot of a proxy from the store.
///
/// `previous`: the proxy's last snapshot, for what generation can reuse from it; `None`
/// when it is still current.
pub async fn build_snapshot(
    cp: &ZoneCp,
    id: &ProxyId,
    previous: Option<&ProxySnapshot>,
) -> Result<Option<ProxySnapshot>, Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    match id.rtype {
        ResourceType::ZoneIngress => {
            let Some(zi) = cp.store.get_shared(ResourceType::ZoneIngress, "", &id.name).await.map_err(internal)? else {
                return Ok(Some(generate::empty()));
            };
            // Not `availableServices` (what the zone offers, thousands of entries at scale):
            // generation reads the Dataplanes themselves.
            let spec = ZoneIngressSpec {
                zone: String::new(),
                networking: zi
                    .spec
                    .get("networking")
                    .map(ZoneIngressNetworking::deserialize)
                    .transpose()
                    .map_err(|e| Status::internal(e.to_string()))?
                    .unwrap_or_default(),
                available_services: Vec::new(),
            };
            let meshes = cp.store.list(ResourceType::Mesh, None).await.map_err(internal)?;
            let dataplanes = cp.dataplanes.read(cp.store.as_ref()).await.map_err(internal)?;
            // Both route kinds name subsets the same way (`to[].rules[].default.backendRefs`).
            let mut routes = cp.store.list(ResourceType::MeshTCPRoute, None).await.map_err(internal)?;
            routes.extend(cp.store.list(ResourceType::MeshHTTPRoute, None).await.map_err(internal)?);
            let route_subsets = tcp_route::subsets(&routes);
            let inputs = IngressInputs {
                zone: &cp.cfg.zone_name,
                node_id: &id.node_id,
                ingress: &spec,
                meshes: &meshes,
                dataplanes: &dataplanes,
                route_subsets: &route_subsets,
            };
            if generate::ingress_unchanged(&inputs, previous) {
                return Ok(None);
            }
            Ok(Some(generate::ingress(&inputs, previous)))
        }
        ResourceType::ZoneEgress => egress_snapshot(cp, id).await.map(Some),
        ResourceType::Dataplane => dataplane_snapshot(cp, id).await.map(Some),
        _ => Ok(Some(generate::empty())),
    }
}

/// TLS material of a proxy in a mesh with the builtin CA (`None`: no mTLS), and when it
/// must be renewed.
async fn mesh_identity(
    cp: &ZoneCp,
    mesh: &Resource,
    proxy: &str,
    tags: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Option<(sidecar::SidecarTls, std::time::SystemTime)>, Status> {
    let spec: MeshSpec = mesh.typed().unwrap_or_default();
    match spec.enabled_backend() {
        Some(backend) if backend.backend_type == "builtin" => {
            let ca = cp
                .ca
                .ensure_ca(&cp.store, &mesh.name, &backend.name)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let cert = cp
                .ca
                .identity(&ca, &mesh.name, proxy, tags, backend.dp_cert_lifetime())
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            // At least a second apart, whatever the configured lifetime.
            let floor = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
            let refresh = cert.rotate_at().max(floor);
            Ok(Some((
                sidecar::SidecarTls { ca_pem: ca.cert_pem, cert_pem: cert.cert_pem, key_pem: cert.key_pem },
                refresh,
            )))
        }
        _ => Ok(None),
    }
}

/// A ZoneEgress serves every mesh with mTLS: passthrough to other zones, and the mesh's
/// ExternalServices.
async fn egress_snapshot(cp: &ZoneCp, id: &ProxyId) -> Result<ProxySnapshot, Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    let Some(ze) = cp.store.get(ResourceType::ZoneEgress, "", &id.name).await.map_err(internal)? else {
        return Ok(generate::empty());
    };
    let spec: ZoneEgressSpec = ze.typed().map_err(|e| Status::internal(e.to_string()))?;
    let ingresses = cp.store.list(ResourceType::ZoneIngress, None).await.map_err(internal)?;
    let tags: BTreeMap<String, BTreeSet<String>> =
        [(crate::model::SERVICE_TAG.to_string(), [egress::ZONE_EGRESS_SERVICE.to_string()].into_iter().collect())]
            .into_iter()
            .collect();
    let mut per_mesh = vec![];
    let mut refresh_at: Option<std::time::SystemTime> = None;
    for mesh in cp.store.list(ResourceType::Mesh, None).await.map_err(internal)? {
        let Some((tls, refresh)) = mesh_identity(cp, &mesh, &id.name, &tags).await? else { continue };
        refresh_at = Some(refresh_at.map_or(refresh, |r| r.min(refresh)));
        let es = cp.store.list(ResourceType::ExternalService, Some(&mesh.name)).await.map_err(internal)?;
        let tps = cp.store.list(ResourceType::TrafficPermission, Some(&mesh.name)).await.map_err(internal)?;
        let mtps = cp.store.list(ResourceType::MeshTrafficPermission, Some(&mesh.name)).await.map_err(internal)?;
        per_mesh.push((mesh.name.clone(), tls, es, tps, mtps));
    }
    let meshes = per_mesh
        .iter()
        .map(|(name, tls, es, tps, mtps)| egress::EgressMesh {
            name,
            tls: sidecar::SidecarTls {
                ca_pem: tls.ca_pem.clone(),
                cert_pem: tls.cert_pem.clone(),
                key_pem: tls.key_pem.clone(),
            },
            external_services: es,
            permissions: tps,
            mesh_permissions: mtps,
        })
        .collect();
    let mut snap =
        egress::egress(&egress::EgressInputs { zone: &cp.cfg.zone_name, egress: &spec, meshes, ingresses: &ingresses });
    snap.refresh_at = refresh_at;
    Ok(snap)
}

async fn dataplane_snapshot(cp: &ZoneCp, id: &ProxyId) -> Result<ProxySnapshot, Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    let Some(mut dp) = cp.store.get(ResourceType::Dataplane, &id.mesh, &id.name).await.map_err(internal)? else {
        return Ok(generate::empty());
    };
    // The proxy's own transparent-proxy settings, unless the Dataplane has some.
    if let Some(tp) = &id.transparent_proxy
        && let Some(serde_json::Value::Object(net)) = dp.spec.get_mut("networking")
        && !net.contains_key("transparentProxying")
    {
        net.insert("transparentProxying".into(), tp.clone());
    }
    let Some(mesh) = cp.store.get(ResourceType::Mesh, "", &id.mesh).await.map_err(internal)? else {
        return Ok(generate::empty());
    };
    let mesh_spec: MeshSpec = mesh.typed().unwrap_or_default();
    if let Some(b) = mesh_spec.enabled_backend().filter(|b| b.backend_type != "builtin") {
        tracing::warn!(mesh = %id.mesh, backend = %b.name, kind = %b.backend_type, "only builtin mTLS backends are supported; serving the proxy without mTLS");
    }
    let spec: DataplaneSpec = dp.typed().unwrap_or_default();
    let metrics = prometheus::endpoint(&mesh_spec, &spec);
    let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for inb in spec.networking.iter().flat_map(|n| &n.inbound) {
        for (k, v) in &inb.tags {
            tags.entry(k.clone()).or_default().insert(v.clone());
        }
    }
    let (tls, refresh_at) = match mesh_identity(cp, &mesh, &id.name, &tags).await? {
        Some((tls, refresh)) => (Some(tls), Some(refresh)),
        None => (None, None),
    };
    let external_services = cp.store.list(ResourceType::ExternalService, Some(&id.mesh)).await.map_err(internal)?;
    // With `routing.zoneEgress`, cross-zone and external traffic leaves through the
    // zone's egresses that are online.
    let egresses = if mesh_spec.zone_egress() { local_egresses(cp).await.map_err(internal)? } else { vec![] };
    let all = cp.dataplanes.read(cp.store.as_ref()).await.map_err(internal)?;
    let dataplanes: Vec<&DataplaneView> = all.serving(Some(&id.mesh)).map(|d| d.as_ref()).collect();
    let ingresses = cp.store.list(ResourceType::ZoneIngress, None).await.map_err(internal)?;
    let vips = crate::vips::load(cp.store.as_ref(), &id.mesh).await;
    let circuit_breakers = cp.store.list(ResourceType::MeshCircuitBreaker, Some(&id.mesh)).await.map_err(internal)?;
    let retries = cp.store.list(ResourceType::MeshRetry, Some(&id.mesh)).await.map_err(internal)?;
    let health_checks = cp.store.list(ResourceType::MeshHealthCheck, Some(&id.mesh)).await.map_err(internal)?;
    let mesh_metrics = cp.store.list(ResourceType::MeshMetric, Some(&id.mesh)).await.map_err(internal)?;
    let access_logs = cp.store.list(ResourceType::MeshAccessLog, Some(&id.mesh)).await.map_err(internal)?;
    let load_balancing =
        cp.store.list(ResourceType::MeshLoadBalancingStrategy, Some(&id.mesh)).await.map_err(internal)?;
    let mesh_tls_policies = cp.store.list(ResourceType::MeshTLS, Some(&id.mesh)).await.map_err(internal)?;
    let traffic_permissions =
        cp.store.list(ResourceType::MeshTrafficPermission, Some(&id.mesh)).await.map_err(internal)?;
    let timeouts = cp.store.list(ResourceType::MeshTimeout, Some(&id.mesh)).await.map_err(internal)?;
    let tcp_routes = cp.store.list(ResourceType::MeshTCPRoute, Some(&id.mesh)).await.map_err(internal)?;
    let rate_limits = cp.store.list(ResourceType::MeshRateLimit, Some(&id.mesh)).await.map_err(internal)?;
    let http_routes = cp.store.list(ResourceType::MeshHTTPRoute, Some(&id.mesh)).await.map_err(internal)?;
    let fault_injections = cp.store.list(ResourceType::MeshFaultInjection, Some(&id.mesh)).await.map_err(internal)?;
    let mut snap = sidecar::sidecar(&sidecar::SidecarInputs {
        zone: &cp.cfg.zone_name,
        dataplane: &dp,
        dataplanes: &dataplanes,
        ingresses: &ingresses,
        vips: &vips,
        vip_port: cp.cfg.service_vip_port,
        vips_bindable: cp.cfg.dns_cidr.is_loopback(),
        dns_port: id.dns_port,
        features: &id.features,
        workdir: &id.workdir,
        mtls_mode: mesh_spec.enabled_backend().and_then(|b| b.mode.as_deref()),
        mesh_tls: &mesh_tls_policies,
        traffic_permissions: &traffic_permissions,
        timeouts: &timeouts,
        tcp_routes: &tcp_routes,
        http_routes: &http_routes,
        fault_injections: &fault_injections,
        rate_limits: &rate_limits,
        tls,
        zone_egress: mesh_spec.zone_egress(),
        locality_aware: mesh_spec.locality_aware(),
        egresses: &egresses,
        external_services: &external_services,
        circuit_breakers: &circuit_breakers,
        retries: &retries,
        health_checks: &health_checks,
        access_logs: &access_logs,
        load_balancing: &load_balancing,
        metrics,
        mesh_metric: meshmetric::merged(&mesh_metrics),
    });
    snap.refresh_at = refresh_at;
    Ok(snap)
}

/// `(address, port)` of this zone's ZoneEgresses whose proxy is connected.
async fn local_egresses(cp: &ZoneCp) -> Result<Vec<(String, u32)>, crate::store::StoreError> {
    let online: BTreeSet<String> = cp
        .store
        .list(ResourceType::ZoneEgressInsight, None)
        .await?
        .into_iter()
        .filter(crate::lifecycle::is_online)
        .map(|i| i.name)
        .collect();
    let mut out = vec![];
    for ze in cp.store.list(ResourceType::ZoneEgress, None).await? {
        let Ok(spec) = ze.typed::<ZoneEgressSpec>() else { continue };
        if !(spec.zone.is_empty() || spec.zone == cp.cfg.zone_name) || !online.contains(&ze.name) {
            continue;
        }
        if let Ok(port) = u32::try_from(spec.networking.port)
            && port != 0
        {
            out.push((spec.networking.address.clone(), port));
        }
    }
    out.sort();
    Ok(out)
}

/// Sleep until the snapshot's refresh time (forever when it has none).
async fn refresh_due(snap: Option<&ProxySnapshot>) {
    match snap.and_then(|s| s.refresh_at) {
        Some(t) => {
            let wait = t.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_first<T>(inbound: &mut Streaming<T>) -> Result<Option<T>, Status> {
    match tokio::time::timeout(std::time::Duration::from_secs(60), inbound.message()).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded("no discovery request within 60s")),
    }
}

/// Changes that can alter what a proxy is sent: not Zones, and of the insights only a
/// DataplaneInsight (a proxy joining or leaving changes the endpoints of others).
fn affects_xds(e: &ChangeEvent) -> bool {
    let t = e.rtype();
    (!t.descriptor().read_only || t == ResourceType::DataplaneInsight || t == ResourceType::ZoneEgressInsight)
        && t != ResourceType::Zone
}

async fn debounce(cp: &ZoneCp, events: &mut tokio::sync::broadcast::Receiver<ChangeEvent>) {
    tokio::time::sleep(cp.cfg.xds_debounce).await;
    while events.try_recv().is_ok() {}
}

/// What differs between a State of the World and a Delta stream; the stream loop
/// ([`run`]) is the same for both.
trait Protocol: Send {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    /// Logged when the stream ends with an error.
    const NAME: &'static str;
    fn node(req: &Self::Req) -> Option<&Node>;
    /// The response to a request, if one is due.
    fn on_request(&mut self, snap: &ProxySnapshot, node: &str, req: Self::Req) -> Option<Self::Resp>;
    /// The push of `type_url` after the snapshot changed, if anything changed for it.
    fn push(&mut self, snap: &ProxySnapshot, type_url: &str) -> Option<Self::Resp>;
    /// The types the proxy subscribed to.
    fn subscribed(&self) -> Vec<String>;
    /// The type whose response `req` accepts (ACK), if it does.
    fn acks(&self, req: &Self::Req) -> Option<String>;
}

impl Protocol for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "ADS";
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(&mut self, snap: &ProxySnapshot, node: &str, req: DiscoveryRequest) -> Option<DiscoveryResponse> {
        Sotw::on_request(self, snap, node, req)
    }
    fn push(&mut self, snap: &ProxySnapshot, type_url: &str) -> Option<DiscoveryResponse> {
        self.response(snap, type_url, false)
    }
    fn subscribed(&self) -> Vec<String> {
        Sotw::subscribed(self)
    }
    fn acks(&self, req: &DiscoveryRequest) -> Option<String> {
        Sotw::acks(self, req)
    }
}

impl Protocol for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta ADS";
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn on_request(
        &mut self,
        snap: &ProxySnapshot,
        node: &str,
        req: DeltaDiscoveryRequest,
    ) -> Option<DeltaDiscoveryResponse> {
        if let delta::Reply::Nack(reason) = delta::classify(&req) {
            tracing::warn!(node, type_url = %req.type_url, error = %reason, "proxy rejected (NACK) the configuration");
        }
        Delta::on_request(self, snap, &req)
    }
    fn push(&mut self, snap: &ProxySnapshot, type_url: &str) -> Option<DeltaDiscoveryResponse> {
        self.diff(snap, type_url, false)
    }
    fn subscribed(&self) -> Vec<String> {
        Delta::subscribed(self)
    }
    fn acks(&self, req: &DeltaDiscoveryRequest) -> Option<String> {
        (delta::classify(req) == delta::Reply::Ack).then(|| req.type_url.clone())
    }
}

/// One ADS stream: admit the proxy on its first request, answer requests, and push
/// what changed when the store changes (debounced) or a certificate is due for rotation.
///
/// A snapshot that cannot be built yet (`Unavailable`: a federated zone still waits for
/// the mesh CA from global) holds the stream, like Envoy's warming: requests queue, and
/// the first store change that makes it buildable answers them. A rebuild that fails that
/// way keeps the proxy on its last snapshot.
async fn run<P: Protocol>(
    cp: Arc<ZoneCp>,
    token: String,
    mut st: P,
    mut inbound: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
) -> Result<(), Status> {
    let Some(first) = recv_first(&mut inbound).await? else { return Ok(()) };
    let mut events = cp.store.events();
    let (id, _registration, online) = admit(&cp, P::node(&first), &token).await?;
    let mut snap = rebuild(&cp, &id, None).await?;
    let mut pending = std::collections::VecDeque::from([first]);
    let mut acked = BTreeSet::new();
    let mut ready = false;
    loop {
        if let Some(snap) = &snap {
            while let Some(req) = pending.pop_front() {
                if let Some(t) = st.acks(&req) {
                    acked.insert(t);
                }
                if let Some(n) = P::node(&req)
                    && !n.id.is_empty()
                    && n.id != id.node_id
                {
                    return Err(Status::invalid_argument(format!(
                        "node id changed from {} to {} on one stream",
                        id.node_id, n.id
                    )));
                }
                if let Some(resp) = st.on_request(snap, &id.node_id, req)
                    && tx.send(Ok(resp)).await.is_err()
                {
                    return Ok(());
                }
            }
            // Serving once its listeners (and, with mTLS, its certificates) are in place:
            // only then do other proxies get it as an endpoint.
            let secrets = snap.resources(generate::SECRET_TYPE).is_empty() || acked.contains(generate::SECRET_TYPE);
            if !ready && acked.contains(generate::LISTENER_TYPE) && secrets {
                ready = true;
                online.serving();
            }
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(r)) => { pending.push_back(r); continue; }
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::debug!(node = %id.node_id, error = %e, "{} stream ended", P::NAME);
                    return Ok(());
                }
            },
            c = next_change(&mut events, affects_xds) => {
                if c == Change::Closed {
                    return Ok(());
                }
                debounce(&cp, &mut events).await;
            }
            _ = refresh_due(snap.as_ref()) => {}
        }
        snap = rebuild(&cp, &id, snap).await?;
        let Some(snap) = &snap else { continue };
        for t in st.subscribed() {
            if let Some(resp) = st.push(snap, &t) {
                tracing::debug!(node = %id.node_id, type_url = %t, "push");
                if tx.send(Ok(resp)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The proxy's snapshot, or `previous` when it cannot be built yet or is still current.
async fn rebuild(cp: &ZoneCp, id: &ProxyId, previous: Option<ProxySnapshot>) -> Result<Option<ProxySnapshot>, Status> {
    match build_snapshot(cp, id, previous.as_ref()).await {
        Ok(Some(s)) => Ok(Some(s)),
        Ok(None) => Ok(previous),
        Err(e) if e.code() == tonic::Code::Unavailable => {
            tracing::warn!(node = %id.node_id, reason = %e.message(), "configuration on hold");
            Ok(previous)
        }
        Err(e) => Err(e),
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let token = token_from(req.metadata())?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let cp = self.cp.clone();
        tokio::spawn(async move {
            if let Err(status) = run(cp, token, Sotw::default(), inbound, tx.clone()).await {
                tracing::warn!(code = ?status.code(), message = %status.message(), "ADS stream refused");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let token = token_from(req.metadata())?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let cp = self.cp.clone();
        tokio::spawn(async move {
            if let Err(status) = run(cp, token, Delta::default(), inbound, tx.clone()).await {
                tracing::warn!(code = ?status.code(), message = %status.message(), "delta ADS stream refused");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
