//! `availableServices` of this zone's ZoneIngresses: what the zone's Dataplanes offer
//! (Kuma's `pkg/zone/available_services.go`). Every ingress of the zone gets the same
//! list, also one whose proxy is gone, down to empty; except an ingress whose proxy is
//! still joining, which offers nothing until it serves (other zones count an ingress only
//! once it lists services: Kuma's graceful join).
//!
//! The list has an entry per service and tag set, thousands at scale, and a one-endpoint
//! change changes one count: while nothing else wrote the ingress and no entry came or went,
//! a pass edits the counts that changed in place ([`Store::edit`]).

use serde_json::{Map, Value};

use super::{Written, WrittenLog};
use crate::components::zone::ZoneCp;
use crate::dataplanes::Dataplanes;
use crate::lifecycle::joining;
use crate::model::{Resource, ResourceType};
use crate::store::{ChangeEvent, Store};

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

pub async fn update(cp: &ZoneCp, written: &WrittenLog) -> anyhow::Result<()> {
    let dps = cp.dataplanes.read(cp.store.as_ref()).await?;
    for zi in cp.store.list_shared(ResourceType::ZoneIngress, None).await? {
        let zone = zi.spec.get("zone").and_then(|z| z.as_str()).unwrap_or_default();
        if !zone.is_empty() && zone != cp.cfg.zone_name {
            continue; // another zone's ingress: its availableServices come from that zone
        }
        let joining = cp.store.get(ResourceType::ZoneIngressInsight, "", &zi.name).await?.is_some_and(|i| joining(&i));
        let key = zi.key();
        let last = written.get(&key).filter(|w| w.version == zi.version);
        if !joining
            && let Some(last) = last
            && let Some(changed) = changed_counts(&dps, &zi, last)
        {
            drop(zi); // ours no longer holds it: the store can edit it in place
            edit_counts(cp.store.as_ref(), &key, last.version, changed, &dps, written).await;
            continue;
        }
        let stored = zi.spec.get("availableServices");
        // Compared in place: most passes change nothing.
        let same = match stored {
            Some(v) if joining => v.as_array().is_some_and(Vec::is_empty),
            Some(v) => matches(&dps, v),
            None => false,
        };
        if same {
            written.set(key, Written { version: zi.version, generation: dps.generation() });
            continue;
        }
        let value = if joining { Value::Array(Vec::new()) } else { to_json(&dps) };
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
        match cp.store.upsert(updated, Some(version)).await {
            Ok(r) if !joining => written.set(key, Written { version: r.version, generation: dps.generation() }),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "availableServices update raced with another write"),
        }
    }
    Ok(())
}

/// The counts that changed since `last` as (position, count), when the stored list is what
/// `last` says it is with no entry come or gone since; `None` otherwise (compare it whole).
fn changed_counts(dps: &Dataplanes, zi: &Resource, last: Written) -> Option<Vec<(usize, u32)>> {
    let list = zi.spec.get("availableServices")?.as_array()?;
    if dps.available_keys_stamp() > last.generation || list.len() != dps.available_len() {
        return None;
    }
    let changed = dps
        .available()
        .enumerate()
        .filter(|(i, (_, _, c))| {
            c.stamp > last.generation && list[*i].get("instances").and_then(Value::as_u64) != Some(u64::from(c.n))
        })
        .map(|(i, (_, _, c))| (i, c.n))
        .collect();
    Some(changed)
}

/// Writes the changed counts into the stored list (nothing when none changed).
async fn edit_counts(
    store: &dyn Store,
    key: &crate::store::Key,
    version: u64,
    changed: Vec<(usize, u32)>,
    dps: &Dataplanes,
    written: &WrittenLog,
) {
    let generation = dps.generation();
    if changed.is_empty() {
        written.set(key.clone(), Written { version, generation });
        return;
    }
    let edit = Box::new(move |r: &mut Resource| {
        let Some(list) = r.spec.get_mut("availableServices").and_then(Value::as_array_mut) else { return false };
        for (i, n) in changed {
            if let Some(entry) = list.get_mut(i).and_then(Value::as_object_mut) {
                entry.insert("instances".into(), n.into());
            }
        }
        true
    });
    match store.edit(key, version, edit).await {
        Ok(r) => written.set(key.clone(), Written { version: r.version, generation }),
        Err(e) => tracing::debug!(error = %e, "availableServices update raced with another write"),
    }
}

/// `availableServices` of every mesh as the JSON a ZoneIngress stores: one entry per
/// (mesh, full tag set) with its count, built directly (the same as serialising the list).
fn to_json(dps: &Dataplanes) -> Value {
    let entry = |(mesh, tags, c): (&str, &std::collections::BTreeMap<String, String>, crate::dataplanes::Counted)| {
        let tags = tags.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let mut m = Map::new();
        m.insert("tags".into(), Value::Object(tags));
        m.insert("instances".into(), c.n.into());
        m.insert("mesh".into(), mesh.into());
        Value::Object(m)
    };
    Value::Array(dps.available().map(entry).collect())
}

/// Whether `stored` is [`to_json`], compared in place (thousands of entries at scale:
/// neither side is built or parsed).
fn matches(dps: &Dataplanes, stored: &Value) -> bool {
    let Some(list) = stored.as_array() else { return false };
    list.len() == dps.available_len()
        && list.iter().zip(dps.available()).all(|(v, (mesh, tags, c))| {
            let Some(o) = v.as_object() else { return false };
            let same_tags = o.get("tags").and_then(|t| t.as_object()).is_some_and(|t| {
                t.len() == tags.len()
                    && tags.iter().all(|(k, val)| t.get(k).and_then(|x| x.as_str()) == Some(val.as_str()))
            });
            o.len() == 3
                && same_tags
                && o.get("instances").and_then(|i| i.as_u64()) == Some(u64::from(c.n))
                && o.get("mesh").and_then(|m| m.as_str()) == Some(mesh)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dp(name: &str, svc: &str) -> Resource {
        Resource::from_json(&json!({"type":"Dataplane","mesh":"a","name":name,
            "networking":{"address":"10.0.0.1","inbound":[{"port":1,"tags":{"kuma.io/service":svc}}]}}))
        .unwrap()
    }

    #[test]
    fn json_is_the_serialised_list_and_matches_only_itself() {
        let both = Dataplanes::from_resources([dp("x", "web"), dp("y", "web")]);
        let one = Dataplanes::from_resources([dp("x", "web")]);
        let json = to_json(&both);
        assert_eq!(json, serde_json::to_value(both.available_services(|_| true)).unwrap());
        assert_eq!(json[0]["instances"], 2);
        assert!(matches(&both, &json));
        assert!(!matches(&one, &json), "other counts");
        let mut other = json.clone();
        other[0]["tags"]["kuma.io/service"] = "x".into();
        assert!(!matches(&both, &other));
    }

    #[test]
    fn changed_counts_are_those_stamped_since_and_different() {
        // The third Dataplane changes a count after the last entry came (api's).
        let dps = Dataplanes::from_resources([dp("x", "web"), dp("y", "api"), dp("z", "web")]);
        let mut zi = Resource::new(ResourceType::ZoneIngress, "", "zi");
        zi.spec.insert("availableServices".into(), to_json(&dps));
        let since_keys = Written { version: 3, generation: dps.available_keys_stamp() };
        // Right as stored: nothing to change.
        assert_eq!(changed_counts(&dps, &zi, since_keys), Some(vec![]));
        // web (second by SNI) was stamped since: its stored count is checked and corrected;
        // api was not, so it is taken as written.
        let mut stale = zi.clone();
        stale.spec["availableServices"][1]["instances"] = 7.into();
        stale.spec["availableServices"][0]["instances"] = 7.into();
        assert_eq!(changed_counts(&dps, &stale, since_keys), Some(vec![(1, 2)]));
        // An entry came after the generation, or the list has another length: compare it whole.
        assert_eq!(changed_counts(&dps, &zi, Written { version: 3, generation: 0 }), None);
        stale.spec["availableServices"].as_array_mut().unwrap().pop();
        assert_eq!(changed_counts(&dps, &stale, since_keys), None);
    }
}
