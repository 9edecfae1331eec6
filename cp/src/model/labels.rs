//! Kuma's well-known labels, and the ones a control plane computes when a resource is
//! created (`kumahq/kuma:pkg/core/resources/labels/compute.go`).

use std::collections::BTreeMap;

use super::{KdsFlags, Resource, Scope};

/// Where a resource was created: `global` or `zone`.
pub const ORIGIN: &str = "kuma.io/origin";
pub const ORIGIN_GLOBAL: &str = "global";
pub const ORIGIN_ZONE: &str = "zone";
/// The zone a resource comes from (also an inbound tag).
pub const ZONE: &str = "kuma.io/zone";
/// The name a resource had before KDS gave it a hash suffix.
pub const DISPLAY_NAME: &str = "kuma.io/display-name";
pub const MESH: &str = "kuma.io/mesh";
pub const ENV: &str = "kuma.io/env";
pub const ENV_UNIVERSAL: &str = "universal";
/// Per-resource override of the type's KDS flags: `enabled` / `disabled`.
pub const KDS_SYNC: &str = "kuma.io/kds-sync";
/// Dropped before a resource leaves a zone.
pub const DELETION_GRACE: &str = "kuma.io/deletion-grace-period-started-at";

/// What kind of control plane computes the labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    Global,
    /// A zone (standalone or federated) with its name.
    Zone(&'a str),
}

/// Labels a control plane adds to a resource created through its API or by a proxy:
/// `kuma.io/mesh` on mesh-scoped types; on a zone, `kuma.io/origin: zone`, `kuma.io/zone`
/// and `kuma.io/env` on the types zones provide. Labels already present are kept.
pub fn compute(resource: &mut Resource, role: Role<'_>) {
    let d = resource.descriptor();
    let labels = &mut resource.labels;
    if d.scope == Scope::Mesh {
        let mesh = if resource.mesh.is_empty() { "default" } else { resource.mesh.as_str() };
        labels.entry(MESH.into()).or_insert_with(|| mesh.to_string());
    }
    if let Role::Zone(zone) = role
        && d.kds.has(KdsFlags::PROVIDED_BY_ZONE)
    {
        labels.entry(ORIGIN.into()).or_insert_with(|| ORIGIN_ZONE.into());
        if labels.get(ORIGIN).map(String::as_str) != Some(ORIGIN_GLOBAL) {
            labels.entry(ZONE.into()).or_insert_with(|| zone.to_string());
            labels.entry(ENV.into()).or_insert_with(|| ENV_UNIVERSAL.into());
        }
    }
}

/// Kuma's `IsLocallyOriginated`: a resource without an origin label counts as local on
/// either side.
pub fn locally_originated(labels: &BTreeMap<String, String>, global: bool) -> bool {
    match labels.get(ORIGIN).map(String::as_str) {
        None => true,
        Some(o) => o == if global { ORIGIN_GLOBAL } else { ORIGIN_ZONE },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourceType;

    #[test]
    fn zones_label_what_they_provide() {
        let mut dp = Resource::new(ResourceType::Dataplane, "default", "dp-1");
        compute(&mut dp, Role::Zone("zone-1"));
        let l = |r: &Resource, k: &str| r.labels.get(k).cloned();
        assert_eq!(l(&dp, ORIGIN).as_deref(), Some("zone"));
        assert_eq!(l(&dp, ZONE).as_deref(), Some("zone-1"));
        assert_eq!(l(&dp, MESH).as_deref(), Some("default"));
        assert_eq!(l(&dp, ENV).as_deref(), Some("universal"));
        // A Mesh is not provided by zones; global labels only the mesh scope.
        let mut mesh = Resource::new(ResourceType::Mesh, "", "default");
        compute(&mut mesh, Role::Zone("zone-1"));
        assert!(mesh.labels.is_empty());
        let mut tp = Resource::new(ResourceType::TrafficPermission, "default", "tp");
        compute(&mut tp, Role::Global);
        assert_eq!(tp.labels.keys().collect::<Vec<_>>(), vec![MESH]);
        assert!(locally_originated(&tp.labels, true) && locally_originated(&dp.labels, false));
        assert!(!locally_originated(&dp.labels, true));
    }
}
