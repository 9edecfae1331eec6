//! Leader election: of the instances sharing a database, one runs the jobs that must run
//! once (reconcilers, the zone's KDS client, zone liveness); every instance serves.
//!
//! * Memory store: this instance is the only one, always the leader (Kuma's
//!   always-leader elector).
//! * PostgreSQL: a lease row (`leader_leases`, lock `kuma-cp-lock` as Kuma's). The holder
//!   renews it every [`RENEW_EVERY`]; the others try to take it as often, and succeed
//!   once it expired ([`LEASE`], measured by the database's clock). A holder that could
//!   not renew for almost a lease steps down by itself, before anyone else can take
//!   over, so two leaders never overlap. A stopping leader gives the lease up at once.
//!   Kuma uses `pglock` (also a lease row); the lease fits PgBouncer in transaction mode,
//!   where session advisory locks would not.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio::time::Instant;

/// Kuma's lock name.
pub const LOCK_NAME: &str = "kuma-cp-lock";
/// How long a lease lasts without renewal: how long a dead leader's jobs stay undone.
pub const LEASE: Duration = Duration::from_secs(8);
/// How often the holder renews and the others try.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Whether this instance leads, now and as it changes.
#[derive(Clone)]
pub struct Leadership {
    tx: Arc<watch::Sender<bool>>,
}

impl Leadership {
    /// The only instance: always the leader.
    pub fn always() -> Self {
        Leadership { tx: Arc::new(watch::channel(true).0) }
    }

    fn follower() -> Self {
        Leadership { tx: Arc::new(watch::channel(false).0) }
    }

    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    fn set(&self, leader: bool) {
        self.tx.send_if_modified(|v| std::mem::replace(v, leader) != leader);
    }

    /// Elect through the database as `instance`; starts as a follower.
    pub fn postgres(pool: Pool, instance: String, shutdown: watch::Receiver<bool>) -> Self {
        let l = Leadership::follower();
        tokio::spawn(elect(pool, instance, l.clone(), shutdown));
        l
    }
}

/// Take or renew the lease: true when this instance holds it afterwards.
async fn try_lease(pool: &Pool, instance: &str) -> Result<bool, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "INSERT INTO leader_leases AS l (name, holder, acquired_at, expires_at)
             VALUES ($1, $2, now(), now() + $3::bigint * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET
                 holder = EXCLUDED.holder,
                 acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at ELSE now() END,
                 expires_at = EXCLUDED.expires_at
             WHERE l.holder = EXCLUDED.holder OR l.expires_at < now()
             RETURNING holder",
            &[&LOCK_NAME, &instance, &lease_ms],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(!rows.is_empty())
}

async fn release(pool: &Pool, instance: &str) {
    if let Ok(client) = pool.get().await {
        let _ =
            client.execute("DELETE FROM leader_leases WHERE name = $1 AND holder = $2", &[&LOCK_NAME, &instance]).await;
    }
}

async fn elect(pool: Pool, instance: String, leadership: Leadership, mut shutdown: watch::Receiver<bool>) {
    // When the lease we hold was last confirmed (the time the renewal was sent, so the
    // database's expiry is at least this plus a lease).
    let mut held_since: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    loop {
        let sent = Instant::now();
        let outcome = tokio::time::timeout(RENEW_EVERY * 3, try_lease(&pool, &instance))
            .await
            .unwrap_or_else(|_| Err("no answer from the database".into()));
        match outcome {
            Ok(true) => {
                if held_since.is_none() {
                    tracing::info!(lock = LOCK_NAME, instance = %instance, "leader election: this instance is the leader");
                }
                held_since = Some(sent);
                last_error = None;
            }
            Ok(false) => {
                if held_since.take().is_some() {
                    tracing::warn!(
                        lock = LOCK_NAME,
                        "leader election: another instance took the lease; this one follows"
                    );
                }
                last_error = None;
            }
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "leader election: cannot reach the database");
                    last_error = Some(e);
                }
            }
        }
        // Step down before the lease can expire: nobody else may lead while we still do.
        if let Some(t) = held_since
            && t.elapsed() + RENEW_EVERY >= LEASE
        {
            tracing::warn!(lock = LOCK_NAME, "leader election: the lease could not be renewed; stepping down");
            held_since = None;
        }
        leadership.set(held_since.is_some());
        tokio::select! {
            _ = tokio::time::sleep_until(sent + RENEW_EVERY) => {}
            _ = shutdown.changed() => {
                if held_since.is_some() {
                    release(&pool, &instance).await;
                    tracing::info!(lock = LOCK_NAME, "leader election: lease given up on shutdown");
                }
                leadership.set(false);
                return;
            }
        }
    }
}

/// Run `start` every time this instance becomes the leader, with a receiver that turns
/// `true` when it stops being the leader or the control plane shuts down (what
/// [`crate::reconcile::spawn`] and the KDS client take as their shutdown signal).
pub fn spawn_while_leader<F>(leadership: &Leadership, mut shutdown: watch::Receiver<bool>, name: &'static str, start: F)
where
    F: Fn(watch::Receiver<bool>) + Send + 'static,
{
    let mut leader = leadership.subscribe();
    let me = leadership.clone();
    tokio::spawn(async move {
        let _keep = me;
        loop {
            if !*leader.borrow_and_update() {
                tokio::select! {
                    r = leader.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            tracing::debug!(component = name, "leader: starting");
            let (stop_tx, stop_rx) = watch::channel(false);
            start(stop_rx);
            let lost = tokio::select! {
                r = leader.wait_for(|l| !*l) => r.is_ok(),
                _ = shutdown.changed() => false,
            };
            let _ = stop_tx.send(true);
            if !lost {
                return;
            }
            tracing::debug!(component = name, "leader: stopped (leadership lost)");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leader_only_jobs_start_on_leading_and_stop_on_losing_it() {
        let l = Leadership::follower();
        let (_shutdown_tx, shutdown) = watch::channel(false);
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        spawn_while_leader(&l, shutdown, "test", move |mut stop| {
            let tx = started_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send("started");
                let _ = stop.changed().await;
                let _ = tx.send("stopped");
            });
        });
        assert!(!l.is_leader());
        l.set(true);
        assert_eq!(started.recv().await, Some("started"));
        l.set(false);
        assert_eq!(started.recv().await, Some("stopped"));
        l.set(true);
        assert_eq!(started.recv().await, Some("started"));
        assert!(started.try_recv().is_err());
    }

    #[tokio::test]
    async fn shutdown_stops_leader_only_jobs() {
        let l = Leadership::always();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn_while_leader(&l, shutdown, "test", move |mut stop| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = stop.changed().await;
                let _ = tx.send(*stop.borrow());
            });
        });
        let _ = shutdown_tx.send(true);
        assert_eq!(rx.recv().await, Some(true));
    }
}
