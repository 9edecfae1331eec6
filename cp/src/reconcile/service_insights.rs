//! ServiceInsight `all-services-<mesh>`: per `kuma.io/service`, how many Dataplane
//! inbounds are online and offline, and in which zones (Kuma's `pkg/insights/resyncer.go`).
//! Global computes it over every zone's Dataplanes and sends it to the zones; a federated
//! zone serves what it received; a standalone zone computes its own.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::{Written, WrittenLog};
use crate::context::Cp;
use crate::dataplanes::{Dataplanes, ServiceStat};
use crate::model::labels::compute as compute_labels;
use crate::model::{Resource, ResourceType};
use crate::store::ChangeEvent;

pub fn name(mesh: &str) -> String {
    format!("all-services-{mesh}")
}

fn relevant(e: &ChangeEvent) -> bool {
    matches!(e.rtype(), ResourceType::Dataplane | ResourceType::DataplaneInsight | ResourceType::Mesh)
}

pub fn spawn(cp: &Arc<Cp>, shutdown: watch::Receiver<bool>) {
    let c = cp.clone();
    let interval = cp.cfg.insights_min_resync_interval;
    let written = Arc::new(WrittenLog::default());
    super::spawn("service insights", cp, shutdown, relevant, interval, move || {
        let (cp, written) = (c.clone(), written.clone());
        async move { update(&cp, &written).await }
    });
}

fn status(s: &ServiceStat) -> &'static str {
    match (s.online, s.offline) {
        (0, _) => "offline",
        (_, 0) => "online",
        _ => "partially_degraded",
    }
}

/// Whether `v` is the JSON of `s`, compared in place.
fn stat_matches(s: &ServiceStat, v: &Value) -> bool {
    let zones_match = match v.get("zones").and_then(Value::as_array) {
        None => s.zones.is_empty(),
        Some(z) => z.len() == s.zones.len() && z.iter().zip(s.zones.keys()).all(|(a, b)| a.as_str() == Some(b)),
    };
    let n = |k: &str| v.get("dataplanes").and_then(|d| d.get(k)).and_then(Value::as_u64);
    v.as_object().is_some_and(|o| o.len() == 2 + usize::from(!s.zones.is_empty()))
        && v.get("status").and_then(Value::as_str) == Some(status(s))
        && n("online") == Some(u64::from(s.online))
        && n("offline") == Some(u64::from(s.offline))
        && v.get("dataplanes").and_then(Value::as_object).is_some_and(|d| d.len() == 2)
        && zones_match
}

fn stat_json(s: &ServiceStat) -> Value {
    let mut v = json!({"status": status(s), "dataplanes": {"online": s.online, "offline": s.offline}});
    if !s.zones.is_empty() {
        v["zones"] = json!(s.zones.keys().collect::<Vec<_>>());
    }
    v
}

/// The `services` map of one mesh's ServiceInsight.
pub fn compute(dps: &Dataplanes, mesh: &str) -> Map<String, Value> {
    dps.service_stats(mesh).map(|(svc, s)| (svc.to_string(), stat_json(s))).collect()
}

/// Whether a stored `services` map says what the index says (compared in place: it has an
/// entry per service, thousands at scale).
fn services_match(dps: &Dataplanes, mesh: &str, stored: Option<&Value>) -> bool {
    let Some(stored) = stored.and_then(Value::as_object) else { return false };
    stored.len() == dps.service_stats(mesh).count()
        && dps.service_stats(mesh).all(|(svc, s)| stored.get(svc).is_some_and(|v| stat_matches(s, v)))
}

/// The entries that changed since `last`, as JSON, when the stored insight is what `last`
/// says it is with no service come or gone since; `None` otherwise (compare it whole).
fn changed_services(dps: &Dataplanes, mesh: &str, stored: &Resource, last: Written) -> Option<Vec<(String, Value)>> {
    let services = stored.spec.get("services")?.as_object()?;
    if dps.service_stats_keys_stamp() > last.generation || services.len() != dps.service_stats(mesh).count() {
        return None;
    }
    let changed = dps
        .service_stats(mesh)
        .filter(|(svc, s)| s.stamp > last.generation && !services.get(*svc).is_some_and(|v| stat_matches(s, v)))
        .map(|(svc, s)| (svc.to_string(), stat_json(s)))
        .collect();
    Some(changed)
}

async fn update(cp: &Cp, written: &WrittenLog) -> anyhow::Result<()> {
    let meshes: BTreeSet<String> = cp.store.list(ResourceType::Mesh, None).await?.into_iter().map(|m| m.name).collect();
    let dps = cp.dataplanes.read(cp.store.as_ref()).await?;
    let generation = dps.generation();
    for mesh in &meshes {
        let mut r = Resource::new(ResourceType::ServiceInsight, mesh, &name(mesh));
        compute_labels(&mut r, cp.role());
        let key = r.key();
        let stored = cp.store.get_shared(ResourceType::ServiceInsight, mesh, &r.name).await?;
        let last = written.get(&key);
        if let Some(old) = stored.as_ref().filter(|old| old.labels == r.labels)
            && let Some(last) = last.filter(|w| w.version == old.version)
            && let Some(changed) = changed_services(&dps, mesh, old, last)
        {
            drop(stored); // ours no longer holds it: the store can edit it in place
            if changed.is_empty() {
                written.set(key, Written { version: last.version, generation });
                continue;
            }
            let edit = Box::new(move |r: &mut Resource| {
                let Some(services) = r.spec.get_mut("services").and_then(Value::as_object_mut) else { return false };
                for (svc, v) in changed {
                    services.insert(svc, v);
                }
                true
            });
            match cp.store.edit(&key, last.version, edit).await {
                Ok(edited) => written.set(key, Written { version: edited.version, generation }),
                // Written meanwhile: the next pass compares it whole.
                Err(e) => tracing::debug!(error = %e, "service insight update raced with another write"),
            }
            continue;
        }
        if let Some(old) = stored.as_ref().filter(|old| old.labels == r.labels)
            && services_match(&dps, mesh, old.spec.get("services"))
        {
            written.set(key, Written { version: old.version, generation });
            continue;
        }
        drop(stored);
        r.spec.insert("services".into(), Value::Object(compute(&dps, mesh)));
        let stored = cp.store.upsert(r, None).await?;
        written.set(key, Written { version: stored.version, generation });
    }
    // Insights of meshes that are gone (only ours: a zone keeps what global sent).
    for si in cp.store.list_shared(ResourceType::ServiceInsight, None).await? {
        if !meshes.contains(&si.mesh) && si.name == name(&si.mesh) {
            cp.store.delete(ResourceType::ServiceInsight, &si.mesh, &si.name).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplanes::DataplaneIndex;
    use crate::store::{MemoryStore, Store};

    fn dp(name: &str, svc: &str, zone: &str, ready: bool) -> Resource {
        let v = json!({"type": "Dataplane", "mesh": "default", "name": name, "networking": {"address": "10.0.0.1",
            "inbound": [{"port": 1, "tags": {"kuma.io/service": svc, "kuma.io/zone": zone}, "health": {"ready": ready}}]}});
        Resource::from_json(&v).unwrap()
    }

    fn insight(name: &str, online: bool) -> Resource {
        let mut sub = json!({"id": "1", "connectTime": "2026-01-01T00:00:00Z"});
        if !online {
            sub["disconnectTime"] = json!("2026-01-01T00:01:00Z");
        }
        let v = json!({"type": "DataplaneInsight", "mesh": "default", "name": name, "subscriptions": [sub]});
        Resource::from_json(&v).unwrap()
    }

    #[tokio::test]
    async fn counts_online_offline_and_zones() {
        let store = MemoryStore::new();
        let index = DataplaneIndex::new(store.events());
        for r in [dp("a", "echo", "zone-1", true), dp("b", "echo", "zone-2", true), dp("c", "web", "zone-1", false)] {
            store.upsert(r, None).await.unwrap();
        }
        for r in [insight("a", true), insight("b", false), insight("c", true)] {
            store.upsert(r, None).await.unwrap();
        }
        let dps = index.read(&store).await.unwrap();
        let m = compute(&dps, "default");
        assert_eq!(m["echo"]["status"], "partially_degraded");
        assert_eq!(m["echo"]["dataplanes"], json!({"online": 1, "offline": 1}));
        assert_eq!(m["echo"]["zones"], json!(["zone-1", "zone-2"]));
        // Connected but not ready: offline.
        assert_eq!(m["web"]["status"], "offline");
        assert!(compute(&dps, "other").is_empty());
        // What was stored matches the figures it came from, and only those.
        let stored = Value::Object(m.clone());
        assert!(services_match(&dps, "default", Some(&stored)));
        let mut fewer = m.clone();
        fewer.remove("web");
        assert!(!services_match(&dps, "default", Some(&Value::Object(fewer))));

        // b comes online: one entry changed since, and only it is reported.
        let mut si = Resource::new(ResourceType::ServiceInsight, "default", &name("default"));
        si.spec.insert("services".into(), stored);
        let last = Written { version: 0, generation: dps.generation() };
        store.upsert(insight("b", true), None).await.unwrap();
        let now = index.read(&store).await.unwrap();
        assert!(!services_match(&now, "default", si.spec.get("services")));
        let changed = changed_services(&now, "default", &si, last).unwrap();
        assert_eq!(
            changed,
            vec![(
                "echo".to_string(),
                json!({"status": "online",
            "dataplanes": {"online": 2, "offline": 0}, "zones": ["zone-1", "zone-2"]})
            )]
        );
        // A service gone: compared whole.
        store.delete(ResourceType::Dataplane, "default", "c").await.unwrap();
        let later = index.read(&store).await.unwrap();
        assert_eq!(changed_services(&later, "default", &si, last), None);
        assert_eq!(compute(&later, "default").len(), 1);
        // Once written as of that read, the next pass edits in place again.
        si.spec.insert("services".into(), Value::Object(compute(&later, "default")));
        let written = Written { version: 0, generation: later.generation() };
        assert_eq!(changed_services(&later, "default", &si, written), Some(vec![]));
    }
}
