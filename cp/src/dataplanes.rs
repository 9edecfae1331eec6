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

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::{Mutex, broadcast};

use crate::lifecycle::{is_online, joining};
use crate::model::labels::ZONE;
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

/// A count, with its stamp: a value of the generation counter taken when it last changed
/// (below the generation of the read that changed it, above every earlier one).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counted {
    pub n: u32,
    pub stamp: u64,
}

/// ServiceInsight figures of one service of a mesh: its Dataplanes' inbounds online and
/// offline (a proxy that is connected with every inbound ready is online), and their zones.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceStat {
    pub online: u32,
    pub offline: u32,
    /// Zone -> inbounds in it.
    pub zones: BTreeMap<String, u32>,
    /// Its stamp, as [`Counted::stamp`].
    pub stamp: u64,
}

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
    services: BTreeMap<(String, String, BTreeMap<String, String>), Counted>,
    /// The stamp of the last entry that appeared in or left `services`.
    services_keys_stamp: u64,
    /// (mesh, service) -> its ServiceInsight figures, over every Dataplane.
    stats: BTreeMap<MeshName, ServiceStat>,
    /// The stamp of the last entry that appeared in or left `stats`.
    stats_keys_stamp: u64,
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
    #[cfg(test)]
    pub fn available_services(&self, include: impl Fn(&str) -> bool) -> Vec<crate::model::AvailableService> {
        self.available()
            .filter(|(mesh, _, _)| include(mesh))
            .map(|(mesh, tags, c)| crate::model::AvailableService {
                tags: tags.clone(),
                instances: c.n,
                mesh: mesh.to_string(),
                external_service: false,
            })
            .collect()
    }

    /// Every mesh's entries of `availableServices`: (mesh, full tag set, healthy inbounds
    /// with it) of the serving Dataplanes, by mesh, then tags as an SNI.
    pub fn available(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, String>, Counted)> {
        self.services.iter().map(|((mesh, _, tags), c)| (mesh.as_str(), tags, *c))
    }

    /// How many entries [`Dataplanes::available`] has.
    pub fn available_len(&self) -> usize {
        self.services.len()
    }

    /// The stamp of the last entry that appeared in or left [`Dataplanes::available`]
    /// (an entry whose count changed has its own stamp).
    pub fn available_keys_stamp(&self) -> u64 {
        self.services_keys_stamp
    }

    /// The ServiceInsight figures of each service of a mesh, by service.
    pub fn service_stats<'a>(&'a self, mesh: &'a str) -> impl Iterator<Item = (&'a str, &'a ServiceStat)> + 'a {
        let start = (mesh.to_string(), String::new());
        self.stats.range(start..).take_while(move |((m, _), _)| m == mesh).map(|((_, svc), s)| (svc.as_str(), s))
    }

    /// The stamp of the last service that appeared in or left [`Dataplanes::service_stats`].
    pub fn service_stats_keys_stamp(&self) -> u64 {
        self.stats_keys_stamp
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
        let mut out = Dataplanes::default();
        for r in resources {
            out.set_dataplane((r.mesh.clone(), r.name.clone()), Some(r));
        }
        out.generation = next_generation();
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
        let online = self.online.contains(&key);
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
        if let Some(old) = &old {
            self.stat(old, online, false);
        }
        if let Some(new) = &new {
            self.stat(new, online, true);
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
        let was_online = self.online.contains(&key);
        for (set, member) in [(&mut self.joining, j), (&mut self.online, o)] {
            if member {
                set.insert(key.clone());
            } else {
                set.remove(&key);
            }
        }
        let Some(view) = self.by_key.get(&key).cloned() else { return };
        if was_joining != j {
            self.offer(&view, !j);
        }
        if was_online != o {
            self.stat(&view, was_online, false);
            self.stat(&view, o, true);
        }
    }

    /// Adds (or takes back) a Dataplane's inbounds in its services' figures; `connected`:
    /// whether its proxy has an open subscription.
    fn stat(&mut self, view: &DataplaneView, connected: bool, add: bool) {
        // A proxy with an inbound that is not ready is degraded, and Kuma counts a
        // degraded proxy as offline for all its services.
        let online = connected && view.inbounds().iter().all(|i| i.is_healthy());
        for inb in view.inbounds() {
            let Some(svc) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
            let key = (view.mesh().to_string(), svc.clone());
            let zone = inb.tags.get(ZONE).or_else(|| view.resource.labels.get(ZONE));
            let stamp = next_generation();
            if add {
                let s = self.stats.entry(key).or_insert_with(|| {
                    self.stats_keys_stamp = stamp;
                    ServiceStat::default()
                });
                *(if online { &mut s.online } else { &mut s.offline }) += 1;
                if let Some(z) = zone {
                    *s.zones.entry(z.clone()).or_default() += 1;
                }
                s.stamp = stamp;
            } else if let Some(s) = self.stats.get_mut(&key) {
                let n = if online { &mut s.online } else { &mut s.offline };
                *n = n.saturating_sub(1);
                if let Some(z) = zone
                    && let Some(c) = s.zones.get_mut(z)
                {
                    *c -= 1;
                    if *c == 0 {
                        s.zones.remove(z);
                    }
                }
                s.stamp = stamp;
                if s.online + s.offline == 0 {
                    self.stats.remove(&key);
                    self.stats_keys_stamp = stamp;
                }
            }
        }
    }

    /// Adds (or takes back) what a serving Dataplane offers.
    fn offer(&mut self, view: &DataplaneView, add: bool) {
        let mesh = view.mesh();
        let mut touched = BTreeSet::new();
        for tags in inbound_services(view) {
            let key = (mesh.to_string(), sni_from_tags("", tags), tags.clone());
            let stamp = next_generation();
            if add {
                let c = self.services.entry(key).or_insert_with(|| {
                    self.services_keys_stamp = stamp;
                    Counted::default()
                });
                *c = Counted { n: c.n + 1, stamp };
            } else if let Entry::Occupied(mut e) = self.services.entry(key) {
                let n = e.get().n.saturating_sub(1);
                *e.get_mut() = Counted { n, stamp };
                if n == 0 {
                    e.remove();
                    self.services_keys_stamp = stamp;
                }
            }
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
    } else if let Entry::Occupied(mut e) = map.entry(key) {
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
            for (rtype, key) in changed {
                let r = match store.get(rtype, &key.0, &key.1).await {
                    Ok(r) => r,
                    Err(e) => {
                        // The events are drained and the state half applied: load it anew.
                        st.current = None;
                        return Err(e);
                    }
                };
                match rtype {
                    ResourceType::Dataplane => next.set_dataplane(key, r),
                    _ => next.set_insight(key, r.as_ref()),
                }
            }
            // After the changes: every stamp in this state is below it, and every stamp a
            // later read gives is above it (what `Written` relies on).
            next.generation = next_generation();
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
        let counts =
            |d: &Dataplanes| d.available().map(|(m, t, c)| (m.to_string(), t.clone(), c.n)).collect::<Vec<_>>();
        assert_eq!(counts(&kept), counts(&fresh));
        let stats = |d: &Dataplanes| -> Vec<(MeshName, ServiceStat)> {
            d.stats.iter().map(|(k, s)| (k.clone(), ServiceStat { stamp: 0, ..s.clone() })).collect()
        };
        assert_eq!(stats(&kept), stats(&fresh));
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
