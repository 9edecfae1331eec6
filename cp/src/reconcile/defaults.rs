//! What a control plane that owns the mesh configuration (global, or a standalone zone)
//! creates: the zone-token signing key, the `default` Mesh, and per Mesh its builtin CA
//! and dataplane-token signing key. A federated zone creates none of these: they arrive
//! from global over KDS (Kuma: `EnsureDefaultMeshExists` and the mesh CA run only where
//! the Mesh is created).

use std::sync::Arc;

use tokio::sync::watch;

use crate::context::Cp;
use crate::model::labels::compute as compute_labels;
use crate::model::{MeshSpec, Resource, ResourceType};
use crate::store::ChangeEvent;

pub const DEFAULT_MESH: &str = "default";

/// Start-up defaults of global and of a standalone zone.
pub async fn standalone(cp: &Arc<Cp>) -> anyhow::Result<()> {
    // A durable store keeps the key itself (every instance sharing it uses that one); the
    // memory store gets a copy in the work directory so that tokens survive a restart.
    let key = if cp.store.durable() {
        cp.tokens.ensure_zone_signing_key().await
    } else {
        cp.tokens.persist_zone_signing_key(&cp.cfg.work_dir().join("zone-token-signing-key.pem")).await
    };
    key.map_err(|e| anyhow::anyhow!("cannot load or create the zone token signing key: {e}"))?;
    if !cp.cfg.skip_mesh_creation && cp.store.get(ResourceType::Mesh, "", DEFAULT_MESH).await?.is_none() {
        let mut mesh = Resource::new(ResourceType::Mesh, "", DEFAULT_MESH);
        compute_labels(&mut mesh, cp.role());
        // expected version 0: a Mesh applied meanwhile wins.
        if cp.store.upsert(mesh, Some(0)).await.is_ok() {
            tracing::info!("default Mesh created (KUMA_DEFAULTS_SKIP_MESH_CREATION=true skips this)");
        }
    }
    Ok(())
}

fn mesh_changed(e: &ChangeEvent) -> bool {
    e.rtype() == ResourceType::Mesh
}

/// Keep every Mesh's builtin CA and dataplane-token signing key in place.
pub fn spawn_mesh_reconcilers(cp: &Arc<Cp>, shutdown: watch::Receiver<bool>) {
    let c = cp.clone();
    super::spawn("mesh CAs and signing keys", cp, shutdown, mesh_changed, std::time::Duration::ZERO, move || {
        let cp = c.clone();
        async move {
            for m in cp.store.list(ResourceType::Mesh, None).await? {
                let spec: MeshSpec = m.typed().unwrap_or_default();
                if let Some(b) = spec.enabled_backend()
                    && b.backend_type == "builtin"
                    && let Err(e) = cp.ca.ensure_ca(&cp.store, &m.name, &b.name).await
                {
                    tracing::warn!(mesh = %m.name, error = %e, "cannot create the mesh CA");
                }
                if let Err(e) = cp.tokens.ensure_dataplane_signing_key(&m.name).await {
                    tracing::warn!(mesh = %m.name, error = %e, "cannot create the dataplane token signing key");
                }
            }
            Ok(())
        }
    });
}
