//! MeshTCPRoute on a sidecar's outbounds (Kuma 2.14): the `to` entry for an outbound's
//! MeshService splits its connections over `backendRefs` by weight, each a MeshService or
//! a MeshServiceSubset (the service's endpoints carrying its tags). The outbound's
//! tcp_proxy gets weighted clusters, one per backend; a subset's cluster has the subset's
//! endpoints and Kuma's tag SNI (`backend{mesh=default,version=v2}`).
//!
//! Policies targeting the whole mesh are read, by name; the last `to` entry for a service
//! wins, and its first rule's backends. Other zones' endpoints of a subset are their
//! ingresses', which route every subset a route names ([`subsets`]), as Kuma's do.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::model::Resource;

/// One backend of a split.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub service: String,
    /// Empty for a whole MeshService.
    pub tags: BTreeMap<String, String>,
    pub weight: u32,
}

impl Backend {
    /// The cluster the backend's connections go to: the service's own, or one per subset.
    pub fn cluster(&self) -> String {
        if self.tags.is_empty() {
            return self.service.clone();
        }
        let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}-{}", self.service, super::generate::version_of(&tags.join(",")))
    }
}

/// The backends `service`'s connections split over; `None` when no route applies.
pub fn backends(policies: &[Resource], service: &str) -> Option<Vec<Backend>> {
    let mut out = None;
    for spec in super::resilience::mesh_wide(policies) {
        for to in spec["to"].as_array().into_iter().flatten() {
            let t = &to["targetRef"];
            if t["kind"] != "MeshService" || t["name"].as_str() != Some(service) {
                continue;
            }
            let refs = to["rules"][0]["default"]["backendRefs"].as_array();
            let parsed: Vec<Backend> = refs.into_iter().flatten().filter_map(backend).collect();
            if !parsed.is_empty() {
                out = Some(parsed);
            }
        }
    }
    out
}

/// (mesh, service) to the tag subsets of it that routes name, without `mesh`.
pub type Subsets = BTreeMap<(String, String), std::collections::BTreeSet<BTreeMap<String, String>>>;

/// The subsets the routes (of any mesh) send to: a zone ingress routes each by its SNI.
pub fn subsets(routes: &[Resource]) -> Subsets {
    let mut out = Subsets::new();
    for r in routes {
        let Ok(spec) = r.typed::<Value>() else { continue };
        let tos = spec["to"].as_array().into_iter().flatten();
        let refs = tos
            .flat_map(|to| to["rules"].as_array().into_iter().flatten())
            .flat_map(|rule| rule["default"]["backendRefs"].as_array().into_iter().flatten());
        for b in refs.filter_map(backend).filter(|b| !b.tags.is_empty()) {
            out.entry((r.mesh.clone(), b.service)).or_default().insert(b.tags);
        }
    }
    out
}

pub(crate) fn backend(r: &Value) -> Option<Backend> {
    let service = r["name"].as_str()?.to_string();
    let tags = match r["kind"].as_str()? {
        "MeshService" => BTreeMap::new(),
        "MeshServiceSubset" => r["tags"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect(),
        other => {
            tracing::debug!(kind = other, "MeshTCPRoute backendRef kind not served");
            return None;
        }
    };
    let weight = r.get("weight").map_or(Some(1), |w| w.as_u64().and_then(|w| u32::try_from(w).ok()))?;
    (weight > 0).then_some(Backend { service, tags, weight })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_last_route_for_a_service_splits_it() {
        let route = |name: &str, refs: Value| {
            Resource::from_json(&json!({"type": "MeshTCPRoute", "mesh": "m", "name": name, "spec": {
                "targetRef": {"kind": "Mesh"},
                "to": [{"targetRef": {"kind": "MeshService", "name": "backend"}, "rules": [{"default": {"backendRefs": refs}}]}]}}))
            .unwrap()
        };
        let a = route("a", json!([{"kind": "MeshService", "name": "backend"}]));
        let b = route(
            "b",
            json!([{"kind": "MeshServiceSubset", "name": "backend", "tags": {"version": "v1"}, "weight": 90},
                   {"kind": "MeshServiceSubset", "name": "backend", "tags": {"version": "v2"}, "weight": 10}]),
        );
        let got = backends(&[b, a], "backend").unwrap();
        assert_eq!(got.iter().map(|b| b.weight).collect::<Vec<_>>(), [90, 10]);
        assert_eq!(got[1].tags.get("version").map(String::as_str), Some("v2"));
        assert_ne!(got[0].cluster(), got[1].cluster());
        assert!(got[0].cluster().starts_with("backend-"));
        assert_eq!(backends(&[], "backend"), None);
    }
}
