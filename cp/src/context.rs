//! State shared by everything a control plane runs, whatever its mode. What only a zone
//! runs (the DP server, proxy lifecycles, VIPs) is in [`crate::components::zone`].

use std::sync::Arc;
use std::sync::atomic::AtomicU16;

use crate::ca::CaManager;
use crate::config::RunConfig;
use crate::dataplanes::DataplaneIndex;
use crate::kds::metrics::KdsMetrics;
use crate::kds::provider::SharedEncodes;
use crate::leader::Leadership;
use crate::model::labels::Role;
use crate::store::Store;
use crate::tokens::Tokens;

pub struct Cp {
    pub cfg: RunConfig,
    pub store: Arc<dyn Store>,
    pub tokens: Tokens,
    /// Builtin mesh CAs; a federated zone only reads the ones global sends.
    pub ca: CaManager,
    /// This instance's id (Kuma's `<hostname>-<suffix>`), as KDS reports it.
    pub instance_id: String,
    /// Bound DP server port (the bootstrap's default ADS port); 0 on global.
    pub dp_port: AtomicU16,
    /// Counters of the KDS streams.
    pub kds_metrics: KdsMetrics,
    /// What global's zone streams encoded, shared between them.
    pub kds_encodes: SharedEncodes,
    /// Whether this instance runs the leader-only jobs (always, on the memory store).
    pub leader: Leadership,
    /// The Dataplanes, parsed once, for everything derived from them.
    pub dataplanes: DataplaneIndex,
}

impl Cp {
    /// The only instance of its control plane (memory store): always the leader.
    pub fn new(cfg: RunConfig, store: Arc<dyn Store>) -> Arc<Self> {
        Self::with_leadership(cfg, store, instance_id(), Leadership::always())
    }

    /// One of several instances sharing `store`, known as `instance_id`, leading when
    /// `leader` says so.
    pub fn with_leadership(
        cfg: RunConfig,
        store: Arc<dyn Store>,
        instance_id: String,
        leader: Leadership,
    ) -> Arc<Self> {
        let federated = cfg.is_federated_zone();
        Arc::new(Cp {
            tokens: Tokens::new(store.clone(), federated),
            ca: CaManager::new(cfg.work_dir(), !federated),
            instance_id,
            dp_port: AtomicU16::new(cfg.dp_server_port),
            kds_metrics: KdsMetrics::default(),
            kds_encodes: SharedEncodes::default(),
            leader,
            dataplanes: DataplaneIndex::new(store.events()),
            cfg,
            store,
        })
    }

    /// Who computes labels of the resources this control plane creates.
    pub fn role(&self) -> Role<'_> {
        if self.cfg.is_global() { Role::Global } else { Role::Zone(&self.cfg.zone_name) }
    }

    /// `mode` as the API and logs say it.
    pub fn mode_name(&self) -> &'static str {
        if self.cfg.is_global() { "global" } else { "zone" }
    }
}

/// Kuma's instance id: `<hostname>-<4 hex digits>`.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cp".into());
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    format!("{host}-{:04x}", u16::from_be_bytes(b))
}

/// A random RFC 4122 version 4 UUID (token ids, subscription ids).
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    // aws-lc's system RNG; failure is practically impossible and only weakens uniqueness.
    let _ = aws_lc_rs::rand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
