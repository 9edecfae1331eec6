//! Global's KDS server (`:5685`): `KDSSyncService` (both sync streams) and
//! `GlobalKDSService` (health checks; the Envoy-admin reverse streams answer
//! `Unimplemented`, which Kuma zones take as "older global, carry on").
//!
//! A zone is known by its `client-id` metadata only (Kuma OSS has no KDS
//! authentication). Its Zone is created on first connect; each `GlobalToZoneSync` stream
//! is a subscription in its ZoneInsight, closed when the stream ends.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, Struct};
use kuma_proto::kuma::mesh::v1alpha1::global_kds_service_server::{GlobalKdsService, GlobalKdsServiceServer};
use kuma_proto::kuma::mesh::v1alpha1::kds_sync_service_server::{KdsSyncService, KdsSyncServiceServer};
use kuma_proto::kuma::mesh::v1alpha1::{
    ClustersRequest, ClustersResponse, StatsRequest, StatsResponse, XdsConfigRequest, XdsConfigResponse,
    ZoneHealthCheckRequest, ZoneHealthCheckResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status, Streaming};

use super::insight::{PeerInfo, Subscription, create_zone_if_absent};
use super::mapper::PeerZone;
use super::provider::Direction;
use super::sink::Side;
use super::stream::{Observer, consume, provide, subscribe};
use super::{CLIENT_ID, FEATURE_HASH_SUFFIX, FEATURES_HEADER, MD_CONFIG, MD_CONTROL_PLANE_ID, MD_VERSION};
use crate::context::Cp;

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often zones are told to health-check (Kuma's `zoneHealthCheck.pollInterval`).
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// No first request within this long ends a stream.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The KDS port's routes: both gRPC services, and a sentence for a `dp` pointed here.
pub fn router(cp: Arc<Cp>) -> Router {
    let max = cp.cfg.kds_max_msg_size;
    let sync = KdsSyncServiceServer::new(Kds { cp: cp.clone() })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let health = GlobalKdsServiceServer::new(Kds { cp })
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    tonic::service::Routes::new(sync)
        .add_service(health)
        .prepare()
        .into_axum_router()
        .route("/bootstrap", axum::routing::post(not_a_dp_server))
}

/// `POST /bootstrap` on global: a data plane proxy was pointed at the wrong control plane.
async fn not_a_dp_server() -> axum::response::Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        "this is the global control plane's KDS port, which serves zones only: point --cp-address at a zone \
         control plane's DP server (https://<zone cp>:5678)",
    )
        .into_response()
}

#[derive(Clone)]
struct Kds {
    cp: Arc<Cp>,
}

/// The zone of a request: its `client-id` metadata.
fn zone_of<T>(req: &Request<T>) -> Result<String, Status> {
    let zone = req
        .metadata()
        .get(CLIENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|z| !z.is_empty())
        .ok_or_else(|| Status::invalid_argument("KDS: the `client-id` metadata (the zone's name) is missing"))?;
    if !kuma_model::resource::rfc1123_name(zone) {
        return Err(Status::invalid_argument(format!("KDS: zone name {zone:?} is not a lower-case RFC 1123 name")));
    }
    Ok(zone.to_string())
}

fn hash_suffix<T>(req: &Request<T>) -> bool {
    super::metadata_values(req.metadata(), FEATURES_HEADER).iter().any(|f| f == FEATURE_HASH_SUFFIX)
}

fn peer_info(cp: &Cp, node: Option<&Node>, auth: bool) -> PeerInfo {
    let md = super::node_metadata(node.and_then(|n| n.metadata.as_ref()));
    PeerInfo {
        global_instance_id: cp.instance_id.clone(),
        zone_instance_id: md.get(MD_CONTROL_PLANE_ID).and_then(|v| v.as_str()).unwrap_or_default().to_string(),
        version: md.get(MD_VERSION).cloned(),
        config: md.get(MD_CONFIG).and_then(|v| v.as_str()).unwrap_or_default().to_string(),
        auth_token_provided: auth,
    }
}

async fn first_request(
    inbound: &mut Streaming<DeltaDiscoveryRequest>,
) -> Result<Option<DeltaDiscoveryRequest>, Status> {
    match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded("KDS: no request within 60s")),
    }
}

#[tonic::async_trait]
impl KdsSyncService for Kds {
    type GlobalToZoneSyncStream = RespStream<DeltaDiscoveryResponse>;
    type ZoneToGlobalSyncStream = RespStream<DeltaDiscoveryRequest>;

    async fn global_to_zone_sync(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::GlobalToZoneSyncStream>, Status> {
        let zone = zone_of(&req)?;
        let peer = PeerZone { name: zone.clone(), hash_suffix: hash_suffix(&req) };
        let auth = req.metadata().get("authorization").is_some();
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryResponse>(16);
        let cp = self.cp.clone();
        tokio::spawn(async move {
            let result = async {
                create_zone_if_absent(&cp, &zone).await.map_err(|e| Status::internal(e.to_string()))?;
                let Some(first) = first_request(&mut inbound).await? else { return Ok(()) };
                let info = peer_info(&cp, first.node.as_ref(), auth);
                let sub = Subscription::open(&cp, &zone, info).await.map_err(|e| Status::internal(e.to_string()))?;
                tracing::info!(zone = %zone, "KDS: zone connected (GlobalToZoneSync)");
                let obs = Observer { peer: zone.clone(), subscription: Some(sub.clone()) };
                let r = provide(&cp, Direction::GlobalToZone(peer), &obs, Some(first), &mut inbound, &tx).await;
                sub.close().await;
                r
            }
            .await;
            match result {
                Ok(()) => tracing::info!(zone = %zone, "KDS: zone disconnected (GlobalToZoneSync)"),
                Err(e) => {
                    tracing::info!(zone = %zone, error = %e.message(), "KDS: zone disconnected (GlobalToZoneSync)")
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }

    async fn zone_to_global_sync(
        &self,
        req: Request<Streaming<DeltaDiscoveryResponse>>,
    ) -> Result<Response<Self::ZoneToGlobalSyncStream>, Status> {
        let zone = zone_of(&req)?;
        let hash = hash_suffix(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        let cp = self.cp.clone();
        tokio::spawn(async move {
            let result = async {
                create_zone_if_absent(&cp, &zone).await.map_err(|e| Status::internal(e.to_string()))?;
                tracing::info!(zone = %zone, "KDS: zone connected (ZoneToGlobalSync)");
                // Global's subscription names the zone as the node and itself as the control plane.
                let mut md = Struct::default();
                md.fields.insert(MD_CONTROL_PLANE_ID.into(), super::to_pb(&serde_json::json!(cp.instance_id)));
                md.fields.insert(MD_CONFIG.into(), super::to_pb(&serde_json::json!("")));
                md.fields.insert(MD_VERSION.into(), super::to_pb(&super::version_json()));
                let node = Node { id: zone.clone(), metadata: Some(md), ..Default::default() };
                let obs = Observer { peer: zone.clone(), subscription: None };
                let types = super::types_sent_by_zone();
                subscribe(&types, &node, &tx).await?;
                consume(&cp, Side::Global { zone: &zone }, hash, &types, &obs, &mut inbound, &tx).await
            }
            .await;
            match result {
                Ok(()) => tracing::info!(zone = %zone, "KDS: zone disconnected (ZoneToGlobalSync)"),
                Err(e) => {
                    tracing::info!(zone = %zone, error = %e.message(), "KDS: zone disconnected (ZoneToGlobalSync)")
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

#[tonic::async_trait]
impl GlobalKdsService for Kds {
    type StreamXDSConfigsStream = RespStream<XdsConfigRequest>;
    type StreamStatsStream = RespStream<StatsRequest>;
    type StreamClustersStream = RespStream<ClustersRequest>;

    async fn stream_xds_configs(
        &self,
        _req: Request<Streaming<XdsConfigResponse>>,
    ) -> Result<Response<Self::StreamXDSConfigsStream>, Status> {
        Err(Status::unimplemented("Envoy admin through global is not supported; ask the zone control plane"))
    }

    async fn stream_stats(
        &self,
        _req: Request<Streaming<StatsResponse>>,
    ) -> Result<Response<Self::StreamStatsStream>, Status> {
        Err(Status::unimplemented("Envoy admin through global is not supported; ask the zone control plane"))
    }

    async fn stream_clusters(
        &self,
        _req: Request<Streaming<ClustersResponse>>,
    ) -> Result<Response<Self::StreamClustersStream>, Status> {
        Err(Status::unimplemented("Envoy admin through global is not supported; ask the zone control plane"))
    }

    async fn health_check(
        &self,
        req: Request<ZoneHealthCheckRequest>,
    ) -> Result<Response<ZoneHealthCheckResponse>, Status> {
        let zone = zone_of(&req)?;
        tracing::debug!(zone = %zone, "KDS: health check");
        let interval = PbDuration { seconds: HEALTH_CHECK_INTERVAL.as_secs() as i64, nanos: 0 };
        Ok(Response::new(ZoneHealthCheckResponse { interval: Some(interval) }))
    }
}
