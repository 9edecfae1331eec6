//! Shared state of a running control plane.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::RunConfig;
use crate::model::{Resource, ResourceType, ZoneIngressSpec};
use crate::store::{Key, Store};
use crate::tokens::Tokens;

pub struct Cp {
    pub cfg: RunConfig,
    pub store: Arc<dyn Store>,
    pub tokens: Tokens,
    /// PEM of the CA that signs the DP-server certificate.
    pub ca_pem: String,
    /// SANs of the generated DP-server certificate (empty if user-provided).
    pub tls_sans: Vec<String>,
    /// Bound DP server port (the bootstrap's default ADS port).
    pub dp_port: std::sync::atomic::AtomicU16,
    pub lifecycle: Lifecycle,
    /// Builtin mesh CAs and data plane identity certificates.
    pub ca: crate::ca::CaManager,
    /// `.mesh` VIP allocation.
    pub vips: crate::vips::VipManager,
    /// Proxies with an open ADS stream: key -> number of streams.
    online: Mutex<HashMap<Key, usize>>,
}

/// Marks a proxy online while alive.
pub struct OnlineGuard {
    cp: Arc<Cp>,
    key: Key,
}

impl Drop for OnlineGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.cp.online.lock()
            && let Some(n) = m.get_mut(&self.key)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Cp {
    pub fn new(cfg: RunConfig, store: Arc<dyn Store>, ca_pem: String, tls_sans: Vec<String>) -> Arc<Self> {
        Arc::new(Cp {
            tokens: Tokens::new(store.clone()),
            lifecycle: Lifecycle::default(),
            ca: crate::ca::CaManager::new(cfg.work_dir()),
            vips: crate::vips::VipManager::new(cfg.work_dir()),
            online: Mutex::new(HashMap::new()),
            dp_port: std::sync::atomic::AtomicU16::new(cfg.dp_server_port),
            cfg,
            store,
            ca_pem,
            tls_sans,
        })
    }
}

impl Cp {
    pub fn mark_online(self: &Arc<Self>, key: Key) -> OnlineGuard {
        if let Ok(mut m) = self.online.lock() {
            *m.entry(key.clone()).or_default() += 1;
        }
        OnlineGuard { cp: self.clone(), key }
    }

    pub fn is_online(&self, key: &Key) -> bool {
        self.online.lock().map(|m| m.contains_key(key)).unwrap_or(false)
    }
}

/// Universal "direct lifecycle": resources registered by an ADS stream (from node metadata
/// `dataplane.resource`) are removed a delay after their last stream closed.
#[derive(Default)]
pub struct Lifecycle {
    /// key -> (generation, open streams)
    conns: Mutex<HashMap<Key, (u64, usize)>>,
}

pub struct Registration {
    cp: Arc<Cp>,
    key: Key,
}

impl Lifecycle {
    /// Upsert `resource` (the proxy's own resource) and count one more stream for it.
    pub async fn register(cp: &Arc<Cp>, mut resource: Resource) -> Result<Registration, String> {
        match resource.rtype {
            ResourceType::ZoneIngress | ResourceType::ZoneEgress => {
                resource.spec.insert("zone".into(), cp.cfg.zone_name.clone().into());
                if resource.rtype == ResourceType::ZoneIngress {
                    // Keep what the tracker computed so the REST view does not flicker.
                    if let Ok(Some(old)) = cp.store.get(resource.rtype, "", &resource.name).await
                        && let Some(av) = old.spec.get("availableServices")
                    {
                        resource.spec.insert("availableServices".into(), av.clone());
                    } else {
                        resource.spec.remove("availableServices");
                    }
                    let _ = resource.typed::<ZoneIngressSpec>().map_err(|e| e.to_string())?;
                }
            }
            ResourceType::Dataplane => {
                if cp.store.get(ResourceType::Mesh, "", &resource.mesh).await.map_err(|e| e.to_string())?.is_none() {
                    return Err(format!(
                        "mesh {:?} does not exist: create it first (ctl apply -f mesh.yaml)",
                        resource.mesh
                    ));
                }
            }
            _ => return Err(format!("a {} cannot connect as a proxy", resource.rtype.name())),
        }
        let key = resource.key();
        {
            let mut conns = cp.lifecycle.conns.lock().map_err(|_| "lifecycle lock poisoned".to_string())?;
            let e = conns.entry(key.clone()).or_insert((0, 0));
            e.0 += 1;
            e.1 += 1;
        }
        // Register the stream before the upsert so a concurrent deregistration of an older
        // stream cannot delete what we are about to write.
        if let Err(e) = cp.store.upsert(resource, None).await {
            drop(Registration { cp: cp.clone(), key: key.clone() });
            return Err(e.to_string());
        }
        tracing::info!(kind = key.0.name(), mesh = %key.1, name = %key.2, "proxy registered");
        Ok(Registration { cp: cp.clone(), key })
    }
}

impl Registration {
    fn release(&self) {
        let generation = {
            let Ok(mut conns) = self.cp.lifecycle.conns.lock() else { return };
            let Some(e) = conns.get_mut(&self.key) else { return };
            e.1 = e.1.saturating_sub(1);
            if e.1 > 0 {
                return;
            }
            e.0
        };
        let cp = self.cp.clone();
        let key = self.key.clone();
        let delay = cp.cfg.deregistration_delay;
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            tokio::time::sleep(delay).await;
            let still_gone = {
                let Ok(mut conns) = cp.lifecycle.conns.lock() else { return };
                match conns.get(&key) {
                    Some((g, 0)) if *g == generation => {
                        conns.remove(&key);
                        true
                    }
                    _ => false,
                }
            };
            if still_gone {
                match cp.store.delete(key.0, &key.1, &key.2).await {
                    Ok(_) => tracing::info!(kind = key.0.name(), mesh = %key.1, name = %key.2, "proxy deregistered after its stream closed"),
                    Err(e) => tracing::warn!(error = %e, "cannot deregister proxy"),
                }
            }
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}
