//! `.mesh` virtual IPs: one per `kuma.io/service` of a mesh, from `KUMA_DNS_SERVER_CIDR`
//! (`240.0.0.0/4`), allocated lowest-free-first and never reclaimed, so that a service
//! keeps its VIP. A VIP outside the configured range (the range changed) is allocated anew.
//!
//! The allocation of a mesh is stored as Kuma's `kuma-<mesh>-dns-vips` Config resource
//! (spec `config`: JSON object service -> IP) and written to `<work dir>/dns-vips/<mesh>.json`
//! so that it survives a restart of the in-memory store.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::dataplanes::{DataplaneIndex, Dataplanes};
use crate::model::{Resource, ResourceType, SERVICE_TAG};
use crate::store::Store;

/// Kuma's `KUMA_DNS_SERVER_DOMAIN`.
pub const DNS_DOMAIN: &str = "mesh";
/// Kuma's default `KUMA_DNS_SERVER_SERVICE_VIP_PORT`.
pub const SERVICE_VIP_PORT: u32 = 80;

/// An IPv4 range `a.b.c.d/n` (`KUMA_DNS_SERVER_CIDR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    start: u32,
    /// Number of addresses.
    size: u64,
}

impl Default for Cidr {
    fn default() -> Self {
        Cidr { start: 0xF000_0000, size: 1 << 28 } // 240.0.0.0/4
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not an IPv4 range like 240.0.0.0/4");
        let (ip, bits) = s.trim().split_once('/').ok_or_else(err)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let bits: u32 = bits.parse().ok().filter(|b| (1..=32).contains(b)).ok_or_else(err)?;
        let mask = if bits == 32 { u32::MAX } else { !(u32::MAX >> bits) };
        Ok(Cidr { start: u32::from(ip) & mask, size: 1u64 << (32 - bits) })
    }
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u64::from(u32::from(ip));
        ip >= u64::from(self.start) && ip < u64::from(self.start) + self.size
    }

    /// In `127.0.0.0/8`: every VIP is an address of this host, so a proxy can bind it
    /// without transparent proxying.
    pub fn is_loopback(&self) -> bool {
        Ipv4Addr::from(self.start).is_loopback() && self.size <= 1 << 24
    }
}

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

/// Services of each mesh: inbound services of local Dataplanes, services that
/// ZoneIngresses advertise for the mesh (remote zones), and ExternalServices.
pub fn services_by_mesh<'a>(
    dataplanes: &Dataplanes,
    ingresses: impl IntoIterator<Item = &'a Resource>,
    external: &[Resource],
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for es in external {
        if let Ok(spec) = es.typed::<crate::model::ExternalServiceSpec>()
            && let Some(s) = spec.tags.get(SERVICE_TAG).filter(|s| !s.is_empty())
        {
            out.entry(es.mesh.clone()).or_default().insert(s.clone());
        }
    }
    for (mesh, services) in dataplanes.service_names() {
        out.entry(mesh.to_string()).or_default().extend(services.into_iter().map(str::to_string));
    }
    // Read from the JSON in place: an ingress lists thousands of services at scale, and
    // only two strings of each matter here.
    for zi in ingresses {
        let Some(list) = zi.spec.get("availableServices").and_then(|v| v.as_array()) else { continue };
        for a in list {
            let mesh = a.get("mesh").and_then(|m| m.as_str()).filter(|m| !m.is_empty());
            let svc = a.pointer("/tags/kuma.io~1service").and_then(|s| s.as_str()).filter(|s| !s.is_empty());
            if let (Some(mesh), Some(svc)) = (mesh, svc) {
                if let Some(set) = out.get_mut(mesh) {
                    if !set.contains(svc) {
                        set.insert(svc.to_string());
                    }
                } else {
                    out.entry(mesh.to_string()).or_default().insert(svc.to_string());
                }
            }
        }
    }
    out
}

/// Give every service a VIP in `cidr`: keep existing ones, allocate the lowest free address
/// for new ones.
pub fn allocate(existing: &VipMap, services: &BTreeSet<String>, cidr: Cidr) -> VipMap {
    let mut out: VipMap =
        existing.iter().filter(|(_, ip)| cidr.contains(**ip)).map(|(s, ip)| (s.clone(), *ip)).collect();
    let used: BTreeSet<u64> = out.values().map(|ip| u64::from(u32::from(*ip))).collect();
    let mut next = u64::from(cidr.start);
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
        let Some(ip) = u32::try_from(next).ok().filter(|_| next < u64::from(cidr.start) + cidr.size) else {
            tracing::warn!(service = %s, "the .mesh VIP range (KUMA_DNS_SERVER_CIDR) is exhausted");
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
    cidr: Cidr,
    /// What the last update was computed from (held while updating).
    last: tokio::sync::Mutex<Option<Inputs>>,
}

/// What the VIPs depend on: the set of the Dataplanes' services, and the versions of the
/// other zones' ingresses, of the ExternalServices, the Meshes and the VIP views themselves.
#[derive(PartialEq)]
struct Inputs {
    services: u64,
    versions: Vec<(crate::model::Key, u64)>,
}

impl VipManager {
    pub fn new(work_dir: PathBuf, cidr: Cidr) -> Self {
        VipManager { dir: work_dir.join("dns-vips"), cidr, last: tokio::sync::Mutex::new(None) }
    }

    fn file(&self, mesh: &str) -> PathBuf {
        self.dir.join(format!("{mesh}.json"))
    }

    /// Allocate VIPs for services without one, in every mesh; store and persist changes.
    ///
    /// `zone`: this zone, whose own ingresses offer only what its Dataplanes have.
    pub async fn update(&self, store: &Arc<dyn Store>, dataplanes: &DataplaneIndex, zone: &str) -> anyhow::Result<()> {
        let mut last = self.last.lock().await;
        let dps = dataplanes.read(store.as_ref()).await?;
        let remote =
            |zi: &Resource| zi.spec.get("zone").and_then(|z| z.as_str()).is_some_and(|z| !z.is_empty() && z != zone);
        let zis: Vec<_> =
            store.list_shared(ResourceType::ZoneIngress, None).await?.into_iter().filter(|zi| remote(zi)).collect();
        let ess = store.list(ResourceType::ExternalService, None).await?;
        let mesh_list = store.list_shared(ResourceType::Mesh, None).await?;
        let views = store.list_shared(ResourceType::Config, None).await?;
        // Most changes (an endpoint more of a known service) change none of this: skip them.
        let inputs = Inputs {
            services: dps.service_names_stamp(),
            versions: zis
                .iter()
                .map(|r| r.as_ref())
                .chain(&ess)
                .chain(mesh_list.iter().map(|r| r.as_ref()))
                .chain(views.iter().map(|r| r.as_ref()))
                .map(|r| (r.key(), r.version))
                .collect(),
        };
        if last.as_ref() == Some(&inputs) {
            return Ok(());
        }
        let meshes: BTreeSet<String> = mesh_list.iter().map(|m| m.name.clone()).collect();
        let mut wrote = false;
        for (mesh, services) in services_by_mesh(&dps, zis.iter().map(|z| z.as_ref()), &ess) {
            if !meshes.contains(&mesh) {
                continue;
            }
            let stored = store.get(ResourceType::Config, "", &config_name(&mesh)).await?;
            let existing = match &stored {
                Some(r) => r.spec.get("config").and_then(|v| v.as_str()).map(parse_map).unwrap_or_default(),
                // Not in the store (fresh start): what was persisted in the work directory.
                None => std::fs::read_to_string(self.file(&mesh)).map(|s| parse_map(&s)).unwrap_or_default(),
            };
            let updated = allocate(&existing, &services, self.cidr);
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
            wrote = true;
        }
        // A write changed a view's version: the next pass computes once more, then rests.
        *last = (!wrote).then_some(inputs);
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
        let m = allocate(&VipMap::new(), &s, Cidr::default());
        assert_eq!(m["a"], Ipv4Addr::new(240, 0, 0, 0));
        assert_eq!(m["b"], Ipv4Addr::new(240, 0, 0, 1));
        let mut existing = m.clone();
        existing.remove("a");
        let s2: BTreeSet<String> = ["b", "c", "0"].iter().map(|s| s.to_string()).collect();
        let m2 = allocate(&existing, &s2, Cidr::default());
        assert_eq!(m2["b"], Ipv4Addr::new(240, 0, 0, 1));
        assert_eq!(m2["0"], Ipv4Addr::new(240, 0, 0, 0));
        assert_eq!(m2["c"], Ipv4Addr::new(240, 0, 0, 2));
        assert_eq!(parse_map(&render_map(&m2)), m2);
        // A new range reallocates what is outside it.
        let lo: Cidr = "127.1.2.0/24".parse().unwrap();
        assert!(lo.is_loopback() && !Cidr::default().is_loopback());
        let m3 = allocate(&m2, &s2, lo);
        assert_eq!(m3["0"], Ipv4Addr::new(127, 1, 2, 0));
        assert!(m3.values().all(|ip| lo.contains(*ip)));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "x".parse::<Cidr>().is_err());
    }
}
