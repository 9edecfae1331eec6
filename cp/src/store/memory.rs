//! The in-memory store: one instance, state lost on restart (as Kuma's memory store).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use super::{ChangeEvent, ChangeKind, Edit, Key, Store, StoreError, WriteOp};
use crate::model::{Resource, ResourceType, key, now_rfc3339};

/// Room for bursts (a KDS initial sync of thousands of resources) before a slow
/// subscriber lags; a lagging one re-reads everything, so this only trades memory for work.
const EVENT_CAPACITY: usize = 4096;

#[derive(Default)]
struct Inner {
    /// Shared, so that a reader that only looks ([`Store::get_shared`]) copies nothing.
    resources: BTreeMap<Key, Arc<Resource>>,
    /// owner -> owned keys.
    owned: BTreeMap<Key, BTreeSet<Key>>,
    /// Change counter; also the version of the latest write.
    counter: u64,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    events: broadcast::Sender<ChangeEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        MemoryStore { inner: Mutex::new(Inner::default()), changes: tx, events }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Internal("store lock poisoned".into()))
    }

    /// Publishes the events of a write once the lock is released.
    fn announce(&self, counter: u64, events: Vec<ChangeEvent>) {
        if events.is_empty() {
            return;
        }
        self.changes.send_replace(counter);
        for e in events {
            let _ = self.events.send(e);
        }
    }
}

impl Inner {
    /// The write of `upsert`; `None` when nothing but the times would change.
    fn upsert(
        &mut self,
        mut resource: Resource,
        expected: Option<u64>,
    ) -> Result<(Arc<Resource>, Option<ChangeEvent>), StoreError> {
        let k = key(resource.rtype, &resource.mesh, &resource.name);
        let existing = self.resources.get(&k);
        if let Some(exp) = expected {
            let found = existing.map_or(0, |r| r.version);
            if found != exp {
                return Err(super::conflict(&k, exp, found));
            }
        }
        if let Some(old) = existing
            && old.spec == resource.spec
            && old.labels == resource.labels
            && (resource.owner.is_none() || resource.owner == old.owner)
        {
            return Ok((old.clone(), None));
        }
        let now = now_rfc3339();
        let kind = if existing.is_some() { ChangeKind::Updated } else { ChangeKind::Created };
        resource.creation_time = existing.map_or_else(|| now.clone(), |r| r.creation_time.clone());
        resource.modification_time = now;
        resource.mesh = k.1.clone();
        if resource.owner.is_none() {
            resource.owner = existing.and_then(|r| r.owner.clone());
        }
        let old_owner = existing.and_then(|r| r.owner.clone());
        self.counter += 1;
        resource.version = self.counter;
        if old_owner != resource.owner {
            if let Some(o) = &old_owner
                && let Some(set) = self.owned.get_mut(o)
            {
                set.remove(&k);
            }
            if let Some(o) = &resource.owner {
                self.owned.entry(o.clone()).or_default().insert(k.clone());
            }
        }
        let event = ChangeEvent { kind, key: k.clone(), owner: resource.owner.clone() };
        let stored = Arc::new(resource);
        self.resources.insert(k, stored.clone());
        Ok((stored, Some(event)))
    }

    /// The write of `edit`; `None` when `edit` changed nothing.
    fn edit(&mut self, k: &Key, expected: u64, edit: Edit) -> Result<(Arc<Resource>, Option<ChangeEvent>), StoreError> {
        let counter = self.counter + 1;
        let found = self.resources.get(k).map_or(0, |r| r.version);
        let Some(stored) = self.resources.get_mut(k).filter(|_| found == expected) else {
            return Err(super::conflict(k, expected, found));
        };
        // In place unless a reader holds it (then this copies it, as upsert would build it).
        let r = Arc::make_mut(stored);
        if !edit(r) {
            return Ok((stored.clone(), None));
        }
        r.modification_time = now_rfc3339();
        r.version = counter;
        self.counter = counter;
        let event = ChangeEvent { kind: ChangeKind::Updated, key: k.clone(), owner: r.owner.clone() };
        Ok((stored.clone(), Some(event)))
    }

    /// Removes `k` and what it owns, depth first; appends one event per removed resource.
    fn delete(&mut self, k: &Key, events: &mut Vec<ChangeEvent>) -> bool {
        let Some(r) = self.resources.remove(k) else { return false };
        if let Some(o) = &r.owner
            && let Some(set) = self.owned.get_mut(o)
        {
            set.remove(k);
        }
        for child in self.owned.remove(k).unwrap_or_default() {
            self.delete(&child, events);
        }
        self.counter += 1;
        events.push(ChangeEvent { kind: ChangeKind::Deleted, key: k.clone(), owner: r.owner.clone() });
        true
    }
}

#[tonic::async_trait]
impl Store for MemoryStore {
    async fn get_shared(
        &self,
        rtype: ResourceType,
        mesh: &str,
        name: &str,
    ) -> Result<Option<Arc<Resource>>, StoreError> {
        Ok(self.lock()?.resources.get(&key(rtype, mesh, name)).cloned())
    }

    async fn list_shared(&self, rtype: ResourceType, mesh: Option<&str>) -> Result<Vec<Arc<Resource>>, StoreError> {
        let inner = self.lock()?;
        Ok(super::range(&inner.resources, rtype, mesh).cloned().collect())
    }

    async fn upsert(&self, resource: Resource, expected_version: Option<u64>) -> Result<Arc<Resource>, StoreError> {
        let (stored, event, counter) = {
            let mut inner = self.lock()?;
            let (stored, event) = inner.upsert(resource, expected_version)?;
            (stored, event, inner.counter)
        };
        self.announce(counter, event.into_iter().collect());
        Ok(stored)
    }

    async fn edit(&self, key: &Key, expected_version: u64, edit: Edit) -> Result<Arc<Resource>, StoreError> {
        let (stored, event, counter) = {
            let mut inner = self.lock()?;
            let (stored, event) = inner.edit(key, expected_version, edit)?;
            (stored, event, inner.counter)
        };
        self.announce(counter, event.into_iter().collect());
        Ok(stored)
    }

    async fn delete(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<bool, StoreError> {
        let mut events = Vec::new();
        let (existed, counter) = {
            let mut inner = self.lock()?;
            let existed = inner.delete(&key(rtype, mesh, name), &mut events);
            (existed, inner.counter)
        };
        self.announce(counter, events);
        Ok(existed)
    }

    async fn apply(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let mut events = Vec::new();
        let counter = {
            let mut inner = self.lock()?;
            // Creations are checked before anything of the batch is written: all or nothing.
            for op in &ops {
                if let WriteOp::Create(r) = op
                    && let Some(old) = inner.resources.get(&key(r.rtype, &r.mesh, &r.name))
                {
                    return Err(StoreError::Conflict {
                        rtype: r.rtype.name(),
                        mesh: old.mesh.clone(),
                        name: r.name.clone(),
                        expected: 0,
                        found: old.version,
                    });
                }
            }
            for op in ops {
                match op {
                    WriteOp::Upsert(r) => {
                        if let (_, Some(e)) = inner.upsert(r, None)? {
                            events.push(e);
                        }
                    }
                    WriteOp::Delete(k) => {
                        inner.delete(&k, &mut events);
                    }
                    WriteOp::Create(r) => {
                        if let (_, Some(e)) = inner.upsert(r, Some(0))? {
                            events.push(e);
                        }
                    }
                }
            }
            inner.counter
        };
        self.announce(counter, events);
        Ok(())
    }

    fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn events(&self) -> broadcast::Receiver<ChangeEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::delete_mesh;

    #[tokio::test]
    async fn upsert_get_list_delete() {
        let s = MemoryStore::new();
        let mut rx = s.subscribe();
        let mut events = s.events();
        let mut mesh = Resource::new(ResourceType::Mesh, "", "default");
        mesh.spec.insert("x".into(), 1.into());
        let m = s.upsert(mesh.clone(), None).await.unwrap();
        assert_eq!(m.version, 1);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(events.try_recv().unwrap().kind, ChangeKind::Created);
        // Same content: no change announced.
        let again = s.upsert(mesh, None).await.unwrap();
        assert_eq!(again.version, 1);
        assert!(!rx.has_changed().unwrap());
        assert!(events.try_recv().is_err());
        let dp = Resource::new(ResourceType::Dataplane, "default", "dp-1");
        s.upsert(dp, Some(0)).await.unwrap();
        assert!(s.upsert(Resource::new(ResourceType::Dataplane, "default", "dp-1"), Some(0)).await.is_err());
        assert_eq!(s.list(ResourceType::Dataplane, Some("default")).await.unwrap().len(), 1);
        assert_eq!(s.list(ResourceType::Dataplane, Some("other")).await.unwrap().len(), 0);
        // A plain delete of a Mesh leaves its Dataplanes (KDS semantics)...
        assert!(s.delete(ResourceType::Mesh, "", "default").await.unwrap());
        assert_eq!(s.list(ResourceType::Dataplane, None).await.unwrap().len(), 1);
        // ...the REST API's mesh deletion removes them.
        s.upsert(Resource::new(ResourceType::Mesh, "", "default"), None).await.unwrap();
        assert!(delete_mesh(&s, "default").await.unwrap());
        assert!(s.list(ResourceType::Dataplane, None).await.unwrap().is_empty());
        assert!(!delete_mesh(&s, "default").await.unwrap());
    }

    #[tokio::test]
    async fn edit_changes_in_place_when_unshared_and_checks_the_version() {
        let s = MemoryStore::new();
        let mut si = Resource::new(ResourceType::ServiceInsight, "default", "all-services-default");
        si.spec.insert("services".into(), serde_json::json!({"a": 1, "b": 2}));
        let v1 = s.upsert(si, None).await.unwrap().version;
        let k = key(ResourceType::ServiceInsight, "default", "all-services-default");
        let mut events = s.events();
        // A stale version is refused, and so is a resource that is not there.
        let stale = s.edit(&k, v1 + 1, Box::new(|_| true)).await;
        assert!(matches!(stale, Err(StoreError::Conflict { found, .. }) if found == v1));
        let absent = key(ResourceType::ServiceInsight, "default", "other");
        assert!(matches!(s.edit(&absent, 1, Box::new(|_| true)).await, Err(StoreError::Conflict { found: 0, .. })));
        // An edit that changes nothing writes nothing.
        assert_eq!(s.edit(&k, v1, Box::new(|_| false)).await.unwrap().version, v1);
        assert!(events.try_recv().is_err());
        // No reader holds it: the stored resource itself is changed (same allocation).
        let before = Arc::as_ptr(&s.get_shared(k.0, &k.1, &k.2).await.unwrap().unwrap());
        let edited = s
            .edit(
                &k,
                v1,
                Box::new(|r| {
                    r.spec["services"]["a"] = 5.into();
                    true
                }),
            )
            .await
            .unwrap();
        assert_eq!(Arc::as_ptr(&edited), before);
        assert!(edited.version > v1);
        assert_eq!(edited.spec["services"], serde_json::json!({"a": 5, "b": 2}));
        assert_eq!(events.try_recv().unwrap(), ChangeEvent { kind: ChangeKind::Updated, key: k.clone(), owner: None });
        // A reader holding it keeps what it read.
        let held = s.get_shared(k.0, &k.1, &k.2).await.unwrap().unwrap();
        let v2 = held.version;
        s.edit(
            &k,
            v2,
            Box::new(|r| {
                r.spec["services"]["b"] = 7.into();
                true
            }),
        )
        .await
        .unwrap();
        assert_eq!(held.spec["services"]["b"], 2);
        assert_eq!(s.get(k.0, &k.1, &k.2).await.unwrap().unwrap().spec["services"]["b"], 7);
    }

    #[tokio::test]
    async fn deleting_an_owner_deletes_what_it_owns_recursively() {
        let s = MemoryStore::new();
        let zone = Resource::new(ResourceType::Zone, "", "zone-2");
        s.upsert(zone.clone(), None).await.unwrap();
        let mut dp = Resource::new(ResourceType::Dataplane, "default", "web-abc");
        dp.owner = Some(zone.key());
        s.upsert(dp.clone(), None).await.unwrap();
        let mut insight = Resource::new(ResourceType::DataplaneInsight, "default", "web-abc");
        insight.owner = Some(dp.key());
        s.upsert(insight, None).await.unwrap();
        // An update without an owner keeps the owner.
        let mut dp2 = Resource::new(ResourceType::Dataplane, "default", "web-abc");
        dp2.spec.insert("changed".into(), true.into());
        assert_eq!(s.upsert(dp2, None).await.unwrap().owner, Some(zone.key()));
        let mut events = s.events();
        assert!(s.delete(ResourceType::Zone, "", "zone-2").await.unwrap());
        assert!(s.list(ResourceType::Dataplane, None).await.unwrap().is_empty());
        assert!(s.list(ResourceType::DataplaneInsight, None).await.unwrap().is_empty());
        let deleted: Vec<ResourceType> = std::iter::from_fn(|| events.try_recv().ok()).map(|e| e.rtype()).collect();
        assert_eq!(deleted, vec![ResourceType::DataplaneInsight, ResourceType::Dataplane, ResourceType::Zone]);
    }

    #[tokio::test]
    async fn a_batch_with_a_creation_of_an_existing_resource_writes_nothing() {
        let s = MemoryStore::new();
        s.upsert(Resource::new(ResourceType::Zone, "", "z1"), None).await.unwrap();
        let mut events = s.events();
        let ops = vec![
            WriteOp::Upsert(Resource::new(ResourceType::Zone, "", "z0")),
            WriteOp::Create(Resource::new(ResourceType::Zone, "", "z1")),
        ];
        assert!(matches!(s.apply(ops).await, Err(StoreError::Conflict { .. })));
        assert_eq!(s.list(ResourceType::Zone, None).await.unwrap().len(), 1);
        assert!(events.try_recv().is_err());
        s.apply(vec![WriteOp::Create(Resource::new(ResourceType::Zone, "", "z2"))]).await.unwrap();
        assert_eq!(events.try_recv().unwrap().kind, ChangeKind::Created);
    }

    #[tokio::test]
    async fn a_batch_is_announced_once_applied() {
        let s = MemoryStore::new();
        let mut rx = s.subscribe();
        let ops = (0..3).map(|i| WriteOp::Upsert(Resource::new(ResourceType::Zone, "", &format!("z{i}")))).collect();
        s.apply(ops).await.unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        assert_eq!(s.list(ResourceType::Zone, None).await.unwrap().len(), 3);
        s.apply(vec![WriteOp::Delete((ResourceType::Zone, String::new(), "z1".into()))]).await.unwrap();
        assert_eq!(s.list(ResourceType::Zone, None).await.unwrap().len(), 2);
    }
}
