//! What a zone records about the proxies connected to it:
//!
//! * Universal "direct lifecycle": the resource a proxy brings in its node metadata
//!   (`dataplane.resource`, from `--dataplane-file`) is upserted when its stream opens and
//!   removed a delay after its last stream closed (Kuma's `dataplane_lifecycle.go`);
//! * its insight (DataplaneInsight, ZoneIngressInsight, ZoneEgressInsight): one
//!   subscription per ADS stream with connect and disconnect times, which is what "online"
//!   means everywhere (REST, service insights, and global through KDS).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::components::zone::ZoneCp;
use crate::context::random_uuid;
use crate::model::labels::compute as compute_labels;
use crate::model::{Key, Resource, ResourceType, ZoneIngressSpec, now_rfc3339};

/// Kuma's `metrics.dataplane.subscriptionLimit`: subscriptions kept per proxy insight.
const SUBSCRIPTION_LIMIT: usize = 2;

/// Streams of registered proxies: key -> (generation, open streams).
#[derive(Default)]
pub struct Lifecycle {
    conns: Mutex<HashMap<Key, (u64, usize)>>,
}

/// Held by a stream that registered its proxy's resource; dropping it schedules the
/// deregistration.
pub struct Registration {
    cp: Arc<ZoneCp>,
    key: Key,
}

impl Lifecycle {
    /// Upsert `resource` (the proxy's own resource) and count one more stream for it.
    pub async fn register(cp: &Arc<ZoneCp>, mut resource: Resource) -> Result<Registration, String> {
        match resource.rtype {
            ResourceType::ZoneIngress | ResourceType::ZoneEgress => {
                resource.spec.insert("zone".into(), cp.cfg.zone_name.clone().into());
                if resource.rtype == ResourceType::ZoneIngress {
                    // Keep what the tracker computed so the REST view does not flicker.
                    if let Ok(Some(old)) = cp.store.get(resource.rtype, "", &resource.name).await
                        && let Some(av) = old.spec.get("availableServices")
                    {
                        resource.spec.insert("availableServices".into(), av.clone());
                    } else {
                        resource.spec.remove("availableServices");
                    }
                    let _ = resource.typed::<ZoneIngressSpec>().map_err(|e| e.to_string())?;
                }
            }
            ResourceType::Dataplane => {
                if cp.store.get(ResourceType::Mesh, "", &resource.mesh).await.map_err(|e| e.to_string())?.is_none() {
                    let hint = if cp.cfg.is_federated_zone() {
                        "create it on the global control plane; it reaches this zone through KDS"
                    } else {
                        "create it first (ctl apply -f mesh.yaml)"
                    };
                    return Err(format!("mesh {:?} does not exist: {hint}", resource.mesh));
                }
            }
            _ => return Err(format!("a {} cannot connect as a proxy", resource.rtype.name())),
        }
        compute_labels(&mut resource, cp.role());
        let key = resource.key();
        {
            let mut conns = cp.lifecycle.conns.lock().map_err(|_| "lifecycle lock poisoned".to_string())?;
            let e = conns.entry(key.clone()).or_insert((0, 0));
            e.0 += 1;
            e.1 += 1;
        }
        // Register the stream before the upsert so a concurrent deregistration of an older
        // stream cannot delete what we are about to write.
        if let Err(e) = cp.store.upsert(resource, None).await {
            drop(Registration { cp: cp.clone(), key: key.clone() });
            return Err(e.to_string());
        }
        adopt_insight(cp, &key).await;
        tracing::info!(kind = key.0.name(), mesh = %key.1, name = %key.2, "proxy registered");
        Ok(Registration { cp: cp.clone(), key })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let generation = {
            let Ok(mut conns) = self.cp.lifecycle.conns.lock() else { return };
            let Some(e) = conns.get_mut(&self.key) else { return };
            e.1 = e.1.saturating_sub(1);
            if e.1 > 0 {
                return;
            }
            e.0
        };
        let cp = self.cp.clone();
        let key = self.key.clone();
        let delay = cp.cfg.deregistration_delay;
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            tokio::time::sleep(delay).await;
            let still_gone = {
                let Ok(mut conns) = cp.lifecycle.conns.lock() else { return };
                match conns.get(&key) {
                    Some((g, 0)) if *g == generation => {
                        conns.remove(&key);
                        true
                    }
                    _ => false,
                }
            };
            if still_gone {
                if connected_elsewhere(&cp, &key).await {
                    tracing::info!(kind = key.0.name(), mesh = %key.1, name = %key.2, "proxy reconnected to another control plane instance; it stays registered");
                    return;
                }
                // Deleting the proxy's resource deletes its insight (it owns it).
                match cp.store.delete(key.0, &key.1, &key.2).await {
                    Ok(_) => tracing::info!(kind = key.0.name(), mesh = %key.1, name = %key.2, "proxy deregistered after its stream closed"),
                    Err(e) => tracing::warn!(error = %e, "cannot deregister proxy"),
                }
            }
        });
    }
}

/// The insight of a proxy that connected before its resource existed was created without
/// its owner (a store with foreign keys refuses an owner that is not there yet): now that
/// the resource is registered, the insight becomes its, and goes when it goes.
async fn adopt_insight(cp: &ZoneCp, subject: &Key) {
    let insight_type = subject.0.descriptor().insight.unwrap_or(ResourceType::DataplaneInsight);
    for _ in 0..10 {
        let Ok(Some(mut insight)) = cp.store.get(insight_type, &subject.1, &subject.2).await else { return };
        if insight.owner.is_some() {
            return;
        }
        let version = insight.version;
        insight.owner = Some(subject.clone());
        match cp.store.upsert(insight, Some(version)).await {
            Err(crate::store::StoreError::Conflict { .. }) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot give a proxy insight its owner");
                return;
            }
            Ok(_) => return,
        }
    }
}

/// Whether the proxy `subject` has an open stream on another instance of this control
/// plane (it moved there: its registration is that instance's now).
async fn connected_elsewhere(cp: &ZoneCp, subject: &Key) -> bool {
    let insight_type = subject.0.descriptor().insight.unwrap_or(ResourceType::DataplaneInsight);
    let Ok(Some(insight)) = cp.store.get(insight_type, &subject.1, &subject.2).await else { return false };
    insight.spec.get("subscriptions").and_then(Value::as_array).is_some_and(|subs| {
        subs.iter().any(|s| {
            s.get("disconnectTime").is_none_or(Value::is_null) && s["controlPlaneInstanceId"] != cp.instance_id.as_str()
        })
    })
}

/// An open subscription in a proxy's insight; dropping it records the disconnect.
///
/// Its insight writes (connect, serving, disconnect) are made in order by a task of its
/// own, each retried through conflicts and database outages: a stream never waits on
/// them beyond [`CONNECT_WRITE_WAIT`], and none is lost to a passing outage.
pub struct Connected {
    edits: tokio::sync::mpsc::UnboundedSender<(Edit, Option<Key>)>,
    id: String,
}

/// One change of a proxy's `subscriptions`.
type Edit = Box<dyn Fn(&mut Vec<Value>) + Send + Sync>;

/// How long a new stream waits for its connect write (the database may be down: the
/// proxy is served meanwhile, and the write lands when it can).
const CONNECT_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Record that the proxy `subject` (a Dataplane, ZoneIngress or ZoneEgress) opened a
/// stream; `version` is the node metadata's `version` (`{kumaDp, envoy}`).
pub async fn connected(cp: &Arc<ZoneCp>, subject: &Key, version: Option<Value>) -> Connected {
    let insight_type = subject.0.descriptor().insight.unwrap_or(ResourceType::DataplaneInsight);
    let insight = (insight_type, subject.1.clone(), subject.2.clone());
    let id = random_uuid();
    let mut sub = json!({
        "id": id,
        "controlPlaneInstanceId": cp.instance_id,
        "connectTime": now_rfc3339(),
        "status": {"lastUpdateTime": now_rfc3339(), "total": {}},
        "generation": 0,
    });
    if let Some(v) = version {
        sub["version"] = v;
    }
    let owner = subject.clone();
    let me = cp.instance_id.clone();
    let (edits, mut queue) = tokio::sync::mpsc::unbounded_channel::<(Edit, Option<Key>)>();
    let (first_done, first) = tokio::sync::oneshot::channel();
    let writer_cp = cp.clone();
    tokio::spawn(async move {
        let mut first_done = Some(first_done);
        while let Some((edit, owner)) = queue.recv().await {
            update_subscriptions(&writer_cp, &insight, owner, |subs| edit(subs)).await;
            if let Some(done) = first_done.take() {
                let _ = done.send(());
            }
        }
    });
    let connect: Edit = Box::new(move |subs: &mut Vec<Value>| {
        // A proxy whose newest stream is still open and serving moved here (its control
        // plane instance died, or the path to it): it kept serving its listeners, so it is
        // not joining again, and other proxies keep it as an endpoint.
        let moved = subs.last().is_some_and(|s| s.get("disconnectTime").is_none_or(Value::is_null) && acked(s));
        let mut sub = sub.clone();
        if moved {
            sub["status"]["lds"] = json!({"responsesAcknowledged": "1"});
        }
        // A proxy has one stream: one still open on another instance was cut off from it
        // (that instance died), so it is over.
        for s in subs.iter_mut() {
            if s.get("disconnectTime").is_none_or(Value::is_null) && s["controlPlaneInstanceId"] != me.as_str() {
                s["disconnectTime"] = Value::String(now_rfc3339());
            }
        }
        subs.push(sub);
        // Keep the newest; a proxy has one live stream, older entries are history.
        let excess = subs.len().saturating_sub(SUBSCRIPTION_LIMIT);
        subs.drain(..excess);
    });
    let _ = edits.send((connect, Some(owner)));
    let _ = tokio::time::timeout(CONNECT_WRITE_WAIT, first).await;
    Connected { edits, id }
}

impl Connected {
    /// The proxy acknowledged its listeners (and certificates): record it in its
    /// subscription (`status.lds.responsesAcknowledged`), which ends its "joining".
    pub fn serving(&self) {
        let id = self.id.clone();
        let _ = self.edits.send((
            Box::new(move |subs: &mut Vec<Value>| {
                for s in subs.iter_mut().filter(|s| s["id"] == id.as_str()) {
                    s["status"]["lds"] = json!({"responsesAcknowledged": "1"});
                    s["status"]["lastUpdateTime"] = Value::String(now_rfc3339());
                }
            }),
            None,
        ));
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        let id = std::mem::take(&mut self.id);
        // The writer task ends once it has made this last write.
        let _ = self.edits.send((
            Box::new(move |subs: &mut Vec<Value>| {
                for s in subs.iter_mut().filter(|s| s["id"] == id.as_str()) {
                    s["disconnectTime"] = Value::String(now_rfc3339());
                }
            }),
            None,
        ));
    }
}

/// How long an insight write keeps trying through conflicts and database outages. A write
/// given up loses a proxy's state (a proxy never marked serving is never an endpoint), so
/// it tries as long as a proxy would reasonably wait.
const INSIGHT_WRITE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Read-modify-write of an insight's `subscriptions`, retried on concurrent writes and
/// while the store is unavailable.
///
/// A conflict means this instance's copy is behind the database (another instance wrote,
/// or this one's change listener has not caught up, as after a database outage): the retry
/// waits for the copy to change instead of spinning on the same stale version. (An insight
/// missing from the copy is one whose proxy was deleted: the store makes a writer wait
/// until its own write is in the copy, even while its change listener reconnects.)
async fn update_subscriptions(cp: &ZoneCp, insight: &Key, owner: Option<Key>, f: impl Fn(&mut Vec<Value>)) {
    let deadline = tokio::time::Instant::now() + INSIGHT_WRITE_PATIENCE;
    let mut backoff = std::time::Duration::from_millis(50);
    let mut changes = cp.store.subscribe();
    loop {
        changes.borrow_and_update();
        let existing = match cp.store.get(insight.0, &insight.1, &insight.2).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a proxy insight");
                return;
            }
        };
        if existing.is_none() && owner.is_none() {
            return; // the proxy was deleted meanwhile, and its insight with it
        }
        let version = existing.as_ref().map_or(0, |r| r.version);
        let creating = existing.is_none();
        let mut r = existing.unwrap_or_else(|| Resource::new(insight.0, &insight.1, &insight.2));
        let mut subs = r.spec.get("subscriptions").and_then(Value::as_array).cloned().unwrap_or_default();
        f(&mut subs);
        r.spec.insert("subscriptions".into(), Value::Array(subs));
        if r.owner.is_none() {
            r.owner = owner.clone();
        }
        // A proxy connecting for the first time registers its resource after this: the
        // insight is adopted then (`adopt_insight`).
        if creating
            && let Some(o) = &r.owner
            && matches!(cp.store.get(o.0, &o.1, &o.2).await, Ok(None))
        {
            r.owner = None;
        }
        compute_labels(&mut r, cp.role());
        let e = match cp.store.upsert(r, Some(version)).await {
            Ok(_) => {
                tracing::debug!(insight = %format!("{}/{}", insight.1, insight.2), version, "proxy insight written");
                return;
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(insight = %format!("{}/{}", insight.1, insight.2), error = %e, "cannot write a proxy insight; giving up");
            return;
        }
        match e {
            crate::store::StoreError::Conflict { .. } => {
                tracing::debug!(insight = %format!("{}/{}", insight.1, insight.2), version, error = %e, "proxy insight write conflicts; waiting for this instance's copy");
                let _ = tokio::time::timeout(backoff, changes.changed()).await;
            }
            crate::store::StoreError::Unavailable(_) => {
                tracing::debug!(error = %e, "cannot write a proxy insight yet; retrying");
                tokio::time::sleep(backoff).await;
            }
            e => {
                tracing::warn!(error = %e, "cannot write a proxy insight");
                return;
            }
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
    }
}

/// A proxy that connected but has not acknowledged its configuration yet: its newest
/// subscription is open and has no acknowledged listeners. It is not an endpoint until
/// then (connections to it would fail). A proxy with no insight (its resource was applied
/// through the API) or only closed subscriptions is not joining.
pub fn joining(insight: &Resource) -> bool {
    let Some(last) = insight.spec.get("subscriptions").and_then(Value::as_array).and_then(|s| s.last()) else {
        return false;
    };
    let open = last.get("disconnectTime").is_none_or(Value::is_null);
    open && !acked(last)
}

/// A subscription whose proxy acknowledged its listeners.
fn acked(subscription: &Value) -> bool {
    subscription.pointer("/status/lds/responsesAcknowledged").is_some_and(|v| v != "0" && !v.is_null())
}

/// Kuma's `IsOnline` of an insight: a subscription connected and not disconnected.
pub fn is_online(insight: &Resource) -> bool {
    insight.spec.get("subscriptions").and_then(Value::as_array).is_some_and(|subs| {
        subs.iter().any(|s| s.get("connectTime").is_some() && s.get("disconnectTime").is_none_or(Value::is_null))
    })
}
