//! Reconcilers: jobs that keep derived resources equal to what their inputs say (Kuma
//! runs them on the leader, every second; here each runs once at start and again after
//! every relevant store change, debounced).

pub mod available_services;
pub mod defaults;
pub mod service_insights;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::context::Cp;
use crate::model::ResourceType;
use crate::store::{Change, ChangeEvent, Key, next_change};

/// Run `job` now and after every change `relevant` accepts, until shutdown. Changes that
/// arrive during the debounce (`KUMA_XDS_DEBOUNCE`) or a run are folded into the next run,
/// and two runs start at least `min_interval` apart (Kuma runs such jobs on an interval: a
/// burst of changes, such as thousands of Dataplanes registering, costs one run a second
/// rather than one per debounce, while a lone change is still handled after the debounce).
pub fn spawn<F, Fut>(
    name: &'static str,
    cp: &Arc<Cp>,
    mut shutdown: watch::Receiver<bool>,
    relevant: fn(&ChangeEvent) -> bool,
    min_interval: std::time::Duration,
    job: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let cp = cp.clone();
    tokio::spawn(async move {
        let mut events = cp.store.events();
        loop {
            let started = tokio::time::Instant::now();
            if let Err(e) = job().await {
                tracing::warn!(reconciler = name, error = %e, "reconciler failed; retrying on the next change");
            }
            tokio::select! {
                c = next_change(&mut events, relevant) => if c == Change::Closed { return },
                _ = shutdown.changed() => return,
            }
            tokio::time::sleep(cp.cfg.xds_debounce).await;
            tokio::time::sleep_until(started + min_interval).await;
            // Everything queued meanwhile is covered by the next run.
            while events.try_recv().is_ok() {}
        }
    });
}

/// VIPs depend on the services of Dataplanes and of ZoneIngresses, per Mesh.
pub fn vips_relevant(e: &ChangeEvent) -> bool {
    matches!(
        e.rtype(),
        ResourceType::Dataplane | ResourceType::ZoneIngress | ResourceType::Mesh | ResourceType::ExternalService
    )
}

/// What a reconciler last wrote to (or found right in) a derived resource: its stored version
/// and the generation of the Dataplane index it reflects. While the stored version is still
/// that one, the next pass needs to look only at the index entries stamped after that
/// generation, and can edit those in place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Written {
    pub version: u64,
    pub generation: u64,
}

/// A reconciler's [`Written`] per resource.
#[derive(Debug, Default)]
pub struct WrittenLog(Mutex<HashMap<Key, Written>>);

impl WrittenLog {
    pub fn get(&self, key: &Key) -> Option<Written> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied()
    }

    pub fn set(&self, key: Key, w: Written) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key, w);
    }
}
