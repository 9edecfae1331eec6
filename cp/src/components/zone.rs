//! What a zone control plane runs: the DP server (bootstrap + ADS) for its proxies, the
//! reconcilers that keep their inputs current, and, when federated, the KDS client that
//! syncs with global. A standalone zone also does global's jobs for itself (default mesh,
//! mesh CAs, signing keys, service insights); a federated one gets those from global.
//! With several instances on one database, every instance serves its proxies and the
//! leader runs the reconcilers and the KDS client (Kuma: "every zone control plane
//! leader maintains a connection to the global control plane").

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use tokio::sync::watch;

use crate::context::Cp;
use crate::kds::zone::Target;
use crate::lifecycle::Lifecycle;
use crate::reconcile;
use crate::tls::DpServerTls;
use crate::vips::VipManager;

/// A zone control plane: the shared state plus what only zones have.
pub struct ZoneCp {
    core: Arc<Cp>,
    /// PEM of the CA that signs the DP-server certificate.
    pub ca_pem: String,
    /// SANs of the generated DP-server certificate (empty if user-provided).
    pub tls_sans: Vec<String>,
    pub lifecycle: Lifecycle,
    /// `.mesh` VIP allocation.
    pub vips: VipManager,
}

impl Deref for ZoneCp {
    type Target = Cp;
    fn deref(&self) -> &Cp {
        &self.core
    }
}

impl ZoneCp {
    pub fn new(core: Arc<Cp>, ca_pem: String, tls_sans: Vec<String>) -> Arc<Self> {
        Arc::new(ZoneCp {
            vips: VipManager::new(core.cfg.work_dir(), core.cfg.dns_cidr),
            core,
            ca_pem,
            tls_sans,
            lifecycle: Lifecycle::default(),
        })
    }

    pub fn core(&self) -> &Arc<Cp> {
        &self.core
    }
}

/// Start the zone's parts; returns the DP server's address.
pub async fn start(
    cp: &Arc<Cp>,
    tls: &DpServerTls,
    server_tls: Arc<rustls::ServerConfig>,
    kds: Option<Target>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let zone = ZoneCp::new(cp.clone(), tls.ca_pem.clone(), tls.sans.clone());
    if kds.is_none() {
        reconcile::defaults::standalone(cp).await?;
    }
    let l =
        super::bind(SocketAddr::new(cp.cfg.bind_address, cp.cfg.dp_server_port), "DP server", "KUMA_DP_SERVER_PORT")
            .await?;
    let addr = l.local_addr()?;
    cp.dp_port.store(addr.port(), std::sync::atomic::Ordering::Relaxed);
    tracing::info!(address = %addr, "DP server listening (TLS: POST /bootstrap, gRPC ADS)");
    tokio::spawn(crate::dpserver::serve(
        l,
        Some(server_tls),
        crate::dpserver::router(zone.clone()),
        |r, _| r,
        shutdown.clone(),
    ));

    if let Some(target) = &kds {
        tracing::info!(global = %target, zone = %cp.cfg.zone_name, "federated zone: syncing with the global control plane");
        crate::kds::zone::ensure_own_zone(cp).await?;
    }
    let z = zone.clone();
    crate::leader::spawn_while_leader(&cp.leader, shutdown, "zone reconcilers", move |stop| {
        let cp = z.core().clone();
        // availableServices of this zone's ingresses, from its Dataplanes.
        let z1 = z.clone();
        let written = Arc::new(reconcile::WrittenLog::default());
        let interval = cp.cfg.ingress_update_interval;
        reconcile::spawn(
            "availableServices",
            &cp,
            stop.clone(),
            reconcile::available_services::relevant,
            interval,
            move || {
                let (z, written) = (z1.clone(), written.clone());
                async move { reconcile::available_services::update(&z, &written).await }
            },
        );
        // VIPs of local and remote services.
        let z2 = z.clone();
        let interval = cp.cfg.vip_refresh_interval;
        reconcile::spawn("VIPs", &cp, stop.clone(), reconcile::vips_relevant, interval, move || {
            let z = z2.clone();
            async move { z.vips.update(&z.store, &z.dataplanes, &z.cfg.zone_name).await }
        });
        match &kds {
            Some(target) => {
                tokio::spawn(crate::kds::zone::run(cp.clone(), target.clone(), stop));
            }
            None => {
                reconcile::defaults::spawn_mesh_reconcilers(&cp, stop.clone());
                reconcile::service_insights::spawn(&cp, stop);
            }
        }
    });
    Ok(addr)
}
