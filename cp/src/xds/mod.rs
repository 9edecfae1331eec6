//! ADS server (SotW and Delta) for zone proxies and data plane proxies.

pub mod dynconf;
pub mod generate;
pub mod sidecar;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::{Struct, value};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{DpProxyAuth, ZoneProxyAuth};
use crate::context::{Cp, Lifecycle, OnlineGuard, Registration};
use crate::model::{DataplaneSpec, MeshSpec, Resource, ResourceType, ZoneIngressSpec};
use generate::{IngressInputs, Named, ProxySnapshot};

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Max gRPC message size accepted from proxies (requests are small; 4 MiB as gRPC default).
const MAX_DECODE: usize = 4 * 1024 * 1024;

/// The ADS gRPC service.
#[derive(Clone)]
pub struct Ads {
    cp: Arc<Cp>,
}

pub fn service(cp: Arc<Cp>) -> AggregatedDiscoveryServiceServer<Ads> {
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
    /// The proxy is `dp` (node metadata `version.envoy.build` is `dp/...`): its TLS
    /// client sends only DNS-valid SNI, so it gets `dns_sni_alias` names.
    pub dns_sni_only: bool,
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
    cp: &Arc<Cp>,
    node: Option<&Node>,
    token: &str,
) -> Result<(ProxyId, Option<Registration>, OnlineGuard), Status> {
    let node = node.ok_or_else(|| Status::invalid_argument("the first discovery request must carry a node"))?;
    let (mesh, name) = node
        .id
        .split_once('.')
        .ok_or_else(|| Status::invalid_argument(format!("node id {:?} is not <mesh>.<name>", node.id)))?;
    let md = node.metadata.clone().unwrap_or_default();
    let proxy_type = struct_string(&md, "dataplane.proxyType").unwrap_or_else(|| "dataplane".into());
    let rtype = match proxy_type.as_str() {
        "dataplane" | "" => ResourceType::Dataplane,
        "ingress" => ResourceType::ZoneIngress,
        "egress" => ResourceType::ZoneEgress,
        other => return Err(Status::invalid_argument(format!("unknown dataplane.proxyType {other:?}"))),
    };
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

    let registration = match inline {
        Some(r) => Some(Lifecycle::register(cp, r).await.map_err(Status::failed_precondition)?),
        None => None,
    };
    let online = cp.mark_online((rtype, mesh.clone(), name.clone()));
    let dns_port = struct_string(&md, "dataplane.dns.port").and_then(|p| p.trim().parse::<u32>().ok()).unwrap_or(0);
    let features = struct_strings(&md, "features");
    let workdir = struct_string(&md, "workdir").unwrap_or_default();
    let dns_sni_only = match md.fields.get("version").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StructValue(v)) => match v.fields.get("envoy").and_then(|e| e.kind.as_ref()) {
            Some(value::Kind::StructValue(e)) => struct_string(e, "build").is_some_and(|b| b.starts_with("dp/")),
            _ => false,
        },
        _ => false,
    };
    let id = ProxyId { rtype, mesh, name, node_id: node.id.clone(), dns_port, features, workdir, dns_sni_only };
    tracing::info!(node = %id.node_id, kind = rtype.name(), "ADS stream authenticated");
    Ok((id, registration, online))
}

/// Build the current snapshot of a proxy from the store.
pub async fn build_snapshot(cp: &Cp, id: &ProxyId) -> Result<ProxySnapshot, Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    match id.rtype {
        ResourceType::ZoneIngress => {
            let Some(zi) = cp.store.get(ResourceType::ZoneIngress, "", &id.name).await.map_err(internal)? else {
                return Ok(generate::empty());
            };
            let spec: ZoneIngressSpec = zi.typed().map_err(|e| Status::internal(e.to_string()))?;
            let meshes = cp.store.list(ResourceType::Mesh, None).await.map_err(internal)?;
            let dataplanes = cp.store.list(ResourceType::Dataplane, None).await.map_err(internal)?;
            Ok(generate::ingress(&IngressInputs {
                zone: &cp.cfg.zone_name,
                node_id: &id.node_id,
                ingress: &spec,
                meshes: &meshes,
                dataplanes: &dataplanes,
            }))
        }
        ResourceType::Dataplane => dataplane_snapshot(cp, id).await,
        _ => Ok(generate::empty()),
    }
}

async fn dataplane_snapshot(cp: &Cp, id: &ProxyId) -> Result<ProxySnapshot, Status> {
    let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
    let Some(dp) = cp.store.get(ResourceType::Dataplane, &id.mesh, &id.name).await.map_err(internal)? else {
        return Ok(generate::empty());
    };
    let Some(mesh) = cp.store.get(ResourceType::Mesh, "", &id.mesh).await.map_err(internal)? else {
        return Ok(generate::empty());
    };
    let mesh_spec: MeshSpec = mesh.typed().unwrap_or_default();
    let mut refresh_at = None;
    let tls = match mesh_spec.enabled_backend() {
        Some(backend) if backend.backend_type == "builtin" => {
            let ca = cp
                .ca
                .ensure_ca(&cp.store, &id.mesh, &backend.name)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let spec: DataplaneSpec = dp.typed().unwrap_or_default();
            let mut tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for inb in spec.networking.map(|n| n.inbound).unwrap_or_default() {
                for (k, v) in inb.tags {
                    tags.entry(k).or_default().insert(v);
                }
            }
            let cert = cp
                .ca
                .identity(&ca, &id.mesh, &id.name, &tags, backend.dp_cert_lifetime())
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            // At least a second apart, whatever the configured lifetime.
            let floor = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
            refresh_at = Some(cert.rotate_at().max(floor));
            Some(sidecar::SidecarTls { ca_pem: ca.cert_pem, cert_pem: cert.cert_pem, key_pem: cert.key_pem })
        }
        Some(backend) => {
            tracing::warn!(mesh = %id.mesh, backend = %backend.name, kind = %backend.backend_type, "only builtin mTLS backends are supported; serving the proxy without mTLS");
            None
        }
        None => None,
    };
    let dataplanes = cp.store.list(ResourceType::Dataplane, Some(&id.mesh)).await.map_err(internal)?;
    let ingresses = cp.store.list(ResourceType::ZoneIngress, None).await.map_err(internal)?;
    let vips = crate::vips::load(cp.store.as_ref(), &id.mesh).await;
    let mut snap = sidecar::sidecar(&sidecar::SidecarInputs {
        zone: &cp.cfg.zone_name,
        dataplane: &dp,
        dataplanes: &dataplanes,
        ingresses: &ingresses,
        vips: &vips,
        dns_port: id.dns_port,
        features: &id.features,
        workdir: &id.workdir,
        tls,
        dns_sni_only: id.dns_sni_only,
    });
    snap.refresh_at = refresh_at;
    Ok(snap)
}

/// Sleep until the snapshot's refresh time (forever when it has none).
async fn refresh_due(snap: &ProxySnapshot) {
    match snap.refresh_at {
        Some(t) => {
            let wait = t.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

/// Version of a set of resources as sent in one SotW response.
fn set_version(items: &[&Named]) -> String {
    let mut s = String::new();
    for n in items {
        s.push_str(&n.name);
        s.push('=');
        s.push_str(&n.version);
        s.push(';');
    }
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn select<'a>(snap: &'a ProxySnapshot, type_url: &str, names: &[String]) -> Vec<&'a Named> {
    let all = snap.resources(type_url);
    if names.is_empty() || names.iter().any(|n| n == "*") {
        all.iter().collect()
    } else {
        all.iter().filter(|n| names.contains(&n.name)).collect()
    }
}

#[derive(Default)]
struct SotwType {
    names: Vec<String>,
    sent_version: Option<String>,
    nonce: String,
}

struct Sotw {
    types: BTreeMap<String, SotwType>,
    nonce: u64,
}

impl Sotw {
    fn response(&mut self, snap: &ProxySnapshot, type_url: &str, force: bool) -> Option<DiscoveryResponse> {
        let st = self.types.get_mut(type_url)?;
        let items = select(snap, type_url, &st.names);
        let version = set_version(&items);
        if !force && st.sent_version.as_deref() == Some(version.as_str()) {
            return None;
        }
        self.nonce += 1;
        st.nonce = self.nonce.to_string();
        st.sent_version = Some(version.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources: items.iter().map(|n| n.any.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: st.nonce.clone(),
            ..Default::default()
        })
    }

    /// Handle one request; returns the response to send, if any.
    fn on_request(&mut self, snap: &ProxySnapshot, node: &str, r: DiscoveryRequest) -> Option<DiscoveryResponse> {
        let st = self.types.entry(r.type_url.clone()).or_default();
        if !r.response_nonce.is_empty() && r.response_nonce != st.nonce {
            return None; // stale: answered by a newer response already
        }
        if let Some(err) = &r.error_detail {
            tracing::warn!(node, type_url = %r.type_url, version = %r.version_info, error = %err.message, "proxy rejected (NACK) the configuration");
            return None;
        }
        let names_changed = st.names != r.resource_names;
        st.names = r.resource_names.clone();
        let first = st.sent_version.is_none();
        // A request carrying a version other than the one we sent (e.g. after reconnecting),
        // or changed names, or the first request of a type: answer.
        let client_behind = r.version_info != st.sent_version.clone().unwrap_or_default();
        self.response(snap, &r.type_url, first || names_changed || (client_behind && r.response_nonce.is_empty()))
    }
}

async fn recv_first<T>(inbound: &mut Streaming<T>) -> Result<Option<T>, Status> {
    match tokio::time::timeout(std::time::Duration::from_secs(60), inbound.message()).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded("no discovery request within 60s")),
    }
}

async fn debounce(cp: &Cp, changes: &mut tokio::sync::watch::Receiver<u64>) {
    tokio::time::sleep(cp.cfg.xds_debounce).await;
    changes.borrow_and_update();
}

#[derive(Default)]
struct DeltaType {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has: name -> version.
    client_has: BTreeMap<String, String>,
}

struct Delta {
    types: BTreeMap<String, DeltaType>,
    nonce: u64,
}

impl Delta {
    fn diff(&mut self, snap: &ProxySnapshot, type_url: &str, force: bool) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.get_mut(type_url)?;
        let all = snap.resources(type_url);
        let desired: Vec<&Named> = all.iter().filter(|n| st.wildcard || st.names.contains(&n.name)).collect();
        let updated: Vec<&Named> =
            desired.iter().copied().filter(|n| st.client_has.get(&n.name) != Some(&n.version)).collect();
        let desired_names: BTreeSet<&str> = desired.iter().map(|n| n.name.as_str()).collect();
        let removed: Vec<String> =
            st.client_has.keys().filter(|k| !desired_names.contains(k.as_str())).cloned().collect();
        if updated.is_empty() && removed.is_empty() && !force {
            return None;
        }
        for n in &updated {
            st.client_has.insert(n.name.clone(), n.version.clone());
        }
        for r in &removed {
            st.client_has.remove(r);
        }
        self.nonce += 1;
        let all_refs: Vec<&Named> = all.iter().collect();
        Some(DeltaDiscoveryResponse {
            system_version_info: set_version(&all_refs),
            resources: updated
                .iter()
                .map(|n| DeltaResource {
                    name: n.name.clone(),
                    version: n.version.clone(),
                    resource: Some(n.any.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
            ..Default::default()
        })
    }

    fn on_request(
        &mut self,
        snap: &ProxySnapshot,
        node: &str,
        r: DeltaDiscoveryRequest,
    ) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.entry(r.type_url.clone()).or_default();
        if let Some(err) = &r.error_detail {
            tracing::warn!(node, type_url = %r.type_url, error = %err.message, "proxy rejected (NACK) the configuration");
        }
        let first = !st.subscribed;
        if first {
            st.subscribed = true;
            st.wildcard = r.resource_names_subscribe.is_empty();
            for (k, v) in &r.initial_resource_versions {
                st.client_has.insert(k.clone(), v.clone());
            }
        }
        for n in &r.resource_names_subscribe {
            if n == "*" {
                st.wildcard = true;
            } else {
                st.names.insert(n.clone());
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(n);
                st.client_has.remove(n);
            }
        }
        // ACK/NACK only: nothing new to say unless subscriptions changed.
        if !first && r.resource_names_subscribe.is_empty() && r.resource_names_unsubscribe.is_empty() {
            return None;
        }
        self.diff(snap, &r.type_url, first)
    }
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
        self.types.keys().cloned().collect()
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
        Delta::on_request(self, snap, node, req)
    }
    fn push(&mut self, snap: &ProxySnapshot, type_url: &str) -> Option<DeltaDiscoveryResponse> {
        self.diff(snap, type_url, false)
    }
    fn subscribed(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
}

/// One ADS stream: admit the proxy on its first request, answer requests, and push
/// what changed when the store changes (debounced) or a certificate is due for rotation.
async fn run<P: Protocol>(
    cp: Arc<Cp>,
    token: String,
    mut st: P,
    mut inbound: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
) -> Result<(), Status> {
    let Some(first) = recv_first(&mut inbound).await? else { return Ok(()) };
    let mut changes = cp.store.subscribe();
    changes.borrow_and_update();
    let (id, _registration, _online) = admit(&cp, P::node(&first), &token).await?;
    let mut snap = build_snapshot(&cp, &id).await?;
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            if let Some(n) = P::node(&req)
                && !n.id.is_empty()
                && n.id != id.node_id
            {
                return Err(Status::invalid_argument(format!(
                    "node id changed from {} to {} on one stream",
                    id.node_id, n.id
                )));
            }
            if let Some(resp) = st.on_request(&snap, &id.node_id, req)
                && tx.send(Ok(resp)).await.is_err()
            {
                return Ok(());
            }
            continue;
        }
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(r)) => next = Some(r),
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::debug!(node = %id.node_id, error = %e, "{} stream ended", P::NAME);
                    return Ok(());
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                debounce(&cp, &mut changes).await;
            }
            _ = refresh_due(&snap) => {}
        }
        snap = build_snapshot(&cp, &id).await?;
        for t in st.subscribed() {
            if let Some(resp) = st.push(&snap, &t) {
                tracing::debug!(node = %id.node_id, type_url = %t, "push");
                if tx.send(Ok(resp)).await.is_err() {
                    return Ok(());
                }
            }
        }
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
            if let Err(status) = run(cp, token, Sotw { types: BTreeMap::new(), nonce: 0 }, inbound, tx.clone()).await {
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
            if let Err(status) = run(cp, token, Delta { types: BTreeMap::new(), nonce: 0 }, inbound, tx.clone()).await {
                tracing::warn!(code = ?status.code(), message = %status.message(), "delta ADS stream refused");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
