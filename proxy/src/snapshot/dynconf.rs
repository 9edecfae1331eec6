//! Kuma's dynamic-config listener (`_kuma:dynamicconfig`, or `system_dynamicconfig` with
//! unified naming): an HTTP listener on a unix pipe whose routes answer fixed bodies.
//! kuma-dp polls it for the embedded DNS proxy's records (`GET /dns`); `dp` is the proxy
//! itself, so it reads the bodies straight from the resource instead of serving the pipe.
//!
//! `/dns` feeds the embedded DNS proxy and `/meshmetric` (a MeshMetric policy) the metrics
//! socket; `/otel` is accepted and kept in the config dump.

use envoy_types::pb::envoy::config::core::v3::data_source;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{route, route_match};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use prost::{Message, Name};
use serde::Deserialize;
use std::net::IpAddr;
use std::time::Duration;

/// Listener names Kuma 2.14 gives it (legacy, then unified resource naming).
const NAMES: [&str; 2] = ["_kuma:dynamicconfig", "system_dynamicconfig"];
/// The path of the embedded DNS proxy's config (`pkg/dns/dpapi.PATH`).
const DNS_PATH: &str = "/dns";
/// The domain answered authoritatively, as for the `dns_filter` listener.
const MESH_DOMAIN: &str = "mesh";

pub fn is_dynconf(l: &Listener) -> bool {
    NAMES.contains(&l.name.as_str())
}

/// The body of `GET /dns` (Kuma's `dpapi.DNSProxyConfig`). Unknown fields are ignored,
/// as kuma-dp's decoder does (`extraLabels` labels kuma-dp's DNS metrics; dp's DNS
/// metrics do not carry them yet).
#[derive(Debug, Deserialize)]
struct DnsProxyConfig {
    #[serde(default)]
    records: Vec<DnsRecord>,
    #[serde(default)]
    ttl: u32,
}

#[derive(Debug, Deserialize)]
struct DnsRecord {
    name: String,
    #[serde(default)]
    ips: Vec<String>,
}

/// The embedded DNS table of a dynamic-config listener; `None` when it has no `/dns` route.
pub fn dns_table(l: &Listener) -> Result<Option<dns::Table>, String> {
    let Some(body) = body(l, DNS_PATH)? else { return Ok(None) };
    let cfg: DnsProxyConfig = serde_json::from_slice(&body).map_err(|e| format!("{DNS_PATH} body: {e}"))?;
    let mut records = Vec::with_capacity(cfg.records.len());
    for r in cfg.records {
        let ips = r
            .ips
            .iter()
            .map(|ip| ip.parse::<IpAddr>().map_err(|_| format!("{DNS_PATH} body: `{ip}` of {} is not an IP", r.name)))
            .collect::<Result<Vec<_>, _>>()?;
        records.push((r.name, ips));
    }
    let ttl = Duration::from_secs(u64::from(cfg.ttl));
    Ok(Some(dns::Table::new(&[MESH_DOMAIN.to_string()], records, ttl)))
}

/// The path of a MeshMetric policy's config (`meshmetric/dpapi.PATH`).
const MESH_METRIC_PATH: &str = "/meshmetric";

/// What kuma-dp takes from a MeshMetric policy for its metrics socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshMetric {
    /// Applications whose metrics follow the proxy's.
    pub apps: Vec<crate::metrics_socket::App>,
    /// `sidecar.includeUnused` (default false: only the stats in use, as `usedonly`).
    pub include_unused: bool,
    /// Labels added to every sample.
    pub extra_labels: Vec<(String, String)>,
}

/// The MeshMetric config of a dynamic-config listener; `None` when it has no
/// `/meshmetric` route. Its `backends` and `sidecar.profiles` are not interpreted: the
/// Prometheus backends are the listeners the control plane generates, and every stat
/// passes the profiles.
pub fn mesh_metric(l: &Listener) -> Result<Option<MeshMetric>, String> {
    let Some(body) = body(l, MESH_METRIC_PATH)? else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("{MESH_METRIC_PATH} body: {e}"))?;
    let m = &v["observability"]["metrics"];
    let extra_labels = m["extraLabels"]
        .as_object()
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Ok(Some(MeshMetric {
        apps: crate::metrics_socket::apps(&m["applications"]),
        include_unused: m["sidecar"]["includeUnused"].as_bool().unwrap_or(false),
        extra_labels,
    }))
}

/// The inline body the listener answers `GET <path>` with (status 200, no header match).
fn body(l: &Listener, path: &str) -> Result<Option<Vec<u8>>, String> {
    for (i, fc) in l.filter_chains.iter().enumerate() {
        for (j, f) in fc.filters.iter().enumerate() {
            let at = format!("filter_chains[{i}].filters[{j}]");
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                return Err(format!("{at}: typed_config is missing"));
            };
            if any.type_url != HttpConnectionManager::type_url() {
                return Err(format!("{at}: {} is not supported in a dynamic-config listener", any.type_url));
            }
            let hcm = HttpConnectionManager::decode(any.value.as_slice()).map_err(|e| format!("{at}: {e}"))?;
            let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier else {
                return Err(format!("{at}: only an inline route_config is supported"));
            };
            for vh in &rc.virtual_hosts {
                for r in &vh.routes {
                    let Some(m) = &r.r#match else { continue };
                    let matches = match &m.path_specifier {
                        Some(route_match::PathSpecifier::Path(p)) | Some(route_match::PathSpecifier::Prefix(p)) => {
                            p == path
                        }
                        _ => false,
                    };
                    // The route with an `If-None-Match` header is the 304 for pollers.
                    if !matches || !m.headers.is_empty() {
                        continue;
                    }
                    let Some(route::Action::DirectResponse(dr)) = &r.action else { continue };
                    if dr.status != 200 {
                        continue;
                    }
                    return match dr.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                        Some(data_source::Specifier::InlineString(s)) => Ok(Some(s.clone().into_bytes())),
                        Some(data_source::Specifier::InlineBytes(b)) => Ok(Some(b.clone())),
                        Some(_) => Err(format!("{at}: route for {path}: only an inline body is supported")),
                        None => Ok(Some(vec![])),
                    };
                }
            }
        }
    }
    Ok(None)
}
