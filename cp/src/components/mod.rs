//! Start a control plane: store, keys, TLS, DP server, REST API, availableServices tracker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::RunConfig;
use crate::context::Cp;
use crate::model::{ResourceType, ZoneIngressSpec};
use crate::store::{MemoryStore, Store};

/// A running control plane. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub cp: Arc<Cp>,
    /// DP server address (None in global mode).
    pub dp_server: Option<SocketAddr>,
    pub api: SocketAddr,
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

async fn bind(addr: SocketAddr, what: &str, var: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {what}; free the port or choose another one with {var}")
    })
}

/// Start everything and return once both servers are bound.
pub async fn start(cfg: RunConfig) -> anyhow::Result<Running> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    start_with_store(cfg, store).await
}

pub async fn start_with_store(cfg: RunConfig, store: Arc<dyn Store>) -> anyhow::Result<Running> {
    let work_dir = cfg.work_dir();
    let tls = crate::tls::load_or_create(
        &work_dir,
        cfg.tls_cert_file.as_deref(),
        cfg.tls_key_file.as_deref(),
        &cfg.tls_sans,
    )?;
    tracing::info!(path = %tls.ca_cert_path.display(), "DP server CA certificate written; pass it to kuma-dp with --ca-cert-file");
    let server_tls = crate::tls::server_config(&tls)?;
    let cp = Cp::new(cfg.clone(), store, tls.ca_pem.clone(), tls.sans.clone());
    cp.tokens
        .persist_zone_signing_key(&cfg.work_dir().join("zone-token-signing-key.pem"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot load or create the zone token signing key: {e}"))?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut dp_server = None;
    if cfg.is_global() {
        tracing::info!(
            "global mode: serving the REST API only; KDS (zone sync) and the DP server are not implemented yet"
        );
    } else {
        if let Some(g) = &cfg.global_address {
            tracing::warn!(global_address = %g, "zone -> global sync (KDS) is not implemented yet; running as a standalone zone");
        }
        let l = bind(SocketAddr::new(cfg.bind_address, cfg.dp_server_port), "DP server", "KUMA_DP_SERVER_PORT").await?;
        let addr = l.local_addr()?;
        cp.dp_port.store(addr.port(), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(address = %addr, "DP server listening (TLS: POST /bootstrap, gRPC ADS)");
        tokio::spawn(crate::dpserver::serve(
            l,
            Some(server_tls),
            crate::dpserver::router(cp.clone()),
            |r, _| r,
            shutdown_rx.clone(),
        ));
        tokio::spawn(track_available_services(cp.clone(), shutdown_rx.clone()));
        dp_server = Some(addr);
    }
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
            "api": api.to_string(),
            "ca_cert_file": tls.ca_cert_path,
        });
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, f).with_context(|| format!("cannot write {}", f.display()))?;
    }
    // Logged last: whoever waits for this line also finds the address file.
    tracing::info!(address = %api, "REST API listening (HTTP)");
    Ok(Running { cp, dp_server, api, ca_cert_file: tls.ca_cert_path, shutdown })
}

/// Keep every ZoneIngress's `availableServices` equal to what the zone's Dataplanes offer
/// (Kuma recomputes every second on the leader; we recompute on every store change).
async fn track_available_services(cp: Arc<Cp>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = cp.store.subscribe();
    loop {
        changes.borrow_and_update();
        if let Err(e) = update_available_services(&cp).await {
            tracing::warn!(error = %e, "cannot update availableServices");
        }
        if let Err(e) = cp.vips.update(&cp.store).await {
            tracing::warn!(error = %e, "cannot update the .mesh VIPs");
        }
        ensure_mesh_cas(&cp).await;
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        tokio::time::sleep(cp.cfg.xds_debounce).await;
    }
}

async fn update_available_services(cp: &Cp) -> anyhow::Result<()> {
    let dps = cp.store.list(ResourceType::Dataplane, None).await?;
    let available = crate::xds::generate::available_services(&dps);
    let value = serde_json::to_value(&available)?;
    for zi in cp.store.list(ResourceType::ZoneIngress, None).await? {
        let spec: ZoneIngressSpec = zi.typed().unwrap_or_default();
        if !spec.zone.is_empty() && spec.zone != cp.cfg.zone_name {
            continue; // another zone's ingress: its availableServices come from that zone
        }
        if spec.available_services == available && zi.spec.contains_key("availableServices") {
            continue;
        }
        let version = zi.version;
        let mut updated = zi;
        updated.spec.insert("availableServices".into(), value.clone());
        // Conditional write: a concurrent change wins and triggers another pass.
        if let Err(e) = cp.store.upsert(updated, Some(version)).await {
            tracing::debug!(error = %e, "availableServices update raced with another write");
        }
    }
    Ok(())
}

/// Create the CA of every mesh whose enabled mTLS backend is builtin (Kuma's
/// `EnsureBackends` on Mesh create/update).
async fn ensure_mesh_cas(cp: &Cp) {
    let Ok(meshes) = cp.store.list(ResourceType::Mesh, None).await else { return };
    for m in meshes {
        let spec: crate::model::MeshSpec = m.typed().unwrap_or_default();
        if let Some(b) = spec.enabled_backend()
            && b.backend_type == "builtin"
            && let Err(e) = cp.ca.ensure_ca(&cp.store, &m.name, &b.name).await
        {
            tracing::warn!(mesh = %m.name, error = %e, "cannot create the mesh CA");
        }
    }
}
