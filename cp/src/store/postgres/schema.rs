//! The database schema, as numbered migrations embedded in the binary: `cp migrate up`
//! applies the missing ones, `cp run` refuses a database whose schema is not exactly the
//! one it knows (Kuma: `kuma-cp migrate up`, and "database is not migrated").
//!
//! The applied version is the one row of `schema_migrations` (golang-migrate's shape,
//! which Kuma uses). All pending migrations run in one transaction under an advisory
//! lock, so two instances migrating at once do it once, and a failure leaves nothing half
//! done.

use tokio_postgres::Client;

use super::db::{Connector, classify};
use crate::store::StoreError;

/// (version, name, SQL), in order.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "resources", include_str!("migrations/0001_resources.sql")),
    (2, "resource_events", include_str!("migrations/0002_resource_events.sql")),
    (3, "leader_lease", include_str!("migrations/0003_leader_lease.sql")),
];

/// The schema version this binary runs on.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Any number, as long as every instance uses the same one: serialises migrators.
const MIGRATION_LOCK: i64 = 0x6b75_6d61_6370; // "kumacp"

/// What `cp migrate up` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Migrated {
    pub from: i64,
    pub to: i64,
}

async fn current(client: &impl tokio_postgres::GenericClient) -> Result<Option<i64>, tokio_postgres::Error> {
    let exists: bool = client.query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(None);
    }
    let row = client.query_one("SELECT max(version) FROM schema_migrations", &[]).await?;
    Ok(Some(row.get::<_, Option<i64>>(0).unwrap_or(0)))
}

/// Apply every migration the database lacks.
pub async fn migrate_up(conn: &Connector) -> Result<Migrated, StoreError> {
    let mut client = conn.connect_simple().await?;
    let cfg = &conn.cfg;
    let err = |e: tokio_postgres::Error| classify(cfg, &e);
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(err)?;
    // Idempotent statements (`DROP ... IF EXISTS`) need not say they skipped something.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version bigint NOT NULL, dirty boolean NOT NULL)")
        .await
        .map_err(err)?;
    let from = current(&tx).await.map_err(err)?.unwrap_or(0);
    if from > latest() {
        return Err(StoreError::Internal(newer(cfg, from)));
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > from) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Internal(format!("migration {version} ({name}) failed: {}", classify(cfg, &e))))?;
        tracing::info!(version, name, "migration applied");
    }
    tx.execute("DELETE FROM schema_migrations", &[]).await.map_err(err)?;
    tx.execute("INSERT INTO schema_migrations (version, dirty) VALUES ($1, false)", &[&latest()]).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(Migrated { from, to: latest() })
}

fn newer(cfg: &crate::config::PostgresConfig, found: i64) -> String {
    format!(
        "the database ({}) has schema version {found}, newer than this cp knows ({}): run a newer cp",
        cfg.describe(),
        latest()
    )
}

/// Refuse a schema this binary does not run on, with the sentence that says what to do.
pub async fn check(conn: &Connector, client: &Client) -> Result<(), StoreError> {
    let cfg = &conn.cfg;
    let found = current(client).await.map_err(|e| classify(cfg, &e))?;
    let run = "run `cp migrate up` with the same KUMA_STORE_POSTGRES_* settings, then start cp again";
    match found {
        None | Some(0) => Err(StoreError::Internal(format!(
            "the database ({}) has no cp schema yet (it is not migrated): {run}",
            cfg.describe()
        ))),
        Some(v) if v < latest() => Err(StoreError::Internal(format!(
            "the database ({}) has schema version {v} but this cp needs version {}: {run}",
            cfg.describe(),
            latest()
        ))),
        Some(v) if v > latest() => Err(StoreError::Internal(newer(cfg, v))),
        Some(_) => Ok(()),
    }
}
