//! ServiceInsight `all-services-<mesh>`: per `kuma.io/service`, how many Dataplane
//! inbounds are online and offline, and in which zones (Kuma's `pkg/insights/resyncer.go`).
//! Global computes it over every zone's Dataplanes and sends it to the zones; a federated
//! zone serves what it received; a standalone zone computes its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::context::Cp;
use crate::dataplanes::DataplaneView;
use crate::model::labels::{ZONE, compute as compute_labels};
use crate::model::{Resource, ResourceType, SERVICE_TAG};
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
    super::spawn("service insights", cp, shutdown, relevant, interval, move || {
        let cp = c.clone();
        async move { update(&cp).await }
    });
}

#[derive(Default)]
struct Stat<'a> {
    online: u32,
    offline: u32,
    zones: BTreeSet<&'a str>,
}

impl Stat<'_> {
    fn status(&self) -> &'static str {
        match (self.online, self.offline) {
            (0, _) => "offline",
            (_, 0) => "online",
            _ => "partially_degraded",
        }
    }

    /// Whether `v` is this stat's JSON, compared in place.
    fn matches(&self, v: &Value) -> bool {
        let zones_match = match v.get("zones").and_then(Value::as_array) {
            None => self.zones.is_empty(),
            Some(z) => z.len() == self.zones.len() && z.iter().zip(&self.zones).all(|(a, b)| a.as_str() == Some(*b)),
        };
        let n = |k: &str| v.pointer(&format!("/dataplanes/{k}")).and_then(Value::as_u64);
        v.as_object().is_some_and(|o| o.len() == 2 + usize::from(!self.zones.is_empty()))
            && v.get("status").and_then(Value::as_str) == Some(self.status())
            && n("online") == Some(u64::from(self.online))
            && n("offline") == Some(u64::from(self.offline))
            && v.get("dataplanes").and_then(Value::as_object).is_some_and(|d| d.len() == 2)
            && zones_match
    }

    fn to_json(&self) -> Value {
        let mut v = json!({"status": self.status(), "dataplanes": {"online": self.online, "offline": self.offline}});
        if !self.zones.is_empty() {
            v["zones"] = json!(self.zones);
        }
        v
    }
}

/// Per service of the given Dataplanes (each with whether its proxy has an open
/// subscription): inbounds online and offline, and zones.
fn stats<'a>(dataplanes: impl IntoIterator<Item = (&'a DataplaneView, bool)>) -> BTreeMap<&'a str, Stat<'a>> {
    let mut stats: BTreeMap<&str, Stat<'_>> = BTreeMap::new();
    for (view, connected) in dataplanes {
        let dp = &view.resource;
        let inbounds = view.inbounds();
        // A proxy with an inbound that is not ready is degraded, and Kuma counts a
        // degraded proxy as offline for all its services.
        let online = connected && inbounds.iter().all(|i| i.is_healthy());
        for inb in inbounds {
            let Some(svc) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
            let s = stats.entry(svc.as_str()).or_default();
            if online {
                s.online += 1;
            } else {
                s.offline += 1;
            }
            if let Some(z) = inb.tags.get(ZONE).or_else(|| dp.labels.get(ZONE)) {
                s.zones.insert(z.as_str());
            }
        }
    }
    stats
}

/// The `services` map of one mesh's ServiceInsight.
/// `dataplanes`: each with whether its proxy has an open subscription.
pub fn compute<'a>(dataplanes: impl IntoIterator<Item = (&'a DataplaneView, bool)>) -> Map<String, Value> {
    stats(dataplanes).into_iter().map(|(svc, s)| (svc.to_string(), s.to_json())).collect()
}

/// Whether a stored `services` map says what `stats` says (compared in place: it has an
/// entry per service, thousands at scale).
fn services_match(stats: &BTreeMap<&str, Stat<'_>>, stored: Option<&Value>) -> bool {
    let Some(stored) = stored.and_then(Value::as_object) else { return false };
    stored.len() == stats.len() && stats.iter().all(|(svc, s)| stored.get(*svc).is_some_and(|v| s.matches(v)))
}

async fn update(cp: &Cp) -> anyhow::Result<()> {
    let meshes: BTreeSet<String> = cp.store.list(ResourceType::Mesh, None).await?.into_iter().map(|m| m.name).collect();
    let dps = cp.dataplanes.read(cp.store.as_ref()).await?;
    for mesh in &meshes {
        let mut r = Resource::new(ResourceType::ServiceInsight, mesh, &name(mesh));
        compute_labels(&mut r, cp.role());
        let stats = stats(dps.with_online(Some(mesh)));
        let stored = cp.store.get_shared(ResourceType::ServiceInsight, mesh, &r.name).await?;
        if stored.as_ref().is_some_and(|old| old.labels == r.labels && services_match(&stats, old.spec.get("services")))
        {
            continue;
        }
        let services = stats.iter().map(|(svc, s)| (svc.to_string(), s.to_json())).collect();
        r.spec.insert("services".into(), Value::Object(services));
        cp.store.upsert(r, None).await?;
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
    use crate::lifecycle::is_online;

    fn dp(name: &str, svc: &str, zone: &str, ready: bool) -> Resource {
        let v = json!({"type": "Dataplane", "mesh": "default", "name": name, "networking": {"address": "10.0.0.1",
            "inbound": [{"port": 1, "tags": {"kuma.io/service": svc, "kuma.io/zone": zone}, "health": {"ready": ready}}]}});
        Resource::from_json(&v).unwrap()
    }

    fn insight(name: &str, online: bool) -> ((String, String), Resource) {
        let mut sub = json!({"id": "1", "connectTime": "2026-01-01T00:00:00Z"});
        if !online {
            sub["disconnectTime"] = json!("2026-01-01T00:01:00Z");
        }
        let v = json!({"type": "DataplaneInsight", "mesh": "default", "name": name, "subscriptions": [sub]});
        (("default".into(), name.into()), Resource::from_json(&v).unwrap())
    }

    #[test]
    fn counts_online_offline_and_zones() {
        let dps =
            vec![dp("a", "echo", "zone-1", true), dp("b", "echo", "zone-2", true), dp("c", "web", "zone-1", false)];
        let insights: BTreeMap<_, _> =
            [insight("a", true), insight("b", false), insight("c", true)].into_iter().collect();
        let views: Vec<DataplaneView> = dps.into_iter().map(DataplaneView::new).collect();
        let m =
            compute(views.iter().map(|v| {
                (v, insights.get(&(v.resource.mesh.clone(), v.resource.name.clone())).is_some_and(is_online))
            }));
        assert_eq!(m["echo"]["status"], "partially_degraded");
        assert_eq!(m["echo"]["dataplanes"], json!({"online": 1, "offline": 1}));
        assert_eq!(m["echo"]["zones"], json!(["zone-1", "zone-2"]));
        // Connected but not ready: offline.
        assert_eq!(m["web"]["status"], "offline");
        // What was stored matches the stats it came from, and only those.
        let online = |v: &DataplaneView| {
            insights.get(&(v.resource.mesh.clone(), v.resource.name.clone())).is_some_and(is_online)
        };
        let st = stats(views.iter().map(|v| (v, online(v))));
        let stored = Value::Object(m.clone());
        assert!(services_match(&st, Some(&stored)));
        let st_all_online = stats(views.iter().map(|v| (v, true)));
        assert!(!services_match(&st_all_online, Some(&stored)));
        let mut fewer = m.clone();
        fewer.remove("web");
        assert!(!services_match(&st, Some(&Value::Object(fewer))));
    }
}
