//! Start a control plane: what every mode runs (store, REST API, the CP certificate),
//! then the composition of its mode, [`zone`] or [`global`].

pub mod global;
pub mod zone;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{RunConfig, StoreType};
use crate::context::{Cp, instance_id};
use crate::leader::Leadership;
use crate::store::postgres::PostgresStore;
use crate::store::{MemoryStore, Store};

/// A running control plane. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub cp: Arc<Cp>,
    /// DP server address (zones only).
    pub dp_server: Option<SocketAddr>,
    /// KDS server address (global only).
    pub kds: Option<SocketAddr>,
    pub api: SocketAddr,
    /// The CA of this control plane's certificate, for `--ca-cert-file` (zone) and
    /// `KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE` (global).
    pub ca_cert_file: PathBuf,
    shutdown: watch::Sender<bool>,
}

impl Running {
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Resolves when shutdown was requested.
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

pub(crate) async fn bind(addr: SocketAddr, what: &str, var: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {what}; free the port or choose another one with {var}")
    })
}

/// Start everything on the configured store (`KUMA_STORE_TYPE`) and return once every
/// server is bound.
pub async fn start(cfg: RunConfig) -> anyhow::Result<Running> {
    launch(cfg, None).await
}

/// Start everything on `store`, as its only instance.
pub async fn start_with_store(cfg: RunConfig, store: Arc<dyn Store>) -> anyhow::Result<Running> {
    launch(cfg, Some(store)).await
}

async fn launch(cfg: RunConfig, store: Option<Arc<dyn Store>>) -> anyhow::Result<Running> {
    // Inputs a person gives are checked before anything is bound or written.
    let kds_target = if cfg.is_federated_zone() { Some(crate::kds::zone::Target::from_config(&cfg)?) } else { None };
    let work_dir = cfg.work_dir();
    // Kuma's autoconfig: global's KDS server uses the KDS certificate files when given,
    // else the general CP certificate (generated once in the work directory).
    let (cert_file, key_file) = if cfg.is_global() && cfg.kds_tls_cert_file.is_some() {
        (cfg.kds_tls_cert_file.as_deref(), cfg.kds_tls_key_file.as_deref())
    } else {
        (cfg.tls_cert_file.as_deref(), cfg.tls_key_file.as_deref())
    };
    let tls = crate::tls::load_or_create(&work_dir, cert_file, key_file, &cfg.tls_sans)?;
    let server_tls = crate::tls::server_config(&tls)?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let id = instance_id();
    let (store, leader): (Arc<dyn Store>, Leadership) = match (store, cfg.store.store_type) {
        (Some(s), _) => (s, Leadership::always()),
        (None, StoreType::Memory) => (Arc::new(MemoryStore::new()), Leadership::always()),
        (None, StoreType::Postgres) => {
            let pg = PostgresStore::open(&cfg.store.postgres).await?;
            let leader = Leadership::postgres(pg.pool().clone(), id.clone(), shutdown_rx.clone());
            (pg, leader)
        }
    };
    let cp = Cp::with_leadership(cfg.clone(), store, id, leader);

    let (dp_server, kds) = if cfg.is_global() {
        tracing::info!(path = %tls.ca_cert_path.display(), "CP CA certificate written; zones trust it with KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE");
        let kds = global::start(&cp, server_tls, shutdown_rx.clone()).await?;
        (None, Some(kds))
    } else {
        tracing::info!(path = %tls.ca_cert_path.display(), "DP server CA certificate written; pass it to kuma-dp with --ca-cert-file");
        let dp = zone::start(&cp, &tls, server_tls, kds_target, shutdown_rx.clone()).await?;
        (Some(dp), None)
    };

    let api_ip = cfg.api_interface.unwrap_or(cfg.bind_address);
    let l = bind(SocketAddr::new(api_ip, cfg.api_port), "REST API", "KUMA_API_SERVER_HTTP_PORT").await?;
    let api = l.local_addr()?;
    tokio::spawn(crate::dpserver::serve(
        l,
        None,
        crate::api::router(cp.clone()),
        crate::api::with_peer,
        shutdown_rx.clone(),
    ));

    if let Some(f) = &cfg.address_file {
        let doc = serde_json::json!({
            "dp_server": dp_server.map(|a| a.to_string()),
            "kds": kds.map(|a| a.to_string()),
            "api": api.to_string(),
            "ca_cert_file": tls.ca_cert_path,
        });
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, f).with_context(|| format!("cannot write {}", f.display()))?;
    }
    // Logged last: whoever waits for this line also finds the address file.
    tracing::info!(address = %api, "REST API listening (HTTP)");
    Ok(Running { cp, dp_server, kds, api, ca_cert_file: tls.ca_cert_path, shutdown })
}
