//! The capture listeners of a transparent-proxying Dataplane, as Kuma 2.14 generates
//! them: `outbound:passthrough:ipv4` on the outbound redirect port hands each connection
//! to the (unbound) listener of its original destination, or, for a destination the
//! mesh does not know, straight on through an ORIGINAL_DST cluster;
//! `inbound:passthrough:ipv4` does the same for the inbound redirect port.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{Listener, ListenerFilter, listener_filter};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::google::protobuf::{BoolValue, Duration};
use envoy_types::util::pack_any;

use super::generate::{Named, socket_address};
use super::sidecar::{push, tcp_proxy_chain};
use crate::model::TransparentProxying;

pub const OUTBOUND_PASSTHROUGH: &str = "outbound:passthrough:ipv4";
pub const INBOUND_PASSTHROUGH: &str = "inbound:passthrough:ipv4";

/// Adds the capture listeners and their passthrough clusters.
pub fn capture(tp: &TransparentProxying, listeners: &mut Vec<Named>, clusters: &mut Vec<Named>) {
    let sides = [
        (OUTBOUND_PASSTHROUGH, tp.redirect_port_outbound, TrafficDirection::Outbound),
        (INBOUND_PASSTHROUGH, tp.redirect_port_inbound, TrafficDirection::Inbound),
    ];
    for (name, port, direction) in sides {
        if port == 0 {
            continue;
        }
        let l = Listener {
            name: name.to_string(),
            address: Some(socket_address("0.0.0.0", port)),
            use_original_dst: Some(BoolValue { value: true }),
            listener_filters: vec![ListenerFilter {
                name: "envoy.filters.listener.original_dst".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(OriginalDst::default()))),
                ..Default::default()
            }],
            filter_chains: vec![tcp_proxy_chain(name, name, 3600, None)],
            traffic_direction: direction as i32,
            ..Default::default()
        };
        push(listeners, name, l, "", |_| {});
        let c = Cluster {
            name: name.to_string(),
            alt_stat_name: name.replace(':', "_"),
            connect_timeout: Some(Duration { seconds: 10, nanos: 0 }),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
            lb_policy: LbPolicy::ClusterProvided as i32,
            ..Default::default()
        };
        push(clusters, name, c, "", |_| {});
    }
}
