//! The Dataplanes of this control plane, parsed once and kept up to date from the store's
//! change events (a small part of Kuma's mesh context).
//!
//! Everything derived from Dataplanes (a zone ingress's configuration, its
//! `availableServices`, ServiceInsights, VIPs, sidecar endpoints) used to list and parse
//! every Dataplane on every change: at 10,000 Dataplanes that was most of cp's CPU for a
//! one-endpoint change. A read here costs what changed since the last read: it applies the
//! events queued on its own receiver, one `get` per changed key, and shares the rest.
//!
//! Consistency: a reader reacts to an event it received from the store; the same broadcast
//! put that event in this index's receiver before, so draining the receiver at read time
//! covers it, and the `get` returns the resource as of now (never older than the event).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::{Mutex, broadcast};

use crate::lifecycle::{is_online, joining};
use crate::model::{DataplaneSpec, Resource, ResourceType, SERVICE_TAG};
use crate::store::{ChangeEvent, Store, StoreError};
use crate::xds::generate::{EndpointPlan, inbound_endpoints, inbound_services};
use crate::xds::sni::sni_from_tags;

/// One Dataplane with its spec parsed.
#[derive(Debug)]
pub struct DataplaneView {
    pub resource: Resource,
    /// The parsed spec (the default, with no networking, when it does not parse: such a
    /// Dataplane offers nothing).
    pub spec: DataplaneSpec,
}

impl DataplaneView {
    pub fn new(resource: Resource) -> Self {
        let spec = resource.typed().unwrap_or_default();
        DataplaneView { resource, spec }
    }

    pub fn mesh(&self) -> &str {
        &self.resource.mesh
    }

    /// The inbounds of the Dataplane (none without networking).
    pub fn inbounds(&self) -> &[crate::model::Inbound] {
        self.spec.networking.as_ref().map(|n| n.inbound.as_slice()).unwrap_or(&[])
    }
}

type MeshName = (String, String);

/// What the serving Dataplanes offer for one service of one mesh.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceOffer {
    /// The full tag sets of its healthy inbounds, with how many inbounds have each.
    pub tag_sets: BTreeMap<BTreeMap<String, String>, u32>,
    /// Its endpoints, with how many inbounds give each.
    endpoints: BTreeMap<EndpointPlan, u32>,
    /// A new value whenever anything above changes (unique in the process): what was
    /// generated from an offer with the same stamp still holds.
    pub stamp: u64,
}

impl ServiceOffer {
    /// The endpoints, sorted, each once.
    pub fn endpoints(&self) -> Vec<EndpointPlan> {
        self.endpoints.keys().cloned().collect()
    }
}

/// A consistent view of every Dataplane and of its proxy's state.
#[derive(Clone, Debug, Default)]
pub struct Dataplanes {
    by_key: BTreeMap<MeshName, Arc<DataplaneView>>,
    /// Proxies whose insight says they are still joining (connected, listeners not ACKed).
    joining: BTreeSet<MeshName>,
    /// Proxies with an open subscription.
    online: BTreeSet<MeshName>,
    /// What the serving Dataplanes offer, kept with them so that a change costs what it
    /// changed: (mesh, the tags as an SNI, the tags) -> healthy inbounds with those tags.
    services: BTreeMap<(String, String, BTreeMap<String, String>), u32>,
    /// (mesh, service) -> what its serving inbounds offer.
    offers: BTreeMap<MeshName, ServiceOffer>,
    /// (mesh, service) of every Dataplane's inbounds, ready or not -> how many inbounds.
    service_names: BTreeMap<MeshName, u32>,
    /// A new value whenever a (mesh, service) appears in or leaves `service_names`.
    service_names_stamp: u64,
    /// Which state of the index this is: equal generations, equal content.
    generation: u64,
}

impl Dataplanes {
    /// The entries of one mesh or of all, by mesh then name.
    fn entries<'a>(
        &'a self,
        mesh: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a MeshName, &'a Arc<DataplaneView>)> + 'a {
        let start = (mesh.unwrap_or_default().to_string(), String::new());
        self.by_key.range(start..).take_while(move |((m, _), _)| mesh.is_none_or(|mesh| m == mesh))
    }

    /// Every Dataplane, of one mesh or of all, by mesh then name.
    pub fn all<'a>(&'a self, mesh: Option<&'a str>) -> impl Iterator<Item = &'a Arc<DataplaneView>> + 'a {
        self.entries(mesh).map(|(_, v)| v)
    }

    /// The Dataplanes that are endpoints: all but those whose proxy is still joining.
    pub fn serving<'a>(&'a self, mesh: Option<&'a str>) -> impl Iterator<Item = &'a Arc<DataplaneView>> + 'a {
        self.entries(mesh).filter(|(k, _)| !self.joining.contains(*k)).map(|(_, v)| v)
    }

    /// Every Dataplane of a mesh (or of all), with whether its proxy has an open subscription.
    pub fn with_online<'a>(&'a self, mesh: Option<&'a str>) -> impl Iterator<Item = (&'a DataplaneView, bool)> + 'a {
        self.entries(mesh).map(|(k, v)| (v.as_ref(), self.online.contains(k)))
    }

    /// Whether the proxy of a Dataplane has an open subscription.
    #[cfg(test)]
    pub fn is_online(&self, mesh: &str, name: &str) -> bool {
        self.online.contains(&(mesh.to_string(), name.to_string()))
    }

    /// `availableServices` of the meshes `include` accepts: one entry per (mesh, full tag
    /// set) of the serving Dataplanes' healthy inbounds, by mesh, then tags as an SNI.
    /// (What [`Dataplanes::available_services_json`] is checked against.)
    #[cfg(test)]
    pub fn available_services(&self, include: impl Fn(&str) -> bool) -> Vec<crate::model::AvailableService> {
        self.services
            .iter()
            .filter(|((mesh, _, _), _)| include(mesh))
            .map(|((mesh, _, tags), n)| crate::model::AvailableService {
                tags: tags.clone(),
                instances: *n,
                mesh: mesh.clone(),
                external_service: false,
            })
            .collect()
    }

    /// [`Dataplanes::available_services`] of every mesh as the JSON a ZoneIngress stores,
    /// built directly (the same as serialising the list).
    pub fn available_services_json(&self) -> serde_json::Value {
        use serde_json::Value;
        let entry = |((mesh, _, tags), n): (&(String, String, BTreeMap<String, String>), &u32)| {
            let tags = tags.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            let mut m = serde_json::Map::new();
            m.insert("tags".into(), Value::Object(tags));
            m.insert("instances".into(), (*n).into());
            m.insert("mesh".into(), mesh.clone().into());
            Value::Object(m)
        };
        Value::Array(self.services.iter().map(entry).collect())
    }

    /// Whether `stored` is [`Dataplanes::available_services_json`], compared in place
    /// (thousands of entries at scale: neither side is built or parsed).
    pub fn available_services_match(&self, stored: &serde_json::Value) -> bool {
        let Some(list) = stored.as_array() else { return false };
        list.len() == self.services.len()
            && list.iter().zip(&self.services).all(|(v, ((mesh, _, tags), n))| {
                let Some(o) = v.as_object() else { return false };
                let same_tags = o.get("tags").and_then(|t| t.as_object()).is_some_and(|t| {
                    t.len() == tags.len()
                        && tags.iter().all(|(k, val)| t.get(k).and_then(|x| x.as_str()) == Some(val.as_str()))
                });
                o.len() == 3
                    && same_tags
                    && o.get("instances").and_then(|i| i.as_u64()) == Some(u64::from(*n))
                    && o.get("mesh").and_then(|m| m.as_str()) == Some(mesh.as_str())
            })
    }

    /// The endpoints of a service in a mesh, sorted, each once.
    #[cfg(test)]
    pub fn endpoints(&self, mesh: &str, service: &str) -> Vec<EndpointPlan> {
        self.offers.get(&(mesh.to_string(), service.to_string())).map(ServiceOffer::endpoints).unwrap_or_default()
    }

    /// What each service of the meshes `include` accepts is offered, by mesh, then service.
    pub fn offers<'a>(
        &'a self,
        include: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a MeshName, &'a ServiceOffer)> + 'a {
        self.offers.iter().filter(move |((mesh, _), _)| include(mesh))
    }

    /// Every Dataplane of `resources`, all serving (tests and tools).
    pub fn from_resources(resources: impl IntoIterator<Item = Resource>) -> Self {
        let mut out = Dataplanes { generation: next_generation(), ..Default::default() };
        for r in resources {
            out.set_dataplane((r.mesh.clone(), r.name.clone()), Some(r));
        }
        out
    }

    /// The services of each mesh's Dataplanes (ready or not).
    pub fn service_names(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (mesh, svc) in self.service_names.keys() {
            out.entry(mesh.as_str()).or_default().insert(svc.as_str());
        }
        out
    }

    /// Equal for two reads in which [`Dataplanes::service_names`] is the same.
    pub fn service_names_stamp(&self) -> u64 {
        self.service_names_stamp
    }

    /// Equal for two reads with no Dataplane change between them.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn set_dataplane(&mut self, key: MeshName, r: Option<Resource>) {
        let serving = !self.joining.contains(&key);
        let old = match r {
            Some(r) => self.by_key.insert(key.clone(), Arc::new(DataplaneView::new(r))),
            None => self.by_key.remove(&key),
        };
        let new = self.by_key.get(&key).cloned();
        let mut names_changed = false;
        for (view, add) in [(old.as_ref(), false), (new.as_ref(), true)] {
            for inb in view.map(|v| v.inbounds()).unwrap_or_default() {
                if let Some(svc) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) {
                    names_changed |= count(&mut self.service_names, (key.0.clone(), svc.clone()), add);
                }
            }
        }
        if names_changed {
            self.service_names_stamp = next_generation();
        }
        if serving {
            if let Some(old) = old {
                self.offer(&old, false);
            }
            if let Some(new) = self.by_key.get(&key).cloned() {
                self.offer(&new, true);
            }
        }
    }

    fn set_insight(&mut self, key: MeshName, insight: Option<&Resource>) {
        let (j, o) = insight.map_or((false, false), |i| (joining(i), is_online(i)));
        let was_joining = self.joining.contains(&key);
        for (set, member) in [(&mut self.joining, j), (&mut self.online, o)] {
            if member {
                set.insert(key.clone());
            } else {
                set.remove(&key);
            }
        }
        if was_joining != j
            && let Some(view) = self.by_key.get(&key).cloned()
        {
            self.offer(&view, !j);
        }
    }

    /// Adds (or takes back) what a serving Dataplane offers.
    fn offer(&mut self, view: &DataplaneView, add: bool) {
        let mesh = view.mesh();
        let mut touched = BTreeSet::new();
        for tags in inbound_services(view) {
            let key = (mesh.to_string(), sni_from_tags("", tags), tags.clone());
            count(&mut self.services, key, add);
            let service = tags.get(SERVICE_TAG).cloned().unwrap_or_default();
            let offer = self.offers.entry((mesh.to_string(), service.clone())).or_default();
            count(&mut offer.tag_sets, tags.clone(), add);
            touched.insert(service);
        }
        for (service, endpoint) in inbound_endpoints(view) {
            let offer = self.offers.entry((mesh.to_string(), service.clone())).or_default();
            count(&mut offer.endpoints, endpoint, add);
            touched.insert(service);
        }
        for service in touched {
            let key = (mesh.to_string(), service);
            if let Some(offer) = self.offers.get_mut(&key) {
                offer.stamp = next_generation();
                if offer.tag_sets.is_empty() && offer.endpoints.is_empty() {
                    self.offers.remove(&key);
                }
            }
        }
    }
}

/// Counts `key` once more (or once less, forgetting it at zero); whether it appeared or left.
fn count<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, add: bool) -> bool {
    if add {
        let n = map.entry(key).or_default();
        *n += 1;
        *n == 1
    } else if let std::collections::btree_map::Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
            return true;
        }
        false
    } else {
        false
    }
}

/// The index: the latest [`Dataplanes`] and the events not applied to it yet.
pub struct DataplaneIndex {
    state: Mutex<State>,
}

struct State {
    events: broadcast::Receiver<ChangeEvent>,
    current: Option<Arc<Dataplanes>>,
}

/// Generations are unique in the process, so that two different sets never share one.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl DataplaneIndex {
    /// An index fed by `events` (subscribe before anything reads, so nothing is missed).
    pub fn new(events: broadcast::Receiver<ChangeEvent>) -> Self {
        DataplaneIndex { state: Mutex::new(State { events, current: None }) }
    }

    /// The Dataplanes as the store has them now, sharing what did not change.
    pub async fn read(&self, store: &dyn Store) -> Result<Arc<Dataplanes>, StoreError> {
        let mut st = self.state.lock().await;
        let mut changed: BTreeSet<(ResourceType, MeshName)> = BTreeSet::new();
        let mut reload = st.current.is_none();
        loop {
            match st.events.try_recv() {
                Ok(e) if matches!(e.rtype(), ResourceType::Dataplane | ResourceType::DataplaneInsight) => {
                    changed.insert((e.key.0, (e.key.1, e.key.2)));
                }
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(_)) => reload = true,
                Err(_) => break,
            }
        }
        if reload {
            let mut fresh = load(store).await?;
            fresh.generation = next_generation();
            let fresh = Arc::new(fresh);
            st.current = Some(fresh.clone());
            return Ok(fresh);
        }
        let current = st.current.as_mut().expect("loaded above");
        if !changed.is_empty() {
            // Copies the map (not the views) only when a reader still holds the old one.
            let next = Arc::make_mut(current);
            next.generation = next_generation();
            for (rtype, key) in changed {
                let r = store.get(rtype, &key.0, &key.1).await?;
                match rtype {
                    ResourceType::Dataplane => next.set_dataplane(key, r),
                    _ => next.set_insight(key, r.as_ref()),
                }
            }
        }
        Ok(current.clone())
    }
}

async fn load(store: &dyn Store) -> Result<Dataplanes, StoreError> {
    let mut out = Dataplanes::default();
    for i in store.list(ResourceType::DataplaneInsight, None).await? {
        out.set_insight((i.mesh.clone(), i.name.clone()), Some(&i));
    }
    for d in store.list(ResourceType::Dataplane, None).await? {
        out.set_dataplane((d.mesh.clone(), d.name.clone()), Some(d));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use serde_json::json;

    fn res(v: serde_json::Value) -> Resource {
        Resource::from_json(&v).unwrap()
    }

    fn dp(mesh: &str, name: &str, svc: &str) -> Resource {
        res(json!({"type":"Dataplane","mesh":mesh,"name":name,
            "networking":{"address":"10.0.0.1","inbound":[{"port":1,"tags":{"kuma.io/service":svc}}]}}))
    }

    fn names<'a>(it: impl Iterator<Item = &'a Arc<DataplaneView>>) -> Vec<String> {
        it.map(|d| format!("{}/{}", d.mesh(), d.resource.name)).collect()
    }

    /// What an index kept up to date offers is what one loaded from scratch offers.
    async fn assert_offers_match(index: &DataplaneIndex, store: &MemoryStore) {
        let kept = index.read(store).await.unwrap();
        let fresh = load(store).await.unwrap();
        assert_eq!(kept.services, fresh.services);
        let unstamped = |d: &Dataplanes| -> Vec<(MeshName, ServiceOffer)> {
            d.offers.iter().map(|(k, o)| (k.clone(), ServiceOffer { stamp: 0, ..o.clone() })).collect()
        };
        assert_eq!(unstamped(&kept), unstamped(&fresh));
    }

    #[tokio::test]
    async fn reads_follow_writes_and_share_what_did_not_change() {
        let store = MemoryStore::new();
        store.upsert(dp("a", "x", "web"), None).await.unwrap();
        let index = DataplaneIndex::new(store.events());
        store.upsert(dp("b", "y", "api"), None).await.unwrap();
        let first = index.read(&store).await.unwrap();
        assert_eq!(names(first.all(None)), ["a/x", "b/y"]);
        assert_eq!(names(first.all(Some("b"))), ["b/y"]);
        assert!(first.all(Some("c")).next().is_none());

        // A change to one Dataplane: the other's view is the same Arc.
        store.upsert(dp("b", "y", "api-2"), None).await.unwrap();
        let second = index.read(&store).await.unwrap();
        assert_offers_match(&index, &store).await;
        assert!(Arc::ptr_eq(first.all(Some("a")).next().unwrap(), second.all(Some("a")).next().unwrap()));
        assert_eq!(second.all(Some("b")).next().unwrap().inbounds()[0].tags["kuma.io/service"], "api-2");
        // The first reader's view is untouched.
        assert_eq!(first.all(Some("b")).next().unwrap().inbounds()[0].tags["kuma.io/service"], "api");

        // A joining proxy is not serving; once it acknowledged its listeners it is.
        let sub = |acked: &str| {
            res(json!({"type":"DataplaneInsight","mesh":"a","name":"x","subscriptions":[{"id":"1",
                "connectTime":"2026-01-01T00:00:00Z","status":{"lds":{"responsesAcknowledged":acked}}}]}))
        };
        store.upsert(sub("0"), None).await.unwrap();
        let third = index.read(&store).await.unwrap();
        assert_eq!(names(third.serving(None)), ["b/y"]);
        assert_eq!(third.available_services(|_| true).len(), 1, "a joining proxy offers nothing");
        assert_offers_match(&index, &store).await;
        assert!(third.is_online("a", "x"));
        store.upsert(sub("1"), None).await.unwrap();
        assert_eq!(names(index.read(&store).await.unwrap().serving(None)), ["a/x", "b/y"]);
        assert_offers_match(&index, &store).await;
        // Two Dataplanes with the same endpoint: it stays while one of them is left.
        let mut twin = dp("a", "x2", "web");
        twin.name = "x2".into();
        store.upsert(twin, None).await.unwrap();
        let both = index.read(&store).await.unwrap();
        assert_eq!(both.endpoints("a", "web").len(), 1);
        assert_eq!(both.available_services(|m| m == "a")[0].instances, 2);
        // The JSON built directly is the serialised list, and matches only itself.
        let json = both.available_services_json();
        assert_eq!(json, serde_json::to_value(both.available_services(|_| true)).unwrap());
        assert!(both.available_services_match(&json));
        assert!(!first.available_services_match(&json), "other counts");
        let mut other = json.clone();
        other[0]["tags"]["kuma.io/service"] = "x".into();
        assert!(!both.available_services_match(&other));
        store.delete(ResourceType::Dataplane, "a", "x").await.unwrap();
        assert_eq!(index.read(&store).await.unwrap().endpoints("a", "web").len(), 1);
        assert_offers_match(&index, &store).await;

        // Deleted: gone, and nothing read again when nothing changed.
        store.delete(ResourceType::Dataplane, "b", "y").await.unwrap();
        let fourth = index.read(&store).await.unwrap();
        assert_eq!(names(fourth.all(None)), ["a/x2"]);
        assert!(fourth.endpoints("b", "api-2").is_empty());
        assert_offers_match(&index, &store).await;
        assert!(Arc::ptr_eq(&fourth, &index.read(&store).await.unwrap()));
    }
}
