//! `.mesh` virtual IPs: one per `kuma.io/service` of a mesh, from `240.0.0.0/4` (Kuma's
//! `KUMA_DNS_SERVER_CIDR`), allocated lowest-free-first and never reclaimed, so that a
//! service keeps its VIP.
//!
//! The allocation of a mesh is stored as Kuma's `kuma-<mesh>-dns-vips` Config resource
//! (spec `config`: JSON object service -> IP) and written to `<work dir>/dns-vips/<mesh>.json`
//! so that it survives a restart of the in-memory store.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::model::{DataplaneSpec, Resource, ResourceType, SERVICE_TAG, ZoneIngressSpec};
use crate::store::Store;

/// First address of `240.0.0.0/4`.
const CIDR_START: u32 = 0xF000_0000;
/// Number of addresses in `240.0.0.0/4`.
const CIDR_SIZE: u32 = 1 << 28;
/// Kuma's `KUMA_DNS_SERVER_DOMAIN`.
pub const DNS_DOMAIN: &str = "mesh";
/// Kuma's `KUMA_DNS_SERVER_SERVICE_VIP_PORT`.
pub const SERVICE_VIP_PORT: u32 = 80;

pub fn config_name(mesh: &str) -> String {
    format!("kuma-{mesh}-dns-vips")
}

/// service -> VIP of one mesh.
pub type VipMap = BTreeMap<String, Ipv4Addr>;

/// The DNS names of a service: `<service>.mesh`, plus the RFC 1123 form with `_` -> `.`
/// when it differs.
pub fn domains(service: &str) -> Vec<String> {
    let mut out = vec![format!("{service}.{DNS_DOMAIN}")];
    let cleaned = format!("{}.{DNS_DOMAIN}", service.replace('_', "."));
    if cleaned != out[0] {
        out.push(cleaned);
    }
    out
}

/// IPv4-mapped IPv6 form as Kuma writes it (`::ffff:f000:1`).
pub fn to_v6(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("::ffff:{:x}:{:x}", u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]))
}

fn parse_map(s: &str) -> VipMap {
    serde_json::from_str::<BTreeMap<String, String>>(s)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect()
}

fn render_map(m: &VipMap) -> String {
    let s: BTreeMap<&String, String> = m.iter().map(|(k, v)| (k, v.to_string())).collect();
    serde_json::to_string(&s).unwrap_or_default()
}

/// Read the VIPs of a mesh from the store.
pub async fn load(store: &dyn Store, mesh: &str) -> VipMap {
    match store.get(ResourceType::Config, "", &config_name(mesh)).await {
        Ok(Some(r)) => r.spec.get("config").and_then(|v| v.as_str()).map(parse_map).unwrap_or_default(),
        _ => VipMap::new(),
    }
}

/// Services of each mesh: inbound services of local Dataplanes, plus services that
/// ZoneIngresses advertise for the mesh (remote zones).
pub fn services_by_mesh(dataplanes: &[Resource], ingresses: &[Resource]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for dp in dataplanes {
        let Ok(spec) = dp.typed::<DataplaneSpec>() else { continue };
        for inb in spec.networking.map(|n| n.inbound).unwrap_or_default() {
            if let Some(s) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) {
                out.entry(dp.mesh.clone()).or_default().insert(s.clone());
            }
        }
    }
    for zi in ingresses {
        let Ok(spec) = zi.typed::<ZoneIngressSpec>() else { continue };
        for a in spec.available_services {
            if let Some(s) = a.tags.get(SERVICE_TAG).filter(|s| !s.is_empty())
                && !a.mesh.is_empty()
            {
                out.entry(a.mesh.clone()).or_default().insert(s.clone());
            }
        }
    }
    out
}

/// Give every service a VIP: keep existing ones, allocate the lowest free address for new ones.
pub fn allocate(existing: &VipMap, services: &BTreeSet<String>) -> VipMap {
    let mut out = existing.clone();
    let used: BTreeSet<u64> = out.values().map(|ip| u64::from(u32::from(*ip))).collect();
    let mut next = u64::from(CIDR_START);
    let mut used_iter = used.into_iter().peekable();
    for s in services {
        if out.contains_key(s) {
            continue;
        }
        while used_iter.peek().is_some_and(|u| *u < next) {
            used_iter.next();
        }
        while used_iter.peek() == Some(&next) {
            used_iter.next();
            next += 1;
        }
        let Some(ip) = u32::try_from(next).ok().filter(|_| next < u64::from(CIDR_START) + u64::from(CIDR_SIZE)) else {
            tracing::warn!(service = %s, "the .mesh VIP range 240.0.0.0/4 is exhausted");
            break;
        };
        out.insert(s.clone(), Ipv4Addr::from(ip));
        next += 1;
    }
    out
}

/// Keeps the VIP views of all meshes up to date (called on store changes).
pub struct VipManager {
    dir: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl VipManager {
    pub fn new(work_dir: PathBuf) -> Self {
        VipManager { dir: work_dir.join("dns-vips"), lock: tokio::sync::Mutex::new(()) }
    }

    fn file(&self, mesh: &str) -> PathBuf {
        self.dir.join(format!("{mesh}.json"))
    }

    /// Allocate VIPs for services without one, in every mesh; store and persist changes.
    pub async fn update(&self, store: &Arc<dyn Store>) -> anyhow::Result<()> {
        let _g = self.lock.lock().await;
        let dps = store.list(ResourceType::Dataplane, None).await?;
        let zis = store.list(ResourceType::ZoneIngress, None).await?;
        let meshes: BTreeSet<String> =
            store.list(ResourceType::Mesh, None).await?.into_iter().map(|m| m.name).collect();
        for (mesh, services) in services_by_mesh(&dps, &zis) {
            if !meshes.contains(&mesh) {
                continue;
            }
            let stored = store.get(ResourceType::Config, "", &config_name(&mesh)).await?;
            let existing = match &stored {
                Some(r) => r.spec.get("config").and_then(|v| v.as_str()).map(parse_map).unwrap_or_default(),
                // Not in the store (fresh start): what was persisted in the work directory.
                None => std::fs::read_to_string(self.file(&mesh)).map(|s| parse_map(&s)).unwrap_or_default(),
            };
            let updated = allocate(&existing, &services);
            if stored.is_some() && updated == existing {
                continue;
            }
            let text = render_map(&updated);
            if let Err(e) = std::fs::create_dir_all(&self.dir).and_then(|_| std::fs::write(self.file(&mesh), &text)) {
                tracing::warn!(error = %e, path = %self.file(&mesh).display(), "cannot persist the .mesh VIPs");
            }
            let mut r = Resource::new(ResourceType::Config, "", &config_name(&mesh));
            r.spec.insert("config".into(), text.into());
            store.upsert(r, None).await?;
            tracing::debug!(mesh, services = updated.len(), "VIPs updated");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_v6() {
        assert_eq!(
            domains("echo-server_echo-example_svc_1010"),
            vec!["echo-server_echo-example_svc_1010.mesh", "echo-server.echo-example.svc.1010.mesh"]
        );
        assert_eq!(domains("web"), vec!["web.mesh"]);
        assert_eq!(to_v6(Ipv4Addr::new(240, 0, 0, 1)), "::ffff:f000:1");
        assert_eq!(to_v6(Ipv4Addr::new(240, 0, 0, 0)), "::ffff:f000:0");
    }

    #[test]
    fn allocation_is_stable_and_fills_gaps() {
        let s: BTreeSet<String> = ["b", "a"].iter().map(|s| s.to_string()).collect();
        let m = allocate(&VipMap::new(), &s);
        assert_eq!(m["a"], Ipv4Addr::new(240, 0, 0, 0));
        assert_eq!(m["b"], Ipv4Addr::new(240, 0, 0, 1));
        let mut existing = m.clone();
        existing.remove("a");
        let s2: BTreeSet<String> = ["b", "c", "0"].iter().map(|s| s.to_string()).collect();
        let m2 = allocate(&existing, &s2);
        assert_eq!(m2["b"], Ipv4Addr::new(240, 0, 0, 1));
        assert_eq!(m2["0"], Ipv4Addr::new(240, 0, 0, 0));
        assert_eq!(m2["c"], Ipv4Addr::new(240, 0, 0, 2));
        assert_eq!(parse_map(&render_map(&m2)), m2);
    }
}
