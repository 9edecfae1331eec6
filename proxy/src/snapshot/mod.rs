//! The immutable routing snapshot every connection reads once, and its construction
//! from Envoy resources.
//!
//! A snapshot is built and validated off the hot path, then published through one
//! `ArcSwap`; a connection keeps the `Arc`s it took, so reloads never disturb it.

mod build;
pub mod chains;
pub mod cluster;
pub mod dns;
pub mod dynconf;
pub mod hashing;
pub mod lb;
pub mod rbac;

pub(crate) use build::lb_match as lb_match_of;
pub use build::{DnsAnswers, build, build_with, dns_names, eds_hosts};

use crate::resources::Encoded;
use crate::stats::{ListenerStats, TcpStats};
use bytes::Bytes;
use chains::ChainMatcher;
use cluster::{ClusterCfg, HostSet};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: String,
    /// What is in force, for the admin API (kept encoded: it is rarely read).
    pub resources: Arc<Encoded>,
    /// Shared between snapshots that differ only in endpoints.
    pub listeners: Arc<HashMap<String, Arc<ListenerCfg>>>,
    /// UDP listeners with a `dns_filter`.
    pub dns: HashMap<String, Arc<dns::DnsListenerCfg>>,
    /// Records for the embedded DNS proxy, from the dynamic-config listener's `/dns`.
    pub embedded_dns: Option<Arc<::dns::Table>>,
    /// A MeshMetric policy's config, from the dynamic-config listener's `/meshmetric`.
    pub mesh_metric: Option<Arc<dynconf::MeshMetric>>,
    /// Shared between snapshots that differ only in endpoints.
    pub clusters: Arc<HashMap<String, Arc<ClusterCfg>>>,
    /// The EDS clusters by the assignment they take (usually one each), so that an
    /// endpoint update finds its clusters without a walk over all of them.
    pub eds_clusters: Arc<HashMap<String, Vec<Arc<ClusterCfg>>>>,
    /// Unbound listeners (`bind_to_port: false`) by address: where connections captured
    /// by transparent proxying go, by their original destination.
    pub unbound: HashMap<SocketAddr, String>,
}

impl Snapshot {
    /// The unbound listener for a captured connection's original destination: the one
    /// on exactly that address, else one on the wildcard address of that port.
    pub fn captured_by(&self, dst: SocketAddr) -> Option<&str> {
        let any = SocketAddr::new(if dst.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() }, dst.port());
        self.unbound.get(&dst).or_else(|| self.unbound.get(&any)).map(String::as_str)
    }
}

#[derive(Debug)]
pub struct ListenerCfg {
    pub name: String,
    pub address: SocketAddr,
    /// `socket_address.ipv4_compat`: an IPv6 address that takes IPv4 too.
    pub ipv4_compat: bool,
    /// `tls_inspector`: read the ClientHello before choosing a chain.
    pub tls_inspector: Option<crate::inspect::Inspector>,
    /// `http_inspector`: read an HTTP request line or preface before choosing a chain.
    pub http_inspector: Option<crate::inspect::Inspector>,
    /// A chain, or a listener filter's `filter_disabled`, looks at the destination (so a
    /// connection's local address is read).
    pub needs_destination: bool,
    /// How long listener filters may wait for the ClientHello; `None` = forever.
    pub filters_timeout: Option<Duration>,
    pub continue_on_timeout: bool,
    /// Largest ClientHello read before the connection is refused.
    pub max_client_hello: usize,
    /// `bind_to_port` (default true): false for the listeners that connections captured by
    /// transparent proxying are handed to by their original destination.
    pub bind: bool,
    /// `use_original_dst`: hand each connection to the unbound listener of its original
    /// destination, when there is one.
    pub use_original_dst: bool,
    pub matcher: ChainMatcher,
    pub chains: Vec<Arc<Chain>>,
    pub default_chain: Option<Arc<Chain>>,
    pub stats: Arc<ListenerStats>,
}

#[derive(Debug)]
pub struct Chain {
    pub name: String,
    /// `envoy.filters.network.rbac` before the terminal filter.
    pub rbac: Option<Arc<rbac::Rbac>>,
    /// `envoy.filters.network.connection_limit`.
    pub limit: Option<Arc<ChainLimit>>,
    /// `envoy.filters.network.local_ratelimit`.
    pub rate_limit: Option<Arc<ChainRateLimit>>,
    /// `envoy.filters.network.set_filter_state`.
    pub set_state: Option<Arc<crate::filter_state::SetFilterState>>,
    pub action: Action,
    /// TLS termination (`transport_socket` with a `DownstreamTlsContext`).
    pub tls: Tls<crate::tls::ServerTls>,
}

/// A TLS context of a chain or a cluster.
#[derive(Debug)]
pub enum Tls<T> {
    Off,
    Ready(Arc<T>),
    /// Waiting for this SDS secret; connections that need it are refused meanwhile.
    Pending(String),
}

#[derive(Debug)]
pub enum Action {
    /// Shared by every chain with the same `tcp_proxy` config (Kuma gives each server
    /// name its own chain, but only a few distinct proxies).
    TcpProxy(Arc<TcpProxyCfg>),
    /// Write these bytes and close (Kuma's ingress with nothing to route).
    DirectResponse(Bytes),
    /// `http_connection_manager`.
    Http(Arc<crate::hcm::HttpCfg>),
}

#[derive(Debug)]
pub struct TcpProxyCfg {
    pub targets: Vec<Target>,
    /// Cumulative weights of `targets` when there is more than one.
    pub cumulative: Vec<u64>,
    pub idle_timeout: Option<Duration>,
    pub max_connect_attempts: u32,
    pub stats: Arc<TcpStats>,
    /// `hash_policy` `source_ip`: a consistent-hashing cluster hashes the client's address.
    pub hash_source_ip: bool,
    /// One entry per connection.
    pub access_log: crate::access_log::AccessLogs,
}

#[derive(Debug)]
pub struct Target {
    pub cluster_name: String,
    /// `None` when the cluster is unknown: connections are closed and counted.
    pub cluster: Option<Arc<ClusterCfg>>,
    /// The cluster's subset slot of the route's `metadata_match` (`None`: every host).
    pub slot: Option<usize>,
}

impl Target {
    /// The hosts to balance over, as of now (an EDS update swaps them in place).
    pub fn hosts(&self) -> Arc<HostSet> {
        match &self.cluster {
            Some(c) => c.hosts_of(self.slot),
            None => Arc::new(HostSet::default()),
        }
    }
}

impl ListenerCfg {
    pub fn select(&self, offer: &chains::Offer<'_>) -> Option<&Arc<Chain>> {
        match self.matcher.find(offer) {
            Some(i) => self.chains.get(i),
            None => self.default_chain.as_ref(),
        }
    }
}

impl TcpProxyCfg {
    pub fn pick_target(&self, tick: u64) -> Option<&Target> {
        match self.cumulative.last() {
            None => self.targets.first(),
            Some(&total) if total > 0 => {
                let point = tick % total;
                self.targets.get(self.cumulative.partition_point(|&c| c <= point))
            }
            Some(_) => None,
        }
    }
}

/// Envoy's stat name for a listener address: `127.0.0.1_10001`.
pub fn listener_stat_name(addr: &SocketAddr) -> String {
    format!("{}_{}", addr.ip(), addr.port())
}

/// A chain's network `local_ratelimit` filter: each new connection takes a token of the
/// bucket; without one it is closed and counted (`local_rate_limit.<prefix>.rate_limited`).
#[derive(Debug)]
pub struct ChainRateLimit {
    pub bucket: crate::token_bucket::Bucket,
    pub stats: Arc<crate::stats::LocalRateLimitStats>,
}

impl ChainRateLimit {
    pub fn admit(&self) -> bool {
        let ok = self.bucket.take();
        if !ok {
            self.stats.rate_limited.inc();
        }
        ok
    }
}

/// A chain's `connection_limit` filter: at most `max` connections at once; the others are
/// closed and counted.
#[derive(Debug)]
pub struct ChainLimit {
    max: u64,
    stats: Arc<crate::stats::ConnectionLimitStats>,
}

/// One connection admitted by a [`ChainLimit`]; dropping it frees the place.
#[derive(Debug)]
pub struct LimitPermit(Arc<crate::stats::ConnectionLimitStats>);

impl Drop for LimitPermit {
    fn drop(&mut self) {
        self.0.active_connections.dec();
    }
}

impl ChainLimit {
    pub fn new(max: u64, stats: Arc<crate::stats::ConnectionLimitStats>) -> Self {
        ChainLimit { max, stats }
    }

    /// A place for one more connection, or `None` (counted as limited).
    pub fn admit(&self) -> Option<LimitPermit> {
        let active = &self.stats.active_connections;
        if active.fetch_inc_below(self.max) {
            Some(LimitPermit(self.stats.clone()))
        } else {
            self.stats.limited_connections.inc();
            None
        }
    }
}
