//! Kuma's Prometheus endpoint of a sidecar (`PrometheusEndpointGenerator`): when the mesh
//! (or the Dataplane itself) enables a Prometheus metrics backend, the proxy gets the
//! listener `kuma:metrics:prometheus` on `<address>:<conf.port>` (5670 by default), whose
//! route `<conf.path>` (`/metrics`) goes to the cluster `kuma:metrics:hijacker`: the Unix
//! socket where kuma-dp (and dp) answer with the proxy's stats. In an mTLS mesh, unless
//! the backend says `skipMTLS`, only the proxy's own address may scrape in plain text;
//! anyone else must present a mesh certificate.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Address, CidrRange, Pipe, TrafficDirection, address};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;

use super::generate::socket_address;
use super::sidecar::{downstream_tls, tls_socket};
use crate::model::{DataplaneSpec, MeshSpec};

pub const LISTENER: &str = "kuma:metrics:prometheus";
pub const CLUSTER: &str = "kuma:metrics:hijacker";

/// Where and how a proxy exposes its metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsEndpoint {
    pub port: u32,
    pub path: String,
    pub skip_mtls: bool,
}

/// Kuma's `GetPrometheusConfig`: the mesh's enabled backend, when it is a Prometheus one,
/// with what the Dataplane's own `metrics` sets on top; Kuma's defaults (port 5670, path
/// `/metrics`) for what neither sets.
pub fn endpoint(mesh: &MeshSpec, dp: &DataplaneSpec) -> Option<MetricsEndpoint> {
    let backend = enabled_backend(mesh)?;
    let own = dp.metrics.as_ref().filter(|b| b.backend_type.is_empty() || b.backend_type == "prometheus");
    let (mesh_conf, own_conf) =
        (backend.conf.clone().unwrap_or_default(), own.and_then(|b| b.conf.clone()).unwrap_or_default());
    Some(MetricsEndpoint {
        port: own_conf.port.or(mesh_conf.port).filter(|p| *p > 0).unwrap_or(5670),
        path: own_conf.path.or(mesh_conf.path).filter(|p| !p.is_empty()).unwrap_or_else(|| "/metrics".into()),
        skip_mtls: own_conf.skip_mtls.or(mesh_conf.skip_mtls).unwrap_or(false),
    })
}

/// The `kumaSidecarConfiguration.metrics.aggregate` list of the bootstrap (Kuma's
/// `getAggregateMetricsConfig`): the mesh backend's entries, a Dataplane's own replacing
/// those of the same name; disabled ones left out; the address defaults to the
/// Dataplane's.
pub fn aggregate(mesh: &MeshSpec, dp: &DataplaneSpec) -> Vec<serde_json::Value> {
    let Some(backend) = enabled_backend(mesh) else { return vec![] };
    let mut by_name: std::collections::BTreeMap<String, crate::model::AggregateConf> = Default::default();
    let own = dp.metrics.as_ref().and_then(|m| m.conf.as_ref());
    for a in backend.conf.iter().chain(own).flat_map(|c| c.aggregate.iter()) {
        by_name.insert(a.name.clone(), a.clone());
    }
    let address = dp.networking.as_ref().map(|n| n.address.clone()).unwrap_or_default();
    by_name
        .into_values()
        .filter(|a| a.enabled != Some(false) && a.port > 0)
        .map(|a| {
            serde_json::json!({
                "name": a.name,
                "address": a.address.filter(|x| !x.is_empty()).unwrap_or_else(|| address.clone()),
                "port": a.port,
                "path": a.path.filter(|p| !p.is_empty()).unwrap_or_else(|| "/metrics".into()),
            })
        })
        .collect()
}

fn enabled_backend(mesh: &MeshSpec) -> Option<&crate::model::MetricsBackend> {
    let m = mesh.metrics.as_ref()?;
    let b = m.backends.iter().find(|b| !m.enabled_backend.is_empty() && b.name == m.enabled_backend)?;
    (b.backend_type == "prometheus").then_some(b)
}

/// Kuma's `MetricsHijackerSocketName`: `<workdir>/kuma-mh-<name>-<mesh>`, cut to 98 bytes,
/// then `.sock` (the proxy computes the same path).
pub fn socket_path(workdir: &str, name: &str, mesh: &str) -> String {
    let file = format!("kuma-mh-{name}-{mesh}");
    let mut joined = if workdir.is_empty() { file } else { format!("{}/{file}", workdir.trim_end_matches('/')) };
    let mut cut = joined.len().min(98);
    while !joined.is_char_boundary(cut) {
        cut -= 1;
    }
    joined.truncate(cut);
    joined + ".sock"
}

/// The cluster on the metrics socket.
pub fn cluster(workdir: &str, name: &str, mesh: &str) -> Cluster {
    let pipe =
        Address { address: Some(address::Address::Pipe(Pipe { path: socket_path(workdir, name, mesh), mode: 0 })) };
    super::sidecar::static_cluster(CLUSTER, pipe)
}

/// The HTTP chain: `<path>` (prefix, rewritten to `/`) to the metrics socket.
fn chain(ep: &MetricsEndpoint) -> FilterChain {
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(ep.path.clone())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(CLUSTER.into())),
            prefix_rewrite: "/".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: LISTENER.replace(':', "_"),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        http_filters: vec![super::dynconf::router_filter()],
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
            virtual_hosts: vec![VirtualHost {
                name: LISTENER.into(),
                domains: vec!["*".into()],
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
        }],
        ..Default::default()
    }
}

/// The listener on `address:<port>`. With `mtls_mesh` (and no `skipMTLS`): a plain-text
/// chain for the proxy's own address (Prometheus beside it), then the mesh's mTLS.
pub fn listener(name: &str, address: &str, ep: &MetricsEndpoint, mtls_mesh: Option<&str>) -> Listener {
    let filter_chains = match mtls_mesh.filter(|_| !ep.skip_mtls) {
        None => vec![chain(ep)],
        Some(mesh) => {
            let own = address.parse::<std::net::IpAddr>().ok().map(|ip| CidrRange {
                address_prefix: ip.to_string(),
                prefix_len: Some(UInt32Value { value: if ip.is_ipv4() { 32 } else { 128 } }),
            });
            let mut plain = chain(ep);
            plain.filter_chain_match =
                Some(FilterChainMatch { source_prefix_ranges: own.into_iter().collect(), ..Default::default() });
            let mut secure = chain(ep);
            secure.transport_socket = Some(tls_socket(downstream_tls(mesh)));
            vec![plain, secure]
        }
    };
    Listener {
        name: name.into(),
        address: Some(socket_address(address, ep.port)),
        filter_chains,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(metrics: serde_json::Value) -> MeshSpec {
        serde_json::from_value(serde_json::json!({ "metrics": metrics })).unwrap()
    }

    #[test]
    fn the_enabled_prometheus_backend_with_the_dataplanes_overrides_and_kumas_defaults() {
        let m = mesh(
            serde_json::json!({"enabledBackend": "prom", "backends": [{"name": "prom", "type": "prometheus", "conf": {"skipMTLS": true}}]}),
        );
        let ep = endpoint(&m, &DataplaneSpec::default()).unwrap();
        assert_eq!(ep, MetricsEndpoint { port: 5670, path: "/metrics".into(), skip_mtls: true });
        let own: DataplaneSpec = serde_json::from_value(
            serde_json::json!({"metrics": {"type": "prometheus", "conf": {"port": 1234, "skipMTLS": false}}}),
        )
        .unwrap();
        assert_eq!(
            endpoint(&m, &own).unwrap(),
            MetricsEndpoint { port: 1234, path: "/metrics".into(), skip_mtls: false }
        );
        // No enabled backend, or not a Prometheus one: nothing.
        assert_eq!(
            endpoint(&mesh(serde_json::json!({"backends": [{"name": "prom", "type": "prometheus"}]})), &own),
            None
        );
        assert_eq!(
            endpoint(
                &mesh(serde_json::json!({"enabledBackend": "x", "backends": [{"name": "x", "type": "other"}]})),
                &own
            ),
            None
        );
    }

    #[test]
    fn aggregated_applications_the_dataplanes_entries_win_and_disabled_ones_go() {
        let m = mesh(serde_json::json!({"enabledBackend": "prom", "backends": [{"name": "prom", "type": "prometheus",
            "conf": {"aggregate": [{"name": "app", "port": 8888}, {"name": "old", "port": 7777, "path": "/m"}]}}]}));
        let dp: DataplaneSpec = serde_json::from_value(serde_json::json!({
            "networking": {"address": "10.0.0.5"},
            "metrics": {"type": "prometheus", "conf": {"aggregate": [{"name": "old", "port": 7777, "enabled": false},
                {"name": "side", "port": 9999, "address": "127.0.0.1", "path": "/stats"}]}}}))
        .unwrap();
        assert_eq!(
            aggregate(&m, &dp),
            vec![
                serde_json::json!({"name": "app", "address": "10.0.0.5", "port": 8888, "path": "/metrics"}),
                serde_json::json!({"name": "side", "address": "127.0.0.1", "port": 9999, "path": "/stats"}),
            ]
        );
        assert!(aggregate(&MeshSpec::default(), &dp).is_empty());
    }

    #[test]
    fn the_socket_path_is_kumas() {
        assert_eq!(socket_path("/w/", "backend-1", "default"), "/w/kuma-mh-backend-1-default.sock");
        assert_eq!(socket_path("", "a", "m"), "kuma-mh-a-m.sock");
        assert_eq!(socket_path("/w", &"n".repeat(200), "m").len(), 98 + 5);
    }
}
