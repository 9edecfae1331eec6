//! Applying what the other side sent to the local store (Kuma's `ResourceSyncer.Sync`,
//! `kumahq/kuma:pkg/kds/v2/store/sync.go`), as a pure plan of writes:
//!
//! * the first response of a type on a stream is the whole truth: every row this stream
//!   owns that it does not list is deleted; later responses touch only the names they
//!   carry (`resources` upserted, `removed_resources` deleted);
//! * a stream owns only some rows. On global, the rows labelled with its zone (so zone-2's
//!   stream can never delete zone-1's Dataplanes), created owned by that Zone so that
//!   deleting the Zone deletes them. On a zone, every row of a type zones do not provide
//!   ("global wins"), and of the others only the rows that came from global (a zone's own
//!   resources are never deleted by sync);
//! * a resource that cannot be applied is left out and named in the NACK; the rest of the
//!   batch is applied.

use std::collections::BTreeSet;

use crate::model::labels::{self, ORIGIN, ORIGIN_GLOBAL, ZONE};
use crate::model::{KdsFlags, Key, Resource, ResourceType};
use crate::store::WriteOp;

/// Which control plane receives.
#[derive(Clone, Copy, Debug)]
pub enum Side<'a> {
    /// Global, receiving from zone `zone`.
    Global { zone: &'a str },
    /// A zone, receiving from global.
    Zone,
}

impl Side<'_> {
    /// May this stream change or delete the local row `r`?
    pub fn owns(&self, r: &Resource) -> bool {
        match self {
            Side::Global { zone } => {
                r.labels.get(ZONE).map(String::as_str) == Some(*zone) || r.name.starts_with(&format!("{zone}."))
            }
            Side::Zone => {
                !r.descriptor().kds.has(KdsFlags::PROVIDED_BY_ZONE)
                    || r.labels.get(ORIGIN).map(String::as_str) == Some(ORIGIN_GLOBAL)
            }
        }
    }
}

/// A batch of one type, decoded.
#[derive(Debug, Default)]
pub struct Batch {
    /// Resources to create or update (already mapped: names, labels, pins).
    pub resources: Vec<Resource>,
    /// Keys (mesh, name) of `removed_resources`.
    pub removed: Vec<(String, String)>,
    /// Keys (mesh, name) that came but could not be read, with the reason; their local
    /// rows are left as they are.
    pub invalid: Vec<((String, String), String)>,
}

/// The writes that apply `batch` of `rtype` to `local` (every local row of the type), and
/// the reasons to NACK with (empty: ACK).
pub fn plan(
    side: Side<'_>,
    rtype: ResourceType,
    initial: bool,
    local: &[impl std::borrow::Borrow<Resource>],
    batch: Batch,
) -> (Vec<WriteOp>, Vec<String>) {
    let mut errors: Vec<String> = batch.invalid.iter().map(|((m, n), e)| format!("{}: {e}", wire_key(m, n))).collect();
    let mut ops = Vec::new();
    // Indexed once: a scan per received resource made the first sync of 10,000
    // Dataplanes 10,000 scans of 10,000.
    let local: Vec<&Resource> = local.iter().map(std::borrow::Borrow::borrow).collect();
    let index: std::collections::HashMap<(&str, &str), &Resource> =
        local.iter().map(|r| ((r.mesh.as_str(), r.name.as_str()), *r)).collect();
    let find = |mesh: &str, name: &str| index.get(&(mesh, name)).copied();
    let mut seen: BTreeSet<(String, String)> = batch.invalid.iter().map(|(k, _)| k.clone()).collect();
    for mut r in batch.resources {
        seen.insert((r.mesh.clone(), r.name.clone()));
        if let Some(existing) = find(&r.mesh, &r.name)
            && !side.owns(existing)
        {
            let whose = match existing.labels.get(ZONE) {
                Some(z) if !labels::locally_originated(&existing.labels, matches!(side, Side::Global { .. })) => {
                    format!("zone {z}")
                }
                _ => "this control plane".to_string(),
            };
            errors.push(format!(
                "{}: a {} of that name already exists and belongs to {whose}; it is kept",
                wire_key(&r.mesh, &r.name),
                rtype.name()
            ));
            continue;
        }
        if let Side::Global { zone } = side {
            r.owner = Some((ResourceType::Zone, String::new(), zone.to_string()));
        }
        ops.push(WriteOp::Upsert(r));
    }
    for (mesh, name) in &batch.removed {
        if let Some(existing) = find(mesh, name)
            && side.owns(existing)
        {
            ops.push(WriteOp::Delete(existing.key()));
        }
    }
    if initial {
        for r in local.iter().filter(|r| side.owns(r) && !seen.contains(&(r.mesh.clone(), r.name.clone()))) {
            ops.push(WriteOp::Delete(r.key()));
        }
    }
    errors.sort();
    (ops, errors)
}

/// The name of a resource on the wire: `<name>.<mesh>` (`<name>.` for global-scoped types).
pub fn wire_key(mesh: &str, name: &str) -> String {
    format!("{name}.{mesh}")
}

/// Split a wire name at its last `.` into (mesh, name): names may contain dots
/// (`default.ca-builtin-cert-ca-1.default`), meshes may not.
pub fn split_wire_key(key: &str) -> (String, String) {
    match key.rsplit_once('.') {
        Some((name, mesh)) => (mesh.to_string(), name.to_string()),
        None => (String::new(), key.to_string()),
    }
}

/// The key of a local row from a wire name of `rtype`.
pub fn local_key(rtype: ResourceType, wire: &str) -> Key {
    let (mesh, name) = split_wire_key(wire);
    crate::model::key(rtype, &mesh, &name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(v: serde_json::Value) -> Resource {
        Resource::from_json(&v).unwrap()
    }

    fn dp(name: &str, zone: &str) -> Resource {
        res(json!({"type": "Dataplane", "mesh": "default", "name": name,
            "labels": {"kuma.io/origin": "zone", "kuma.io/zone": zone}}))
    }

    fn deleted(ops: &[WriteOp]) -> Vec<String> {
        ops.iter().filter_map(|o| if let WriteOp::Delete(k) = o { Some(k.2.clone()) } else { None }).collect()
    }

    fn upserted(ops: &[WriteOp]) -> Vec<String> {
        ops.iter().filter_map(|o| if let WriteOp::Upsert(r) = o { Some(r.name.clone()) } else { None }).collect()
    }

    #[test]
    fn an_initial_sync_deletes_only_what_the_stream_owns() {
        let local = vec![dp("a", "zone-1"), dp("b", "zone-1"), dp("c", "zone-2")];
        let batch = Batch { resources: vec![dp("a", "zone-1")], ..Default::default() };
        let (ops, errors) = plan(Side::Global { zone: "zone-1" }, ResourceType::Dataplane, true, &local, batch);
        assert!(errors.is_empty());
        assert_eq!(upserted(&ops), vec!["a"]);
        assert_eq!(deleted(&ops), vec!["b"]); // not zone-2's c
        // Global owns what a zone sent through the Zone, so deleting the Zone deletes it.
        let WriteOp::Upsert(a) = &ops[0] else { panic!() };
        assert_eq!(a.owner, Some((ResourceType::Zone, String::new(), "zone-1".into())));
    }

    #[test]
    fn a_later_response_touches_only_its_names() {
        let local = vec![dp("a", "zone-1"), dp("b", "zone-1"), dp("c", "zone-2")];
        let batch = Batch {
            resources: vec![dp("d", "zone-1")],
            removed: vec![("default".into(), "b".into()), ("default".into(), "c".into())],
            ..Default::default()
        };
        let (ops, _) = plan(Side::Global { zone: "zone-1" }, ResourceType::Dataplane, false, &local, batch);
        assert_eq!(upserted(&ops), vec!["d"]);
        assert_eq!(deleted(&ops), vec!["b"]); // zone-1 cannot remove zone-2's c
    }

    #[test]
    fn on_a_zone_global_wins_except_over_the_zones_own_resources() {
        let local_mesh = res(json!({"type": "Mesh", "name": "old"}));
        let own_secret = res(json!({"type": "Secret", "mesh": "default", "name": "s", "data": "eA==",
            "labels": {"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"}}));
        let synced_secret = res(json!({"type": "Secret", "mesh": "default", "name": "t", "data": "eA==",
            "labels": {"kuma.io/origin": "global"}}));
        // Meshes: every local one is global's to delete.
        let (ops, _) = plan(Side::Zone, ResourceType::Mesh, true, &[local_mesh], Batch::default());
        assert_eq!(deleted(&ops), vec!["old"]);
        // Secrets: a zone's own survives the initial sync and a same-named global one is refused.
        let incoming = res(json!({"type": "Secret", "mesh": "default", "name": "s", "data": "eQ==",
            "labels": {"kuma.io/origin": "global"}}));
        let local = vec![own_secret, synced_secret];
        let (ops, errors) = plan(
            Side::Zone,
            ResourceType::Secret,
            true,
            &local,
            Batch { resources: vec![incoming], ..Default::default() },
        );
        assert_eq!(deleted(&ops), vec!["t"]);
        assert!(upserted(&ops).is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("s.default: a Secret of that name already exists"), "{errors:?}");
    }

    #[test]
    fn invalid_resources_are_reported_and_their_rows_kept() {
        let local = vec![dp("a", "zone-1")];
        let batch = Batch { invalid: vec![(("default".into(), "a".into()), "bad spec".into())], ..Default::default() };
        let (ops, errors) = plan(Side::Global { zone: "zone-1" }, ResourceType::Dataplane, true, &local, batch);
        assert!(ops.is_empty());
        assert_eq!(errors, vec!["a.default: bad spec"]);
    }

    #[test]
    fn wire_keys_split_at_the_last_dot() {
        assert_eq!(
            split_wire_key("default.ca-builtin-cert-ca-1.default"),
            ("default".into(), "default.ca-builtin-cert-ca-1".into())
        );
        assert_eq!(split_wire_key("zone-ingress-abc."), (String::new(), "zone-ingress-abc".into()));
        assert_eq!(wire_key("", "z"), "z.");
    }
}
