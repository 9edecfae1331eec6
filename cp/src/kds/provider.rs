//! What one side of KDS offers the other, as a snapshot the Delta state machine
//! (`xds::delta`) diffs: per KDS type (keyed by Kuma's type name, KDS's `type_url`), the
//! encoded resources with their content versions. Rebuilt per type, only for the types a
//! store change touched, and within a type only for the resources whose store version moved
//! ([`Memo`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

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

/// What the last refresh of a stream mapped and encoded, per type and resource, with the
/// store version it came from: a resource whose version did not move is not mapped, encoded
/// or hashed again. At 10,000 Dataplanes, re-encoding every one of them on each change was
/// about two thirds of a zone's and of global's CPU for a one-Dataplane change.
#[derive(Default)]
pub struct Memo {
    /// The zone states the mapping used (global to zone): when they change, all is redone.
    enabled: BTreeMap<String, bool>,
    types: HashMap<ResourceType, Encoded>,
}

/// (mesh, name) -> (store version, what it was sent as).
type Encoded = HashMap<(String, String), (u64, Option<Named>)>;

/// The snapshot of the given types, replacing those types in `snap`.
pub async fn refresh(
    cp: &Cp,
    dir: &Direction,
    types: &BTreeSet<ResourceType>,
    snap: &mut ProxySnapshot,
    memo: &mut Memo,
) -> Result<(), StoreError> {
    let enabled = zone_states(cp, dir).await?;
    if enabled != memo.enabled {
        memo.types.clear();
        memo.enabled = enabled;
    }
    for t in types {
        if !dir.types().contains(t) {
            continue;
        }
        let mut before = memo.types.remove(t).unwrap_or_default();
        let mut kept = HashMap::with_capacity(before.len());
        let mut named = Vec::new();
        for r in cp.store.list_shared(*t, None).await? {
            let key = (r.mesh.clone(), r.name.clone());
            let out = match before.remove(&key) {
                Some((version, out)) if version == r.version => out,
                _ => encode(dir, &r, &memo.enabled),
            };
            named.extend(out.iter().cloned());
            kept.insert(key, (r.version, out));
        }
        named.sort_by(|a, b| a.name.cmp(&b.name));
        named.dedup_by(|a, b| a.name == b.name);
        snap.by_type.insert(t.name().to_string(), named);
        memo.types.insert(*t, kept);
    }
    Ok(())
}

/// One resource as the other side receives it; `None` when it is not sent.
fn encode(dir: &Direction, r: &Resource, enabled: &BTreeMap<String, bool>) -> Option<Named> {
    let out = map(dir, r, enabled)?;
    match codec::encode(&out) {
        Ok(d) => Some(Named::new(d.name, d.version, d.resource.unwrap_or_default())),
        Err(e) => {
            tracing::warn!(kind = r.rtype.name(), name = %r.name, error = %e, "resource not synced: it cannot be encoded");
            None
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;
    use crate::store::MemoryStore;
    use serde_json::json;
    use std::sync::Arc;

    fn dp(name: &str, svc: &str) -> Resource {
        Resource::from_json(&json!({"type": "Dataplane", "mesh": "default", "name": name,
            "networking": {"address": "10.0.0.1", "inbound": [{"port": 1, "tags": {"kuma.io/service": svc}}]}}))
        .unwrap()
    }

    fn sent(snap: &ProxySnapshot) -> &[Named] {
        snap.resources(ResourceType::Dataplane.name())
    }

    #[tokio::test]
    async fn only_resources_whose_version_moved_are_encoded_again() {
        let dir = std::env::temp_dir().join(format!("kds-provider-{}", std::process::id()));
        let cp = Cp::new(RunConfig::for_tests(dir), Arc::new(MemoryStore::new()));
        for (n, s) in [("a", "web"), ("b", "api"), ("c", "db")] {
            cp.store.upsert(dp(n, s), None).await.unwrap();
        }
        let to_global = Direction::ZoneToGlobal { zone: "zone-1".into() };
        let types = BTreeSet::from([ResourceType::Dataplane]);
        let (mut snap, mut memo) = (ProxySnapshot::default(), Memo::default());
        refresh(&cp, &to_global, &types, &mut snap, &mut memo).await.unwrap();
        let first: Vec<Named> = sent(&snap).to_vec();
        assert_eq!(first.len(), 3);

        cp.store.upsert(dp("b", "api-2"), None).await.unwrap();
        cp.store.delete(ResourceType::Dataplane, "default", "c").await.unwrap();
        refresh(&cp, &to_global, &types, &mut snap, &mut memo).await.unwrap();
        let second = sent(&snap);
        assert_eq!(second.len(), 2, "the deleted one is gone");
        assert!(std::ptr::eq(&*first[0], &*second[0]), "`a` did not change: reused as it was");
        assert_eq!(second[1].name, first[1].name);
        assert_ne!(second[1].version, first[1].version, "`b` changed: encoded again");

        // The same as a refresh from nothing.
        let mut fresh = ProxySnapshot::default();
        refresh(&cp, &to_global, &types, &mut fresh, &mut Memo::default()).await.unwrap();
        let parts =
            |v: &[Named]| v.iter().map(|n| (n.name.clone(), n.version.clone(), n.any.clone())).collect::<Vec<_>>();
        assert_eq!(parts(second), parts(sent(&fresh)));
    }
}
