//! Kuma's dynamic-config listener (`pkg/xds/dynconf`): an HTTP listener on the pipe
//! `<workdir>/kuma-mesh-metric-config.sock` whose routes answer fixed bodies, polled by
//! kuma-dp with `If-None-Match` (304 when unchanged). `dp` reads the bodies straight from
//! the resource. Today it carries the embedded DNS proxy's records (`/dns`).

use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, HeaderValue, HeaderValueOption, Pipe, address, data_source,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, Route, RouteConfiguration, RouteMatch, VirtualHost, header_matcher, route,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use serde::Serialize;
use std::collections::BTreeMap;

/// Listener name with Kuma 2.14's legacy naming (`dynconf.ListenerName`).
pub const LISTENER: &str = "_kuma:dynamicconfig";
/// The node-metadata feature of a proxy that runs the embedded DNS proxy.
pub use kuma_model::proxy::features::EMBEDDED_DNS as FEATURE_EMBEDDED_DNS;
const SOCKET: &str = "kuma-mesh-metric-config.sock";

/// The `/dns` body (Kuma's `dpapi.DNSProxyConfig`): records sorted by name, TTL 30 s.
#[derive(Serialize)]
struct DnsProxyConfig<'a> {
    records: Vec<DnsRecord<'a>>,
    ttl: u32,
}

#[derive(Serialize)]
struct DnsRecord<'a> {
    name: &'a str,
    ips: &'a [String],
}

pub fn dns_body(records: &BTreeMap<String, Vec<String>>) -> Vec<u8> {
    let records = records.iter().map(|(name, ips)| DnsRecord { name, ips }).collect();
    serde_json::to_vec(&DnsProxyConfig { records, ttl: 30 }).expect("DNS records serialize")
}

/// Envoy's router, the last (here the only) HTTP filter of a connection manager.
pub(crate) fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
            value: vec![],
        })),
        ..Default::default()
    }
}

/// The listener answering `GET <path>` with each body (`name` is the config's name).
pub fn listener(workdir: &str, configs: &[(&str, &str, Vec<u8>)]) -> Listener {
    let mut routes = vec![];
    let mut max_body = 0;
    for (name, path, body) in configs {
        let etag: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let path_match = |headers| RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Path(path.to_string())),
            headers,
            ..Default::default()
        };
        routes.push(Route {
            r#match: Some(path_match(vec![HeaderMatcher {
                name: "If-None-Match".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(etag.clone())),
                    ..Default::default()
                })),
                ..Default::default()
            }])),
            action: Some(route::Action::DirectResponse(DirectResponseAction { status: 304, ..Default::default() })),
            ..Default::default()
        });
        routes.push(Route {
            name: format!("{LISTENER}:{name}"),
            r#match: Some(path_match(vec![])),
            response_headers_to_add: vec![HeaderValueOption {
                header: Some(HeaderValue { key: "Etag".into(), value: etag, ..Default::default() }),
                ..Default::default()
            }],
            action: Some(route::Action::DirectResponse(DirectResponseAction {
                status: 200,
                body: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(String::from_utf8_lossy(body).into_owned())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        });
        max_body = max_body.max(body.len());
    }
    let hcm = HttpConnectionManager {
        stat_prefix: LISTENER.replace(':', "_"),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        http_filters: vec![router_filter()],
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
            virtual_hosts: vec![VirtualHost {
                name: LISTENER.into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            max_direct_response_body_size_bytes: Some(UInt32Value { value: max_body as u32 }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let path =
        if workdir.is_empty() { SOCKET.to_string() } else { format!("{}/{SOCKET}", workdir.trim_end_matches('/')) };
    Listener {
        name: LISTENER.into(),
        address: Some(Address { address: Some(address::Address::Pipe(Pipe { path, mode: 0 })) }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn dns_records_become_a_200_route_with_an_etag_and_a_304_for_it() {
        let records = BTreeMap::from([
            ("b.mesh".to_string(), vec!["240.0.0.2".to_string()]),
            ("a.mesh".to_string(), vec!["240.0.0.1".to_string(), "::ffff:f000:1".to_string()]),
        ]);
        let body = dns_body(&records);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"records":[{"name":"a.mesh","ips":["240.0.0.1","::ffff:f000:1"]},{"name":"b.mesh","ips":["240.0.0.2"]}],"ttl":30}"#
        );
        let l = listener("/work/dir/", &[("dns", "/dns", body.clone())]);
        assert_eq!(l.name, "_kuma:dynamicconfig");
        let Some(address::Address::Pipe(p)) = l.address.and_then(|a| a.address) else { panic!("not a pipe") };
        assert_eq!(p.path, "/work/dir/kuma-mesh-metric-config.sock");
        let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else { panic!() };
        assert_eq!(rc.max_direct_response_body_size_bytes.map(|v| v.value), Some(body.len() as u32));
        let [not_modified, ok] = rc.virtual_hosts[0].routes.as_slice() else { panic!("two routes") };
        let etag = &ok.response_headers_to_add[0].header.as_ref().unwrap().value;
        assert_eq!(etag.len(), 64);
        let m = not_modified.r#match.as_ref().unwrap();
        let Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) = &m.headers[0].header_match_specifier else {
            panic!()
        };
        assert_eq!(sm.match_pattern, Some(string_matcher::MatchPattern::Exact(etag.clone())));
        let Some(route::Action::DirectResponse(dr)) = &ok.action else { panic!() };
        assert_eq!(dr.status, 200);
        assert_eq!(
            dr.body.as_ref().and_then(|b| b.specifier.clone()),
            Some(data_source::Specifier::InlineString(String::from_utf8(body).unwrap()))
        );
    }
}
