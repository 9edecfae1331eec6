//! `availableServices` of this zone's ZoneIngresses: what the zone's Dataplanes offer
//! (Kuma's `pkg/zone/available_services.go`). Every ingress of the zone gets the same
//! list, also one whose proxy is gone, down to empty; except an ingress whose proxy is
//! still joining, which offers nothing until it serves (other zones count an ingress only
//! once it lists services: Kuma's graceful join).

use crate::components::zone::ZoneCp;
use crate::lifecycle::joining;
use crate::model::{Resource, ResourceType};
use crate::store::ChangeEvent;

pub fn relevant(e: &ChangeEvent) -> bool {
    matches!(
        e.rtype(),
        ResourceType::Dataplane
            | ResourceType::DataplaneInsight
            | ResourceType::ZoneIngress
            | ResourceType::ZoneIngressInsight
            | ResourceType::Mesh
    )
}

pub async fn update(cp: &ZoneCp) -> anyhow::Result<()> {
    let dps = cp.dataplanes.read(cp.store.as_ref()).await?;
    for zi in cp.store.list_shared(ResourceType::ZoneIngress, None).await? {
        let zone = zi.spec.get("zone").and_then(|z| z.as_str()).unwrap_or_default();
        if !zone.is_empty() && zone != cp.cfg.zone_name {
            continue; // another zone's ingress: its availableServices come from that zone
        }
        let joining = cp.store.get(ResourceType::ZoneIngressInsight, "", &zi.name).await?.is_some_and(|i| joining(&i));
        let stored = zi.spec.get("availableServices");
        // Compared in place: building or parsing thousands of entries was most of this
        // job's cost, and most passes change nothing.
        let same = match stored {
            Some(v) if joining => v.as_array().is_some_and(Vec::is_empty),
            Some(v) => dps.available_services_match(v),
            None => false,
        };
        if same {
            continue;
        }
        let value = if joining { serde_json::Value::Array(Vec::new()) } else { dps.available_services_json() };
        let version = zi.version;
        // A copy without the old list (thousands of entries, replaced anyway).
        let mut updated = Resource {
            spec: zi
                .spec
                .iter()
                .filter(|(k, _)| *k != "availableServices")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            labels: zi.labels.clone(),
            owner: zi.owner.clone(),
            ..Resource::new(zi.rtype, &zi.mesh, &zi.name)
        };
        updated.spec.insert("availableServices".into(), value);
        // Conditional write: a concurrent change wins and triggers another pass.
        if let Err(e) = cp.store.upsert(updated, Some(version)).await {
            tracing::debug!(error = %e, "availableServices update raced with another write");
        }
    }
    Ok(())
}
