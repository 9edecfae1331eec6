//! Which inbound policies (MeshTLS, MeshTrafficPermission) apply to one inbound of a
//! Dataplane, and in what order, as Kuma's matcher ranks top-level targetRefs: the mesh
//! (or none), a MeshSubset whose tags the inbound carries, the MeshService (the inbound's
//! `kuma.io/service`), a MeshServiceSubset (that and tags), the Dataplane by labels or by
//! name, and last one inbound of it by `sectionName` (its name or port). Policies of equal
//! rank go by name; a later policy overrides an earlier one.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::model::Resource;
use crate::model::specs::Inbound;

const SERVICE_TAG: &str = "kuma.io/service";

/// Whether every tag of `want` (a JSON object, absent = none) is in `have`.
pub fn tags_match(want: Option<&Map<String, Value>>, have: &BTreeMap<String, String>) -> bool {
    want.into_iter().flatten().all(|(k, v)| have.get(k).map(String::as_str) == v.as_str())
}

/// How specific a top-level targetRef is for this inbound (`None`: the proxy's outbounds,
/// which only mesh-wide policies reach); `None` when it does not select it.
pub fn rank(target: &Value, dp: &Resource, inbound: Option<&Inbound>) -> Option<u8> {
    let service = |name: Option<&str>| {
        inbound.is_some_and(|i| name.is_some() && i.tags.get(SERVICE_TAG).map(String::as_str) == name)
    };
    let section = |name: &str| inbound.is_some_and(|i| i.name.as_deref() == Some(name) || i.port.to_string() == name);
    let dataplane = match target["name"].as_str() {
        Some(name) => (name == dp.name).then_some(5),
        None => tags_match(target["labels"].as_object(), &dp.labels).then_some(4),
    };
    match target["kind"].as_str() {
        None | Some("Mesh") => Some(0),
        Some("MeshSubset") => inbound.filter(|i| tags_match(target["tags"].as_object(), &i.tags)).map(|_| 1),
        Some("MeshService") => service(target["name"].as_str()).then_some(2),
        Some("MeshServiceSubset") => (service(target["name"].as_str())
            && inbound.is_some_and(|i| tags_match(target["tags"].as_object(), &i.tags)))
        .then_some(3),
        Some("Dataplane") => match target["sectionName"].as_str() {
            None => dataplane,
            Some(s) => dataplane.filter(|_| section(s)).map(|_| 6),
        },
        Some(_) => None,
    }
}

/// The specs of the policies that select this inbound, least specific first.
pub fn selecting(policies: &[Resource], dp: &Resource, inbound: Option<&Inbound>) -> Vec<Value> {
    let mut selected: Vec<(u8, &str, Value)> = policies
        .iter()
        .filter_map(|r| {
            let spec = r.typed::<Value>().ok()?;
            Some((rank(&spec["targetRef"], dp, inbound)?, r.name.as_str(), spec))
        })
        .collect();
    selected.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    selected.into_iter().map(|(_, _, spec)| spec).collect()
}

/// The merged `default` of the `from` entries (targetRef Mesh) and `rules` of the policies
/// that select this inbound, least specific first; `None` when no entry reaches it.
pub fn merged(policies: &[Resource], dp: &Resource, inbound: Option<&Inbound>) -> Option<Map<String, Value>> {
    let mut out: Option<Map<String, Value>> = None;
    for p in selecting(policies, dp, inbound) {
        let from = p["from"].as_array().into_iter().flatten().filter(|f| f["targetRef"]["kind"] == "Mesh");
        for entry in from.chain(p["rules"].as_array().into_iter().flatten()) {
            if let Value::Object(d) = &entry["default"] {
                super::resilience::merge(out.get_or_insert_with(Map::new), d);
            }
        }
    }
    out
}
