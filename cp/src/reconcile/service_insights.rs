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
struct Stat {
    online: u32,
    offline: u32,
    zones: BTreeSet<String>,
}

/// The `services` map of one mesh's ServiceInsight.
/// `dataplanes`: each with whether its proxy has an open subscription.
pub fn compute<'a>(dataplanes: impl IntoIterator<Item = (&'a DataplaneView, bool)>) -> Map<String, Value> {
    let mut stats: BTreeMap<String, Stat> = BTreeMap::new();
    for (view, connected) in dataplanes {
        let dp = &view.resource;
        let inbounds = view.inbounds();
        // A proxy with an inbound that is not ready is degraded, and Kuma counts a
        // degraded proxy as offline for all its services.
        let online = connected && inbounds.iter().all(|i| i.is_healthy());
        for inb in inbounds {
            let Some(svc) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
            let s = match stats.get_mut(svc) {
                Some(s) => s,
                None => stats.entry(svc.clone()).or_default(),
            };
            if online {
                s.online += 1;
            } else {
                s.offline += 1;
            }
            if let Some(z) = inb.tags.get(ZONE).or_else(|| dp.labels.get(ZONE)) {
                s.zones.insert(z.clone());
            }
        }
    }
    stats
        .into_iter()
        .map(|(svc, s)| {
            let status = match (s.online, s.offline) {
                (0, _) => "offline",
                (_, 0) => "online",
                _ => "partially_degraded",
            };
            let mut v = json!({"status": status, "dataplanes": {"online": s.online, "offline": s.offline}});
            if !s.zones.is_empty() {
                v["zones"] = json!(s.zones);
            }
            (svc, v)
        })
        .collect()
}

async fn update(cp: &Cp) -> anyhow::Result<()> {
    let meshes: BTreeSet<String> = cp.store.list(ResourceType::Mesh, None).await?.into_iter().map(|m| m.name).collect();
    let dps = cp.dataplanes.read(cp.store.as_ref()).await?;
    for mesh in &meshes {
        let mut r = Resource::new(ResourceType::ServiceInsight, mesh, &name(mesh));
        r.spec.insert("services".into(), Value::Object(compute(dps.with_online(Some(mesh)))));
        compute_labels(&mut r, cp.role());
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
    }
}
