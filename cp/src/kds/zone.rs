//! A federated zone's KDS client: dial global (`KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS`),
//! open both sync streams and a health check on one connection, and when any of them
//! ends, tear all down and dial again after a jittered backoff, forever. Meanwhile the
//! zone serves its proxies from what it last synced: the store keeps it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::protobuf::Struct;
use kuma_proto::kuma::mesh::v1alpha1::ZoneHealthCheckRequest;
use kuma_proto::kuma::mesh::v1alpha1::global_kds_service_client::GlobalKdsServiceClient;
use kuma_proto::kuma::mesh::v1alpha1::kds_sync_service_client::KdsSyncServiceClient;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::insight::{PeerInfo, Subscription};
use super::provider::Direction;
use super::sink::Side;
use super::stream::{Observer, consume, provide, subscribe};
use super::*;
use crate::context::Cp;
use crate::model::{Resource, ResourceType};

/// HTTP/2 keepalive of the KDS connection (Kuma: 15 s, and global permits it).
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Where and how to reach global, checked at start-up.
#[derive(Clone)]
pub struct Target {
    /// As configured (`grpcs://host:5685`).
    address: String,
    endpoint: Endpoint,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

impl Target {
    /// From `KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS` and the KDS TLS settings; every mistake is
    /// one sentence naming the variable.
    pub fn from_config(cfg: &crate::config::RunConfig) -> anyhow::Result<Target> {
        let address = cfg.global_address.clone().unwrap_or_default().trim().to_string();
        let (tls, rest) = if let Some(rest) = address.strip_prefix("grpcs://") {
            (true, rest)
        } else if let Some(rest) = address.strip_prefix("grpc://") {
            (false, rest)
        } else {
            bail!(
                "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS={address:?} must start with grpcs:// (TLS) or grpc:// \
                 (plain), e.g. grpcs://global-cp:5685"
            );
        };
        if rest.is_empty() || rest.contains('/') {
            bail!(
                "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS={address:?} must be <scheme>://host:port, e.g. grpcs://global-cp:5685"
            );
        }
        let url = format!("{}://{rest}", if tls { "https" } else { "http" });
        let mut trust = xds_client::Trust { skip_verify: cfg.kds_tls_skip_verify, ..Default::default() };
        if tls
            && !cfg.kds_tls_skip_verify
            && let Some(f) = &cfg.kds_root_ca_file
        {
            let pem = std::fs::read(f)
                .with_context(|| format!("cannot read KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE={}", f.display()))?;
            xds_client::check_ca_pem(&pem)
                .map_err(|e| anyhow::anyhow!("KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE={}: {e}", f.display()))?;
            trust.ca_pem = Some(pem);
        }
        let endpoint = xds_client::endpoint(&url, &trust)
            .map_err(|e| anyhow::anyhow!("KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS={address:?}: {e}"))?
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        Ok(Target { address, endpoint })
    }
}

/// A federated zone lists exactly one Zone, itself.
pub async fn ensure_own_zone(cp: &Cp) -> anyhow::Result<()> {
    if cp.store.get(ResourceType::Zone, "", &cp.cfg.zone_name).await?.is_none() {
        let mut z = Resource::new(ResourceType::Zone, "", &cp.cfg.zone_name);
        z.spec.insert("enabled".into(), Value::Bool(true));
        let _ = cp.store.upsert(z, Some(0)).await;
    }
    Ok(())
}

/// Dial global and sync, forever (until shutdown).
pub async fn run(cp: Arc<Cp>, target: Target, mut shutdown: watch::Receiver<bool>) {
    let mut retry =
        xds_client::Retry::new(xds_client::Backoff { initial: cp.cfg.kds_base_backoff, max: cp.cfg.kds_max_backoff });
    // The same failure again and again is said once (then at debug) until something changes.
    let mut last_error: Option<String> = None;
    loop {
        let outcome = tokio::select! {
            r = session(&cp, &target) => r,
            _ = shutdown.changed() => return,
        };
        match outcome {
            Ok(synced) => {
                if synced {
                    retry.reset();
                }
                last_error = None;
                tracing::info!(global = %target, "KDS: disconnected from global; the zone keeps serving its last synced state");
            }
            Err(e) if last_error.as_ref() == Some(&e) => {
                tracing::debug!(global = %target, error = %e, "KDS: still cannot connect to global")
            }
            Err(e) => {
                tracing::warn!(global = %target, error = %e, "KDS: cannot sync with global; the zone keeps serving its last synced state and retries");
                last_error = Some(e);
            }
        }
        let delay = retry.next_delay();
        tracing::debug!(global = %target, retry_in = ?delay, "KDS: reconnecting to global");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One connection: returns `Ok(true)` when it got as far as syncing, `Ok(false)` when it
/// was closed before, and the reason when it failed. Whichever stream ends first ends the
/// session (Kuma tears down all streams of a connection on any error).
async fn session(cp: &Arc<Cp>, target: &Target) -> Result<bool, String> {
    let channel = target.endpoint.connect().await.map_err(|e| explain_connect(&xds_client::error_chain(&e)))?;
    tracing::info!(global = %target, zone = %cp.cfg.zone_name, "KDS: connected to global");
    let max = cp.cfg.kds_max_msg_size;
    let client = KdsSyncServiceClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let synced = std::sync::atomic::AtomicBool::new(false);
    let result = tokio::select! {
        r = global_to_zone(cp, client.clone(), &synced) => r,
        r = zone_to_global(cp, client, &synced) => r,
        () = health_checks(cp, channel) => Ok(()),
    };
    let synced = synced.load(std::sync::atomic::Ordering::Relaxed);
    result.map(|()| synced).map_err(|e| explain_connect(e.message()))
}

/// GlobalToZoneSync: subscribe to what global provides and apply it.
async fn global_to_zone(
    cp: &Arc<Cp>,
    mut client: KdsSyncServiceClient<Channel>,
    synced: &std::sync::atomic::AtomicBool,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    let types = types_sent_by_global();
    subscribe(&types, &node(cp), &tx).await?;
    let mut inbound = client.global_to_zone_sync(with_metadata(cp, ReceiverStream::new(rx))).await?.into_inner();
    synced.store(true, std::sync::atomic::Ordering::Relaxed);
    let observer = Observer { peer: "global".into(), subscription: None };
    let r = consume(cp, Side::Zone, true, &types, &observer, &mut inbound, &tx).await;
    tracing::info!(error = ?r.as_ref().err().map(|e| e.message().to_string()), "KDS: GlobalToZoneSync ended");
    r
}

/// ZoneToGlobalSync: global subscribes to what this zone provides, and we answer.
async fn zone_to_global(
    cp: &Arc<Cp>,
    mut client: KdsSyncServiceClient<Channel>,
    synced: &std::sync::atomic::AtomicBool,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryResponse>(64);
    let mut inbound = client.zone_to_global_sync(with_metadata(cp, ReceiverStream::new(rx))).await?.into_inner();
    let Some(first) = inbound.message().await? else { return Ok(()) };
    synced.store(true, std::sync::atomic::Ordering::Relaxed);
    // Global names itself in its first request: our own ZoneInsight records the pair.
    let md = node_metadata(first.node.as_ref().and_then(|n| n.metadata.as_ref()));
    let info = PeerInfo {
        global_instance_id: md.get(MD_CONTROL_PLANE_ID).and_then(Value::as_str).unwrap_or_default().to_string(),
        zone_instance_id: cp.instance_id.clone(),
        version: md.get(MD_VERSION).cloned(),
        config: config_json(cp),
        auth_token_provided: false,
    };
    let sub =
        Subscription::open(cp, &cp.cfg.zone_name, info).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
    let observer = Observer { peer: "global".into(), subscription: Some(sub.clone()) };
    let dir = Direction::ZoneToGlobal { zone: cp.cfg.zone_name.clone() };
    let r = provide(cp, dir, &observer, Some(first), &mut inbound, &tx).await;
    sub.close().await;
    tracing::info!(error = ?r.as_ref().err().map(|e| e.message().to_string()), "KDS: ZoneToGlobalSync ended");
    r
}

/// `GlobalKDSService.HealthCheck` at the interval global asks for; never ends on its own
/// (an older global without it answers `Unimplemented`, and then we just stop asking).
async fn health_checks(cp: &Arc<Cp>, channel: Channel) {
    let mut client = GlobalKdsServiceClient::new(channel);
    let mut interval = Duration::from_secs(10);
    loop {
        match client.health_check(with_metadata(cp, ZoneHealthCheckRequest {})).await {
            Ok(resp) => {
                if let Some(d) = resp.into_inner().interval.filter(|d| d.seconds > 0) {
                    interval = Duration::from_secs(d.seconds.unsigned_abs());
                }
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => std::future::pending::<()>().await,
            Err(e) => tracing::debug!(error = %e.message(), "KDS: health check failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Zone metadata on every call: who we are and what we can do.
fn with_metadata<T>(cp: &Cp, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    if let Ok(v) = MetadataValue::try_from(cp.cfg.zone_name.as_str()) {
        md.insert(CLIENT_ID, v);
    }
    md.insert(VERSION_HEADER, MetadataValue::from_static(KUMA_VERSION));
    md.insert(KDS_VERSION_HEADER, MetadataValue::from_static(KDS_VERSION));
    md.append(FEATURES_HEADER, MetadataValue::from_static(FEATURE_ZONE_PING_HEALTH));
    md.append(FEATURES_HEADER, MetadataValue::from_static(FEATURE_HASH_SUFFIX));
    req
}

/// The node of our requests: the zone's name, and its version, config, instance and features.
fn node(cp: &Cp) -> Node {
    let mut md = Struct::default();
    md.fields.insert(MD_VERSION.into(), to_pb(&version_json()));
    md.fields.insert(MD_CONFIG.into(), to_pb(&json!(config_json(cp))));
    md.fields.insert(MD_CONTROL_PLANE_ID.into(), to_pb(&json!(cp.instance_id)));
    md.fields.insert(MD_FEATURES.into(), to_pb(&json!(NODE_FEATURES)));
    Node { id: cp.cfg.zone_name.clone(), metadata: Some(md), ..Default::default() }
}

/// One sentence for a failed dial, naming the variables that fix a certificate problem.
fn explain_connect(e: &str) -> String {
    if e.contains("certificate") || e.contains("UnknownIssuer") || e.contains("invalid peer") {
        format!(
            "{e}: global's certificate cannot be verified; set KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE to global's \
             kuma-cp.crt (or KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY=true to skip verification)"
        )
    } else {
        e.to_string()
    }
}
