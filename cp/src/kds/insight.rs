//! ZoneInsight: the record of a zone's KDS connections (`subscriptions`), kept by global
//! for every zone and by a federated zone for itself. A subscription with a connect time
//! and no disconnect time means Online (Kuma's `IsOnline`).
//!
//! Liveness follows Kuma: while a stream is alive in this process its subscription's
//! `generation` is bumped every `idle timeout / 2`; a finalizer marks subscriptions whose
//! generation stopped moving as disconnected. A stream that ends (cleanly or not) marks
//! its subscription disconnected at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::context::{Cp, random_uuid};
use crate::model::{Resource, ResourceType, now_rfc3339};
use crate::store::StoreError;

/// Kuma's `metrics.zone.subscriptionLimit`.
const SUBSCRIPTION_LIMIT: usize = 10;
/// How often counters of a live subscription reach the store.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Per-type response counters of a subscription.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    sent: u64,
    acked: u64,
    rejected: u64,
}

#[derive(Default)]
struct Stats {
    by_type: BTreeMap<String, Counts>,
    dirty: bool,
}

/// One open KDS subscription of a zone.
pub struct Subscription {
    cp: Arc<Cp>,
    zone: String,
    id: String,
    stats: Mutex<Stats>,
    closed: AtomicBool,
}

/// What the peer said about itself when the stream opened.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub global_instance_id: String,
    pub zone_instance_id: String,
    /// `version` node metadata: `{"kumaCp": {...}}`.
    pub version: Option<Value>,
    /// The zone CP's configuration as JSON text (`config` node metadata).
    pub config: String,
    pub auth_token_provided: bool,
}

#[derive(Clone, Copy)]
pub enum Outcome {
    Sent,
    Acked,
    Rejected,
}

impl Subscription {
    /// Open a subscription in `zone`'s insight, finalising older ones still marked online.
    pub async fn open(cp: &Arc<Cp>, zone: &str, peer: PeerInfo) -> Result<Arc<Subscription>, StoreError> {
        let id = random_uuid();
        let now = now_rfc3339();
        let mut sub = json!({
            "id": id,
            "globalInstanceId": peer.global_instance_id,
            "zoneInstanceId": peer.zone_instance_id,
            "connectTime": now,
            "status": {"lastUpdateTime": now, "total": {}, "stat": {}},
            "generation": 0,
            "config": peer.config,
            "authTokenProvided": peer.auth_token_provided,
        });
        if let Some(v) = peer.version {
            sub["version"] = v;
        }
        update(cp, zone, |subs| {
            for s in subs.iter_mut().filter(|s| s.get("disconnectTime").is_none()) {
                s.insert("disconnectTime".into(), Value::String(now.clone()));
            }
            subs.push(sub.as_object().cloned().unwrap_or_default());
            let excess = subs.len().saturating_sub(SUBSCRIPTION_LIMIT);
            subs.drain(..excess);
        })
        .await?;
        let s = Arc::new(Subscription {
            cp: cp.clone(),
            zone: zone.to_string(),
            id,
            stats: Mutex::new(Stats::default()),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&s), cp.cfg.zone_idle_timeout / 2));
        Ok(s)
    }

    pub fn record(&self, rtype: &str, outcome: Outcome) {
        if let Ok(mut st) = self.stats.lock() {
            let c = st.by_type.entry(rtype.to_string()).or_default();
            match outcome {
                Outcome::Sent => c.sent += 1,
                Outcome::Acked => c.acked += 1,
                Outcome::Rejected => c.rejected += 1,
            }
            st.dirty = true;
        }
    }

    /// Write counters (and optionally bump the liveness generation).
    async fn flush(&self, bump: bool) {
        let counts = {
            let Ok(mut st) = self.stats.lock() else { return };
            if !st.dirty && !bump {
                return;
            }
            st.dirty = false;
            st.by_type.clone()
        };
        let id = self.id.clone();
        let r = update(&self.cp, &self.zone, |subs| {
            if let Some(s) = subs.iter_mut().find(|s| s.get("id").and_then(Value::as_str) == Some(id.as_str())) {
                write_counts(s, &counts);
                if bump {
                    let g = s.get("generation").and_then(Value::as_u64).unwrap_or(0);
                    s.insert("generation".into(), json!(g + 1));
                }
            }
        })
        .await;
        if let Err(e) = r {
            tracing::debug!(zone = %self.zone, error = %e, "cannot write the zone insight");
        }
    }

    /// Mark the subscription disconnected (idempotent).
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let counts = self.stats.lock().map(|s| s.by_type.clone()).unwrap_or_default();
        let id = self.id.clone();
        let _ = update(&self.cp, &self.zone, |subs| {
            if let Some(s) = subs.iter_mut().find(|s| s.get("id").and_then(Value::as_str) == Some(id.as_str())) {
                write_counts(s, &counts);
                s.insert("disconnectTime".into(), Value::String(now_rfc3339()));
            }
        })
        .await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let (cp, zone, id) = (self.cp.clone(), self.zone.clone(), self.id.clone());
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            let _ = update(&cp, &zone, |subs| {
                if let Some(s) = subs.iter_mut().find(|s| s.get("id").and_then(Value::as_str) == Some(id.as_str())) {
                    s.insert("disconnectTime".into(), Value::String(now_rfc3339()));
                }
            })
            .await;
        });
    }
}

fn write_counts(s: &mut Map<String, Value>, counts: &BTreeMap<String, Counts>) {
    let mut total = Counts::default();
    let mut stat = Map::new();
    for (t, c) in counts {
        total.sent += c.sent;
        total.acked += c.acked;
        total.rejected += c.rejected;
        stat.insert(t.clone(), counts_json(*c));
    }
    s.insert(
        "status".into(),
        json!({"lastUpdateTime": now_rfc3339(), "total": counts_json(total), "stat": Value::Object(stat)}),
    );
}

/// Protojson of `KDSServiceStats`: uint64 as strings, zeros omitted.
fn counts_json(c: Counts) -> Value {
    let mut m = Map::new();
    for (k, v) in [("responsesSent", c.sent), ("responsesAcknowledged", c.acked), ("responsesRejected", c.rejected)] {
        if v > 0 {
            m.insert(k.into(), Value::String(v.to_string()));
        }
    }
    Value::Object(m)
}

async fn flush_loop(sub: std::sync::Weak<Subscription>, bump_every: Duration) {
    let mut last_bump = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(FLUSH_INTERVAL).await;
        let Some(s) = sub.upgrade() else { return };
        if s.closed.load(Ordering::SeqCst) {
            return;
        }
        let bump = last_bump.elapsed() >= bump_every;
        if bump {
            last_bump = tokio::time::Instant::now();
        }
        s.flush(bump).await;
    }
}

/// Read-modify-write of `zone`'s insight subscriptions, retried on concurrent writes. The
/// insight is owned by the Zone, so deleting the Zone deletes it.
async fn update(cp: &Cp, zone: &str, f: impl Fn(&mut Vec<Map<String, Value>>)) -> Result<(), StoreError> {
    loop {
        let existing = cp.store.get(ResourceType::ZoneInsight, "", zone).await?;
        let version = existing.as_ref().map_or(0, |r| r.version);
        let mut r = existing.unwrap_or_else(|| Resource::new(ResourceType::ZoneInsight, "", zone));
        let mut subs: Vec<Map<String, Value>> = r
            .spec
            .get("subscriptions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_object().cloned()).collect())
            .unwrap_or_default();
        f(&mut subs);
        r.spec.insert("subscriptions".into(), Value::Array(subs.into_iter().map(Value::Object).collect()));
        r.owner = Some((ResourceType::Zone, String::new(), zone.to_string()));
        match cp.store.upsert(r, Some(version)).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Kuma's `ZoneInsight.IsOnline`.
pub fn is_online(insight: &Resource) -> bool {
    crate::lifecycle::is_online(insight)
}

/// Create `Zone{enabled}` if it does not exist (Kuma's `createZoneIfAbsent`).
pub async fn create_zone_if_absent(cp: &Cp, zone: &str) -> Result<(), StoreError> {
    if cp.store.get(ResourceType::Zone, "", zone).await?.is_some() {
        return Ok(());
    }
    let mut z = Resource::new(ResourceType::Zone, "", zone);
    z.spec.insert("enabled".into(), Value::Bool(true));
    match cp.store.upsert(z, Some(0)).await {
        Ok(_) => {
            tracing::info!(zone, "zone created on its first connection");
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every `idle timeout / 2`, mark disconnected the online subscriptions whose generation
/// did not move since the previous tick (their stream is not alive in any process).
pub fn spawn_idle_finalizer(cp: &Arc<Cp>, mut shutdown: watch::Receiver<bool>) {
    let cp = cp.clone();
    tokio::spawn(async move {
        let period = cp.cfg.zone_idle_timeout;
        // (zone, subscription id) -> generation seen at the previous tick.
        let mut seen: BTreeMap<(String, String), u64> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            let Ok(insights) = cp.store.list(ResourceType::ZoneInsight, None).await else { continue };
            let mut next = BTreeMap::new();
            for zi in insights {
                let zone = zi.name.clone();
                let mut stale = Vec::new();
                for s in zi.spec.get("subscriptions").and_then(Value::as_array).into_iter().flatten() {
                    if s.get("disconnectTime").is_some() {
                        continue;
                    }
                    let id = s.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
                    let generation = s.get("generation").and_then(Value::as_u64).unwrap_or(0);
                    match seen.get(&(zone.clone(), id.clone())) {
                        Some(g) if *g == generation => stale.push(id),
                        _ => {
                            next.insert((zone.clone(), id), generation);
                        }
                    }
                }
                if !stale.is_empty() {
                    tracing::info!(zone = %zone, "zone went silent for longer than KUMA_METRICS_ZONE_IDLE_TIMEOUT: marked offline");
                    let _ = update(&cp, &zone, |subs| {
                        for s in subs.iter_mut() {
                            if s.get("id").and_then(Value::as_str).is_some_and(|id| stale.iter().any(|x| x == id)) {
                                s.insert("disconnectTime".into(), Value::String(now_rfc3339()));
                            }
                        }
                    })
                    .await;
                }
            }
            seen = next;
        }
    });
}
