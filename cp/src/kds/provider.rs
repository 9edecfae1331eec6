//! What one side of KDS offers the other, as a snapshot the Delta state machine
//! (`xds::delta`) diffs: per KDS type (keyed by Kuma's type name, KDS's `type_url`), the
//! encoded resources with their content versions. Rebuilt per type, only for the types a
//! store change touched.

use std::collections::{BTreeMap, BTreeSet};

use super::codec;
use super::mapper::{self, PeerZone};
use crate::context::Cp;
use crate::model::{Resource, ResourceType};
use crate::store::{ChangeEvent, StoreError};
use crate::tokens::rsa_public_key_pem;
use crate::xds::generate::{Named, ProxySnapshot};

/// Which way the resources go.
#[derive(Clone, Debug)]
pub enum Direction {
    /// Global offering its resources to a zone.
    GlobalToZone(PeerZone),
    /// A zone offering its own resources to global.
    ZoneToGlobal { zone: String },
}

impl Direction {
    pub fn types(&self) -> Vec<ResourceType> {
        match self {
            Direction::GlobalToZone(_) => super::types_sent_by_global(),
            Direction::ZoneToGlobal { .. } => super::types_sent_by_zone(),
        }
    }

    /// The types whose snapshot a store change may alter: its own type, and for global's
    /// ZoneIngresses also a Zone (enabling or disabling a zone filters its ingresses).
    pub fn touched(&self, e: &ChangeEvent) -> Vec<ResourceType> {
        let mut out = vec![e.rtype()];
        if matches!(self, Direction::GlobalToZone(_)) && e.rtype() == ResourceType::Zone {
            out.push(ResourceType::ZoneIngress);
        }
        out
    }
}

/// The snapshot of the given types, replacing those types in `snap`.
pub async fn refresh(
    cp: &Cp,
    dir: &Direction,
    types: &BTreeSet<ResourceType>,
    snap: &mut ProxySnapshot,
) -> Result<(), StoreError> {
    let enabled = zone_states(cp, dir).await?;
    for t in types {
        if !dir.types().contains(t) {
            continue;
        }
        let mut named = Vec::new();
        for r in cp.store.list(*t, None).await? {
            let Some(out) = map(dir, &r, &enabled) else { continue };
            match codec::encode(&out) {
                Ok(d) => named.push(Named::new(d.name, d.version, d.resource.unwrap_or_default())),
                Err(e) => {
                    tracing::warn!(kind = t.name(), name = %r.name, error = %e, "resource not synced: it cannot be encoded")
                }
            }
        }
        named.sort_by(|a, b| a.name.cmp(&b.name));
        named.dedup_by(|a, b| a.name == b.name);
        snap.by_type.insert(t.name().to_string(), named);
    }
    Ok(())
}

/// zone name -> enabled, when the direction needs it.
async fn zone_states(cp: &Cp, dir: &Direction) -> Result<BTreeMap<String, bool>, StoreError> {
    if !matches!(dir, Direction::GlobalToZone(_)) {
        return Ok(BTreeMap::new());
    }
    Ok(cp
        .store
        .list(ResourceType::Zone, None)
        .await?
        .into_iter()
        .map(|z| {
            let enabled = z.spec.get("enabled").and_then(serde_json::Value::as_bool).unwrap_or(true);
            (z.name, enabled)
        })
        .collect())
}

fn map(dir: &Direction, r: &Resource, enabled: &BTreeMap<String, bool>) -> Option<Resource> {
    match dir {
        Direction::GlobalToZone(peer) => {
            // A zone global has no Zone for (deleted meanwhile) counts as disabled: its
            // resources are on their way out.
            let zone_enabled = |z: &str| enabled.get(z).copied().unwrap_or(false);
            mapper::global_to_zone(r, peer, &zone_enabled, &rsa_public_key_pem)
        }
        Direction::ZoneToGlobal { zone } => mapper::zone_to_global(r, zone),
    }
}
