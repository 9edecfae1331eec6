//! `availableServices` of this zone's ZoneIngresses: what the zone's Dataplanes offer
//! (Kuma's `pkg/zone/available_services.go`). Every ingress of the zone gets the same
//! list, also one whose proxy is gone, down to empty; except an ingress whose proxy is
//! still joining, which offers nothing until it serves (other zones count an ingress only
//! once it lists services: Kuma's graceful join).

use crate::components::zone::ZoneCp;
use crate::lifecycle::joining;
use crate::model::{ResourceType, ZoneIngressSpec};
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
    let dps = crate::lifecycle::serving_dataplanes(cp.store.as_ref(), None).await?;
    let services = crate::xds::generate::available_services(&dps);
    for zi in cp.store.list(ResourceType::ZoneIngress, None).await? {
        let spec: ZoneIngressSpec = zi.typed().unwrap_or_default();
        if !spec.zone.is_empty() && spec.zone != cp.cfg.zone_name {
            continue; // another zone's ingress: its availableServices come from that zone
        }
        let joining = cp.store.get(ResourceType::ZoneIngressInsight, "", &zi.name).await?.is_some_and(|i| joining(&i));
        let available = if joining { Vec::new() } else { services.clone() };
        let value = serde_json::to_value(&available)?;
        if spec.available_services == available && zi.spec.contains_key("availableServices") {
            continue;
        }
        let version = zi.version;
        let mut updated = zi;
        updated.spec.insert("availableServices".into(), value);
        // Conditional write: a concurrent change wins and triggers another pass.
        if let Err(e) = cp.store.upsert(updated, Some(version)).await {
            tracing::debug!(error = %e, "availableServices update raced with another write");
        }
    }
    Ok(())
}
