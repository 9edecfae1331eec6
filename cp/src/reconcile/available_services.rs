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
    let services = dps.available_services(|_| true);
    let offered = serde_json::to_value(&services)?;
    let nothing = serde_json::Value::Array(Vec::new());
    for zi in cp.store.list_shared(ResourceType::ZoneIngress, None).await? {
        let zone = zi.spec.get("zone").and_then(|z| z.as_str()).unwrap_or_default();
        if !zone.is_empty() && zone != cp.cfg.zone_name {
            continue; // another zone's ingress: its availableServices come from that zone
        }
        let joining = cp.store.get(ResourceType::ZoneIngressInsight, "", &zi.name).await?.is_some_and(|i| joining(&i));
        let value = if joining { &nothing } else { &offered };
        // Compared as JSON: the stored list is what an earlier pass wrote from the same
        // serialisation (parsing thousands of entries back was most of this job's cost).
        if zi.spec.get("availableServices") == Some(value) {
            continue;
        }
        let value = value.clone();
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
