//! The two loops every KDS stream runs, whichever side opened it:
//!
//! * [`provide`]: read `DeltaDiscoveryRequest`s, answer with `DeltaDiscoveryResponse`s of
//!   this side's resources, and push what changes (global on `GlobalToZoneSync`, the zone
//!   on `ZoneToGlobalSync`);
//! * [`consume`]: subscribe to every type, apply each response to the store, ACK or NACK
//!   it (the zone on `GlobalToZoneSync`, global on `ZoneToGlobalSync`).

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::codec;
use super::insight::{Outcome, Subscription};
use super::metrics::Event;
use super::provider::{self, Direction};
use super::sink::{self, Batch, Side};
use crate::context::Cp;
use crate::model::{ResourceType, validate};
use crate::store::{Change, next_change};
use crate::xds::delta::{Delta, Reply, classify};
use crate::xds::generate::ProxySnapshot;

/// gRPC `INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Where the counters of a stream go.
pub struct Observer {
    /// The other side: a zone's name on global, `global` on a zone.
    pub peer: String,
    /// The ZoneInsight subscription the stream reports to, if any.
    pub subscription: Option<Arc<Subscription>>,
}

impl Observer {
    fn record(&self, cp: &Cp, rtype: &str, outcome: Outcome) {
        if let Some(s) = &self.subscription {
            s.record(rtype, outcome);
        }
        let event = match outcome {
            Outcome::Sent => Event::ResponsesSent,
            Outcome::Acked => Event::ResponsesAcked,
            Outcome::Rejected => Event::ResponsesNacked,
        };
        cp.kds_metrics.add(event, &self.peer, rtype, 1);
    }
}

/// Serve this side's resources over a stream of requests until it ends. `first` is a
/// request already read from `inbound`.
pub async fn provide(
    cp: &Arc<Cp>,
    dir: Direction,
    obs: &Observer,
    first: Option<DeltaDiscoveryRequest>,
    inbound: &mut Streaming<DeltaDiscoveryRequest>,
    tx: &mpsc::Sender<DeltaDiscoveryResponse>,
) -> Result<(), tonic::Status> {
    let mut events = cp.store.events();
    let (mut snap, mut memo) = (ProxySnapshot::default(), provider::Memo::default());
    let all: BTreeSet<ResourceType> = dir.types().into_iter().collect();
    provider::refresh(cp, &dir, &all, &mut snap, &mut memo)
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut delta = Delta::default();
    let mut next = first;
    let mut announced: BTreeSet<String> = BTreeSet::new();
    loop {
        if let Some(req) = next.take() {
            match classify(&req) {
                Reply::Subscribe => {}
                Reply::Ack => obs.record(cp, &req.type_url, Outcome::Acked),
                Reply::Nack(reason) => {
                    obs.record(cp, &req.type_url, Outcome::Rejected);
                    tracing::warn!(peer = %obs.peer, kind = %req.type_url, %reason, "KDS: the other side rejected (NACK) resources");
                }
            }
            if let Some(resp) = delta.on_request(&snap, &req) {
                send(cp, obs, tx, resp, &mut announced).await?;
            }
            continue;
        }
        let mut dirty = BTreeSet::new();
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(r)) => { next = Some(r); continue; }
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            },
            c = next_change(&mut events, |e| dir.types().contains(&e.rtype()) || e.rtype() == ResourceType::Zone) => {
                match c {
                    Change::Closed => return Ok(()),
                    Change::Lagged => dirty.extend(all.iter().copied()),
                    Change::Event(e) => dirty.extend(dir.touched(&e)),
                }
                tokio::time::sleep(cp.cfg.xds_debounce).await;
                // What changed during the debounce is folded into this refresh.
                loop {
                    match events.try_recv() {
                        Ok(e) => dirty.extend(dir.touched(&e)),
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => dirty.extend(all.iter().copied()),
                        Err(_) => break,
                    }
                }
            }
        }
        provider::refresh(cp, &dir, &dirty, &mut snap, &mut memo)
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        for t in delta.subscribed() {
            if let Some(resp) = delta.diff(&snap, &t, false) {
                send(cp, obs, tx, resp, &mut announced).await?;
            }
        }
    }
}

async fn send(
    cp: &Cp,
    obs: &Observer,
    tx: &mpsc::Sender<DeltaDiscoveryResponse>,
    resp: DeltaDiscoveryResponse,
    announced: &mut BTreeSet<String>,
) -> Result<(), tonic::Status> {
    let (t, n, removed) = (resp.type_url.clone(), resp.resources.len(), resp.removed_resources.len());
    cp.kds_metrics.add(Event::ResourcesSent, &obs.peer, &t, n as u64);
    obs.record(cp, &t, Outcome::Sent);
    if announced.insert(t.clone()) {
        // One line per type that has something; empty first syncs only at debug.
        if n > 0 {
            tracing::info!(peer = %obs.peer, kind = %t, resources = n, "KDS: first sync of this type sent");
        } else {
            tracing::debug!(peer = %obs.peer, kind = %t, "KDS: first sync of this type sent (empty)");
        }
    } else {
        tracing::debug!(peer = %obs.peer, kind = %t, resources = n, removed, "KDS: changes sent");
    }
    tx.send(resp).await.map_err(|_| tonic::Status::cancelled("the stream closed"))
}

/// Subscribe to every one of `types`, wildcard (each initial request carries `node`).
/// Queue these before awaiting the call: a Kuma global answers the call only once it has
/// read them.
pub async fn subscribe(
    types: &[ResourceType],
    node: &Node,
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
) -> Result<(), tonic::Status> {
    for t in types {
        let req = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.name().to_string(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        tx.send(req).await.map_err(|_| tonic::Status::cancelled("the stream closed"))?;
    }
    Ok(())
}

/// Apply every response to the store and ACK or NACK it, until the stream ends. A store
/// failure ends the stream (the peer reconnects and sends everything again).
pub async fn consume(
    cp: &Arc<Cp>,
    side: Side<'_>,
    hash_suffix_peer: bool,
    types: &[ResourceType],
    obs: &Observer,
    inbound: &mut Streaming<DeltaDiscoveryResponse>,
    tx: &mpsc::Sender<DeltaDiscoveryRequest>,
) -> Result<(), tonic::Status> {
    let mut synced: BTreeSet<ResourceType> = BTreeSet::new();
    while let Some(resp) = inbound.message().await? {
        let Some(rtype) = ResourceType::from_name(&resp.type_url).filter(|t| types.contains(t)) else {
            let reason = format!("type {:?} was not subscribed", resp.type_url);
            tracing::warn!(peer = %obs.peer, %reason, "KDS: response refused");
            tx.send(nack(&resp, &reason)).await.map_err(|_| tonic::Status::cancelled("the stream closed"))?;
            continue;
        };
        let initial = synced.insert(rtype);
        let batch = decode_batch(side, hash_suffix_peer, rtype, &resp);
        let local = cp.store.list_shared(rtype, None).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
        let received = batch.resources.len();
        let (ops, errors) = sink::plan(side, rtype, initial, &local, batch);
        cp.store.apply(ops).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
        cp.kds_metrics.add(Event::ResourcesReceived, &obs.peer, rtype.name(), received as u64);
        cp.kds_metrics.add(Event::ResourcesRejected, &obs.peer, rtype.name(), errors.len() as u64);
        if initial && received > 0 {
            tracing::info!(peer = %obs.peer, kind = rtype.name(), resources = received, "KDS: first sync of this type applied");
        } else if initial {
            tracing::debug!(peer = %obs.peer, kind = rtype.name(), "KDS: first sync of this type applied (empty)");
        }
        let reply = if errors.is_empty() {
            obs.record(cp, rtype.name(), Outcome::Acked);
            DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            }
        } else {
            let reason = errors.join("; ");
            obs.record(cp, rtype.name(), Outcome::Rejected);
            tracing::warn!(peer = %obs.peer, kind = rtype.name(), %reason, "KDS: resources refused (NACK); the rest of the batch is applied");
            nack(&resp, &reason)
        };
        tx.send(reply).await.map_err(|_| tonic::Status::cancelled("the stream closed"))?;
    }
    Ok(())
}

/// Kuma's NACK: the nonce, the wildcard subscription again, and the reason.
fn nack(resp: &DeltaDiscoveryResponse, reason: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        resource_names_subscribe: vec!["*".into()],
        error_detail: Some(RpcStatus { code: INVALID_ARGUMENT, message: reason.to_string(), ..Default::default() }),
        ..Default::default()
    }
}

/// Decode, pin (on global) and validate the resources of a response.
fn decode_batch(side: Side<'_>, hash_suffix_peer: bool, rtype: ResourceType, resp: &DeltaDiscoveryResponse) -> Batch {
    let mut batch = Batch::default();
    for d in &resp.resources {
        let key = sink::split_wire_key(&d.name);
        let decoded = codec::decode(rtype, d).and_then(|mut r| {
            if let Side::Global { zone } = side {
                let replaced = super::mapper::pin_to_zone(&mut r, zone, hash_suffix_peer);
                if !replaced.is_empty() {
                    tracing::warn!(zone, kind = rtype.name(), name = %r.name, replaced = ?replaced,
                        "KDS: a zone named another zone in its resource; pinned to the zone of the stream");
                }
            }
            validate(&r).map_err(|c| crate::model::format_causes(&c))?;
            Ok(r)
        });
        match decoded {
            Ok(r) => batch.resources.push(r),
            Err(e) => batch.invalid.push((key, e)),
        }
    }
    for name in &resp.removed_resources {
        let (mesh, mut n) = sink::split_wire_key(name);
        if let Side::Global { zone } = side
            && !hash_suffix_peer
        {
            n = format!("{zone}.{n}");
        }
        batch.removed.push((mesh, n));
    }
    batch
}
