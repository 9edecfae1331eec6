//! Upstream clusters: hosts, load balancing and subsets, as resolved at build time.

use crate::health::{CheckCfg, HostHealth};
use crate::outlier::{Detector, Monitor, Outcome};
use crate::stats::ClusterStats;
use crate::tls::ClientTls;
use crate::upstream::HostAddr;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use super::lb::HostSet;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    /// Consistent hashing; the settings are the hosts' ([`EdsSource::hashing`]).
    RingHash,
    Maglev,
}

/// A cluster: its settings (reached through `Deref`) and its hosts, which an EDS update
/// replaces in place.
#[derive(Debug)]
pub struct ClusterCfg {
    pub settings: ClusterSettings,
    /// The hosts and the subsets routes select, replaced together by an EDS update
    /// ([`ClusterCfg::publish`]) without rebuilding the cluster or any listener.
    endpoints: ArcSwap<Endpoints>,
    /// The `metadata_match` sets of the routes to this cluster; a [`Target`]'s slot
    /// indexes them and [`Endpoints::subsets`].
    ///
    /// [`Target`]: super::Target
    subset_keys: Mutex<Vec<BTreeMap<String, String>>>,
}

impl std::ops::Deref for ClusterCfg {
    type Target = ClusterSettings;
    fn deref(&self) -> &ClusterSettings {
        &self.settings
    }
}

/// A cluster's hosts, all and by subset, as one consistent value.
#[derive(Debug, Default)]
pub struct Endpoints {
    pub all: Arc<HostSet>,
    /// By subset slot ([`ClusterCfg::subset_slot`]).
    subsets: Vec<Arc<HostSet>>,
}

/// An EDS cluster's settings that shape its hosts.
#[derive(Debug, Clone)]
pub struct EdsSource {
    /// The assignment's name: `eds_cluster_config.service_name`, else the cluster's.
    pub service: String,
    /// `transport_socket_matches` criteria, in order.
    pub tls_criteria: Vec<BTreeMap<String, String>>,
    pub outlier: Option<crate::outlier::OutlierCfg>,
    pub panic_threshold: u32,
    /// RING_HASH and MAGLEV's settings.
    pub hashing: Option<super::hashing::Hashing>,
}

/// The HTTP version of upstream requests (`HttpProtocolOptions`, or the older cluster
/// fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamHttp {
    #[default]
    Http1,
    Http2,
    /// The downstream request's version.
    Downstream,
}

#[derive(Debug)]
pub struct Host {
    pub addr: HostAddr,
    pub weight: u32,
    /// `filter_metadata["envoy.lb"]` of the endpoint, for subset selection.
    pub lb_metadata: BTreeMap<String, String>,
    /// The EDS health status (UNHEALTHY, DRAINING and TIMEOUT hosts take no traffic).
    pub healthy: bool,
    /// The first `transport_socket_matches` entry the endpoint matches; `None`: the
    /// cluster's own `transport_socket`.
    pub tls_match: Option<usize>,
    /// Active health checking's verdict, when the cluster checks.
    pub health: Option<Arc<HostHealth>>,
    /// The DNS name of a STRICT_DNS endpoint, or the endpoint's `hostname`
    /// (`auto_host_rewrite` sends it as the authority).
    pub hostname: Option<String>,
    /// Upstream HTTP connections to this host.
    pub pool: crate::hcm::pool::HostPool,
    /// The EDS priority of the host's locality (0 is the highest).
    pub priority: u32,
    /// Outlier detection's view of the host, when its cluster has it.
    pub outlier: Option<(Arc<Detector>, Arc<Monitor>)>,
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub connect_fail: AtomicU64,
}

impl Host {
    /// A host at `addr` with nothing else known (an original destination).
    pub fn at(addr: std::net::SocketAddr) -> Host {
        Host {
            addr: HostAddr::Ip(addr),
            weight: 1,
            lb_metadata: BTreeMap::new(),
            healthy: true,
            tls_match: None,
            health: None,
            hostname: None,
            pool: Default::default(),
            priority: 0,
            outlier: None,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_fail: AtomicU64::new(0),
        }
    }

    /// Whether `other` is the same endpoint with the same settings: an update that keeps
    /// it keeps this host, with its connection pool and its counts.
    pub fn same_endpoint(&self, other: &Host) -> bool {
        self.addr == other.addr
            && self.weight == other.weight
            && self.lb_metadata == other.lb_metadata
            && self.healthy == other.healthy
            && self.tls_match == other.tls_match
            && self.hostname == other.hostname
            && self.priority == other.priority
    }

    /// Whether the host may take traffic now: healthy as EDS says, passing its active
    /// health checks, and not ejected. `Err(Some(t))`: ejected until `t`.
    pub fn available(&self, now: Instant) -> Result<(), Option<Instant>> {
        if !self.healthy || self.health.as_ref().is_some_and(|h| !h.passing()) {
            return Err(None);
        }
        match &self.outlier {
            Some((d, m)) => m.ejected_until(&d.cfg(), now).map_or(Ok(()), |t| Err(Some(t))),
            None => Ok(()),
        }
    }

    /// Tells outlier detection how a connection or request to this host ended.
    pub fn record(&self, outcome: Outcome) {
        if let Some((d, m)) = &self.outlier {
            d.record(m, &self.addr, outcome);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    NoFallback,
    AnyEndpoint,
    DefaultSubset,
}

#[derive(Debug)]
pub struct SubsetCfg {
    pub fallback: Fallback,
    pub default_subset: BTreeMap<String, String>,
    /// Key sets a metadata match may use, each with its own fallback.
    pub selectors: Vec<(Vec<String>, Fallback)>,
}

/// A cluster's settings; [`ClusterCfg::new`] adds its hosts.
#[derive(Debug)]
pub struct ClusterSettings {
    pub name: String,
    /// ORIGINAL_DST: each connection goes to its own original destination.
    pub original_dst: bool,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    /// Circuit breaker: most upstream connections open at once.
    pub max_connections: u64,
    pub subsets: Option<SubsetCfg>,
    /// What an EDS update needs to build this cluster's hosts again (`None`: not an EDS
    /// cluster, its hosts change only with the cluster).
    pub eds: Option<EdsSource>,
    pub stats: Arc<ClusterStats>,
    /// TLS origination (`transport_socket` with an `UpstreamTlsContext`).
    pub tls: super::Tls<ClientTls>,
    /// The `transport_socket_matches` sockets, in order ([`Host::tls_match`] indexes them).
    pub tls_matches: Vec<super::Tls<ClientTls>>,
    /// The active health check, when the cluster has one.
    pub health_check: Option<Arc<CheckCfg>>,
    /// Which HTTP version requests to this cluster use.
    pub http_protocol: UpstreamHttp,
    /// Circuit breaker: most requests in flight at once (HTTP).
    pub max_requests: u64,
    /// `upstream_bind_config`: where connections come from.
    pub source: crate::upstream::Source,
}

impl ClusterCfg {
    pub fn new(settings: ClusterSettings, hosts: Arc<HostSet>) -> ClusterCfg {
        ClusterCfg {
            settings,
            endpoints: ArcSwap::from_pointee(Endpoints { all: hosts, subsets: vec![] }),
            subset_keys: Mutex::new(vec![]),
        }
    }

    /// Whether the cluster balances by a hash (RING_HASH, MAGLEV): only then is a
    /// request's or a connection's hash worked out.
    pub fn hashes(&self) -> bool {
        matches!(self.lb, LbPolicy::RingHash | LbPolicy::Maglev)
    }

    /// The TLS a connection to `host` originates.
    pub fn tls_for(&self, host: &Host) -> &super::Tls<ClientTls> {
        host.tls_match.and_then(|i| self.tls_matches.get(i)).unwrap_or(&self.tls)
    }

    /// Every host of the cluster, as of now.
    pub fn hosts(&self) -> Arc<HostSet> {
        self.endpoints.load().all.clone()
    }

    /// The hosts of a route's subset slot (`None`: the whole cluster), as of now.
    pub fn hosts_of(&self, slot: Option<usize>) -> Arc<HostSet> {
        let e = self.endpoints.load();
        match slot {
            None => e.all.clone(),
            Some(i) => match e.subsets.get(i) {
                Some(set) => set.clone(),
                // Registered after the last publish (not done by the builder, which
                // publishes once every route is known): computed on the spot.
                None => {
                    let keys = self.subset_keys.lock().unwrap_or_else(|p| p.into_inner());
                    keys.get(i).map_or_else(|| e.all.clone(), |k| self.subset_of(&e.all, k))
                }
            },
        }
    }

    /// The slot of a route's `metadata_match` (`None` when it selects the whole cluster).
    /// The builder registers every route's set, then [`publish`](Self::publish)es.
    pub fn subset_slot(&self, wanted: &BTreeMap<String, String>) -> Option<usize> {
        if wanted.is_empty() || self.subsets.is_none() {
            return None;
        }
        let mut keys = self.subset_keys.lock().unwrap_or_else(|p| p.into_inner());
        Some(keys.iter().position(|k| k == wanted).unwrap_or_else(|| {
            keys.push(wanted.clone());
            keys.len() - 1
        }))
    }

    /// Makes `all` the cluster's hosts, with every registered subset of them. Connections
    /// that already picked from the previous hosts keep them.
    pub fn publish(&self, all: Arc<HostSet>) {
        let keys = self.subset_keys.lock().unwrap_or_else(|p| p.into_inner());
        let subsets = keys.iter().map(|k| self.subset_of(&all, k)).collect();
        self.endpoints.store(Arc::new(Endpoints { all, subsets }));
    }

    /// The hosts a route with `metadata_match` balances over (Envoy's subset LB).
    pub fn subset(&self, wanted: &BTreeMap<String, String>) -> Arc<HostSet> {
        self.subset_of(&self.hosts(), wanted)
    }

    fn subset_of(&self, all: &Arc<HostSet>, wanted: &BTreeMap<String, String>) -> Arc<HostSet> {
        let Some(cfg) = &self.subsets else {
            return all.clone();
        };
        let filtered = |want: &BTreeMap<String, String>| {
            let hosts: Vec<Arc<Host>> = all
                .hosts
                .iter()
                .filter(|h| want.iter().all(|(k, v)| h.lb_metadata.get(k) == Some(v)))
                .cloned()
                .collect();
            Arc::new(all.with_hosts(hosts))
        };
        let fallback = |f: Fallback| match f {
            Fallback::NoFallback => Arc::new(HostSet::default()),
            Fallback::AnyEndpoint => all.clone(),
            Fallback::DefaultSubset => filtered(&cfg.default_subset),
        };
        if wanted.is_empty() {
            return all.clone();
        }
        let keys: Vec<&String> = wanted.keys().collect();
        match cfg.selectors.iter().find(|(k, _)| k.iter().collect::<Vec<_>>() == keys) {
            None => fallback(cfg.fallback),
            Some((_, f)) => {
                let set = filtered(wanted);
                if set.is_empty() { fallback(*f) } else { set }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn host_set(hosts: Vec<Arc<Host>>) -> HostSet {
        HostSet::new(hosts, 140, 50, None)
    }

    fn host(port: u16, weight: u32, md: &[(&str, &str)]) -> Arc<Host> {
        Arc::new(Host {
            weight,
            lb_metadata: md.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Host::at(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        })
    }

    fn count(set: &HostSet, lb: LbPolicy, n: usize) -> BTreeMap<u16, usize> {
        let mut m = BTreeMap::new();
        for _ in 0..n {
            *m.entry(set.pick(lb, 0, None).unwrap().addr.port()).or_default() += 1;
        }
        m
    }

    #[test]
    fn round_robin_alternates_and_weights_hold() {
        let set = host_set(vec![host(1, 1, &[]), host(2, 1, &[])]);
        let picks: Vec<u16> = (0..4).map(|_| set.pick(LbPolicy::RoundRobin, 0, None).unwrap().addr.port()).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
        let set = host_set(vec![host(1, 1, &[]), host(2, 3, &[])]);
        let c = count(&set, LbPolicy::RoundRobin, 4000);
        assert!((900..1100).contains(&c[&1]), "{c:?}");
        let c = count(&set, LbPolicy::Random, 4000);
        assert!((800..1200).contains(&c[&1]), "{c:?}");
    }

    #[test]
    fn least_request_prefers_idle_hosts() {
        let set = host_set(vec![host(1, 1, &[]), host(2, 1, &[])]);
        set.hosts[0].active.store(100, Ordering::Relaxed);
        let c = count(&set, LbPolicy::LeastRequest, 1000);
        assert!(c.get(&1).copied().unwrap_or(0) < 350, "{c:?}");
    }

    #[test]
    fn unhealthy_and_zero_weight_hosts_are_skipped() {
        let mut h = Arc::try_unwrap(host(1, 1, &[])).unwrap();
        h.healthy = false;
        let set = host_set(vec![Arc::new(h), host(2, 0, &[]), host(3, 1, &[])]);
        assert_eq!(count(&set, LbPolicy::RoundRobin, 10).keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn subsets_follow_selectors_and_fallbacks() {
        let all = Arc::new(host_set(vec![
            host(1, 1, &[("version", "v1"), ("region", "eu")]),
            host(2, 1, &[("version", "v2"), ("region", "us")]),
        ]));
        let cluster = |fallback| {
            ClusterCfg::new(
                ClusterSettings {
                    name: "c".into(),
                    original_dst: false,
                    connect_timeout: Duration::from_secs(1),
                    lb: LbPolicy::RoundRobin,
                    max_connections: 1024,
                    subsets: Some(SubsetCfg {
                        fallback,
                        default_subset: BTreeMap::from([("version".into(), "v1".into())]),
                        selectors: vec![(vec!["version".into()], Fallback::NoFallback)],
                    }),
                    eds: None,
                    stats: Default::default(),
                    tls: crate::snapshot::Tls::Off,
                    tls_matches: vec![],
                    health_check: None,
                    http_protocol: UpstreamHttp::Http1,
                    max_requests: 1024,
                    source: Default::default(),
                },
                all.clone(),
            )
        };
        let m = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let c = cluster(Fallback::AnyEndpoint);
        let ports = |s: Arc<HostSet>| s.hosts.iter().map(|h| h.addr.port()).collect::<Vec<_>>();
        assert_eq!(ports(c.subset(&m("version", "v2"))), [2]);
        assert_eq!(ports(c.subset(&m("version", "v3"))), Vec::<u16>::new());
        assert_eq!(ports(c.subset(&m("region", "eu"))), [1, 2]);
        assert_eq!(ports(cluster(Fallback::DefaultSubset).subset(&m("region", "eu"))), [1]);
        assert_eq!(ports(cluster(Fallback::NoFallback).subset(&m("region", "eu"))), Vec::<u16>::new());
    }
}
