//! UDP listeners with Envoy's `dns_filter` (how Kuma 2.14 gives sidecars their `.mesh`
//! names): the inline table becomes a `dns::Table`, the client config the upstreams.

use envoy_types::pb::envoy::config::core::v3::{Address, TypedExtensionConfig, address, socket_address};
use envoy_types::pb::envoy::config::listener::v3::{Listener, listener_filter};
use envoy_types::pb::envoy::data::dns::v3::dns_table::dns_endpoint::EndpointConfig;
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::DnsFilterConfig;
use envoy_types::pb::envoy::extensions::filters::udp::dns_filter::v3::dns_filter_config::server_context_config::ConfigSource;
use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
use envoy_types::pb::envoy::extensions::network::dns_resolver::getaddrinfo::v3::GetAddrInfoDnsResolverConfig;
use prost::{Message, Name};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The domain Kuma serves authoritatively (`KUMA_DNS_SERVER_DOMAIN`).
const MESH_DOMAIN: &str = "mesh";
const DEFAULT_TTL: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct DnsListenerCfg {
    pub name: String,
    pub address: SocketAddr,
    pub table: Arc<dns::Table>,
    /// Resolvers for other names; empty: the host's /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
}

pub fn is_udp(l: &Listener) -> bool {
    matches!(&l.address, Some(Address { address: Some(address::Address::SocketAddress(sa)) })
        if sa.protocol == socket_address::Protocol::Udp as i32)
}

fn socket(a: &Address) -> Result<SocketAddr, String> {
    let Some(address::Address::SocketAddress(sa)) = &a.address else {
        return Err("only socket_address is supported".into());
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| format!("`{}` is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| format!("port {p}"))?,
        _ => 0,
    };
    Ok(SocketAddr::new(ip, port))
}

/// The resolvers of Envoy's current `typed_dns_resolver_config`: c-ares lists them;
/// getaddrinfo (and c-ares without any) means the host's resolver.
fn typed_resolvers(cfg: Option<&TypedExtensionConfig>) -> Result<Vec<Address>, String> {
    let Some(any) = cfg.and_then(|c| c.typed_config.as_ref()) else { return Ok(vec![]) };
    if any.type_url == CaresDnsResolverConfig::type_url() {
        let c = CaresDnsResolverConfig::decode(any.value.as_slice()).map_err(|e| format!("dns_filter: {e}"))?;
        Ok(c.resolvers)
    } else if any.type_url == GetAddrInfoDnsResolverConfig::type_url() {
        Ok(vec![])
    } else {
        Err(format!("dns_filter: client_config.typed_dns_resolver_config {} is not supported", any.type_url))
    }
}

pub fn build(l: &Listener) -> Result<DnsListenerCfg, String> {
    let address = socket(l.address.as_ref().ok_or("address is missing")?).map_err(|e| format!("address: {e}"))?;
    let [f] = l.listener_filters.as_slice() else {
        return Err("a UDP listener must have exactly one listener filter (dns_filter)".into());
    };
    let any = match &f.config_type {
        Some(listener_filter::ConfigType::TypedConfig(any)) if any.type_url == DnsFilterConfig::type_url() => any,
        _ => return Err(format!("UDP listener filter {} is not supported (only dns_filter)", f.name)),
    };
    let cfg = DnsFilterConfig::decode(any.value.as_slice()).map_err(|e| format!("dns_filter: {e}"))?;
    let table = match cfg.server_config.and_then(|s| s.config_source) {
        Some(ConfigSource::InlineDnsTable(t)) => t,
        Some(_) => return Err("dns_filter: only an inline_dns_table is supported".into()),
        None => Default::default(),
    };
    let mut ttl = DEFAULT_TTL;
    let mut records = vec![];
    for d in &table.virtual_domains {
        if let Some(t) = &d.answer_ttl {
            ttl = Duration::new(t.seconds.max(0) as u64, 0);
        }
        let ips = match d.endpoint.as_ref().and_then(|e| e.endpoint_config.as_ref()) {
            Some(EndpointConfig::AddressList(list)) => list
                .address
                .iter()
                .map(|a| a.parse::<IpAddr>().map_err(|_| format!("dns_filter: `{a}` of {} is not an IP", d.name)))
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(format!("dns_filter: {} must have an address_list", d.name)),
        };
        records.push((d.name.clone(), ips));
    }
    #[allow(deprecated)]
    let upstreams = match &cfg.client_config {
        Some(c) => {
            let mut resolvers = c.dns_resolution_config.as_ref().map(|r| r.resolvers.clone()).unwrap_or_default();
            resolvers.extend(typed_resolvers(c.typed_dns_resolver_config.as_ref())?);
            resolvers.iter().chain(&c.upstream_resolvers).map(socket).collect::<Result<Vec<_>, _>>()?
        }
        None => vec![],
    };
    Ok(DnsListenerCfg {
        name: l.name.clone(),
        address,
        table: Arc::new(dns::Table::new(&[MESH_DOMAIN.to_string()], records, ttl)),
        upstreams,
    })
}
