//! Envoy resources -> `Snapshot`, refusing what `dp` cannot honour.
//!
//! Every refusal names the resource and the field, because it becomes a NACK reason or
//! the log line a user reads. Fields that only shape observability are accepted and
//! reported once as notes.

use super::ChainLimit;
use super::chains::{ChainMatcher, Criteria};
use super::cluster::{
    ClusterCfg, ClusterSettings, EdsSource, Fallback, Host, HostSet, LbPolicy, SubsetCfg, UpstreamHttp,
};
use super::rbac::Rbac;
use super::{Action, Chain, ListenerCfg, Snapshot, Target, TcpProxyCfg, Tls, listener_stat_name};
use super::{hashing, lb};
use crate::filter_state::SetFilterState;
use crate::hcm::{BuildCtx as HttpBuildCtx, HttpCfg};
use crate::health::{CheckCfg, Checks, HostHealth};
use crate::inspect::{Inspector, Predicate};
use crate::outlier::OutlierCfg;
use crate::resources::{Encoded, ListenerResource, Resources};
use crate::stats::Registry;
use crate::tls::{self as tls_cfg, Secrets, TlsError};
use crate::upstream::HostAddr;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Metadata, SocketAddress, address, data_source, socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{CidrRange, TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, filter, listener_filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit;
use envoy_types::pb::envoy::extensions::filters::network::direct_response::v3::Config as DirectResponse;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit as NetLocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::network::set_filter_state::v3::Config as SetFilterStateConfig;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{DownstreamTlsContext, UpstreamTlsContext};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use prost::{Message, Name};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Resolved addresses of STRICT_DNS endpoints, keyed by (hostname, port).
pub type DnsAnswers = HashMap<(String, u16), Vec<SocketAddr>>;

const TLS_INSPECTOR: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const HTTP_INSPECTOR: &str = "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;
const DEFAULT_LISTENER_FILTERS_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
const DEFAULT_MAX_REQUESTS: u64 = 1024;
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The HTTP version of requests to a cluster: `HttpProtocolOptions` in
/// `typed_extension_protocol_options`, else the older cluster fields.
fn http_protocol(c: &Cluster) -> Result<UpstreamHttp, String> {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions as U;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig as E;
    if let Some(any) = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS) {
        let o: HttpProtocolOptions = unpack(any)?;
        return Ok(match o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(E::Http2ProtocolOptions(_)) => UpstreamHttp::Http2,
                Some(E::Http3ProtocolOptions(_)) => return Err("HTTP/3 upstreams are not supported".into()),
                _ => UpstreamHttp::Http1,
            },
            Some(U::UseDownstreamProtocolConfig(_)) => UpstreamHttp::Downstream,
            // ALPN decides with TLS; without it HTTP/1.1, as Envoy does.
            Some(U::AutoConfig(_)) | None => UpstreamHttp::Http1,
        });
    }
    #[allow(deprecated)]
    let legacy = if c.protocol_selection == cluster::ClusterProtocolSelection::UseDownstreamProtocol as i32 {
        UpstreamHttp::Downstream
    } else if c.http2_protocol_options.is_some() {
        UpstreamHttp::Http2
    } else {
        UpstreamHttp::Http1
    };
    Ok(legacy)
}

/// Builds a snapshot. `notes` collects accepted-but-ignored fields.
pub fn build(
    resources: &Resources,
    dns: &DnsAnswers,
    stats: &Registry,
    notes: &mut Vec<String>,
) -> Result<Snapshot, String> {
    build_with(resources, None, Arc::new(resources.encode()), dns, stats, notes)
}

/// [`build`] with the encoded form of `resources` already at hand (what the admin API
/// shows).
pub fn build_with(
    resources: &Resources,
    previous: Option<&Snapshot>,
    encoded: Arc<Encoded>,
    dns: &DnsAnswers,
    stats: &Registry,
    notes: &mut Vec<String>,
) -> Result<Snapshot, String> {
    let endpoints: HashMap<&str, &ClusterLoadAssignment> =
        resources.endpoints.iter().map(|e| (e.cluster_name.as_str(), e)).collect();
    let secrets: Secrets<'_> = resources.secrets.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut clusters = HashMap::new();
    for c in &resources.clusters {
        let before = previous.and_then(|p| p.clusters.get(&c.name)).map(|c| &**c);
        let cfg = build_cluster(c, before, &endpoints, dns, &secrets, stats, notes)
            .map_err(|e| format!("cluster `{}`: {e}", c.name))?;
        if clusters.insert(c.name.clone(), Arc::new(cfg)).is_some() {
            return Err(format!("cluster `{}` is defined twice", c.name));
        }
    }
    let mut listeners = HashMap::new();
    let route_configs: HashMap<&str, &RouteConfiguration> =
        resources.routes.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut cx =
        ChainCtx { clusters: &clusters, secrets: &secrets, proxies: Proxies::new(), stats, route_configs, notes };
    let mut bound: HashMap<SocketAddr, &str> = HashMap::new();
    let mut dns = HashMap::new();
    for l in resources.listeners.iter().filter(|l| super::dns::is_udp(l)) {
        let l = l.to_listener().map_err(|e| format!("listener `{}`: {e}", l.name))?;
        let cfg = super::dns::build(&l).map_err(|e| format!("listener `{}`: {e}", l.name))?;
        if dns.insert(l.name.clone(), Arc::new(cfg)).is_some() {
            return Err(format!("listener `{}` is defined twice", l.name));
        }
    }
    let (mut embedded_dns, mut mesh_metric) = (None, None);
    for l in resources.listeners.iter().filter(|l| super::dynconf::is_dynconf(l)) {
        let l = l.to_listener().map_err(|e| format!("listener `{}`: {e}", l.name))?;
        if let Some(t) = super::dynconf::dns_table(&l).map_err(|e| format!("listener `{}`: {e}", l.name))? {
            embedded_dns = Some(Arc::new(t));
        }
        if let Some(m) = super::dynconf::mesh_metric(&l).map_err(|e| format!("listener `{}`: {e}", l.name))? {
            mesh_metric = Some(Arc::new(m));
        }
    }
    for l in resources.listeners.iter().filter(|l| !super::dns::is_udp(l) && !super::dynconf::is_dynconf(l)) {
        // A listener on a Unix socket: Kuma's MeshMetric OpenTelemetry backends, where
        // kuma-dp's exporter sends metrics. dp has no such exporter, so nothing would use
        // the listener; it is accepted, said, and not served, rather than refused (a
        // refusal would hold back every other listener of the update).
        if let Some(Address { address: Some(address::Address::Pipe(p)) }) = &l.address {
            cx.notes.push(format!(
                "listener `{}` on the Unix socket {} is not served (MeshMetric OpenTelemetry export is not implemented)",
                l.name, p.path
            ));
            continue;
        }
        let cfg = build_listener(l, &mut cx).map_err(|e| format!("listener `{}`: {e}", l.name))?;
        if cfg.address.port() != 0
            && let Some(other) = bound.insert(cfg.address, &l.name)
        {
            return Err(format!("listeners `{other}` and `{}` both use {}", l.name, cfg.address));
        }
        if listeners.insert(l.name.clone(), Arc::new(cfg)).is_some() {
            return Err(format!("listener `{}` is defined twice", l.name));
        }
    }
    // Every route registered its subset with its cluster: compute them once.
    for c in clusters.values().filter(|c| c.subsets.is_some()) {
        c.publish(c.hosts());
    }
    let unbound = listeners.values().filter(|l| !l.bind).map(|l| (l.address, l.name.clone())).collect();
    let mut eds_clusters: HashMap<String, Vec<Arc<ClusterCfg>>> = HashMap::new();
    for c in clusters.values() {
        if let Some(e) = &c.eds {
            eds_clusters.entry(e.service.clone()).or_default().push(c.clone());
        }
    }
    Ok(Snapshot {
        version: resources.version.clone(),
        resources: encoded,
        listeners: Arc::new(listeners),
        dns,
        embedded_dns,
        mesh_metric,
        clusters: Arc::new(clusters),
        eds_clusters: Arc::new(eds_clusters),
        unbound,
    })
}

/// The (hostname, port) pairs STRICT_DNS clusters need resolved.
pub fn dns_names(resources: &Resources) -> Vec<(String, u16)> {
    let mut out = vec![];
    for c in resources.clusters.iter().filter(|c| discovery_type(c) == Ok(cluster::DiscoveryType::StrictDns)) {
        for le in c.load_assignment.iter().flat_map(|a| &a.endpoints) {
            for ep in &le.lb_endpoints {
                if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier
                    && let Ok(EndpointAddr::Socket(host, port)) = endpoint_address(e.address.as_ref())
                    && host.parse::<IpAddr>().is_err()
                {
                    out.push((host.to_string(), port));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `tcp_proxy` configs built so far, by their encoded bytes.
type Proxies = HashMap<Vec<u8>, Arc<TcpProxyCfg>>;

/// What building a listener's chains reads and collects.
struct ChainCtx<'a> {
    clusters: &'a HashMap<String, Arc<ClusterCfg>>,
    secrets: &'a Secrets<'a>,
    proxies: Proxies,
    stats: &'a Registry,
    /// RDS route configurations by name.
    route_configs: HashMap<&'a str, &'a RouteConfiguration>,
    notes: &'a mut Vec<String>,
}

fn build_listener(l: &ListenerResource, cx: &mut ChainCtx<'_>) -> Result<ListenerCfg, String> {
    let stats = cx.stats;
    let (host, port) = socket_address(l.address.as_ref()).map_err(|e| format!("address: {e}"))?;
    if let Some(Address { address: Some(address::Address::SocketAddress(sa)) }) = &l.address
        && sa.protocol == socket_address::Protocol::Udp as i32
    {
        return Err("address: UDP listeners (dns_filter) are not supported yet".into());
    }
    let ip: IpAddr = host.parse().map_err(|_| format!("address: `{host}` is not an IP address"))?;
    let address = SocketAddr::new(ip, port);
    let ipv4_compat =
        matches!(&l.address, Some(Address { address: Some(address::Address::SocketAddress(sa)) }) if sa.ipv4_compat);
    unsupported(l.filter_chain_matcher.is_some(), "filter_chain_matcher")?;
    unsupported(l.fcds_config.is_some(), "fcds_config")?;
    unsupported(l.api_listener.is_some(), "api_listener")?;
    unsupported(l.listener_specifier.is_some(), "internal_listener")?;
    unsupported(!l.additional_addresses.is_empty(), "additional_addresses")?;
    unsupported(l.udp_listener_config.is_some(), "udp_listener_config")?;
    unsupported(l.transparent.is_some_and(|b| b.value), "transparent")?;
    if !l.access_log.is_empty() {
        cx.notes.push(format!("listener `{}`: access_log is ignored (dp writes its own access log)", l.name));
    }

    let (mut tls_inspector, mut http_inspector) = (None, None);
    for (i, f) in l.listener_filters.iter().enumerate() {
        let type_url = match &f.config_type {
            Some(listener_filter::ConfigType::TypedConfig(any)) => any.type_url.as_str(),
            _ => "",
        };
        let is = |type_name: &str, name: &str| type_url.ends_with(type_name) || (type_url.is_empty() && f.name == name);
        let inspector = || -> Result<Inspector, String> {
            let disabled = f.filter_disabled.as_ref().map(Predicate::from_proto).transpose();
            Ok(Inspector { disabled: disabled.map_err(|e| format!("listener_filters[{i}].filter_disabled: {e}"))? })
        };
        if is(TLS_INSPECTOR, "envoy.filters.listener.tls_inspector") {
            tls_inspector = Some(inspector()?);
        } else if is(HTTP_INSPECTOR, "envoy.filters.listener.http_inspector") {
            http_inspector = Some(inspector()?);
        } else if is(ORIGINAL_DST, ORIGINAL_DST_NAME) {
            // Every captured connection's original destination is read anyway.
            unsupported(f.filter_disabled.is_some(), &format!("listener_filters[{i}].filter_disabled"))?;
        } else {
            return Err(format!("listener_filters[{i}]: {} ({type_url}) is not supported", f.name));
        }
    }
    let filters_timeout = match &l.listener_filters_timeout {
        None => Some(DEFAULT_LISTENER_FILTERS_TIMEOUT),
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };

    let mut matcher = ChainMatcher::default();
    let mut chains = vec![];
    for (i, fc) in l.chains().enumerate() {
        // Decoded one at a time: see `ListenerResource`.
        let fc = fc.map_err(|e| format!("filter_chains[{i}]: {e}"))?;
        let chain = build_chain(&fc, cx).map_err(|e| format!("filter_chains[{i}]: {e}"))?;
        let criteria = criteria(&fc).map_err(|e| format!("filter_chains[{i}].filter_chain_match: {e}"))?;
        matcher.insert(&criteria, i)?;
        chains.push(Arc::new(chain));
    }
    let default_chain = match &l.default_filter_chain {
        Some(fc) => Some(Arc::new(build_chain(fc, cx).map_err(|e| format!("default_filter_chain: {e}"))?)),
        None => None,
    };
    let inspectors_use_port = [&tls_inspector, &http_inspector]
        .into_iter()
        .flatten()
        .any(|i| i.disabled.as_ref().is_some_and(|p| p.uses_port()));
    let needs_destination = matcher.uses_ports() || matcher.uses_destinations() || inspectors_use_port;
    Ok(ListenerCfg {
        name: l.name.clone(),
        needs_destination,
        address,
        ipv4_compat,
        tls_inspector,
        http_inspector,
        filters_timeout,
        continue_on_timeout: l.continue_on_listener_filters_timeout,
        max_client_hello: DEFAULT_MAX_CLIENT_HELLO,
        bind: l.bind_to_port.is_none_or(|b| b.value),
        use_original_dst: l.use_original_dst.is_some_and(|b| b.value),
        matcher,
        chains,
        default_chain,
        stats: stats.listener(&listener_stat_name(&address)),
    })
}

fn criteria(fc: &FilterChain) -> Result<Criteria, String> {
    let Some(m) = &fc.filter_chain_match else {
        return Ok(Criteria::default());
    };
    unsupported(!m.direct_source_prefix_ranges.is_empty(), "direct_source_prefix_ranges")?;
    unsupported(m.source_type != 0, "source_type")?;
    let ranges = cidr_ranges(&m.source_prefix_ranges, "source_prefix_ranges")?;
    let destinations = cidr_ranges(&m.prefix_ranges, "prefix_ranges")?;
    if let Some(p) = m.source_ports.iter().find(|p| **p > 65535) {
        return Err(format!("source_ports: {p} is not a port"));
    }
    let sources = super::chains::Sources { ranges, ports: m.source_ports.clone() };
    for n in &m.server_names {
        if n.is_empty() || (n.contains('*') && !(n.starts_with("*.") && n[1..].find('*').is_none())) {
            return Err(format!("server_names: `{n}` is neither a name nor a `*.suffix` wildcard"));
        }
    }
    Ok(Criteria {
        port: m.destination_port.map(|p| p.value),
        server_names: m.server_names.iter().map(|s| s.to_ascii_lowercase()).collect(),
        transport_protocol: Some(m.transport_protocol.clone()).filter(|t| !t.is_empty()),
        application_protocols: m.application_protocols.clone(),
        destinations,
        sources,
    })
}

/// Envoy's `CidrRange`s as (network, prefix length); an unset length is 0, as in Envoy.
fn cidr_ranges(ranges: &[CidrRange], field: &str) -> Result<Vec<(std::net::IpAddr, u8)>, String> {
    let mut out = vec![];
    for (i, r) in ranges.iter().enumerate() {
        let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
        let bad = || format!("{field}[{i}]: `{}/{len}` is not a CIDR range", r.address_prefix);
        let ip: std::net::IpAddr = r.address_prefix.parse().map_err(|_| bad())?;
        let len = u8::try_from(len).ok().filter(|l| u32::from(*l) <= if ip.is_ipv4() { 32 } else { 128 });
        let len = len.ok_or_else(bad)?;
        out.push((super::chains::masked(ip, len).ok_or_else(bad)?, len));
    }
    Ok(out)
}

fn build_chain(fc: &FilterChain, cx: &mut ChainCtx<'_>) -> Result<Chain, String> {
    let (clusters, secrets, stats) = (cx.clusters, cx.secrets, cx.stats);
    let tls = transport(fc.transport_socket.as_ref(), |ctx: DownstreamTlsContext| tls_cfg::server(&ctx, secrets))?;
    let Some((last, rest)) = fc.filters.split_last() else {
        // Envoy closes every connection of a chain without filters (MeshProxyPatch can
        // leave one); so does dp: nothing to write, then the close.
        return Ok(Chain {
            name: fc.name.clone(),
            rbac: None,
            limit: None,
            rate_limit: None,
            set_state: None,
            action: Action::DirectResponse(Default::default()),
            tls,
        });
    };
    let mut rbac = None;
    let mut limit = None;
    let mut set_state = None;
    let mut rate_limit = None;
    for f in rest {
        match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) if any.type_url == RbacFilter::type_url() && rbac.is_none() => {
                let cfg = Rbac::build(&unpack(any)?, stats).map_err(|e| format!("filter {}: {e}", f.name))?;
                rbac = Some(Arc::new(cfg));
            }
            Some(filter::ConfigType::TypedConfig(any))
                if any.type_url == ConnectionLimit::type_url() && limit.is_none() =>
            {
                let cfg: ConnectionLimit = unpack(any)?;
                let max =
                    cfg.max_connections.map(|v| v.value).filter(|v| *v > 0).ok_or_else(|| {
                        format!("filter {}: connection_limit.max_connections must be at least 1", f.name)
                    })?;
                limit = Some(Arc::new(ChainLimit::new(max, stats.connection_limit(&cfg.stat_prefix))));
            }
            Some(filter::ConfigType::TypedConfig(any))
                if any.type_url == NetLocalRateLimit::type_url() && rate_limit.is_none() =>
            {
                let cfg: NetLocalRateLimit = unpack(any)?;
                let bucket =
                    cfg.token_bucket.as_ref().ok_or_else(|| format!("filter {}: token_bucket is required", f.name))?;
                let bucket =
                    crate::token_bucket::Bucket::from_proto(bucket).map_err(|e| format!("filter {}: {e}", f.name))?;
                // `runtime_enabled`: dp has no runtime, so its default decides.
                let on = cfg.runtime_enabled.as_ref().is_none_or(|r| r.default_value.is_some_and(|v| v.value));
                if on {
                    let stats = stats.local_ratelimit(&cfg.stat_prefix);
                    rate_limit = Some(Arc::new(super::ChainRateLimit { bucket, stats }));
                }
            }
            Some(filter::ConfigType::TypedConfig(any))
                if any.type_url == SetFilterStateConfig::type_url() && set_state.is_none() =>
            {
                let cfg = SetFilterState::from_proto(&unpack(any)?).map_err(|e| format!("filter {}: {e}", f.name))?;
                set_state = Some(Arc::new(cfg));
            }
            _ => return Err(format!("filter {} is not supported before the terminal filter", f.name)),
        }
    }
    let any = match &last.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        _ => return Err(format!("filter {}: only typed_config is supported", last.name)),
    };
    let action = if any.type_url == TcpProxy::type_url() {
        let cfg = match cx.proxies.get(&any.value) {
            Some(cfg) => cfg.clone(),
            None => {
                let cfg = Arc::new(
                    build_tcp_proxy(&unpack(any)?, clusters, stats, cx.notes).map_err(|e| format!("tcp_proxy: {e}"))?,
                );
                cx.proxies.insert(any.value.clone(), cfg.clone());
                cfg
            }
        };
        Action::TcpProxy(cfg)
    } else if any.type_url == HttpConnectionManager::type_url() {
        let hcm: HttpConnectionManager = unpack(any)?;
        let target = |name: &str, wanted: BTreeMap<String, String>| target(clusters, name, wanted);
        let mut hx = HttpBuildCtx { target: &target, route_configs: &cx.route_configs, stats, notes: &mut *cx.notes };
        Action::Http(Arc::new(HttpCfg::build(&hcm, &mut hx).map_err(|e| format!("http_connection_manager: {e}"))?))
    } else if any.type_url == DirectResponse::type_url() {
        let cfg: DirectResponse = unpack(any)?;
        let bytes = match cfg.response.and_then(|r| r.specifier) {
            None => vec![],
            Some(data_source::Specifier::InlineBytes(b)) => b,
            Some(data_source::Specifier::InlineString(s)) => s.into_bytes(),
            Some(_) => return Err("direct_response: only inline_bytes and inline_string are supported".into()),
        };
        Action::DirectResponse(bytes.into())
    } else {
        return Err(format!("filter {} ({}) is not supported", last.name, any.type_url));
    };
    Ok(Chain { name: fc.name.clone(), rbac, limit, rate_limit, set_state, action, tls })
}

fn build_tcp_proxy(
    tp: &TcpProxy,
    clusters: &HashMap<String, Arc<ClusterCfg>>,
    stats: &Registry,
    notes: &mut Vec<String>,
) -> Result<TcpProxyCfg, String> {
    unsupported(tp.on_demand.is_some(), "on_demand")?;
    unsupported(tp.tunneling_config.is_some(), "tunneling_config")?;
    unsupported(tp.max_downstream_connection_duration.is_some(), "max_downstream_connection_duration")?;
    unsupported(tp.downstream_idle_timeout.is_some(), "downstream_idle_timeout")?;
    unsupported(tp.upstream_idle_timeout.is_some(), "upstream_idle_timeout")?;
    unsupported(!tp.proxy_protocol_tlvs.is_empty(), "proxy_protocol_tlvs")?;
    unsupported(tp.upstream_connect_mode != 0, "upstream_connect_mode")?;
    unsupported(tp.max_early_data_bytes.is_some(), "max_early_data_bytes")?;
    let base = lb_match(tp.metadata_match.as_ref());
    let target = |name: &str, extra: BTreeMap<String, String>| {
        let mut wanted = base.clone();
        wanted.extend(extra);
        target(clusters, name, wanted)
    };
    let (targets, cumulative) = match &tp.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(name)) => (vec![target(name, BTreeMap::new())], vec![]),
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
            let mut total = 0u64;
            let mut cumulative = vec![];
            let mut targets = vec![];
            for c in &w.clusters {
                total += u64::from(c.weight);
                cumulative.push(total);
                targets.push(target(&c.name, lb_match(c.metadata_match.as_ref())));
            }
            if total == 0 {
                return Err("weighted_clusters: the weights add up to 0".into());
            }
            (targets, cumulative)
        }
        None => return Err("neither cluster nor weighted_clusters is set".into()),
    };
    let idle_timeout = match &tp.idle_timeout {
        None => Some(DEFAULT_TCP_IDLE_TIMEOUT),
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };
    // One policy at most (Envoy's validation). dp keeps no hashable filter state, so a
    // `filter_state` policy gives no hash, as in Envoy when the state is absent.
    let mut hash_source_ip = false;
    for p in &tp.hash_policy {
        use envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier;
        match &p.policy_specifier {
            Some(PolicySpecifier::SourceIp(_)) => hash_source_ip = true,
            Some(PolicySpecifier::FilterState(_)) => {}
            None => return Err("hash_policy: no policy is set".into()),
        }
    }
    Ok(TcpProxyCfg {
        targets,
        cumulative,
        idle_timeout,
        max_connect_attempts: tp.max_connect_attempts.map_or(1, |v| v.value.max(1)),
        stats: stats.tcp(&tp.stat_prefix),
        hash_source_ip,
        access_log: crate::access_log::AccessLogs::build(
            &tp.access_log,
            &format!("tcp_proxy `{}`", tp.stat_prefix),
            notes,
        )?,
    })
}

/// A route's target: the cluster by name (`None` when unknown) and the hosts of the
/// subset `wanted` selects.
fn target(clusters: &HashMap<String, Arc<ClusterCfg>>, name: &str, wanted: BTreeMap<String, String>) -> Target {
    let cluster = clusters.get(name).cloned();
    let slot = cluster.as_ref().and_then(|c| c.subset_slot(&wanted));
    Target { cluster_name: name.to_string(), cluster, slot }
}

fn discovery_type(c: &Cluster) -> Result<cluster::DiscoveryType, String> {
    match &c.cluster_discovery_type {
        None => Ok(cluster::DiscoveryType::Static),
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            cluster::DiscoveryType::try_from(*t).map_err(|_| format!("type: unknown discovery type {t}"))
        }
        Some(cluster::ClusterDiscoveryType::ClusterType(t)) => Err(format!("cluster_type {} is not supported", t.name)),
    }
}

#[allow(clippy::too_many_arguments)]
fn build_cluster(
    c: &Cluster,
    previous: Option<&ClusterCfg>,
    endpoints: &HashMap<&str, &ClusterLoadAssignment>,
    dns: &DnsAnswers,
    secrets: &Secrets<'_>,
    stats: &Registry,
    notes: &mut Vec<String>,
) -> Result<ClusterCfg, String> {
    use cluster::{DiscoveryType, LbPolicy as P};
    let kind = discovery_type(c)?;
    let lb = match P::try_from(c.lb_policy) {
        Ok(P::RoundRobin) => LbPolicy::RoundRobin,
        Ok(P::ClusterProvided) if kind == cluster::DiscoveryType::OriginalDst => LbPolicy::RoundRobin,
        Ok(P::LeastRequest) => LbPolicy::LeastRequest,
        Ok(P::Random) => LbPolicy::Random,
        Ok(P::RingHash) => LbPolicy::RingHash,
        Ok(P::Maglev) => LbPolicy::Maglev,
        Ok(p) => return Err(format!("lb_policy {} is not supported", p.as_str_name())),
        Err(_) => return Err(format!("lb_policy {} is unknown", c.lb_policy)),
    };
    let hashing = hashing_of(c, lb)?;
    unsupported(c.load_balancing_policy.is_some(), "load_balancing_policy")?;
    let tls = transport(c.transport_socket.as_ref(), |ctx: UpstreamTlsContext| tls_cfg::client(&ctx, secrets))?;
    let mut tls_matches = vec![];
    let mut criteria = vec![];
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        let ts = m.transport_socket.as_ref();
        let t = transport(ts, |ctx: UpstreamTlsContext| tls_cfg::client(&ctx, secrets))
            .map_err(|e| format!("transport_socket_matches[{i}] ({}): {e}", m.name))?;
        tls_matches.push(t);
        criteria.push(struct_strings(m.r#match.as_ref()));
    }
    let unverified = std::iter::once(&tls).chain(&tls_matches).any(|t| matches!(t, Tls::Ready(ct) if !ct.verifies));
    if unverified {
        notes.push(format!(
            "cluster `{}`: an UpstreamTlsContext has no validation context; the server's certificate is not verified",
            c.name
        ));
    }
    let health_check = CheckCfg::from_cluster(&c.health_checks, &c.name)?.map(Arc::new);
    unsupported(!c.filters.is_empty(), "filters")?;
    let outlier = match &c.outlier_detection {
        Some(o) => Some(OutlierCfg::from_proto(o, notes, &c.name)?),
        None => None,
    };
    let service = match kind {
        DiscoveryType::Eds => {
            let service = c.eds_cluster_config.as_ref().map(|e| e.service_name.as_str()).unwrap_or("");
            Some(if service.is_empty() { c.name.as_str() } else { service })
        }
        _ => None,
    };
    let assignment = match kind {
        DiscoveryType::Static | DiscoveryType::StrictDns => c.load_assignment.as_ref(),
        DiscoveryType::Eds => service.and_then(|s| endpoints.get(s).copied()),
        // Each connection goes where it was originally headed (transparent proxying's
        // passthrough); there are no hosts to pick.
        DiscoveryType::OriginalDst => None,
        other => return Err(format!("type {} is not supported", other.as_str_name())),
    };
    let panic_threshold = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map_or(lb::DEFAULT_PANIC_THRESHOLD, |p| p.value.clamp(0.0, 100.0) as u32);
    let source = EdsSource {
        service: service.unwrap_or_default().to_string(),
        tls_criteria: criteria,
        outlier,
        panic_threshold,
        hashing,
    };
    // Envoy's name for the cluster's stats: `alt_stat_name` when it has one.
    let cluster_stats = stats.cluster(if c.alt_stat_name.is_empty() { &c.name } else { &c.alt_stat_name });
    let strict_dns = (kind == DiscoveryType::StrictDns).then_some(c.dns_lookup_family);
    let hosts = Arc::new(host_set(
        &c.name,
        assignment,
        strict_dns,
        dns,
        &source,
        health_check.as_deref(),
        &cluster_stats,
        stats,
        previous.map(|p| p.hosts()).as_deref(),
    )?);
    let subsets = match &c.lb_subset_config {
        None => None,
        Some(s) => Some(build_subsets(s)?),
    };
    let max_connections = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
        .and_then(|t| t.max_connections)
        .map_or(DEFAULT_MAX_CONNECTIONS, |v| u64::from(v.value));
    let bind = match &c.upstream_bind_config {
        Some(b) => bind_config(b, &c.name, notes)?,
        None => Default::default(),
    };
    let settings = ClusterSettings {
        original_dst: kind == DiscoveryType::OriginalDst,
        name: c.name.clone(),
        connect_timeout: c.connect_timeout.as_ref().map_or(DEFAULT_CONNECT_TIMEOUT, duration),
        lb,
        max_connections,
        subsets,
        eds: (kind == DiscoveryType::Eds).then_some(source),
        stats: cluster_stats,
        tls,
        tls_matches,
        health_check,
        http_protocol: http_protocol(c)?,
        max_requests: c
            .circuit_breakers
            .as_ref()
            .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
            .and_then(|t| t.max_requests)
            .map_or(DEFAULT_MAX_REQUESTS, |v| u64::from(v.value)),
        source: bind,
    };
    Ok(ClusterCfg::new(settings, hosts))
}

/// The hosts of an EDS cluster after an update of its assignment alone: the cluster and
/// every listener stay as they are ([`ClusterCfg::publish`] swaps them in).
pub fn eds_hosts(c: &ClusterCfg, a: &ClusterLoadAssignment, stats: &Registry) -> Result<HostSet, String> {
    let source = c.eds.as_ref().ok_or_else(|| format!("cluster `{}` is not an EDS cluster", c.name))?;
    host_set(
        &c.name,
        Some(a),
        None,
        &DnsAnswers::new(),
        source,
        c.health_check.as_deref(),
        &c.stats,
        stats,
        Some(&c.hosts()),
    )
    .map_err(|e| format!("cluster `{}`: {e}", c.name))
}

/// A cluster's hosts from its assignment. Hosts of `previous` that are the same
/// endpoint with the same settings are kept as they are, with their connection pools
/// and counts (active requests weigh in LEAST_REQUEST).
#[allow(clippy::too_many_arguments)]
fn host_set(
    name: &str,
    assignment: Option<&ClusterLoadAssignment>,
    strict_dns: Option<i32>,
    dns: &DnsAnswers,
    source: &EdsSource,
    health_check: Option<&CheckCfg>,
    cluster_stats: &Arc<crate::stats::ClusterStats>,
    stats: &Registry,
    previous: Option<&HostSet>,
) -> Result<HostSet, String> {
    let per_host =
        PerHost { tls_criteria: &source.tls_criteria, health: health_check.map(|cfg| (&stats.health, name, cfg)) };
    let mut hosts = match assignment {
        Some(a) => build_hosts(a, strict_dns, dns, &per_host)?,
        None => vec![],
    };
    if let Some(cfg) = &source.outlier {
        let detector = stats.outlier.cluster(name, cfg, cluster_stats);
        let addrs: Vec<HostAddr> = hosts.iter().map(|h| h.addr.clone()).collect();
        for (h, m) in hosts.iter_mut().zip(detector.update(cfg.clone(), &addrs)) {
            Arc::get_mut(h).expect("hosts are not shared yet").outlier = Some((detector.clone(), m));
        }
    }
    if let Some(old) = previous.filter(|p| !p.hosts.is_empty()) {
        let by_addr: HashMap<&HostAddr, &Arc<Host>> = old.hosts.iter().map(|h| (&h.addr, h)).collect();
        for h in hosts.iter_mut() {
            let same_state = |o: &Host| {
                o.health.as_ref().map(Arc::as_ptr) == h.health.as_ref().map(Arc::as_ptr)
                    && o.outlier.as_ref().map(|(_, m)| Arc::as_ptr(m))
                        == h.outlier.as_ref().map(|(_, m)| Arc::as_ptr(m))
            };
            if let Some(o) = by_addr.get(&h.addr).filter(|o| o.same_endpoint(h) && same_state(o)) {
                *h = Arc::clone(o);
            }
        }
    }
    let overprovisioning = assignment
        .and_then(|a| a.policy.as_ref())
        .and_then(|p| p.overprovisioning_factor)
        .map_or(lb::DEFAULT_OVERPROVISIONING, |v| v.value);
    Ok(HostSet::new(hosts, overprovisioning, source.panic_threshold, source.hashing))
}

/// `upstream_bind_config`: the source address and the extra ones, one per family (Envoy
/// picks the one of the host's family).
fn bind_config(
    b: &envoy_types::pb::envoy::config::core::v3::BindConfig,
    cluster: &str,
    notes: &mut Vec<String>,
) -> Result<crate::upstream::Source, String> {
    let mut source = crate::upstream::Source::default();
    #[allow(deprecated)]
    let extra =
        b.extra_source_addresses.iter().filter_map(|e| e.address.as_ref()).chain(&b.additional_source_addresses);
    for sa in b.source_address.iter().chain(extra) {
        let ip: std::net::IpAddr =
            sa.address.parse().map_err(|_| format!("upstream_bind_config: `{}` is not an IP address", sa.address))?;
        let port = match &sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(*p).unwrap_or(0),
            _ => 0,
        };
        let slot = if ip.is_ipv4() { &mut source.v4 } else { &mut source.v6 };
        if slot.is_some() {
            return Err("upstream_bind_config: two source addresses of one family".into());
        }
        *slot = Some(std::net::SocketAddr::new(ip, port));
    }
    if b.freebind.is_some_and(|f| f.value) || !b.socket_options.is_empty() {
        notes.push(format!("cluster `{cluster}`: upstream_bind_config's freebind and socket_options are not applied"));
    }
    unsupported(b.local_address_selector.is_some(), "upstream_bind_config.local_address_selector")?;
    Ok(source)
}

/// RING_HASH's and MAGLEV's settings: `ring_hash_lb_config` / `maglev_lb_config` and
/// `common_lb_config.consistent_hashing_lb_config`, with Envoy's defaults and checks.
fn hashing_of(c: &Cluster, lb: LbPolicy) -> Result<Option<hashing::Hashing>, String> {
    use cluster::LbConfig;
    use cluster::ring_hash_lb_config::HashFunction;
    use hashing::{DEFAULT_MAGLEV_TABLE, DEFAULT_MAX_RING, DEFAULT_MIN_RING, Hashing, Kind};
    let kind = match (lb, &c.lb_config) {
        (LbPolicy::RingHash, cfg) => {
            let r = match cfg {
                Some(LbConfig::RingHashLbConfig(r)) => Some(r),
                _ => None,
            };
            Kind::Ring {
                min: r.and_then(|r| r.minimum_ring_size).map_or(DEFAULT_MIN_RING, |v| v.value),
                max: r.and_then(|r| r.maximum_ring_size).map_or(DEFAULT_MAX_RING, |v| v.value),
                murmur: r.is_some_and(|r| r.hash_function == HashFunction::MurmurHash2 as i32),
            }
        }
        (LbPolicy::Maglev, Some(LbConfig::MaglevLbConfig(m))) => {
            Kind::Maglev { table_size: m.table_size.map_or(DEFAULT_MAGLEV_TABLE, |v| v.value) }
        }
        (LbPolicy::Maglev, _) => Kind::Maglev { table_size: DEFAULT_MAGLEV_TABLE },
        _ => return Ok(None),
    };
    let common = c.common_lb_config.as_ref().and_then(|l| l.consistent_hashing_lb_config.as_ref());
    // Bounded loads move requests off their hashed host: it changes where traffic goes.
    unsupported(
        common.and_then(|h| h.hash_balance_factor).is_some_and(|f| f.value > 0),
        "common_lb_config.consistent_hashing_lb_config.hash_balance_factor",
    )?;
    let h = Hashing { kind, use_hostname: common.is_some_and(|h| h.use_hostname_for_hashing) };
    h.validate()?;
    Ok(Some(h))
}

/// What a host gets from its cluster beyond its address.
struct PerHost<'a> {
    /// `transport_socket_matches` criteria, in order.
    tls_criteria: &'a [BTreeMap<String, String>],
    /// The health registry, the cluster's name and its check.
    health: Option<(&'a Checks, &'a str, &'a CheckCfg)>,
}

impl PerHost<'_> {
    /// The first transport socket match of an endpoint: its own metadata first, then its
    /// locality's (Envoy's order). An empty criterion matches every endpoint.
    fn tls_match(&self, endpoint: Option<&Metadata>, locality: Option<&Metadata>) -> Option<usize> {
        if self.tls_criteria.is_empty() {
            return None;
        }
        let md = |m: Option<&Metadata>| struct_strings(m.and_then(|m| m.filter_metadata.get(TLS_MATCH_KEY)));
        let (ep, loc) = (md(endpoint), md(locality));
        let hit = |have: &BTreeMap<String, String>| {
            self.tls_criteria.iter().position(|want| want.iter().all(|(k, v)| have.get(k) == Some(v)))
        };
        hit(&ep).or_else(|| hit(&loc))
    }

    fn health(&self, addr: &HostAddr) -> Option<Arc<HostHealth>> {
        self.health.map(|(checks, cluster, cfg)| checks.host(cluster, addr, cfg))
    }
}

/// The endpoint metadata namespace `transport_socket_matches` look at.
const TLS_MATCH_KEY: &str = "envoy.transport_socket_match";

const ORIGINAL_DST: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const ORIGINAL_DST_NAME: &str = "envoy.filters.listener.original_dst";

const RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// A `transport_socket`: none or raw_buffer (plain TCP), or TLS built by `make`.
fn transport<C, T>(ts: Option<&TransportSocket>, make: impl FnOnce(C) -> Result<T, TlsError>) -> Result<Tls<T>, String>
where
    C: Message + Name + Default,
{
    let Some(ts) = ts else { return Ok(Tls::Off) };
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any)) => any,
        None => return Err(format!("transport_socket {}: typed_config is missing", ts.name)),
    };
    if any.type_url.ends_with(RAW_BUFFER) {
        return Ok(Tls::Off);
    }
    if any.type_url != C::type_url() {
        return Err(format!("transport_socket {} ({}) is not supported here", ts.name, any.type_url));
    }
    match make(unpack(any)?) {
        Ok(t) => Ok(Tls::Ready(Arc::new(t))),
        Err(TlsError::Missing(name)) => Ok(Tls::Pending(name)),
        Err(TlsError::Invalid(e)) => Err(format!("transport_socket: {e}")),
    }
}

/// The addresses of a DNS answer a STRICT_DNS cluster keeps, by its `dns_lookup_family`
/// (Envoy's resolver asks for these families and uses what comes back).
fn by_family(addrs: &[SocketAddr], family: i32) -> Vec<SocketAddr> {
    use cluster::DnsLookupFamily as F;
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|a| a.is_ipv4());
    match F::try_from(family) {
        Ok(F::V4Only) => v4,
        Ok(F::V6Only) => v6,
        Ok(F::V4Preferred) if v4.is_empty() => v6,
        Ok(F::V4Preferred) => v4,
        Ok(F::All) => addrs.to_vec(),
        // AUTO, the default: IPv6 when the name has such addresses, else IPv4.
        _ if v6.is_empty() => v4,
        _ => v6,
    }
}

/// Every host of an assignment, with its priority. `strict_dns`: the cluster's
/// `dns_lookup_family` when it is a STRICT_DNS cluster.
fn build_hosts(
    a: &ClusterLoadAssignment,
    strict_dns: Option<i32>,
    dns: &DnsAnswers,
    per_host: &PerHost<'_>,
) -> Result<Vec<Arc<Host>>, String> {
    if let Some(p) = &a.policy {
        unsupported(!p.drop_overloads.is_empty(), "load_assignment.policy.drop_overloads")?;
    }
    let mut hosts = vec![];
    for (i, le) in a.endpoints.iter().enumerate() {
        for (j, ep) in le.lb_endpoints.iter().enumerate() {
            let at = || format!("endpoints[{i}].lb_endpoints[{j}]");
            let e = match &ep.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
                _ => return Err(format!("{}: only `endpoint` is supported", at())),
            };
            // `auto_host_rewrite` sends the endpoint's `hostname`, or what a STRICT_DNS
            // endpoint resolves (Envoy's host name there is the address as written, an IP
            // literal included).
            let mut hostname = Some(e.hostname.clone()).filter(|h| !h.is_empty());
            let addrs: Vec<HostAddr> =
                match endpoint_address(e.address.as_ref()).map_err(|err| format!("{}: {err}", at()))? {
                    EndpointAddr::Pipe(path) => vec![HostAddr::Pipe(path.into())],
                    EndpointAddr::Socket(host, port) => {
                        if strict_dns.is_some() {
                            hostname.get_or_insert_with(|| host.to_string());
                        }
                        match (host.parse::<IpAddr>(), strict_dns) {
                            (Ok(ip), _) => vec![HostAddr::Ip(SocketAddr::new(ip, port))],
                            (Err(_), Some(family)) => dns
                                .get(&(host.to_string(), port))
                                .map(|a| by_family(a, family).into_iter().map(HostAddr::Ip).collect())
                                .unwrap_or_default(),
                            (Err(_), None) => return Err(format!("{}: `{host}` is not an IP address", at())),
                        }
                    }
                };
            // UNHEALTHY, DRAINING and TIMEOUT hosts take no traffic.
            let healthy = !matches!(ep.health_status, 2..=4);
            let weight = ep.load_balancing_weight.map_or(1, |w| w.value);
            let lb_metadata = lb_match(ep.metadata.as_ref());
            let tls_match = per_host.tls_match(ep.metadata.as_ref(), le.metadata.as_ref());
            for addr in addrs {
                hosts.push(Arc::new(Host {
                    health: per_host.health(&addr),
                    addr,
                    weight,
                    lb_metadata: lb_metadata.clone(),
                    healthy,
                    tls_match,
                    hostname: hostname.clone(),
                    pool: Default::default(),
                    priority: le.priority,
                    outlier: None,
                    active: AtomicU64::new(0),
                    total: AtomicU64::new(0),
                    connect_fail: AtomicU64::new(0),
                }));
            }
        }
    }
    Ok(hosts)
}

fn build_subsets(s: &cluster::LbSubsetConfig) -> Result<SubsetCfg, String> {
    let fallback = match s.fallback_policy {
        0 => Fallback::NoFallback,
        1 => Fallback::AnyEndpoint,
        2 => Fallback::DefaultSubset,
        p => return Err(format!("lb_subset_config.fallback_policy {p} is unknown")),
    };
    let mut selectors = vec![];
    for (i, sel) in s.subset_selectors.iter().enumerate() {
        let f = match sel.fallback_policy {
            0 => fallback,
            1 => Fallback::NoFallback,
            2 => Fallback::AnyEndpoint,
            3 => Fallback::DefaultSubset,
            _ => return Err(format!("lb_subset_config.subset_selectors[{i}].fallback_policy is not supported")),
        };
        let mut keys = sel.keys.clone();
        keys.sort();
        selectors.push((keys, f));
    }
    Ok(SubsetCfg { fallback, default_subset: struct_strings(s.default_subset.as_ref()), selectors })
}

/// `filter_metadata["envoy.lb"]` as strings, the part of metadata subsets use.
pub(crate) fn lb_match(m: Option<&Metadata>) -> BTreeMap<String, String> {
    struct_strings(m.and_then(|m| m.filter_metadata.get("envoy.lb")))
}

fn struct_strings(s: Option<&Struct>) -> BTreeMap<String, String> {
    let Some(s) = s else { return BTreeMap::new() };
    s.fields
        .iter()
        .map(|(k, v): (&String, &Value)| {
            let v = match &v.kind {
                Some(value::Kind::StringValue(s)) => s.clone(),
                Some(value::Kind::NumberValue(n)) => n.to_string(),
                Some(value::Kind::BoolValue(b)) => b.to_string(),
                _ => String::new(),
            };
            (k.clone(), v)
        })
        .collect()
}

fn socket_address(a: Option<&Address>) -> Result<(&str, u16), String> {
    let sa: &SocketAddress = match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(_) => return Err("only socket_address is supported here".into()),
        None => return Err("missing".into()),
    };
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} is out of range"))?
        }
        Some(socket_address::PortSpecifier::NamedPort(_)) => return Err("named_port is not supported".into()),
        None => 0,
    };
    Ok((sa.address.as_str(), port))
}

/// An endpoint's address: a socket address (IP or, for STRICT_DNS, a name) or a pipe.
enum EndpointAddr<'a> {
    Socket(&'a str, u16),
    Pipe(&'a str),
}

fn endpoint_address(a: Option<&Address>) -> Result<EndpointAddr<'_>, String> {
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::Pipe(p)) if p.path.is_empty() => Err("pipe: the path is empty".into()),
        Some(address::Address::Pipe(p)) => Ok(EndpointAddr::Pipe(&p.path)),
        _ => socket_address(a).map(|(host, port)| EndpointAddr::Socket(host, port)),
    }
}

fn unpack<M: Message + Name + Default>(any: &Any) -> Result<M, String> {
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", any.type_url))
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

fn unsupported(set: bool, field: &str) -> Result<(), String> {
    if set { Err(format!("{field} is not supported")) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints};

    fn assignment(hosts: &[(&str, u16)]) -> ClusterLoadAssignment {
        let lb_endpoints = hosts
            .iter()
            .map(|(host, port)| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: host.to_string(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(*port))),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect();
        ClusterLoadAssignment {
            endpoints: vec![LocalityLbEndpoints { lb_endpoints, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn strict_dns_hosts_follow_the_lookup_family_and_keep_their_name() {
        use cluster::DnsLookupFamily as F;
        let (v4, v6): (SocketAddr, SocketAddr) = ("127.0.0.1:80".parse().unwrap(), "[::1]:80".parse().unwrap());
        let dns = DnsAnswers::from([(("localhost".to_string(), 80), vec![v4, v6])]);
        let per_host = PerHost { tls_criteria: &[], health: None };
        let a = assignment(&[("localhost", 80), ("127.0.0.2", 81)]);
        let hosts = |family: F| -> Vec<(String, Option<String>)> {
            build_hosts(&a, Some(family as i32), &dns, &per_host)
                .unwrap()
                .iter()
                .map(|h| (h.addr.to_string(), h.hostname.clone()))
                .collect()
        };
        let named = |addr: &str, name: &str| (addr.to_string(), Some(name.to_string()));
        // An IP literal is a host of its own, named as written (Envoy's auto_host_rewrite
        // sends it); a name gives one host per address of the family asked for.
        assert_eq!(hosts(F::V4Only), [named("127.0.0.1:80", "localhost"), named("127.0.0.2:81", "127.0.0.2")]);
        assert_eq!(hosts(F::V6Only), [named("[::1]:80", "localhost"), named("127.0.0.2:81", "127.0.0.2")]);
        assert_eq!(hosts(F::Auto)[0], named("[::1]:80", "localhost"));
        assert_eq!(hosts(F::V4Preferred)[0], named("127.0.0.1:80", "localhost"));
        assert_eq!(hosts(F::All).len(), 3);
        assert_eq!(by_family(&[v4], F::Auto as i32), [v4]);
        assert_eq!(by_family(&[v6], F::V4Preferred as i32), [v6]);
        assert_eq!(by_family(&[v6], F::V4Only as i32), []);
        // Outside STRICT_DNS an IP endpoint has no name to send.
        let static_hosts = build_hosts(&assignment(&[("127.0.0.2", 81)]), None, &dns, &per_host).unwrap();
        assert_eq!(static_hosts[0].hostname, None);
    }
}
