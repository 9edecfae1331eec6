//! Resource store: the trait every backend implements, its change events, the
//! in-memory backend (Kuma's default `store.type: memory`) and the PostgreSQL one
//! ([`postgres`], `KUMA_STORE_TYPE=postgres`), which several instances share.
//!
//! Two ways to follow changes: [`Store::subscribe`] is a counter for "something changed",
//! [`Store::events`] says what changed (type, key, owner), so that a consumer can ignore
//! what it does not read (an xDS stream is not rebuilt for an insight write, a KDS stream
//! recomputes only the types that changed).

mod memory;
pub mod postgres;

pub use memory::MemoryStore;

use tokio::sync::{broadcast, watch};

pub use crate::model::Key;
use crate::model::{Resource, ResourceType};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{rtype} {name:?} was modified concurrently (expected version {expected}, found {found})")]
    Conflict { rtype: &'static str, mesh: String, name: String, expected: u64, found: u64 },
    /// The database cannot be reached (PostgreSQL down or cut off): writes fail, reads
    /// are served from memory.
    #[error("{0}")]
    Unavailable(String),
    #[error("store failure: {0}")]
    Internal(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One change, announced after it is visible to readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub kind: ChangeKind,
    pub key: Key,
    /// The owner of the resource (deleting the owner deleted this one too).
    pub owner: Option<Key>,
}

impl ChangeEvent {
    pub fn rtype(&self) -> ResourceType {
        self.key.0
    }
}

/// One write of a batch ([`Store::apply`]).
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Create or update (times and version are set by the store; a new resource keeps
    /// the owner it carries, an existing one keeps its owner unless this one names one).
    Upsert(Resource),
    /// Delete, with everything it owns.
    Delete(Key),
    /// Create; the whole batch fails with [`StoreError::Conflict`] when it already exists
    /// (two instances creating the same pair of secrets: one wins, entirely).
    Create(Resource),
}

/// A change made by [`Store::edit`]: whether it changed anything.
pub type Edit = Box<dyn FnOnce(&mut Resource) -> bool + Send>;

/// Storage of resources with change notification.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// One resource, shared with the store: readers that only look copy nothing (a zone
    /// ingress lists thousands of services: copying it on every read was a large part of
    /// cp's work).
    async fn get_shared(
        &self,
        rtype: ResourceType,
        mesh: &str,
        name: &str,
    ) -> Result<Option<std::sync::Arc<Resource>>, StoreError>;
    /// All resources of a type, shared; `mesh = Some(m)` restricts mesh-scoped types to one
    /// mesh.
    async fn list_shared(
        &self,
        rtype: ResourceType,
        mesh: Option<&str>,
    ) -> Result<Vec<std::sync::Arc<Resource>>, StoreError>;
    /// [`Store::get_shared`], as a copy to change.
    async fn get(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<Option<Resource>, StoreError> {
        Ok(self.get_shared(rtype, mesh, name).await?.map(|r| (*r).clone()))
    }
    /// [`Store::list_shared`], as copies.
    async fn list(&self, rtype: ResourceType, mesh: Option<&str>) -> Result<Vec<Resource>, StoreError> {
        Ok(self.list_shared(rtype, mesh).await?.iter().map(|r| (**r).clone()).collect())
    }
    /// Create or update. Creation/modification times and the version are set by the store.
    /// When nothing but the times would change, the stored resource is returned unchanged
    /// and no change is announced. `expected_version` (if any) must match the stored one
    /// (0 = must not exist).
    /// Returns the stored resource, shared (a large one is not copied back).
    async fn upsert(
        &self,
        resource: Resource,
        expected_version: Option<u64>,
    ) -> Result<std::sync::Arc<Resource>, StoreError>;
    /// Change the spec of a stored resource whose version is `expected_version`: `edit` changes
    /// it and says whether it changed anything (when not, nothing is written or announced).
    /// Fails with [`StoreError::Conflict`] when the stored version is another (found 0: it
    /// does not exist). Times and version are set as by [`Store::upsert`].
    ///
    /// Made for derived resources with thousands of entries (a ServiceInsight, a zone
    /// ingress's `availableServices`) of which a change touches a few: the memory store edits
    /// its own copy when no reader holds it, where building the whole resource again and
    /// dropping the old one was most of cp's work for a one-endpoint change. This default
    /// copies it and writes it back conditionally.
    async fn edit(&self, key: &Key, expected_version: u64, edit: Edit) -> Result<std::sync::Arc<Resource>, StoreError> {
        let stored = self.get_shared(key.0, &key.1, &key.2).await?;
        let found = stored.as_ref().map_or(0, |r| r.version);
        let Some(stored) = stored.filter(|_| found == expected_version) else {
            return Err(conflict(key, expected_version, found));
        };
        let mut r = (*stored).clone();
        if !edit(&mut r) {
            return Ok(stored);
        }
        drop(stored);
        self.upsert(r, Some(expected_version)).await
    }
    /// Delete a resource and, recursively, every resource it owns. Returns whether it existed.
    async fn delete(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<bool, StoreError>;
    /// Apply several writes at once: readers see all of them or none (Kuma runs a KDS
    /// batch in one transaction).
    async fn apply(&self, ops: Vec<WriteOp>) -> Result<(), StoreError>;
    /// Current change counter.
    fn version(&self) -> u64;
    /// A receiver that sees the change counter after every change.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Every change, as it happens. A receiver that falls behind gets `Lagged` and should
    /// treat everything as changed.
    fn events(&self) -> broadcast::Receiver<ChangeEvent>;
    /// `memory` or `postgres` (Kuma's `store.type`).
    fn store_type(&self) -> &'static str {
        "memory"
    }
    /// Does the state outlive this process (so nothing needs a copy in the work directory)?
    fn durable(&self) -> bool {
        self.store_type() != "memory"
    }
}

/// A write expected `expected` and found `found` (0: absent).
fn conflict(key: &Key, expected: u64, found: u64) -> StoreError {
    StoreError::Conflict { rtype: key.0.name(), mesh: key.1.clone(), name: key.2.clone(), expected, found }
}

/// The stored resources of one type (of one mesh, for a mesh-scoped type), by key.
fn range<'a, V>(
    map: &'a std::collections::BTreeMap<Key, V>,
    rtype: ResourceType,
    mesh: Option<&'a str>,
) -> impl Iterator<Item = &'a V> + 'a {
    map.range((rtype, String::new(), String::new())..)
        .take_while(move |(k, _)| k.0 == rtype)
        .filter(move |(k, _)| mesh.is_none_or(|m| !rtype.is_mesh_scoped() || k.1 == m))
        .map(|(_, v)| v)
}

/// What [`next_change`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Event(ChangeEvent),
    /// The receiver fell behind: some changes were missed, treat everything as changed.
    Lagged,
    /// The store is gone.
    Closed,
}

/// Waits for the next change that `relevant` accepts (or for a lag, which may have
/// hidden one).
pub async fn next_change(rx: &mut broadcast::Receiver<ChangeEvent>, relevant: impl Fn(&ChangeEvent) -> bool) -> Change {
    loop {
        match rx.recv().await {
            Ok(e) if relevant(&e) => return Change::Event(e),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return Change::Lagged,
            Err(broadcast::error::RecvError::Closed) => return Change::Closed,
        }
    }
}

/// Delete a mesh and every mesh-scoped resource in it (the REST API's `DELETE
/// /meshes/{name}`, as Kuma's mesh manager does). KDS deletes of a Mesh do not cascade.
pub async fn delete_mesh(store: &dyn Store, mesh: &str) -> Result<bool, StoreError> {
    if store.get(ResourceType::Mesh, "", mesh).await?.is_none() {
        return Ok(false);
    }
    let mut ops = Vec::new();
    for t in ResourceType::ALL.iter().filter(|t| t.is_mesh_scoped()) {
        for r in store.list(*t, Some(mesh)).await? {
            ops.push(WriteOp::Delete(r.key()));
        }
    }
    ops.push(WriteOp::Delete((ResourceType::Mesh, String::new(), mesh.to_string())));
    store.apply(ops).await?;
    Ok(true)
}
