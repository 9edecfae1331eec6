//! A sidecar's outbounds: a listener per outbound (tcp_proxy or HTTP routes), the
//! clusters they reach (whole services, route subsets, ExternalServices, through the egress)
//! and those clusters' endpoints (local instances, other zones' ingresses).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig};
use envoy_types::pb::envoy::config::core::v3::{Locality, TrafficDirection};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};
use envoy_types::util::pack_any;

use super::tls::{tls_socket, upstream_tls_subset, upstream_tls_via, with_params};
use super::{Proxy, Resources, SidecarInputs, ZONE_TAG, push, tags_metadata, tcp_chain};
use crate::model::{ExternalServiceSpec, SERVICE_TAG, ZoneIngressSpec};
use crate::xds;
use crate::xds::access_log::KumaValues;
use crate::xds::egress::{ZONE_EGRESS_SERVICE, external_cluster};
use crate::xds::generate::{Named, ads_config_source, endpoint_metadata, remote_ingresses, socket_address, version_of};
use crate::xds::http::{HttpTimeouts, PROTOCOL_TAG, Protocol};
use kuma_model::proxy::features::BIND_OUTBOUNDS as FEATURE_BIND_OUTBOUNDS;

/// The outbound listeners, and the clusters and endpoints their connections go to.
pub(super) fn generate(proxy: &Proxy<'_>, out: &mut Resources) {
    let Proxy { inputs, dp, mesh, net, tproxy, mtls, al_pipe, .. } = proxy;
    let (inputs, dp, mesh, net, mtls) = (*inputs, *dp, *mesh, *net, *mtls);
    let Resources { listeners, clusters, loads, .. } = out;

    // --- outbounds --------------------------------------------------------------------
    // (address, port) -> (service, tags)
    let mut outbounds: BTreeMap<(String, u32), (String, BTreeMap<String, String>)> = BTreeMap::new();
    for ob in &net.outbound {
        let Some(svc) = ob.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else {
            continue; // backendRef (MeshService) outbounds are not served yet
        };
        let Ok(port) = u32::try_from(ob.port) else { continue };
        let addr = ob.address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| "127.0.0.1".into());
        outbounds.insert((addr, port), (svc.clone(), ob.tags.clone()));
    }
    // VIP outbounds: captured by transparent proxying, or bound on this host when the
    // proxy binds outbounds and the VIPs are loopback addresses (no iptables needed).
    let bind_outbounds = inputs.features.contains(FEATURE_BIND_OUTBOUNDS);
    if (tproxy.is_some() && !bind_outbounds) || (bind_outbounds && inputs.vips_bindable) {
        for (svc, vip) in inputs.vips {
            let tags: BTreeMap<String, String> = [(SERVICE_TAG.to_string(), svc.clone())].into_iter().collect();
            outbounds.entry((vip.to_string(), inputs.vip_port)).or_insert((svc.clone(), tags));
        }
    }
    let services: BTreeSet<String> = outbounds.values().map(|(s, _)| s.clone()).collect();
    let external: BTreeMap<String, ExternalServiceSpec> = inputs
        .external_services
        .iter()
        .filter_map(|r| r.typed::<ExternalServiceSpec>().ok())
        .filter_map(|s| Some((s.tags.get(SERVICE_TAG).filter(|v| !v.is_empty())?.clone(), s)))
        .collect();
    // The services spoken to over HTTP: what their endpoints speak (an ExternalService:
    // its tag), unless only a MeshTCPRoute routes them (Kuma's MeshTCPRoute then takes an
    // HTTP service over).
    let protocols = service_protocols(inputs);
    let http_protocol = |svc: &str| -> Option<Protocol> {
        let p = match external.get(svc) {
            Some(es) => Protocol::of_tag(es.tags.get(PROTOCOL_TAG).map(String::as_str)),
            None => protocols.get(svc).copied().unwrap_or(Protocol::Tcp),
        };
        let p = Some(p).filter(|p| p.is_http())?;
        let tcp_only = xds::tcp_route::backends(inputs.tcp_routes, svc).is_some()
            && xds::http_route::backends(inputs.http_routes, svc).is_none();
        (!tcp_only).then_some(p)
    };
    // The proxy's tags (each tag's values over its inbounds, sorted and comma-joined), as
    // Kuma's `x-kuma-tags` carries them.
    let mut tag_values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (k, v) in net.inbound.iter().flat_map(|i| i.tags.iter()) {
        tag_values.entry(k.clone()).or_default().insert(v.clone());
    }
    let own_tags: BTreeMap<String, String> =
        tag_values.into_iter().map(|(k, vs)| (k, vs.into_iter().collect::<Vec<_>>().join(","))).collect();
    // Kuma's source service: the first inbound's.
    let own_service = net.inbound.iter().find_map(|i| i.tags.get(SERVICE_TAG)).map_or("unknown", String::as_str);
    for ((addr, port), (svc, tags)) in &outbounds {
        let name = format!("outbound:{addr}:{port}");
        let protocol = http_protocol(svc);
        let values = KumaValues {
            http: protocol.is_some(),
            mesh,
            source_ip: &net.address,
            source_service: own_service,
            destination_service: svc,
            zone: inputs.zone,
        };
        let backends = xds::access_log::outbound_backends(inputs.access_logs, svc);
        let access_log = xds::access_log::loggers(&backends, &values, al_pipe);
        let chain = match protocol {
            Some(p) => {
                let timeouts = HttpTimeouts::of(xds::resilience::merged_conf(inputs.timeouts, svc).as_ref());
                let retry = xds::http::retry_policy(xds::resilience::merged_conf(inputs.retries, svc).as_ref(), p);
                let mut routes = xds::http_route::routes(inputs.http_routes, svc, &timeouts, retry.as_ref());
                xds::http_route::apply_route_timeouts(&mut routes, inputs.timeouts, inputs.http_routes, svc);
                if external.contains_key(svc) {
                    // The external host's name, not the mesh's, goes upstream (Kuma's
                    // `auto_host_rewrite` on splits to an ExternalService).
                    xds::http_route::auto_host_rewrite(&mut routes);
                }
                let tags = xds::fault_injection::tags_header(inputs.fault_injections, &own_tags);
                let hcm = xds::http::outbound(svc, p, routes, &timeouts, tags, access_log);
                FilterChain { filters: vec![hcm], ..Default::default() }
            }
            None => outbound_chain(svc, inputs, access_log),
        };
        let l = Listener {
            name: name.clone(),
            address: Some(socket_address(addr, *port)),
            bind_to_port: tproxy.as_ref().filter(|_| !bind_outbounds).map(|_| BoolValue { value: false }),
            filter_chains: vec![chain],
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        };
        push(listeners, &name, l, &format!("{tags:?}"), |l| l.metadata = tags_metadata(tags));
    }

    let endpoints = outbound_endpoints(inputs, mtls);
    let outbound_tls = xds::meshtls::resolve(inputs.mtls_mode, inputs.mesh_tls, dp, None);
    let via_egress = inputs.zone_egress && mtls;
    // The clusters the outbounds' connections go to: each service's own, or its route's
    // backends (whole services, or subsets of one).
    let mut targets: BTreeMap<String, xds::tcp_route::Backend> = BTreeMap::new();
    for svc in &services {
        let whole = || vec![xds::tcp_route::Backend { service: svc.clone(), tags: BTreeMap::new(), weight: 1 }];
        let routed = match http_protocol(svc) {
            Some(_) => xds::http_route::backends(inputs.http_routes, svc),
            None => xds::tcp_route::backends(inputs.tcp_routes, svc),
        };
        for b in routed.unwrap_or_else(whole) {
            targets.insert(b.cluster(), b);
        }
    }
    for (name, target) in &targets {
        let (svc, subset) = (&target.service, &target.tags);
        if let Some(es) = external.get(svc) {
            if !subset.is_empty() {
                tracing::debug!(service = %svc, "a route's subset of an ExternalService is not served");
                continue;
            }
            if via_egress {
                // To the zone's egresses, which terminate this mTLS as `zone-egress`.
                let c = Cluster {
                    name: svc.clone(),
                    connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
                    cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                    eds_cluster_config: Some(EdsClusterConfig {
                        eds_config: Some(ads_config_source()),
                        service_name: String::new(),
                    }),
                    transport_socket: Some(tls_socket(upstream_tls_via(mesh, svc, ZONE_EGRESS_SERVICE))),
                    ..Default::default()
                };
                let cluster_version = version_of(&format!("{c:?}"));
                push(clusters, svc, c, "", |_| {});
                let eps = egress_endpoints(inputs.egresses);
                let v = version_of(&format!("{svc}|{eps:?}|{cluster_version}"));
                loads.push(Named::new(svc.clone(), v, pack_any(cla_proto(svc, &eps))));
            } else if let Some((host, port)) = es.host_port() {
                // Straight to the external address.
                let protocol = es.tags.get("kuma.io/protocol").map(String::as_str).unwrap_or("tcp");
                let c = external_cluster(svc, mesh, &host, port, protocol, es);
                push(clusters, svc, c, "", |_| {});
            }
            continue;
        }
        let connect = xds::timeout::outbound(inputs.timeouts, svc).map(|t| t.connect);
        let mut c = Cluster {
            name: name.clone(),
            connect_timeout: Some(connect.unwrap_or(Duration { seconds: 5, nanos: 0 })),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                service_name: String::new(),
            }),
            transport_socket: inputs.tls.as_ref().map(|_| {
                let mut ctx = upstream_tls_subset(mesh, svc, svc, subset);
                with_params(&mut ctx.common_tls_context, &outbound_tls);
                tls_socket(ctx)
            }),
            ..Default::default()
        };
        if let Some(p) = http_protocol(svc) {
            // Sidecars speak HTTP/2 to each other, whatever the application speaks.
            let conf = xds::resilience::merged_conf(inputs.timeouts, svc);
            let timeouts = HttpTimeouts::of(conf.as_ref());
            c.typed_extension_protocol_options =
                xds::http::protocol_options(true, (p != Protocol::Grpc).then_some(&timeouts));
        }
        if let Some(conf) = xds::resilience::merged_conf(inputs.circuit_breakers, svc) {
            xds::resilience::apply(&mut c, &conf);
        }
        if let Some(conf) = xds::resilience::merged_conf(inputs.health_checks, svc) {
            let protocol = http_protocol(svc).unwrap_or(Protocol::Tcp);
            xds::resilience::apply_health_check(&mut c, &conf, protocol, &own_tags);
        }
        if let Some(conf) = xds::resilience::merged_conf(inputs.load_balancing, svc) {
            xds::resilience::apply_load_balancer(&mut c, &conf);
        }
        let cluster_version = version_of(&format!("{c:?}"));
        push(clusters, name, c, "", |_| {});
        // A subset: the endpoints that carry its tags, other zones' ingresses among them
        // (they route the subset's SNI; see tcp_route).
        let in_subset = |e: &&OutEndpoint| subset.iter().all(|(k, v)| e.tags.get(k) == Some(v));
        let eps: Vec<OutEndpoint> = endpoints.get(svc).into_iter().flatten().filter(in_subset).cloned().collect();
        let mut cla = cla_proto(name, &eps);
        if inputs.locality_aware {
            // Kuma's locality awareness: other zones' endpoints are the fallback level.
            for l in &mut cla.endpoints {
                if l.locality.as_ref().is_some_and(|z| z.zone != inputs.zone) {
                    l.priority = 1;
                }
            }
        }
        // The version includes the cluster's: a changed cluster needs its endpoints again.
        let v = version_of(&format!("{name}|{eps:?}|{cluster_version}"));
        loads.push(Named::new(name.clone(), v, pack_any(cla)));
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct OutEndpoint {
    zone: Option<String>,
    address: String,
    port: u32,
    weight: u32,
    /// Endpoint tags without `kuma.io/service`.
    tags: BTreeMap<String, String>,
}

/// An outbound's tcp_proxy, with MeshRetry's connect attempts and MeshTimeout's idle
/// timeout when policies set them, and MeshAccessLog's loggers.
fn outbound_chain(svc: &str, inputs: &SidecarInputs<'_>, access_log: Vec<AccessLog>) -> FilterChain {
    let attempts =
        xds::resilience::merged_conf(inputs.retries, svc).and_then(|c| xds::resilience::connect_attempts(&c));
    let idle = xds::timeout::outbound(inputs.timeouts, svc).map_or(Duration { seconds: 3600, nanos: 0 }, |t| t.idle);
    let mut tcp = TcpProxy {
        max_connect_attempts: attempts.map(|value| UInt32Value { value }),
        access_log,
        idle_timeout: Some(idle),
        ..super::tcp_proxy(svc, svc, 3600)
    };
    match xds::tcp_route::backends(inputs.tcp_routes, svc).as_deref() {
        Some([one]) => tcp.cluster_specifier = Some(tcp_proxy::ClusterSpecifier::Cluster(one.cluster())),
        Some(split) => {
            let clusters = split
                .iter()
                .map(|b| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: b.cluster(),
                    weight: b.weight,
                    ..Default::default()
                })
                .collect();
            tcp.cluster_specifier =
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster { clusters }));
        }
        None => {}
    }
    tcp_chain(tcp, None)
}

/// One endpoint per online egress of the zone.
fn egress_endpoints(egresses: &[(String, u32)]) -> Vec<OutEndpoint> {
    egresses
        .iter()
        .map(|(address, port)| OutEndpoint {
            zone: None,
            address: address.clone(),
            port: *port,
            weight: 1,
            tags: BTreeMap::new(),
        })
        .collect()
}

/// Endpoints per service of the proxy's mesh: healthy local inbounds (weight = number of
/// distinct remote ingress coordinates, or 1) and, with mTLS, one endpoint per remote
/// ZoneIngress advertising the service (weight = its instance count), or with
/// `routing.zoneEgress` one per online egress of the zone instead.
fn outbound_endpoints(inputs: &SidecarInputs<'_>, mtls: bool) -> BTreeMap<String, Vec<OutEndpoint>> {
    let mesh = inputs.dataplane.mesh.as_str();
    let mut out: BTreeMap<String, Vec<OutEndpoint>> = BTreeMap::new();
    let mut coordinates: BTreeSet<(String, i64)> = BTreeSet::new();
    let via_egress = inputs.zone_egress && mtls;
    if mtls {
        for (spec, port) in remote_ingresses(inputs.ingresses, inputs.zone) {
            let n = &spec.networking;
            let coord = (n.advertised_address.clone(), n.advertised_port);
            if coordinates.contains(&coord) {
                continue; // several ingress instances behind one load balancer
            }
            if !spec.available_services.is_empty() {
                coordinates.insert(coord);
            }
            for a in &spec.available_services {
                if a.mesh != mesh || a.external_service {
                    continue;
                }
                let Some(svc) = a.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
                if via_egress {
                    // The egress passes the mTLS through to this ingress by SNI.
                    out.entry(svc.clone()).or_default().extend(egress_endpoints(inputs.egresses));
                    continue;
                }
                let tags = without_service(&a.tags);
                out.entry(svc.clone()).or_default().push(OutEndpoint {
                    zone: Some(tags.get(ZONE_TAG).cloned().unwrap_or_else(|| spec.zone.clone())),
                    address: n.advertised_address.clone(),
                    port,
                    weight: a.instances.max(1),
                    tags,
                });
            }
        }
    }
    let local_weight = u32::try_from(coordinates.len()).unwrap_or(u32::MAX).max(1);
    for d in inputs.dataplanes.iter().filter(|d| d.mesh() == mesh) {
        let Some(net) = &d.spec.networking else { continue };
        for inb in net.inbound.iter().filter(|i| i.is_healthy()) {
            let Some(svc) = inb.tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) else { continue };
            let Ok(port) = u32::try_from(inb.port) else { continue };
            let address = Some(net.advertised_address.clone())
                .filter(|a| !a.is_empty())
                .or_else(|| inb.address.clone().filter(|a| !a.is_empty()))
                .unwrap_or_else(|| net.address.clone());
            let tags = without_service(&inb.tags);
            out.entry(svc.clone()).or_default().push(OutEndpoint {
                zone: tags.get(ZONE_TAG).cloned().or_else(|| d.resource.labels.get(ZONE_TAG).cloned()),
                address,
                port,
                weight: local_weight,
                tags,
            });
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// An endpoint's tags: its instance's, without `kuma.io/service`.
fn without_service(tags: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Each service's protocol, from the `kuma.io/protocol` of its instances here and in other
/// zones (as Kuma's mesh context infers it).
fn service_protocols(inputs: &SidecarInputs<'_>) -> BTreeMap<String, Protocol> {
    let mesh = inputs.dataplane.mesh.as_str();
    let mut seen: BTreeMap<String, Vec<Protocol>> = BTreeMap::new();
    let mut add = |tags: &BTreeMap<String, String>| {
        if let Some(svc) = tags.get(SERVICE_TAG).filter(|s| !s.is_empty()) {
            seen.entry(svc.clone()).or_default().push(Protocol::of_tag(tags.get(PROTOCOL_TAG).map(String::as_str)));
        }
    };
    for d in inputs.dataplanes.iter().filter(|d| d.mesh() == mesh) {
        for inb in d.spec.networking.iter().flat_map(|n| n.inbound.iter()) {
            add(&inb.tags);
        }
    }
    for zi in inputs.ingresses {
        let Ok(spec) = zi.typed::<ZoneIngressSpec>() else { continue };
        if spec.zone == inputs.zone {
            continue;
        }
        for a in spec.available_services.iter().filter(|a| a.mesh == mesh && !a.external_service) {
            add(&a.tags);
        }
    }
    seen.into_iter().map(|(svc, all)| (svc, Protocol::common(all.into_iter()))).collect()
}

fn cla_proto(name: &str, endpoints: &[OutEndpoint]) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<Option<String>, Vec<LbEndpoint>> = BTreeMap::new();
    for e in endpoints {
        let metadata = (!e.tags.is_empty()).then(|| endpoint_metadata(&e.tags));
        by_zone.entry(e.zone.clone()).or_default().push(LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket_address(&e.address, e.port)),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            metadata,
            ..Default::default()
        });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_zone
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: zone.map(|z| Locality { zone: z, ..Default::default() }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
