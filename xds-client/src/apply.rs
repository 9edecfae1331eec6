//! Applying one discovery response to the cache: validation, the handler call, commit or roll back,
//! and the ACK/NACK request that answers it. No I/O here, so all of it is unit-tested below.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource as WrappedResource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tracing::{info, warn};

use crate::{DeltaChange, Handler, Resource, State};

/// gRPC `INVALID_ARGUMENT`: the code Envoy puts in `error_detail` of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Type URL of `envoy.service.discovery.v3.Resource`, which a SotW server may wrap resources in.
const WRAPPED_RESOURCE_TYPE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// Every xDS resource type we know of (Listener, Cluster, ClusterLoadAssignment.cluster_name,
/// RouteConfiguration, ScopedRouteConfiguration, VirtualHost, Secret, Runtime, ...) carries its
/// name in field 1 as a string. Decoding only that field skips the rest of the message cheaply.
#[derive(Clone, PartialEq, Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

/// Whether a response was accepted, for the status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ack,
    Nack(String),
}

/// The client's memory: what was accepted, per type. Survives reconnects.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    subscribed: BTreeSet<String>,
    pub(crate) state: State,
    /// SotW: `version_info` of the last accepted response per type (what a NACK repeats).
    sotw_versions: BTreeMap<String, String>,
    /// Types that had at least one response accepted.
    pub(crate) acked: BTreeSet<String>,
}

impl Cache {
    pub(crate) fn new(type_urls: &[String]) -> Self {
        Self { subscribed: type_urls.iter().cloned().collect(), ..Default::default() }
    }

    /// Delta: `initial_resource_versions` for a new stream = name -> version of every accepted resource.
    pub(crate) fn held_versions(&self, type_url: &str) -> std::collections::HashMap<String, String> {
        self.state
            .resources
            .get(type_url)
            .map(|m| m.iter().map(|(name, r)| (name.clone(), r.version.clone())).collect())
            .unwrap_or_default()
    }

    /// SotW: validate and offer the response to the handler; returns the ACK or NACK to send.
    pub(crate) fn on_sotw(
        &mut self,
        resp: DiscoveryResponse,
        handler: &mut dyn Handler,
    ) -> (DiscoveryRequest, Verdict) {
        let DiscoveryResponse { version_info, resources, type_url, nonce, .. } = resp;
        let count = resources.len();
        let outcome = self.try_sotw(&type_url, &version_info, resources, handler);
        let verdict = match outcome {
            Ok(()) => {
                info!(type_url = %type_url, version = %version_info, resources = count, "applied xDS update (ACK)");
                self.sotw_versions.insert(type_url.clone(), version_info.clone());
                self.acked.insert(type_url.clone());
                Verdict::Ack
            }
            Err(reason) => {
                warn!(type_url = %type_url, version = %version_info, nonce = %nonce, %reason, "rejected xDS update (NACK)");
                Verdict::Nack(reason)
            }
        };
        let request = match &verdict {
            Verdict::Ack => DiscoveryRequest { version_info, response_nonce: nonce, type_url, ..Default::default() },
            Verdict::Nack(reason) => DiscoveryRequest {
                version_info: self.sotw_versions.get(&type_url).cloned().unwrap_or_default(),
                response_nonce: nonce,
                error_detail: Some(nack_status(reason)),
                type_url,
                ..Default::default()
            },
        };
        (request, verdict)
    }

    fn try_sotw(
        &mut self,
        type_url: &str,
        version: &str,
        resources: Vec<Any>,
        handler: &mut dyn Handler,
    ) -> Result<(), String> {
        if !self.subscribed.contains(type_url) {
            return Err(format!("type {type_url:?} was not subscribed"));
        }
        let mut next = BTreeMap::new();
        for (index, any) in resources.into_iter().enumerate() {
            let (name, any) = unwrap_sotw(any, type_url).map_err(|e| format!("resource #{index}: {e}"))?;
            if next.contains_key(&name) {
                return Err(format!("duplicate resource name {name:?}"));
            }
            next.insert(name, Resource { version: version.to_string(), any });
        }
        // Swap the new set in, offer it, and swap the old one back if refused: no copy of other types.
        let previous = self.state.resources.insert(type_url.to_string(), next);
        match handler.apply(&self.state, type_url) {
            Ok(()) => Ok(()),
            Err(reason) => {
                match previous {
                    Some(p) => self.state.resources.insert(type_url.to_string(), p),
                    None => self.state.resources.remove(type_url),
                };
                Err(reason)
            }
        }
    }

    /// Delta: validate, apply upserts and removals, offer to the handler; returns the ACK or NACK.
    pub(crate) fn on_delta(
        &mut self,
        resp: DeltaDiscoveryResponse,
        handler: &mut dyn Handler,
    ) -> (DeltaDiscoveryRequest, Verdict) {
        let DeltaDiscoveryResponse { system_version_info, resources, type_url, removed_resources, nonce, .. } = resp;
        let (upserts, removals) = (resources.len(), removed_resources.len());
        let outcome = self.try_delta(&type_url, resources, removed_resources, handler);
        let verdict = match outcome {
            Ok(total) => {
                info!(
                    type_url = %type_url, version = %system_version_info, upserts, removals, resources = total,
                    "applied xDS update (ACK)"
                );
                self.acked.insert(type_url.clone());
                Verdict::Ack
            }
            Err(reason) => {
                warn!(type_url = %type_url, version = %system_version_info, nonce = %nonce, %reason, "rejected xDS update (NACK)");
                Verdict::Nack(reason)
            }
        };
        let error_detail = match &verdict {
            Verdict::Ack => None,
            Verdict::Nack(reason) => Some(nack_status(reason)),
        };
        (DeltaDiscoveryRequest { type_url, response_nonce: nonce, error_detail, ..Default::default() }, verdict)
    }

    /// Returns the number of resources of the type after the update.
    fn try_delta(
        &mut self,
        type_url: &str,
        resources: Vec<WrappedResource>,
        removed: Vec<String>,
        handler: &mut dyn Handler,
    ) -> Result<usize, String> {
        if !self.subscribed.contains(type_url) {
            return Err(format!("type {type_url:?} was not subscribed"));
        }
        let existed = self.state.resources.contains_key(type_url);
        let held = self.state.resources.get(type_url);
        // Validate everything before touching the state.
        let mut upserts = Vec::with_capacity(resources.len());
        let mut seen = BTreeSet::new();
        for r in resources {
            if !seen.insert(r.name.clone()) {
                return Err(format!("duplicate resource name {:?}", r.name));
            }
            match r.resource {
                Some(any) => {
                    check_type(&any, type_url).map_err(|e| format!("resource {:?}: {e}", r.name))?;
                    upserts.push((r.name, Resource { version: r.version, any }));
                }
                // A resource without a body is a TTL heartbeat: fine for one we hold, nothing to apply.
                None if held.is_some_and(|m| m.contains_key(&r.name)) => {}
                None => return Err(format!("resource {:?} has no body and is not held", r.name)),
            }
        }
        if let Some(name) = removed.iter().find(|n| seen.contains(*n)) {
            return Err(format!("resource {name:?} is both updated and removed"));
        }

        // Apply with an undo log (name, previous value), offer, and undo in reverse if refused.
        let map = self.state.resources.entry(type_url.to_string()).or_default();
        let mut undo: Vec<(String, Option<Resource>)> = Vec::with_capacity(upserts.len() + removed.len());
        let mut change = DeltaChange::default();
        for (name, resource) in upserts {
            let previous = map.insert(name.clone(), resource);
            change.upserted.push(name.clone());
            undo.push((name, previous));
        }
        for name in removed {
            // Removing a name we do not hold is allowed by the protocol and changes nothing.
            if let Some(previous) = map.remove(&name) {
                change.removed.push(name.clone());
                undo.push((name, Some(previous)));
            }
        }
        let total = map.len();
        self.state.delta = Some(change);
        let outcome = handler.apply(&self.state, type_url);
        self.state.delta = None; // only for the handler, while it looks at this response
        match outcome {
            Ok(()) => Ok(total),
            Err(reason) => {
                let map = self.state.resources.get_mut(type_url).expect("inserted above");
                for (name, previous) in undo.into_iter().rev() {
                    match previous {
                        Some(p) => map.insert(name, p),
                        None => map.remove(&name),
                    };
                }
                if !existed {
                    self.state.resources.remove(type_url);
                }
                Err(reason)
            }
        }
    }
}

fn nack_status(reason: &str) -> RpcStatus {
    RpcStatus { code: INVALID_ARGUMENT, message: reason.to_string(), details: Vec::new() }
}

fn check_type(any: &Any, type_url: &str) -> Result<(), String> {
    if any.type_url == type_url {
        Ok(())
    } else {
        Err(format!("type {:?} does not match the response type {type_url:?}", any.type_url))
    }
}

/// SotW resources are bare `Any`s (or `Any`s wrapping a discovery `Resource`): find the name.
fn unwrap_sotw(any: Any, type_url: &str) -> Result<(String, Any), String> {
    if any.type_url == WRAPPED_RESOURCE_TYPE && type_url != WRAPPED_RESOURCE_TYPE {
        let wrapped = WrappedResource::decode(any.value.as_slice())
            .map_err(|e| format!("cannot decode the discovery Resource wrapper: {e}"))?;
        let inner = wrapped.resource.ok_or_else(|| format!("wrapped resource {:?} has no body", wrapped.name))?;
        check_type(&inner, type_url)?;
        let name = if wrapped.name.is_empty() { resource_name(&inner)? } else { wrapped.name };
        return Ok((name, inner));
    }
    check_type(&any, type_url)?;
    Ok((resource_name(&any)?, any))
}

fn resource_name(any: &Any) -> Result<String, String> {
    NameOnly::decode(any.value.as_slice())
        .map(|n| n.name)
        .map_err(|e| format!("cannot read the resource name (field 1) of a {}: {e}", any.type_url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::util::pack_any;
    use prost::Name;

    const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    fn cluster(name: &str) -> Any {
        pack_any(Cluster { name: name.into(), ..Default::default() })
    }

    /// Refuses any state holding a resource whose name starts with "bad"; remembers what it saw.
    #[derive(Default)]
    struct Picky {
        calls: usize,
        /// What each call was told the response changed.
        deltas: Vec<Option<DeltaChange>>,
    }
    impl Handler for Picky {
        fn apply(&mut self, state: &State, _changed: &str) -> Result<(), String> {
            self.calls += 1;
            self.deltas.push(state.delta.clone());
            for (name, _) in state.resources.values().flatten() {
                if name.starts_with("bad") {
                    return Err(format!("{name} is bad"));
                }
            }
            Ok(())
        }
    }

    fn names(cache: &Cache, type_url: &str) -> Vec<String> {
        cache.state.resources.get(type_url).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    fn sotw(version: &str, nonce: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            nonce: nonce.into(),
            type_url: CLUSTER.into(),
            resources,
            ..Default::default()
        }
    }

    fn res(name: &str, version: &str, any: Option<Any>) -> WrappedResource {
        WrappedResource { name: name.into(), version: version.into(), resource: any, ..Default::default() }
    }

    #[test]
    fn type_url_constant_matches_envoy_types() {
        assert_eq!(Cluster::type_url(), CLUSTER);
        assert_eq!(WrappedResource::type_url(), WRAPPED_RESOURCE_TYPE);
    }

    #[test]
    fn sotw_ack_replaces_the_set_and_nack_keeps_the_previous_one() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let mut h = Picky::default();
        let (req, v) = cache.on_sotw(sotw("1", "n1", vec![cluster("a"), cluster("b")]), &mut h);
        assert_eq!(v, Verdict::Ack);
        assert_eq!(h.deltas, [None], "a SotW response replaces its type whole");
        assert_eq!((req.version_info.as_str(), req.response_nonce.as_str()), ("1", "n1"));
        assert!(req.error_detail.is_none());
        assert_eq!(names(&cache, CLUSTER), ["a", "b"]);

        let (req, v) = cache.on_sotw(sotw("2", "n2", vec![cluster("a"), cluster("bad")]), &mut h);
        assert_eq!(v, Verdict::Nack("bad is bad".into()));
        assert_eq!((req.version_info.as_str(), req.response_nonce.as_str()), ("1", "n2"));
        let detail = req.error_detail.expect("NACK has error_detail");
        assert_eq!((detail.code, detail.message.as_str()), (3, "bad is bad"));
        assert_eq!(names(&cache, CLUSTER), ["a", "b"], "previous state kept");
        assert_eq!(cache.state.resources[CLUSTER]["a"].version, "1");

        let (_, v) = cache.on_sotw(sotw("3", "n3", vec![cluster("c")]), &mut h);
        assert_eq!(v, Verdict::Ack);
        assert_eq!(names(&cache, CLUSTER), ["c"]);
    }

    #[test]
    fn sotw_first_nack_has_empty_version_and_leaves_no_type_entry() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let (req, v) = cache.on_sotw(sotw("1", "n1", vec![cluster("bad")]), &mut Picky::default());
        assert!(matches!(v, Verdict::Nack(_)));
        assert_eq!(req.version_info, "");
        assert!(cache.state.resources.is_empty());
        assert!(cache.acked.is_empty());
    }

    #[test]
    fn sotw_rejects_mismatched_type_duplicates_unsubscribed_and_garbage_without_calling_the_handler() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let mut h = Picky::default();
        let listener = pack_any(Listener { name: "l".into(), ..Default::default() });
        let cases: Vec<(DiscoveryResponse, &str)> = vec![
            (sotw("1", "n", vec![listener.clone()]), "does not match the response type"),
            (sotw("1", "n", vec![cluster("a"), cluster("a")]), "duplicate resource name \"a\""),
            (
                DiscoveryResponse { type_url: Listener::type_url(), resources: vec![listener], ..Default::default() },
                "was not subscribed",
            ),
            (
                sotw("1", "n", vec![Any { type_url: CLUSTER.into(), value: vec![0x0a, 0x05, b'x'] }]),
                "cannot read the resource name",
            ),
        ];
        for (resp, expected) in cases {
            let (req, v) = cache.on_sotw(resp, &mut h);
            match v {
                Verdict::Nack(reason) => assert!(reason.contains(expected), "{reason:?} lacks {expected:?}"),
                Verdict::Ack => panic!("expected a NACK containing {expected:?}"),
            }
            assert!(req.error_detail.is_some());
        }
        assert_eq!(h.calls, 0);
        assert!(cache.state.resources.is_empty());
    }

    #[test]
    fn sotw_unwraps_discovery_resource_wrappers() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let wrapped = pack_any(res("w", "", Some(cluster("w"))));
        let (_, v) = cache.on_sotw(sotw("1", "n", vec![wrapped]), &mut Picky::default());
        assert_eq!(v, Verdict::Ack);
        assert_eq!(names(&cache, CLUSTER), ["w"]);
        assert_eq!(cache.state.resources[CLUSTER]["w"].any.type_url, CLUSTER);
    }

    fn delta(nonce: &str, resources: Vec<WrappedResource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: "sys".into(),
            type_url: CLUSTER.into(),
            nonce: nonce.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn delta_upserts_removes_and_rolls_back_exactly_on_nack() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let mut h = Picky::default();
        let (req, v) = cache.on_delta(
            delta("n1", vec![res("a", "1", Some(cluster("a"))), res("b", "1", Some(cluster("b")))], &[]),
            &mut h,
        );
        assert_eq!(v, Verdict::Ack);
        assert_eq!((req.response_nonce.as_str(), req.type_url.as_str()), ("n1", CLUSTER));
        assert!(req.error_detail.is_none() && req.initial_resource_versions.is_empty());

        // update a, add c, remove b and an unknown name
        let (_, v) = cache.on_delta(
            delta("n2", vec![res("a", "2", Some(cluster("a"))), res("c", "1", Some(cluster("c")))], &["b", "zz"]),
            &mut h,
        );
        assert_eq!(v, Verdict::Ack);
        assert_eq!(names(&cache, CLUSTER), ["a", "c"]);
        // The handler was told what changed: the unknown name removed is not among it.
        let told = DeltaChange { upserted: vec!["a".into(), "c".into()], removed: vec!["b".into()] };
        assert_eq!(h.deltas.last(), Some(&Some(told)));
        assert_eq!(cache.state.delta, None, "only while the handler looks");
        let held = cache.held_versions(CLUSTER);
        assert_eq!((held["a"].as_str(), held["c"].as_str(), held.len()), ("2", "1", 2));

        // refused: update a, add bad, remove c -> all undone
        let (req, v) = cache.on_delta(
            delta("n3", vec![res("a", "3", Some(cluster("a"))), res("bad", "1", Some(cluster("bad")))], &["c"]),
            &mut h,
        );
        assert_eq!(v, Verdict::Nack("bad is bad".into()));
        assert_eq!(req.response_nonce, "n3");
        assert_eq!(req.error_detail.as_ref().map(|d| d.code), Some(3));
        assert_eq!(cache.held_versions(CLUSTER), held, "versions of rejected resources are never recorded");
    }

    #[test]
    fn delta_validation_failures() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let mut h = Picky::default();
        let listener = pack_any(Listener { name: "l".into(), ..Default::default() });
        let cases = vec![
            (delta("n", vec![res("l", "1", Some(listener))], &[]), "does not match"),
            (delta("n", vec![res("a", "1", Some(cluster("a"))), res("a", "2", Some(cluster("a")))], &[]), "duplicate"),
            (delta("n", vec![res("a", "1", Some(cluster("a")))], &["a"]), "both updated and removed"),
            (delta("n", vec![res("a", "1", None)], &[]), "no body"),
        ];
        for (resp, expected) in cases {
            match cache.on_delta(resp, &mut h).1 {
                Verdict::Nack(reason) => assert!(reason.contains(expected), "{reason:?} lacks {expected:?}"),
                Verdict::Ack => panic!("expected NACK with {expected:?}"),
            }
        }
        assert_eq!(h.calls, 0);
        assert!(cache.state.resources.is_empty(), "a first NACK leaves no empty type entry");
    }

    #[test]
    fn delta_heartbeat_for_a_held_resource_changes_nothing() {
        let mut cache = Cache::new(&[CLUSTER.to_string()]);
        let mut h = Picky::default();
        cache.on_delta(delta("n1", vec![res("a", "1", Some(cluster("a")))], &[]), &mut h);
        let (_, v) = cache.on_delta(delta("n2", vec![res("a", "9", None)], &[]), &mut h);
        assert_eq!(v, Verdict::Ack);
        assert_eq!(cache.held_versions(CLUSTER)["a"], "1");
    }
}
