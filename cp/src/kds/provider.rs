//! What one side of KDS offers the other, as a snapshot the Delta state machine
//! (`xds::delta`) diffs: per KDS type (keyed by Kuma's type name, KDS's `type_url`), the
//! encoded resources with their content versions. Rebuilt per type, only for the types a
//! store change touched, and within a type only for the resources whose store version moved
//! ([`Memo`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

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

/// What global's zone streams encoded, shared between them. What global sends in place of a
/// resource depends on the resource and on whether the zone hashes names, not on which zone
/// it is (that only decides whether it is sent), so the ServiceInsight and each zone's
/// ingress, 10,000 entries each at scale, are encoded once per change instead of once per
/// zone.
#[derive(Default)]
pub struct SharedEncodes(Mutex<HashMap<ResourceType, SharedOfType>>);

/// (mesh, name, whether the zone hashes names) -> (store version, its encoding).
type SharedOfType = HashMap<(String, String, bool), (u64, Named)>;

impl SharedEncodes {
    fn get(&self, r: &Resource, hash_suffix: bool) -> Option<Named> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (version, named) = all.get(&r.rtype)?.get(&(r.mesh.clone(), r.name.clone(), hash_suffix))?;
        (*version == r.version).then(|| named.clone())
    }

    fn put(&self, r: &Resource, hash_suffix: bool, named: Named) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.entry(r.rtype).or_default().insert((r.mesh.clone(), r.name.clone(), hash_suffix), (r.version, named));
    }

    /// Forgets the resources of `rtype` that are no longer stored.
    fn prune(&self, rtype: ResourceType, stored: &Encoded) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(of_type) = all.get_mut(&rtype) {
            of_type.retain(|(mesh, name, _), _| stored.contains_key(&(mesh.clone(), name.clone())));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().values().map(HashMap::len).sum()
    }
}

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
                _ => encode(cp, dir, &r, &memo.enabled),
            };
            named.extend(out.iter().cloned());
            kept.insert(key, (r.version, out));
        }
        named.sort_by(|a, b| a.name.cmp(&b.name));
        named.dedup_by(|a, b| a.name == b.name);
        snap.set(t.name().to_string(), named);
        if matches!(dir, Direction::GlobalToZone(_)) {
            cp.kds_encodes.prune(*t, &kept);
        }
        memo.types.insert(*t, kept);
    }
    Ok(())
}

/// One resource as the other side receives it; `None` when it is not sent.
fn encode(cp: &Cp, dir: &Direction, r: &Resource, enabled: &BTreeMap<String, bool>) -> Option<Named> {
    let out = map(dir, r, enabled)?;
    let shared = match dir {
        Direction::GlobalToZone(peer) => Some(peer.hash_suffix),
        Direction::ZoneToGlobal { .. } => None,
    };
    if let Some(named) = shared.and_then(|h| cp.kds_encodes.get(r, h)) {
        return Some(named);
    }
    match codec::encode(&out) {
        Ok(d) => {
            let named = Named::new(d.name, d.version, d.resource.unwrap_or_default());
            if let Some(h) = shared {
                cp.kds_encodes.put(r, h, named.clone());
            }
            Some(named)
        }
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

    #[tokio::test]
    async fn zone_streams_share_one_encoding_of_each_resource() {
        let dir = std::env::temp_dir().join(format!("kds-provider-shared-{}", std::process::id()));
        let cp = Cp::new(RunConfig::for_tests(dir), Arc::new(MemoryStore::new()));
        let mesh = |name: &str, backend: &str| {
            Resource::from_json(&json!({"type": "Mesh", "name": name,
                "mtls": {"enabledBackend": backend, "backends": [{"name": backend, "type": "builtin"}]}}))
            .unwrap()
        };
        cp.store.upsert(mesh("m1", "ca-1"), None).await.unwrap();
        cp.store.upsert(mesh("m2", "ca-1"), None).await.unwrap();
        async fn refresh_for(cp: &Cp, zone: &str) -> Vec<Named> {
            let to = Direction::GlobalToZone(PeerZone { name: zone.into(), hash_suffix: true });
            let mut snap = ProxySnapshot::default();
            let types = BTreeSet::from([ResourceType::Mesh]);
            refresh(cp, &to, &types, &mut snap, &mut Memo::default()).await.unwrap();
            snap.resources(ResourceType::Mesh.name()).to_vec()
        }
        let (one, two) = (refresh_for(&cp, "zone-1").await, refresh_for(&cp, "zone-2").await);
        assert_eq!(one.len(), 2);
        for (a, b) in one.iter().zip(&two) {
            assert!(std::ptr::eq(&**a, &**b), "{}: encoded once for both zones", a.name);
        }

        // A change is encoded once more, for whichever zone asks first; a deletion is forgotten.
        cp.store.upsert(mesh("m1", "ca-2"), None).await.unwrap();
        cp.store.delete(ResourceType::Mesh, "", "m2").await.unwrap();
        let (one_again, two_again) = (refresh_for(&cp, "zone-1").await, refresh_for(&cp, "zone-2").await);
        assert_eq!(one_again.len(), 1);
        assert_ne!(one_again[0].version, one[0].version);
        assert!(std::ptr::eq(&*one_again[0], &*two_again[0]));
        assert_eq!(cp.kds_encodes.len(), 1, "m2's encoding was dropped with it");
    }
}
