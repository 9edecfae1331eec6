//! Resource store: a trait so that a Postgres store can be added later, and the in-memory
//! implementation used today (Kuma's default `store.type: memory`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::model::{Resource, ResourceType, now_unix, rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{rtype} {name:?} was modified concurrently (expected version {expected}, found {found})")]
    Conflict { rtype: &'static str, name: String, expected: u64, found: u64 },
    #[error("store failure: {0}")]
    Internal(String),
}

/// The key of a resource: type, mesh ("" for global-scoped types) and name.
pub type Key = (ResourceType, String, String);

/// Storage of resources with a global change counter.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<Option<Resource>, StoreError>;
    /// All resources of a type; `mesh = Some(m)` restricts mesh-scoped types to one mesh.
    async fn list(&self, rtype: ResourceType, mesh: Option<&str>) -> Result<Vec<Resource>, StoreError>;
    /// Create or update. Creation/modification times and the version are set by the store.
    /// When nothing but the times would change, the stored resource is returned unchanged
    /// and no change is announced. `expected_version` (if any) must match the stored one
    /// (0 = must not exist).
    async fn upsert(&self, resource: Resource, expected_version: Option<u64>) -> Result<Resource, StoreError>;
    /// Delete; deleting a Mesh deletes every resource in it. Returns whether it existed.
    async fn delete(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<bool, StoreError>;
    /// Current change counter.
    fn version(&self) -> u64;
    /// A receiver that sees the change counter after every change.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// In-memory store (single instance; state is lost on restart, as in Kuma's memory store).
pub struct MemoryStore {
    inner: Mutex<BTreeMap<Key, Resource>>,
    changes: watch::Sender<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        MemoryStore { inner: Mutex::new(BTreeMap::new()), changes: tx }
    }

    fn bump(&self) -> u64 {
        let mut v = 0;
        self.changes.send_modify(|c| {
            *c += 1;
            v = *c;
        });
        v
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<Key, Resource>>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Internal("store lock poisoned".into()))
    }
}

fn key_of(rtype: ResourceType, mesh: &str, name: &str) -> Key {
    (rtype, if rtype.is_mesh_scoped() { mesh.to_string() } else { String::new() }, name.to_string())
}

#[tonic::async_trait]
impl Store for MemoryStore {
    async fn get(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<Option<Resource>, StoreError> {
        Ok(self.lock()?.get(&key_of(rtype, mesh, name)).cloned())
    }

    async fn list(&self, rtype: ResourceType, mesh: Option<&str>) -> Result<Vec<Resource>, StoreError> {
        let map = self.lock()?;
        Ok(map
            .range((rtype, String::new(), String::new())..)
            .take_while(|(k, _)| k.0 == rtype)
            .filter(|(k, _)| mesh.is_none_or(|m| !rtype.is_mesh_scoped() || k.1 == m))
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn upsert(&self, mut resource: Resource, expected_version: Option<u64>) -> Result<Resource, StoreError> {
        let key = key_of(resource.rtype, &resource.mesh, &resource.name);
        let result = {
            let mut map = self.lock()?;
            let existing = map.get(&key);
            if let Some(exp) = expected_version {
                let found = existing.map_or(0, |r| r.version);
                if found != exp {
                    return Err(StoreError::Conflict {
                        rtype: resource.rtype.name(),
                        name: resource.name.clone(),
                        expected: exp,
                        found,
                    });
                }
            }
            if let Some(old) = existing
                && old.spec == resource.spec
                && old.labels == resource.labels
            {
                return Ok(old.clone());
            }
            let now = rfc3339(now_unix());
            resource.creation_time = existing.map_or_else(|| now.clone(), |r| r.creation_time.clone());
            resource.modification_time = now;
            resource.mesh = key.1.clone();
            // The version is the change counter value of this write; taken under the lock
            // so that versions are unique and ordered.
            resource.version = *self.changes.borrow() + 1;
            map.insert(key, resource.clone());
            resource
        };
        self.bump();
        Ok(result)
    }

    async fn delete(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<bool, StoreError> {
        let existed = {
            let mut map = self.lock()?;
            let existed = map.remove(&key_of(rtype, mesh, name)).is_some();
            if existed && rtype == ResourceType::Mesh {
                map.retain(|k, _| !(k.0.is_mesh_scoped() && k.1 == name));
            }
            existed
        };
        if existed {
            self.bump();
        }
        Ok(existed)
    }

    fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upsert_get_list_delete_cascade() {
        let s = MemoryStore::new();
        let mut rx = s.subscribe();
        let mut mesh = Resource::new(ResourceType::Mesh, "", "default");
        mesh.spec.insert("x".into(), 1.into());
        let m = s.upsert(mesh.clone(), None).await.unwrap();
        assert_eq!(m.version, 1);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // Same content: no change announced.
        let again = s.upsert(mesh, None).await.unwrap();
        assert_eq!(again.version, 1);
        assert!(!rx.has_changed().unwrap());
        let dp = Resource::new(ResourceType::Dataplane, "default", "dp-1");
        s.upsert(dp, Some(0)).await.unwrap();
        assert!(s.upsert(Resource::new(ResourceType::Dataplane, "default", "dp-1"), Some(0)).await.is_err());
        assert_eq!(s.list(ResourceType::Dataplane, Some("default")).await.unwrap().len(), 1);
        assert_eq!(s.list(ResourceType::Dataplane, Some("other")).await.unwrap().len(), 0);
        assert!(s.delete(ResourceType::Mesh, "", "default").await.unwrap());
        assert!(s.list(ResourceType::Dataplane, None).await.unwrap().is_empty());
        assert!(!s.delete(ResourceType::Mesh, "", "default").await.unwrap());
    }
}
