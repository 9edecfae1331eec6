//! The server side of incremental (Delta) xDS, for ADS to proxies and for both KDS
//! directions: per type, what the client subscribed to and which version of each resource
//! it holds; a response carries only what changed and the names that went away.
//!
//! A resource is recorded as held when it is sent, so a NACKed resource is not sent again
//! until it changes (go-control-plane's behaviour, which Kuma relies on). Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};

use super::generate::{Named, ProxySnapshot};
use super::sotw::set_version;

#[derive(Default)]
struct DeltaType {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has: name -> version.
    client_has: BTreeMap<String, String>,
    /// The resources of the last response's snapshot, when the client is subscribed to all
    /// and `client_has` is exactly them: the next diff compares the new list with this one
    /// position by position, by pointer first (generation reuses what did not change), and
    /// looks no name up unless a resource came or went.
    sent: Option<Arc<Vec<Named>>>,
}

impl DeltaType {
    /// The resources of `all` that differ from `sent`, when `all` has the same names in the
    /// same order; `None` otherwise.
    fn changed_since_sent<'a>(&self, all: &'a [Named]) -> Option<Vec<&'a Named>> {
        let sent = self.sent.as_deref().filter(|s| s.len() == all.len())?;
        let mut updated = Vec::new();
        for (n, s) in all.iter().zip(sent) {
            if Named::same(n, s) {
                continue;
            }
            if n.name != s.name {
                return None;
            }
            if n.version != s.version {
                updated.push(n);
            }
        }
        Some(updated)
    }
}

/// The state of one Delta stream.
#[derive(Default)]
pub struct Delta {
    types: BTreeMap<String, DeltaType>,
    nonce: u64,
}

/// What a request said about the previous response of its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The first request of a type (a subscription), no nonce.
    Subscribe,
    Ack,
    Nack(String),
}

/// One walk over the desired resources and what the client holds, both sorted by name: the
/// resources it lacks or holds in another version, and the names it holds that are no longer
/// desired.
fn merge<'a>(desired: &[&'a Named], held: &BTreeMap<String, String>) -> (Vec<&'a Named>, Vec<String>) {
    let (mut updated, mut removed) = (vec![], vec![]);
    let mut held = held.iter().peekable();
    for n in desired {
        while let Some((k, _)) = held.next_if(|(k, _)| k.as_str() < n.name.as_str()) {
            removed.push(k.clone());
        }
        match held.next_if(|(k, _)| **k == n.name) {
            Some((_, version)) if *version == n.version => {}
            _ => updated.push(*n),
        }
    }
    removed.extend(held.map(|(k, _)| k.clone()));
    (updated, removed)
}

pub fn classify(r: &DeltaDiscoveryRequest) -> Reply {
    match (&r.error_detail, r.response_nonce.is_empty()) {
        (Some(e), _) => Reply::Nack(e.message.clone()),
        (None, true) => Reply::Subscribe,
        (None, false) => Reply::Ack,
    }
}

impl Delta {
    /// The response for `type_url` after `snap` changed, if the client lacks anything.
    /// `force` answers even with nothing to say (the first response of a subscription).
    pub fn diff(&mut self, snap: &ProxySnapshot, type_url: &str, force: bool) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.get_mut(type_url)?;
        let all = snap.resources(type_url);
        let (updated, removed) = match st.changed_since_sent(all) {
            Some(updated) => (updated, Vec::new()),
            None => {
                let mut desired: Vec<&Named> =
                    all.iter().filter(|n| st.wildcard || st.names.contains(&n.name)).collect();
                // Generation emits names in order, so this is one linear pass; it makes the
                // walk below a merge of two sorted sequences instead of a map lookup per
                // resource.
                desired.sort_by(|a, b| a.name.cmp(&b.name));
                merge(&desired, &st.client_has)
            }
        };
        st.sent = if st.wildcard { snap.shared(type_url).cloned() } else { None };
        if updated.is_empty() && removed.is_empty() && !force {
            return None;
        }
        for n in &updated {
            st.client_has.insert(n.name.clone(), n.version.clone());
        }
        for r in &removed {
            st.client_has.remove(r);
        }
        self.nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: set_version(all),
            resources: updated
                .iter()
                .map(|n| DeltaResource {
                    name: n.name.clone(),
                    version: n.version.clone(),
                    resource: Some(n.any.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
            ..Default::default()
        })
    }

    /// Handle one request; returns the response to send, if any. ACKs and NACKs are
    /// answered only when they also change the subscription.
    pub fn on_request(&mut self, snap: &ProxySnapshot, r: &DeltaDiscoveryRequest) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.entry(r.type_url.clone()).or_default();
        let first = !st.subscribed;
        if first {
            st.subscribed = true;
            st.wildcard = r.resource_names_subscribe.is_empty();
            for (k, v) in &r.initial_resource_versions {
                st.client_has.insert(k.clone(), v.clone());
            }
        }
        let mut changed = false;
        for n in &r.resource_names_subscribe {
            if n == "*" {
                changed |= !st.wildcard;
                st.wildcard = true;
            } else {
                changed |= st.names.insert(n.clone());
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                changed |= st.wildcard;
                st.wildcard = false;
            } else {
                changed |= st.names.remove(n);
                st.client_has.remove(n);
            }
        }
        if first || changed || !r.resource_names_unsubscribe.is_empty() {
            st.sent = None; // what the client holds changed: the next diff merges by name
        }
        if !first && !changed {
            return None;
        }
        self.diff(snap, &r.type_url, first)
    }

    /// The types the client subscribed to.
    pub fn subscribed(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status;

    const T: &str = "Mesh";

    fn snap(items: &[(&str, &str)]) -> ProxySnapshot {
        let mut s = ProxySnapshot::default();
        s.set(T, items.iter().map(|(n, v)| Named::new(n.to_string(), v.to_string(), Any::default())).collect());
        s
    }

    fn req(nonce: &str, subscribe: &[&str], error: Option<&str>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            response_nonce: nonce.into(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            error_detail: error.map(|m| Status { message: m.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn the_first_response_is_sent_even_empty_then_only_changes() {
        let mut d = Delta::default();
        let r = d.on_request(&snap(&[]), &req("", &["*"], None)).unwrap();
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        assert_eq!(classify(&req(&r.nonce, &[], None)), Reply::Ack);
        assert!(d.on_request(&snap(&[]), &req(&r.nonce, &[], None)).is_none());
        let s = snap(&[("a", "1"), ("b", "1")]);
        let r = d.diff(&s, T, false).unwrap();
        assert_eq!(names(&r), vec!["a", "b"]);
        assert!(d.diff(&s, T, false).is_none());
        let r = d.diff(&snap(&[("a", "2")]), T, false).unwrap();
        assert_eq!(names(&r), vec!["a"]);
        assert_eq!(r.removed_resources, vec!["b"]);
    }

    #[test]
    fn a_nacked_resource_is_not_resent_until_it_changes() {
        let mut d = Delta::default();
        let s = snap(&[("a", "1")]);
        let r = d.on_request(&s, &req("", &["*"], None)).unwrap();
        // Kuma's NACK repeats the wildcard subscription.
        let nack = req(&r.nonce, &["*"], Some("bad a"));
        assert_eq!(classify(&nack), Reply::Nack("bad a".into()));
        assert!(d.on_request(&s, &nack).is_none());
        assert!(d.diff(&s, T, false).is_none());
        assert_eq!(names(&d.diff(&snap(&[("a", "2")]), T, false).unwrap()), vec!["a"]);
    }

    #[test]
    fn initial_versions_spare_what_the_client_has() {
        let mut d = Delta::default();
        let mut r = req("", &[], None);
        r.initial_resource_versions =
            [("a".to_string(), "1".to_string()), ("gone".to_string(), "1".to_string())].into();
        let resp = d.on_request(&snap(&[("a", "1"), ("b", "1")]), &r).unwrap();
        assert_eq!(names(&resp), vec!["b"]);
        assert_eq!(resp.removed_resources, vec!["gone"]);
        assert_eq!(classify(&r), Reply::Subscribe);
    }

    #[test]
    fn a_snapshot_with_the_same_names_is_compared_by_position() {
        let mut d = Delta::default();
        let first = snap(&[("a", "1"), ("b", "1"), ("c", "1")]);
        d.on_request(&first, &req("", &["*"], None)).unwrap();
        // The same resources (one of them rebuilt with its old version) and one changed.
        let mut next = ProxySnapshot::default();
        let old = first.resources(T);
        next.set(T, vec![old[0].clone(), Named::new("b", "1", Any::default()), Named::new("c", "2", Any::default())]);
        let r = d.diff(&next, T, false).unwrap();
        assert_eq!(names(&r), vec!["c"]);
        assert!(r.removed_resources.is_empty());
        // Same length, another name in the middle: the name merge says what came and went.
        let r = d.diff(&snap(&[("a", "1"), ("bb", "1"), ("c", "2")]), T, false).unwrap();
        assert_eq!(names(&r), vec!["bb"]);
        assert_eq!(r.removed_resources, vec!["b"]);
        // After an unsubscription the client holds less than what was sent: what it dropped
        // is sent again, though the snapshot is the same one.
        let same = snap(&[("a", "1"), ("bb", "1"), ("c", "2")]);
        assert!(d.diff(&same, T, false).is_none());
        let mut unsub = req("2", &[], None);
        unsub.resource_names_unsubscribe = vec!["bb".into()];
        assert!(d.on_request(&same, &unsub).is_none());
        assert_eq!(names(&d.diff(&same, T, false).unwrap()), vec!["bb"]);
    }

    #[test]
    fn updates_and_removals_interleave_in_any_order_of_the_snapshot() {
        let mut d = Delta::default();
        let first = snap(&[("b", "1"), ("d", "1"), ("f", "1"), ("h", "1")]);
        d.on_request(&first, &req("", &["*"], None)).unwrap();
        // Out of order on purpose; names before, between and after what the client holds.
        let r = d.diff(&snap(&[("g", "1"), ("a", "1"), ("d", "2"), ("f", "1"), ("i", "1")]), T, false).unwrap();
        let mut got: Vec<(&str, &str)> = r.resources.iter().map(|r| (r.name.as_str(), r.version.as_str())).collect();
        got.sort();
        assert_eq!(got, vec![("a", "1"), ("d", "2"), ("g", "1"), ("i", "1")]);
        assert_eq!(r.removed_resources, vec!["b", "h"]);
        assert!(d.diff(&snap(&[("a", "1"), ("d", "2"), ("f", "1"), ("g", "1"), ("i", "1")]), T, false).is_none());
        let r = d.diff(&snap(&[]), T, false).unwrap();
        assert_eq!(r.removed_resources, vec!["a", "d", "f", "g", "i"]);
    }
}
