//! The PostgreSQL store (`KUMA_STORE_TYPE=postgres`): several control plane instances
//! share one database, and each keeps a full copy of it in memory.
//!
//! * **Writes** go to the database, one statement each (a batch in one transaction),
//!   with optimistic concurrency on the row's version and a no-op when nothing but the
//!   times would change. Deleting a row deletes what it owns (recursively, in the same
//!   statement; the owner foreign key cascades as in Kuma's schema).
//! * **Reads** are served from the copy, so a database outage does not stop the
//!   control plane from serving its proxies and zones; writes then fail with
//!   [`StoreError::Unavailable`], saying so.
//! * **The copy** is kept by one listener per instance: a trigger announces every committed
//!   change on the `resource_events` channel (`LISTEN`/`NOTIFY`) with the row itself when
//!   it fits (else the listener reads it back), the listener applies the changes in commit
//!   order, and emits the store's change events.
//!   It is the only writer of the copy: a write of this instance returns once the
//!   listener applied it (so the writer reads its own write), or after the connection
//!   timeout. A lost listener connection is re-dialled and the copy re-read in full.

mod db;
mod schema;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Row};

pub use db::Connector;
pub use schema::{MIGRATIONS, Migrated, latest as latest_schema};

use super::{ChangeEvent, ChangeKind, Key, Store, StoreError, WriteOp};
use crate::config::PostgresConfig;
use crate::model::{Resource, ResourceType, key, now_rfc3339};

/// The channel the trigger announces changes on.
const CHANNEL: &str = "resource_events";
/// As the memory store: room for bursts before a slow subscriber lags.
const EVENT_CAPACITY: usize = 4096;
/// Notifications applied together (one fetch of their rows).
const BATCH: usize = 1000;
/// How often the listener checks that its connection is alive when nothing happens.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long the version of a deleted row is remembered (for writers waiting on it).
const GONE_TTL: Duration = Duration::from_secs(60);

const COLUMNS: &str = "type, mesh, name, version, spec::text, labels::text, creation_time, modification_time, \
                       owner_type, owner_mesh, owner_name";

const UPSERT: &str = "WITH up AS (
    INSERT INTO resources AS r (name, mesh, type, version, spec, labels, creation_time, modification_time,
                                owner_name, owner_mesh, owner_type)
    VALUES ($1, $2, $3, nextval('resource_versions'), $4::text::jsonb, $5::text::jsonb, $6, $6, $7, $8, $9)
    ON CONFLICT (name, mesh, type) DO UPDATE SET
        version = nextval('resource_versions'),
        spec = EXCLUDED.spec,
        labels = EXCLUDED.labels,
        modification_time = EXCLUDED.modification_time,
        owner_name = CASE WHEN EXCLUDED.owner_name IS NULL THEN r.owner_name ELSE EXCLUDED.owner_name END,
        owner_mesh = CASE WHEN EXCLUDED.owner_name IS NULL THEN r.owner_mesh ELSE EXCLUDED.owner_mesh END,
        owner_type = CASE WHEN EXCLUDED.owner_name IS NULL THEN r.owner_type ELSE EXCLUDED.owner_type END
    WHERE r.spec IS DISTINCT FROM EXCLUDED.spec OR r.labels IS DISTINCT FROM EXCLUDED.labels
       OR (EXCLUDED.owner_name IS NOT NULL AND (r.owner_name, r.owner_mesh, r.owner_type)
           IS DISTINCT FROM (EXCLUDED.owner_name, EXCLUDED.owner_mesh, EXCLUDED.owner_type))
    RETURNING r.version, r.creation_time, r.modification_time, r.owner_type, r.owner_mesh, r.owner_name
)
SELECT version, creation_time, modification_time, owner_type, owner_mesh, owner_name, true FROM up
UNION ALL
SELECT version, creation_time, modification_time, owner_type, owner_mesh, owner_name, false FROM resources
 WHERE name = $1 AND mesh = $2 AND type = $3 AND NOT EXISTS (SELECT 1 FROM up)";

const CREATE: &str = "INSERT INTO resources (name, mesh, type, version, spec, labels, creation_time,
                                             modification_time, owner_name, owner_mesh, owner_type)
    VALUES ($1, $2, $3, nextval('resource_versions'), $4::text::jsonb, $5::text::jsonb, $6, $6, $7, $8, $9)
    ON CONFLICT (name, mesh, type) DO NOTHING
    RETURNING version, creation_time, modification_time, owner_type, owner_mesh, owner_name";

const UPDATE_IF: &str = "UPDATE resources r SET
        version = nextval('resource_versions'),
        spec = $4::text::jsonb,
        labels = $5::text::jsonb,
        modification_time = $6,
        owner_name = CASE WHEN $7::text IS NULL THEN r.owner_name ELSE $7 END,
        owner_mesh = CASE WHEN $7::text IS NULL THEN r.owner_mesh ELSE $8 END,
        owner_type = CASE WHEN $7::text IS NULL THEN r.owner_type ELSE $9 END
    WHERE name = $1 AND mesh = $2 AND type = $3 AND version = $10
      AND (spec IS DISTINCT FROM $4::text::jsonb OR labels IS DISTINCT FROM $5::text::jsonb
           OR ($7::text IS NOT NULL AND (owner_name, owner_mesh, owner_type) IS DISTINCT FROM ($7, $8, $9)))
    RETURNING version, creation_time, modification_time, owner_type, owner_mesh, owner_name";

/// After an `UPDATE_IF` that changed nothing: was it a no-op (the expected version,
/// the same content) or a conflict?
const SAME_AS: &str = "SELECT version, creation_time, modification_time, owner_type, owner_mesh, owner_name,
        (spec = $4::text::jsonb AND labels = $5::text::jsonb
         AND ($6::text IS NULL OR (owner_name, owner_mesh, owner_type) = ($6, $7, $8))) AS same
    FROM resources WHERE name = $1 AND mesh = $2 AND type = $3";

const DELETE_TREE: &str = "WITH RECURSIVE tree(name, mesh, type) AS (
        SELECT name, mesh, type FROM resources WHERE name = $1 AND mesh = $2 AND type = $3
    UNION
        SELECT r.name, r.mesh, r.type FROM resources r JOIN tree t
            ON r.owner_name = t.name AND r.owner_mesh = t.mesh AND r.owner_type = t.type
)
DELETE FROM resources r USING tree t WHERE r.name = t.name AND r.mesh = t.mesh AND r.type = t.type
RETURNING r.type, r.mesh, r.name, r.version";

/// A row as the store keeps it in memory.
struct Meta {
    version: u64,
    creation_time: String,
    modification_time: String,
    owner: Option<Key>,
}

/// The in-memory copy and what the listener knows about it.
#[derive(Default)]
struct State {
    /// Shared, so that a reader that only looks ([`Store::get_shared`]) copies nothing.
    resources: BTreeMap<Key, Arc<Resource>>,
    /// Versions of deleted rows the listener applied, for writers waiting on their delete.
    gone: HashMap<Key, (u64, Instant)>,
    /// Change counter of this copy (`Store::version`).
    counter: u64,
    /// The listener is connected (the copy follows the database).
    connected: bool,
    /// Full re-reads so far (a writer waiting across one has its write in the copy).
    resyncs: u64,
    /// Types in the database this binary does not know (warned once).
    unknown_types: BTreeSet<String>,
}

impl State {
    fn has_applied(&self, k: &Key, version: u64) -> bool {
        self.resources.get(k).is_some_and(|r| r.version >= version) || self.gone.get(k).is_some_and(|g| g.0 >= version)
    }
}

struct Shared {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    events: broadcast::Sender<ChangeEvent>,
    /// Bumped after every applied batch and re-read: writers wait on it.
    applied: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent map (every mutation is a
        // single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes what one locked section changed (call after unlocking).
    fn announce(&self, counter: u64, events: Vec<ChangeEvent>) {
        if !events.is_empty() {
            self.changes.send_replace(counter);
            for e in events {
                let _ = self.events.send(e);
            }
        }
        self.applied.send_modify(|n| *n += 1);
    }
}

/// The PostgreSQL-backed store of one control plane instance.
pub struct PostgresStore {
    conn: Connector,
    pool: Pool,
    shared: Arc<Shared>,
}

impl PostgresStore {
    /// Connects, refuses a schema this binary does not know (with the sentence that
    /// says to run `cp migrate up`), reads every resource and starts following changes.
    pub async fn open(cfg: &PostgresConfig) -> anyhow::Result<Arc<PostgresStore>> {
        let conn = Connector::new(cfg)?;
        let client = conn.connect_simple().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        schema::check(&conn, &client).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        drop(client);
        let pool = conn.pool()?;
        let (changes, _) = watch::channel(0);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (applied, _) = watch::channel(0);
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), changes, events, applied });
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(listen(conn.clone(), shared.clone(), ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("{e}"),
            Err(_) => anyhow::bail!("the PostgreSQL change listener stopped before reading the resources"),
        }
        tracing::info!(database = %cfg.describe(), resources = shared.lock().resources.len(), "PostgreSQL store ready; following changes (LISTEN {CHANNEL})");
        Ok(Arc::new(PostgresStore { conn, pool, shared }))
    }

    /// Apply the embedded migrations (`cp migrate up`).
    pub async fn migrate_up(cfg: &PostgresConfig) -> anyhow::Result<Migrated> {
        let conn = Connector::new(cfg)?;
        schema::migrate_up(&conn).await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The connection pool (leader election uses it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn config(&self) -> &PostgresConfig {
        &self.conn.cfg
    }

    /// Is the copy following the database right now?
    pub fn connected(&self) -> bool {
        self.shared.lock().connected
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| db::classify_pool(&self.conn.cfg, e))
    }

    fn err(&self, e: &tokio_postgres::Error) -> StoreError {
        db::classify(&self.conn.cfg, e)
    }

    /// Runs `f` within the connection timeout, scaled for big batches.
    async fn timed<T>(
        &self,
        ops: usize,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let budget = self.conn.cfg.timeout() * (1 + u32::try_from(ops / 1000).unwrap_or(u32::MAX / 2));
        match tokio::time::timeout(budget, f).await {
            Ok(r) => r,
            Err(_) => Err(db::unavailable(&self.conn.cfg, &format!("no answer within {}s", budget.as_secs()))),
        }
    }

    /// Waits until the listener applied every (key, version), so that this instance reads
    /// its own writes, or re-read everything (which includes them); gives up after the
    /// connection timeout. A write made while the listener is reconnecting (after a database
    /// outage) waits for that re-read too: returning at once let the writer read its copy
    /// before its own write was in it (a proxy's "serving" write then found no insight to
    /// change, and the proxy never became an endpoint).
    async fn wait_applied(&self, written: &[(Key, u64)], resyncs_before: u64) {
        if written.is_empty() {
            return;
        }
        let mut rx = self.shared.applied.subscribe();
        let deadline = tokio::time::Instant::now() + self.conn.cfg.timeout();
        loop {
            {
                let st = self.shared.lock();
                if st.resyncs != resyncs_before || written.iter().all(|(k, v)| st.has_applied(k, *v)) {
                    return;
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        "a committed change did not reach this instance's copy within the connection timeout"
                    );
                    return;
                }
            }
        }
    }

    fn resyncs(&self) -> u64 {
        self.shared.lock().resyncs
    }

    /// After a version conflict: waits until this instance's copy holds the version that
    /// won (at most the connection timeout), so that a writer that reads again and
    /// retries reads that version rather than spinning on a stale one.
    async fn after_conflict(&self, e: StoreError, resyncs: u64) -> StoreError {
        if let StoreError::Conflict { rtype, mesh, name, found, .. } = &e
            && *found > 0
            && let Some(t) = ResourceType::from_name(rtype)
        {
            self.wait_applied(&[(key(t, mesh, name), *found)], resyncs).await;
        }
        e
    }
}

/// The text parameters of a resource: spec, labels, owner (type, mesh, name).
struct Params {
    rtype: &'static str,
    spec: String,
    labels: String,
    owner: (Option<String>, Option<String>, Option<String>),
}

impl Params {
    fn of(r: &Resource) -> Result<Params, StoreError> {
        let spec = serde_json::to_string(&r.spec).map_err(|e| StoreError::Internal(e.to_string()))?;
        let labels = serde_json::to_string(&r.labels).map_err(|e| StoreError::Internal(e.to_string()))?;
        let owner = match &r.owner {
            Some((t, m, n)) => (Some(t.name().to_string()), Some(m.clone()), Some(n.clone())),
            None => (None, None, None),
        };
        Ok(Params { rtype: r.rtype.name(), spec, labels, owner })
    }

    /// `$1`..`$9` of the write statements: the key, the content, the time and the owner.
    fn row<'a>(&'a self, r: &'a Resource, now: &'a String) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![&r.name, &r.mesh, &self.rtype, &self.spec, &self.labels, now, &self.owner.2, &self.owner.1, &self.owner.0]
    }
}

fn meta(row: &Row) -> Meta {
    let owner =
        match (row.get::<_, Option<String>>(3), row.get::<_, Option<String>>(4), row.get::<_, Option<String>>(5)) {
            (Some(t), Some(m), Some(n)) => ResourceType::from_name(&t).map(|t| (t, m, n)),
            _ => None,
        };
    Meta {
        version: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        creation_time: row.get(1),
        modification_time: row.get(2),
        owner,
    }
}

fn with_meta(mut r: Resource, m: Meta) -> Resource {
    r.version = m.version;
    r.creation_time = m.creation_time;
    r.modification_time = m.modification_time;
    r.owner = m.owner;
    r
}

/// A full row (`COLUMNS`) as a resource; `None` for a type this binary does not know.
fn resource(row: &Row) -> Result<Option<Resource>, String> {
    let tname: String = row.get(0);
    let Some(rtype) = ResourceType::from_name(&tname) else { return Ok(None) };
    let mesh: String = row.get(1);
    let name: String = row.get(2);
    let mut r = Resource::new(rtype, &mesh, &name);
    let spec: String = row.get(4);
    r.spec = serde_json::from_str(&spec).map_err(|e| format!("{tname} {name:?}: spec is not a JSON object: {e}"))?;
    let labels: String = row.get(5);
    r.labels = serde_json::from_str(&labels).map_err(|e| format!("{tname} {name:?}: labels: {e}"))?;
    r.version = u64::try_from(row.get::<_, i64>(3)).unwrap_or(0);
    r.creation_time = row.get(6);
    r.modification_time = row.get(7);
    r.owner = match (row.get::<_, Option<String>>(8), row.get::<_, Option<String>>(9), row.get::<_, Option<String>>(10))
    {
        (Some(t), Some(m), Some(n)) => ResourceType::from_name(&t).map(|t| (t, m, n)),
        _ => None,
    };
    Ok(Some(r))
}

/// The outcome of one write statement.
enum Written {
    /// The row as stored, and whether this statement changed it.
    Row(Resource, bool),
    /// Keys and versions of the deleted rows; whether the named row was among them.
    Deleted(Vec<(Key, u64)>, bool),
}

impl PostgresStore {
    /// One write on `client` (a pooled connection or a transaction).
    async fn write(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        op: WriteOp,
        expected: Option<u64>,
    ) -> Result<Written, StoreError> {
        let err = |e: tokio_postgres::Error| self.err(&e);
        match op {
            WriteOp::Delete(k) => {
                let stmt = client.prepare_cached(DELETE_TREE).await.map_err(err)?;
                let rows = client.query(&stmt, &[&k.2, &k.1, &k.0.name()]).await.map_err(err)?;
                let mut deleted = Vec::new();
                let mut existed = false;
                for row in rows {
                    let (t, m, n): (String, String, String) = (row.get(0), row.get(1), row.get(2));
                    let v = u64::try_from(row.get::<_, i64>(3)).unwrap_or(0);
                    let Some(t) = ResourceType::from_name(&t) else { continue };
                    let dk = (t, m, n);
                    existed |= dk == k;
                    deleted.push((dk, v));
                }
                Ok(Written::Deleted(deleted, existed))
            }
            WriteOp::Upsert(r) | WriteOp::Create(r) if expected.is_none() || expected == Some(0) => {
                let create = matches!(expected, Some(0));
                let r = normalise(r);
                let p = Params::of(&r)?;
                let now = now_rfc3339();
                let stmt = client.prepare_cached(if create { CREATE } else { UPSERT }).await.map_err(err)?;
                let mut attempts = 0;
                let rows = loop {
                    attempts += 1;
                    let rows = client.query(&stmt, &p.row(&r, &now)).await.map_err(|e| self.write_error(&r, &e))?;
                    // An upsert that met the same content committed by another instance after
                    // its snapshot was taken neither writes nor sees the row: once more, with
                    // a fresh snapshot (read committed), it sees it.
                    if rows.is_empty() && !create && attempts < 3 {
                        continue;
                    }
                    break rows;
                };
                match rows.first() {
                    Some(row) => {
                        let written = create || row.get::<_, bool>(6);
                        Ok(Written::Row(with_meta(r, meta(row)), written))
                    }
                    None if create => {
                        let found = self.shared.lock().resources.get(&r.key()).map_or(1, |x| x.version);
                        Err(StoreError::Conflict {
                            rtype: r.rtype.name(),
                            mesh: r.mesh,
                            name: r.name,
                            expected: 0,
                            found,
                        })
                    }
                    None => Err(StoreError::Internal(format!(
                        "{} {:?}: the upsert returned no row",
                        r.rtype.name(),
                        r.name
                    ))),
                }
            }
            WriteOp::Upsert(r) | WriteOp::Create(r) => {
                let exp = expected.unwrap_or(0);
                let r = normalise(r);
                let p = Params::of(&r)?;
                let now = now_rfc3339();
                let exp_i = i64::try_from(exp).unwrap_or(i64::MAX);
                let stmt = client.prepare_cached(UPDATE_IF).await.map_err(err)?;
                let mut params = p.row(&r, &now);
                params.push(&exp_i);
                let rows = client.query(&stmt, &params).await.map_err(|e| self.write_error(&r, &e))?;
                if let Some(row) = rows.first() {
                    return Ok(Written::Row(with_meta(r, meta(row)), true));
                }
                // Nothing changed: the same content at the expected version, or a conflict.
                let stmt = client.prepare_cached(SAME_AS).await.map_err(err)?;
                let rows = client
                    .query(
                        &stmt,
                        &[&r.name, &r.mesh, &r.rtype.name(), &p.spec, &p.labels, &p.owner.2, &p.owner.1, &p.owner.0],
                    )
                    .await
                    .map_err(err)?;
                match rows.first() {
                    Some(row) if u64::try_from(row.get::<_, i64>(0)).ok() == Some(exp) && row.get::<_, bool>(6) => {
                        Ok(Written::Row(with_meta(r, meta(row)), false))
                    }
                    found => Err(StoreError::Conflict {
                        rtype: r.rtype.name(),
                        mesh: r.mesh,
                        name: r.name,
                        expected: exp,
                        found: found.map_or(0, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)),
                    }),
                }
            }
        }
    }

    /// A failed write, with the owner named when it is the owner that is missing.
    fn write_error(&self, r: &Resource, e: &tokio_postgres::Error) -> StoreError {
        if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
            && let Some((t, m, n)) = &r.owner
        {
            return StoreError::Internal(format!(
                "{} {:?}: its owner {} {n:?}{} does not exist",
                r.rtype.name(),
                r.name,
                t.name(),
                if m.is_empty() { String::new() } else { format!(" in mesh {m:?}") }
            ));
        }
        self.err(e)
    }
}

/// The key's mesh as the store keeps it (empty for global-scoped types).
fn normalise(mut r: Resource) -> Resource {
    r.mesh = key(r.rtype, &r.mesh, &r.name).1;
    r
}

#[tonic::async_trait]
impl Store for PostgresStore {
    async fn get_shared(
        &self,
        rtype: ResourceType,
        mesh: &str,
        name: &str,
    ) -> Result<Option<Arc<Resource>>, StoreError> {
        Ok(self.shared.lock().resources.get(&key(rtype, mesh, name)).cloned())
    }

    async fn list_shared(&self, rtype: ResourceType, mesh: Option<&str>) -> Result<Vec<Arc<Resource>>, StoreError> {
        Ok(super::range(&self.shared.lock().resources, rtype, mesh).cloned().collect())
    }

    async fn upsert(&self, resource: Resource, expected_version: Option<u64>) -> Result<Arc<Resource>, StoreError> {
        let resource = normalise(resource);
        if expected_version.is_none()
            && let Some(old) = self.shared.lock().resources.get(&resource.key())
            && old.spec == resource.spec
            && old.labels == resource.labels
            && (resource.owner.is_none() || resource.owner == old.owner)
        {
            // Unchanged as far as this instance knows: nothing to write (and nothing to
            // fail while the database is away).
            return Ok(old.clone());
        }
        let resyncs = self.resyncs();
        let k = resource.key();
        let written = self
            .timed(1, async {
                let client = self.client().await?;
                self.write(&client, WriteOp::Upsert(resource), expected_version).await
            })
            .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => return Err(self.after_conflict(e, resyncs).await),
        };
        match written {
            Written::Row(r, changed) => {
                if changed {
                    self.wait_applied(&[(k, r.version)], resyncs).await;
                }
                Ok(Arc::new(r))
            }
            Written::Deleted(..) => Err(StoreError::Internal("unexpected delete".into())),
        }
    }

    async fn delete(&self, rtype: ResourceType, mesh: &str, name: &str) -> Result<bool, StoreError> {
        let resyncs = self.resyncs();
        let k = key(rtype, mesh, name);
        let written = self
            .timed(1, async {
                let client = self.client().await?;
                self.write(&client, WriteOp::Delete(k), None).await
            })
            .await?;
        match written {
            Written::Deleted(rows, existed) => {
                self.wait_applied(&rows, resyncs).await;
                Ok(existed)
            }
            Written::Row(..) => Err(StoreError::Internal("unexpected upsert".into())),
        }
    }

    async fn apply(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let resyncs = self.resyncs();
        let n = ops.len();
        let written = self
            .timed(n, async {
                let mut client = self.client().await?;
                let tx = client.transaction().await.map_err(|e| self.err(&e))?;
                // Prepared first, so that every write below is sent on its first poll: in
                // order, back to back (pipelined). The first failure rolls the batch back.
                for sql in [UPSERT, CREATE, DELETE_TREE] {
                    tx.prepare_cached(sql).await.map_err(|e| self.err(&e))?;
                }
                let futures = ops.into_iter().map(|op| {
                    let expected = matches!(op, WriteOp::Create(_)).then_some(0);
                    self.write(&tx, op, expected)
                });
                let results = futures_util::future::try_join_all(futures).await?;
                tx.commit().await.map_err(|e| self.err(&e))?;
                Ok(results)
            })
            .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => return Err(self.after_conflict(e, resyncs).await),
        };
        let mut keys = Vec::new();
        for w in written {
            match w {
                Written::Row(r, true) => keys.push((r.key(), r.version)),
                Written::Row(_, false) => {}
                Written::Deleted(rows, _) => keys.extend(rows),
            }
        }
        self.wait_applied(&keys, resyncs).await;
        Ok(())
    }

    fn version(&self) -> u64 {
        *self.shared.changes.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn events(&self) -> broadcast::Receiver<ChangeEvent> {
        self.shared.events.subscribe()
    }

    fn store_type(&self) -> &'static str {
        "postgres"
    }
}

// ---------------------------------------------------------------------------------------
// The listener: one connection that LISTENs, re-reads everything on (re)connect, then
// applies the announced changes in commit order.

/// A `resource_events` payload.
#[derive(Deserialize)]
struct Notice {
    op: String,
    #[serde(rename = "type")]
    rtype: String,
    mesh: String,
    name: String,
    version: i64,
    /// The row as committed, when it fitted in the notification.
    row: Option<NoticeRow>,
}

#[derive(Deserialize)]
struct NoticeRow {
    spec: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    creation_time: String,
    modification_time: String,
    owner_type: Option<String>,
    owner_mesh: Option<String>,
    owner_name: Option<String>,
}

impl NoticeRow {
    fn resource(self, rtype: ResourceType, mesh: &str, name: &str, version: u64) -> Resource {
        let mut r = Resource::new(rtype, mesh, name);
        r.spec = self.spec;
        r.labels = self.labels;
        r.version = version;
        r.creation_time = self.creation_time;
        r.modification_time = self.modification_time;
        r.owner = match (self.owner_type, self.owner_mesh, self.owner_name) {
            (Some(t), Some(m), Some(n)) => ResourceType::from_name(&t).map(|t| (t, m, n)),
            _ => None,
        };
        r
    }
}

async fn listen(conn: Connector, shared: Arc<Shared>, ready: oneshot::Sender<Result<(), StoreError>>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    let mut reported: Option<String> = None;
    loop {
        let started = Instant::now();
        let r = session(&conn, &shared, &mut ready).await;
        let was_connected = std::mem::take(&mut shared.lock().connected);
        let e = match r {
            Ok(()) => return, // the store is gone
            Err(e) => e.to_string(),
        };
        if let Some(tx) = ready.take() {
            let _ = tx.send(Err(StoreError::Unavailable(e)));
            return;
        }
        if was_connected || reported.as_ref() != Some(&e) {
            tracing::warn!(error = %e, "PostgreSQL: lost the change listener's connection; serving from memory and reconnecting");
            reported = Some(e);
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection's life: `Ok` only when the store was dropped.
async fn session(
    conn: &Connector,
    shared: &Arc<Shared>,
    ready: &mut Option<oneshot::Sender<Result<(), StoreError>>>,
) -> Result<(), StoreError> {
    let (client, mut connection) = conn.connect().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut pump = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n).is_err() {
                        return None;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    });
    let result = async {
        let cfg = &conn.cfg;
        let timeout = |what: &'static str| {
            db::unavailable(cfg, &format!("{what}: no answer within {}s", cfg.timeout().as_secs()))
        };
        tokio::time::timeout(cfg.timeout(), client.batch_execute(&format!("LISTEN {CHANNEL}")))
            .await
            .map_err(|_| timeout("LISTEN"))?
            .map_err(|e| db::classify(cfg, &e))?;
        // Read after LISTEN: a change committed meanwhile is both in the read and announced.
        let first = ready.is_some();
        let n = tokio::time::timeout(cfg.timeout() * 4, resync(cfg, &client, shared, !first))
            .await
            .map_err(|_| timeout("reading every resource"))??;
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        } else {
            tracing::info!(database = %cfg.describe(), resources = n, "PostgreSQL: change listener reconnected; resources re-read");
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                n = rx.recv() => {
                    let Some(n) = n else { return Err(db::unavailable(cfg, "the listener connection closed")) };
                    let mut batch = vec![n];
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(n) => batch.push(n),
                            Err(_) => break,
                        }
                    }
                    tokio::time::timeout(cfg.timeout(), apply_notices(cfg, &client, shared, batch))
                        .await
                        .map_err(|_| timeout("fetching changed resources"))??;
                }
                _ = ping.tick() => {
                    if Arc::strong_count(shared) == 1 {
                        return Ok(()); // only this task holds it: the store was dropped
                    }
                    tokio::time::timeout(cfg.timeout(), client.simple_query("SELECT 1"))
                        .await
                        .map_err(|_| timeout("ping"))?
                        .map_err(|e| db::classify(cfg, &e))?;
                }
            }
        }
    };
    let r = tokio::select! {
        r = result => r,
        e = &mut pump => Err(match e {
            Ok(Some(e)) => db::classify(&conn.cfg, &e),
            _ => db::unavailable(&conn.cfg, "the listener connection closed"),
        }),
    };
    pump.abort();
    r
}

/// Read every row and make the copy equal to it, announcing the differences. After a
/// reconnect (`everything`), every type present is announced once more, so that whatever
/// failed during the outage (reconcilers, streams) runs again.
async fn resync(cfg: &PostgresConfig, client: &Client, shared: &Shared, everything: bool) -> Result<usize, StoreError> {
    let rows =
        client.query(&format!("SELECT {COLUMNS} FROM resources"), &[]).await.map_err(|e| db::classify(cfg, &e))?;
    let mut fresh = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    for row in &rows {
        match resource(row) {
            Ok(Some(r)) => {
                fresh.insert(r.key(), Arc::new(r));
            }
            Ok(None) => {
                unknown.insert(row.get::<_, String>(0));
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL: a stored resource cannot be read; it is skipped"),
        }
    }
    let (counter, events) = {
        let mut st = shared.lock();
        for t in unknown.difference(&st.unknown_types.clone()) {
            tracing::warn!(kind = %t, "PostgreSQL: rows of a type this cp does not know are ignored");
        }
        st.unknown_types.extend(unknown);
        let mut events = Vec::new();
        for (k, r) in &fresh {
            match st.resources.get(k) {
                None => events.push(ChangeEvent { kind: ChangeKind::Created, key: k.clone(), owner: r.owner.clone() }),
                Some(old) if old.version != r.version => {
                    events.push(ChangeEvent { kind: ChangeKind::Updated, key: k.clone(), owner: r.owner.clone() })
                }
                Some(_) => {}
            }
        }
        for (k, old) in &st.resources {
            if !fresh.contains_key(k) {
                events.push(ChangeEvent { kind: ChangeKind::Deleted, key: k.clone(), owner: old.owner.clone() });
            }
        }
        if everything {
            let mut types = BTreeSet::new();
            for (k, r) in &fresh {
                if types.insert(k.0) && !events.iter().any(|e| e.key.0 == k.0) {
                    events.push(ChangeEvent { kind: ChangeKind::Updated, key: k.clone(), owner: r.owner.clone() });
                }
            }
        }
        st.resources = fresh;
        st.gone.clear();
        st.resyncs += 1;
        st.connected = true;
        st.counter += events.len() as u64;
        (st.counter, events)
    };
    let n = shared.lock().resources.len();
    shared.announce(counter, events);
    Ok(n)
}

/// Apply a batch of notifications: deletes and rows carried in the payload at once, the
/// rest by reading their rows back.
async fn apply_notices(
    cfg: &PostgresConfig,
    client: &Client,
    shared: &Shared,
    batch: Vec<tokio_postgres::Notification>,
) -> Result<(), StoreError> {
    let mut events = Vec::new();
    let mut fetch: BTreeMap<Key, u64> = BTreeMap::new();
    {
        let mut st = shared.lock();
        for n in &batch {
            let Ok(notice) = serde_json::from_str::<Notice>(n.payload()) else {
                tracing::warn!(payload = n.payload(), "PostgreSQL: an unreadable change notification was ignored");
                continue;
            };
            let Some(rtype) = ResourceType::from_name(&notice.rtype) else { continue };
            let k = key(rtype, &notice.mesh, &notice.name);
            let version = u64::try_from(notice.version).unwrap_or(0);
            if notice.op == "D" {
                if st.resources.get(&k).is_some_and(|r| r.version <= version) {
                    let old = st.resources.remove(&k);
                    events.push(ChangeEvent {
                        kind: ChangeKind::Deleted,
                        key: k.clone(),
                        owner: old.and_then(|r| r.owner.clone()),
                    });
                }
                fetch.remove(&k);
                let g = st.gone.entry(k).or_insert((0, Instant::now()));
                *g = (g.0.max(version), Instant::now());
            } else if st.resources.get(&k).is_none_or(|r| r.version < version) {
                match notice.row {
                    // The row as committed, in commit order: applied as it is.
                    Some(row) => {
                        let r = row.resource(rtype, &notice.mesh, &notice.name, version);
                        let kind =
                            if st.resources.contains_key(&k) { ChangeKind::Updated } else { ChangeKind::Created };
                        events.push(ChangeEvent { kind, key: k.clone(), owner: r.owner.clone() });
                        fetch.remove(&k);
                        st.resources.insert(k, Arc::new(r));
                    }
                    None => {
                        fetch.insert(k, version);
                    }
                }
            }
        }
    }
    if !fetch.is_empty() {
        let (mut names, mut meshes, mut types) = (Vec::new(), Vec::new(), Vec::new());
        for k in fetch.keys() {
            names.push(k.2.clone());
            meshes.push(k.1.clone());
            types.push(k.0.name().to_string());
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM resources WHERE (name, mesh, type) IN \
             (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
        );
        let rows = client.query(&sql, &[&names, &meshes, &types]).await.map_err(|e| db::classify(cfg, &e))?;
        let mut st = shared.lock();
        for row in &rows {
            let r = match resource(row) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL: a changed resource cannot be read; it is skipped");
                    continue;
                }
            };
            let k = r.key();
            // A row deleted since its notification is absent here: its delete notice follows.
            let kind = match st.resources.get(&k) {
                Some(old) if old.version >= r.version => continue,
                Some(_) => ChangeKind::Updated,
                None => ChangeKind::Created,
            };
            events.push(ChangeEvent { kind, key: k.clone(), owner: r.owner.clone() });
            st.resources.insert(k, Arc::new(r));
        }
    }
    let counter = {
        let mut st = shared.lock();
        if st.gone.len() > 10_000 {
            st.gone.retain(|_, g| g.1.elapsed() < GONE_TTL);
        }
        st.counter += events.len() as u64;
        st.counter
    };
    shared.announce(counter, events);
    Ok(())
}
