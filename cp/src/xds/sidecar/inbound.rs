//! A sidecar's inbounds: a listener per inbound (tcp_proxy or HTTP, mesh mTLS, the
//! inbound policies), the metrics listeners, and the applications' `localhost:<port>`
//! clusters.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{TrafficDirection, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::google::protobuf::{BoolValue, Duration};

use super::tls::{downstream_tls, tls_socket, with_params};
use super::{KUMA_ALPN, Proxy, Resources, SidecarInputs, push, static_cluster, tags_metadata, tcp_chain, tcp_proxy};
use crate::model::SERVICE_TAG;
use crate::xds;
use crate::xds::access_log::KumaValues;
use crate::xds::generate::socket_address;
use crate::xds::http::{HttpTimeouts, PROTOCOL_TAG, Protocol};
use crate::xds::meshtls::{MeshTls, Mode};

/// The inbound listeners, the metrics listeners, and the clusters of the applications behind
/// the inbounds.
pub(super) fn generate<'a>(
    proxy: &Proxy<'a>,
    out: &mut Resources,
    dynconf_routes: &mut Vec<(&'a str, &'a str, Vec<u8>)>,
) {
    let Proxy { inputs, dp, mesh, net, tproxy, reuse_port, mtls, al_pipe } = proxy;
    let (inputs, dp, mesh, net, reuse_port, mtls) = (*inputs, *dp, *mesh, *net, *reuse_port, *mtls);
    let Resources { listeners, clusters, .. } = out;

    // --- inbounds ---------------------------------------------------------------------
    // Application clusters: address, and MeshTimeout's connect timeout.
    let mut local_clusters: BTreeMap<String, LocalApp> = BTreeMap::new();
    for inb in &net.inbound {
        if inb.state.as_deref() == Some("Ignored") || inb.tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) {
            continue;
        }
        let (Ok(port), dp_ip) = (
            u32::try_from(inb.port),
            inb.address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| net.address.clone()),
        ) else {
            continue;
        };
        let workload_ip = inb.service_address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| dp_ip.clone());
        let workload_port = inb.service_port.and_then(|p| u32::try_from(p).ok()).filter(|p| *p != 0).unwrap_or(port);
        let cluster = format!("localhost:{workload_port}");
        let timeouts = xds::timeout::inbound(inputs.timeouts, dp, inb);
        let protocol = Protocol::of_tag(inb.tags.get(PROTOCOL_TAG).map(String::as_str));
        let timeout_conf = xds::inbound_policy::merged(inputs.timeouts, dp, Some(inb));
        let http_timeouts = HttpTimeouts::of(timeout_conf.as_ref());
        // Same name twice: the last inbound wins (as Kuma's resource set does).
        let app = LocalApp {
            ip: workload_ip,
            port: workload_port,
            connect: timeouts.as_ref().map(|t| t.connect),
            protocol,
            http: http_timeouts.clone(),
        };
        local_clusters.insert(cluster.clone(), app);

        let name = format!("inbound:{dp_ip}:{port}");
        let values = KumaValues {
            http: protocol.is_http(),
            mesh,
            source_ip: &net.address,
            source_service: "unknown",
            destination_service: inb.tags.get(SERVICE_TAG).map_or("", String::as_str),
            zone: inputs.zone,
        };
        let backends = xds::access_log::inbound_backends(inputs.access_logs);
        let mut tcp = TcpProxy {
            access_log: xds::access_log::loggers(&backends, &values, al_pipe),
            ..tcp_proxy(&cluster, &format!("localhost_{workload_port}"), 7200)
        };
        if let Some(t) = &timeouts {
            tcp.idle_timeout = Some(t.idle);
        }
        let settings = xds::meshtls::resolve(inputs.mtls_mode, inputs.mesh_tls, dp, Some(inb));
        let permissions = inputs.traffic_permissions;
        let terminal = if protocol.is_http() {
            // Kuma's order before the router: faults, then the request-rate limit.
            let mut filters = xds::fault_injection::inbound_filters(inputs.fault_injections, dp, inb);
            let mut per_route = std::collections::HashMap::new();
            if let Some((filter, bucket)) = xds::rate_limit::inbound_http(inputs.rate_limits, dp, inb) {
                per_route.insert(filter.name.clone(), bucket);
                filters.push(filter);
            }
            let http = xds::http::Inbound {
                service: values.destination_service,
                cluster: &cluster,
                workload_port,
                protocol,
                timeouts: http_timeouts,
                access_log: tcp.access_log.clone(),
                filters,
                per_route,
            };
            Terminal::Http(Box::new(http), xds::traffic_permission::inbound_http_filter(permissions, mesh, dp, inb))
        } else {
            Terminal::Tcp(Box::new(tcp), xds::traffic_permission::inbound_filter(permissions, mesh, dp, inb, &name))
        };
        let (mut filter_chains, listener_filters) = inbound_chains(inputs, &settings, &terminal);
        if let Some(limit) = xds::rate_limit::inbound_filter(inputs.rate_limits, dp, inb) {
            for chain in &mut filter_chains {
                chain.filters.insert(0, limit.clone());
            }
        }
        let l = Listener {
            name: name.clone(),
            address: Some(socket_address(&dp_ip, port)),
            enable_reuse_port: Some(BoolValue { value: reuse_port }),
            bind_to_port: tproxy.as_ref().map(|_| BoolValue { value: false }),
            filter_chains,
            listener_filters,
            traffic_direction: TrafficDirection::Inbound as i32,
            ..Default::default()
        };
        let tags = inb.tags.clone();
        push(listeners, &name, l, &format!("{tags:?}"), |l| l.metadata = tags_metadata(&tags));
    }
    // Metrics endpoints: the mesh's Prometheus backend, and MeshMetric's. Kuma leaves an
    // endpoint out rather than shadow an inbound on the same address.
    let shadows = |ep: &xds::prometheus::MetricsEndpoint| {
        net.inbound.iter().any(|i| {
            i.port == i64::from(ep.port)
                && i.address.as_deref().filter(|a| !a.is_empty()).is_none_or(|a| a == net.address)
        })
    };
    let mut endpoints = vec![];
    if let Some(ep) = inputs.metrics.as_ref().filter(|ep| !shadows(ep)) {
        endpoints.push((xds::prometheus::LISTENER.to_string(), ep.clone(), mtls.then_some(mesh)));
    }
    if let Some(conf) = &inputs.mesh_metric {
        dynconf_routes.push(("meshmetric", "/meshmetric", xds::meshmetric::body(conf)));
        for (name, ep) in xds::meshmetric::prometheus_backends(conf).into_iter().filter(|(_, ep)| !shadows(ep)) {
            endpoints.push((name, ep, None));
        }
    }
    for (name, ep, mtls_mesh) in &endpoints {
        let l = xds::prometheus::listener(name, &net.address, ep, *mtls_mesh);
        push(listeners, name, l, "", |_| {});
    }
    if !endpoints.is_empty() {
        use xds::prometheus::{CLUSTER, cluster};
        push(clusters, CLUSTER, cluster(inputs.workdir, &dp.name, mesh), "", |_| {});
    }
    for (name, app) in &local_clusters {
        let mut c = static_cluster(name, socket_address(&app.ip, app.port));
        if let Some(t) = app.connect {
            c.connect_timeout = Some(t);
        }
        if app.protocol.is_http() {
            // The application's own protocol; gRPC keeps no idle timeout (as Kuma's).
            let timeouts = (app.protocol != Protocol::Grpc).then_some(&app.http);
            c.typed_extension_protocol_options = xds::http::protocol_options(app.protocol != Protocol::Http, timeouts);
        }
        push(clusters, name, c, "", |_| {});
    }
}

/// An inbound's application, as its `localhost:<port>` cluster reaches it.
struct LocalApp {
    ip: String,
    port: u32,
    /// MeshTimeout's connect timeout.
    connect: Option<Duration>,
    protocol: Protocol,
    /// MeshTimeout's HTTP timeouts (HTTP applications).
    http: HttpTimeouts,
}

/// What an inbound's chains end in: a tcp_proxy (with MeshTrafficPermission as the network
/// `rbac` filter before it), or an HTTP connection manager (with it as the HTTP `rbac`).
enum Terminal<'a> {
    Tcp(Box<TcpProxy>, Filter),
    Http(Box<xds::http::Inbound<'a>>, HttpFilter),
}

impl Terminal<'_> {
    /// The chain's filters; `rbac` on the chain that terminates mesh mTLS.
    fn filters(&self, rbac: bool) -> Vec<Filter> {
        match self {
            Terminal::Tcp(tcp, filter) => {
                let mut filters = tcp_chain(tcp.as_ref().clone(), None).filters;
                if rbac {
                    filters.insert(0, filter.clone());
                }
                filters
            }
            Terminal::Http(i, filter) => vec![xds::http::inbound(i, rbac.then(|| filter.clone()))],
        }
    }
}

/// An inbound's filter chains and listener filters. Without mTLS, one plaintext chain. With
/// it, strict: one chain terminating mesh mTLS, `rbac` first; permissive (Kuma's order):
/// plaintext, then the application's own TLS passed through as it is, then mesh mTLS,
/// which the TLS inspector tells from the application's TLS by ALPN `kuma`.
fn inbound_chains(
    inputs: &SidecarInputs<'_>,
    settings: &MeshTls,
    terminal: &Terminal<'_>,
) -> (Vec<FilterChain>, Vec<ListenerFilter>) {
    let chain = |rbac: bool, tls: Option<TransportSocket>| FilterChain {
        filters: terminal.filters(rbac),
        transport_socket: tls,
        ..Default::default()
    };
    let Some(_) = &inputs.tls else { return (vec![chain(false, None)], vec![]) };
    let mut ctx = downstream_tls(&inputs.dataplane.mesh);
    with_params(&mut ctx.common_tls_context, settings);
    let mesh_tls = chain(true, Some(tls_socket(ctx)));
    if settings.mode == Mode::Strict {
        return (vec![mesh_tls], vec![]);
    }
    let matching = |mut chain: FilterChain, transport: &str, alpn: &[&str]| {
        chain.filter_chain_match = Some(FilterChainMatch {
            transport_protocol: transport.to_string(),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        chain
    };
    let chains = vec![
        matching(chain(false, None), "raw_buffer", &[]),
        matching(chain(false, None), "tls", &[]),
        matching(mesh_tls, "tls", &[KUMA_ALPN]),
    ];
    (chains, vec![xds::generate::tls_inspector()])
}
