//! What a global control plane runs: the KDS server zones dial, and the reconcilers that
//! own the mesh configuration (default Mesh, mesh CAs, signing keys, service insights,
//! zone liveness). It serves no proxies: there is no DP server. With several instances
//! on one database, every instance serves KDS and the leader runs the reconcilers.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::context::Cp;
use crate::reconcile;

/// Start global's parts; returns the KDS server's address.
pub async fn start(
    cp: &Arc<Cp>,
    server_tls: Arc<rustls::ServerConfig>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    reconcile::defaults::standalone(cp).await?;
    let c = cp.clone();
    crate::leader::spawn_while_leader(&cp.leader, shutdown.clone(), "global reconcilers", move |stop| {
        reconcile::defaults::spawn_mesh_reconcilers(&c, stop.clone());
        reconcile::service_insights::spawn(&c, stop.clone());
        crate::kds::insight::spawn_idle_finalizer(&c, stop);
    });

    let l = super::bind(
        SocketAddr::new(cp.cfg.bind_address, cp.cfg.kds_port),
        "KDS server",
        "KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT",
    )
    .await?;
    let addr = l.local_addr()?;
    tracing::info!(address = %addr, "KDS server listening (gRPC over TLS); zones dial it with KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS=grpcs://<host>:{}", addr.port());
    tokio::spawn(crate::dpserver::serve(
        l,
        Some(server_tls),
        crate::kds::global::router(cp.clone()),
        |r, _| r,
        shutdown,
    ));
    Ok(addr)
}
