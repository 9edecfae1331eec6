//! HTTP sidecars, as Kuma 2.14 writes them for services tagged `kuma.io/protocol: http`,
//! `http2` or `grpc` (`kumahq/kuma:pkg/xds/generator/inbound_proxy_generator.go`, and the
//! MeshHTTPRoute, MeshTimeout and MeshRetry plugins for outbounds):
//! * an inbound's chains end in an `http_connection_manager` routing everything to the
//!   application cluster, which speaks HTTP/1.1 (`http`) or HTTP/2; the application learns
//!   its caller from `x-forwarded-client-cert` (`SANITIZE_SET` with the URI), and
//!   MeshTrafficPermission is the HTTP `rbac` filter;
//! * an outbound to a service all of whose endpoints speak HTTP gets a connection manager
//!   with an inline route table ([`super::http_route`]); the clusters between sidecars
//!   speak HTTP/2 over the mesh mTLS, whatever the application speaks.
//!
//! Timeouts: the route's `timeout` is MeshTimeout's `http.requestTimeout` (15s by default),
//! its `idle_timeout` `http.streamIdleTimeout` (30m); the connection manager's
//! `request_headers_timeout` is `http.requestHeadersTimeout`; the cluster's HTTP idle
//! timeout is `idleTimeout` (1h), with `http.maxStreamDuration` and
//! `http.maxConnectionDuration` (none by default). Retries: MeshRetry's `http` (or `grpc`) entry, for those protocols.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::accesslog::v3::AccessLog;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CommonOptions,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, header_matcher,
    retry_policy::RetryBackOff, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    ForwardClientCertDetails, RouteSpecifier, SetCurrentClientCertDetails,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use envoy_types::util::pack_any;
use kuma_model::duration::parse_duration;
use serde_json::{Map, Value};

pub const PROTOCOL_TAG: &str = "kuma.io/protocol";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    /// An inbound's or endpoint's `kuma.io/protocol` (unknown or none: TCP).
    pub fn of_tag(tag: Option<&str>) -> Protocol {
        match tag {
            Some("http") => Protocol::Http,
            Some("http2") => Protocol::Http2,
            Some("grpc") => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    }

    /// What a service's endpoints have in common (Kuma's `GetCommonProtocol`): one
    /// protocol, or gRPC with HTTP/2 giving HTTP/2; anything else, or no endpoint, TCP.
    pub fn common(mut all: impl Iterator<Item = Protocol>) -> Protocol {
        let Some(first) = all.next() else { return Protocol::Tcp };
        all.fold(first, |acc, p| match (acc, p) {
            (a, b) if a == b => a,
            (Protocol::Grpc, Protocol::Http2) | (Protocol::Http2, Protocol::Grpc) => Protocol::Http2,
            _ => Protocol::Tcp,
        })
    }

    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }
}

/// A MeshHTTPRoute or MeshRateLimit header entry (`{name, value}`) as Envoy's option.
pub fn header_option(h: &Value, action: HeaderAppendAction) -> Option<HeaderValueOption> {
    Some(HeaderValueOption {
        header: Some(HeaderValue {
            key: h["name"].as_str()?.to_string(),
            value: h["value"].as_str().unwrap_or_default().to_string(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    })
}

/// Kuma's `SanitizeMetric`: anything outside `[a-zA-Z0-9_-]` becomes `_`.
pub fn stat_name(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

pub fn secs(seconds: i64) -> Duration {
    Duration { seconds, nanos: 0 }
}

fn conf_duration(conf: Option<&Map<String, Value>>, key: &str, default: Duration) -> Duration {
    match conf.and_then(|c| c.get(key)).and_then(Value::as_str).and_then(|s| parse_duration(s).ok()) {
        Some(d) => Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 },
        None => default,
    }
}

/// The HTTP timeouts a MeshTimeout `default` gives (Kuma's defaults for unset fields).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpTimeouts {
    /// The route's `timeout`.
    pub request: Duration,
    /// The route's `idle_timeout`.
    pub stream_idle: Duration,
    /// The connection manager's `request_headers_timeout`.
    pub request_headers: Duration,
    /// The cluster's HTTP connection idle timeout, and its longest stream and connection.
    pub idle: Duration,
    pub max_stream: Duration,
    pub max_connection: Duration,
}

impl HttpTimeouts {
    pub fn of(conf: Option<&Map<String, Value>>) -> HttpTimeouts {
        let http = conf.and_then(|c| c.get("http")).and_then(Value::as_object);
        HttpTimeouts {
            request: conf_duration(http, "requestTimeout", secs(15)),
            stream_idle: conf_duration(http, "streamIdleTimeout", secs(1800)),
            request_headers: conf_duration(http, "requestHeadersTimeout", secs(0)),
            idle: conf_duration(conf, "idleTimeout", secs(3600)),
            max_stream: conf_duration(http, "maxStreamDuration", secs(0)),
            max_connection: conf_duration(http, "maxConnectionDuration", secs(0)),
        }
    }
}

/// The cluster's `typed_extension_protocol_options`: HTTP/2 or HTTP/1.1 upstream, and
/// (not for gRPC, as Kuma) MeshTimeout's connection timeouts.
pub fn protocol_options(http2: bool, timeouts: Option<&HttpTimeouts>) -> HashMap<String, Any> {
    let config = if http2 {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
    } else {
        ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
    };
    let options = HttpProtocolOptions {
        common_http_protocol_options: timeouts.map(|t| CommonOptions {
            idle_timeout: Some(t.idle),
            max_connection_duration: Some(t.max_connection),
            max_stream_duration: Some(t.max_stream),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(config),
        })),
        ..Default::default()
    };
    HashMap::from([(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(options))])
}

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
        ..Default::default()
    }
}

/// gRPC's statistics filter, which Kuma puts before the router of gRPC services.
fn grpc_stats() -> HttpFilter {
    let config = envoy_types::pb::envoy::extensions::filters::http::grpc_stats::v3::FilterConfig {
        emit_filter_state: true,
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.grpc_stats".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(config))),
        ..Default::default()
    }
}

fn hcm_filter(hcm: HttpConnectionManager) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
    }
}

/// The connection manager of an outbound to `service`, routing by `routes`; `tags` is
/// Kuma's `x-kuma-tags` header, sent on every request when the mesh has policies that
/// match callers by it.
pub fn outbound(
    service: &str,
    protocol: Protocol,
    routes: Vec<Route>,
    timeouts: &HttpTimeouts,
    tags: Option<HeaderValueOption>,
    access_log: Vec<AccessLog>,
) -> Filter {
    hcm_filter(HttpConnectionManager {
        stat_prefix: stat_name(service),
        normalize_path: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        common_http_protocol_options: Some(CommonOptions { idle_timeout: Some(secs(0)), ..Default::default() }),
        request_headers_timeout: Some(timeouts.request_headers),
        http_filters: (protocol == Protocol::Grpc).then(grpc_stats).into_iter().chain([router()]).collect(),
        access_log,
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: format!("outbound:{service}"),
            validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
            request_headers_to_add: tags.into_iter().collect(),
            virtual_hosts: vec![VirtualHost {
                name: service.to_string(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    })
}

/// What an inbound's connection manager needs.
pub struct Inbound<'a> {
    pub service: &'a str,
    /// The application cluster, `localhost:<port>`.
    pub cluster: &'a str,
    pub workload_port: u32,
    pub protocol: Protocol,
    pub timeouts: HttpTimeouts,
    pub access_log: Vec<AccessLog>,
    /// HTTP filters before the router (MeshFaultInjection's, MeshRateLimit's).
    pub filters: Vec<HttpFilter>,
    /// The route's `typed_per_filter_config` (MeshRateLimit's bucket).
    pub per_route: HashMap<String, Any>,
}

/// The connection manager of an inbound; `rbac` (MeshTrafficPermission's HTTP filter)
/// goes first, on the chain that terminates mesh mTLS.
pub fn inbound(i: &Inbound<'_>, rbac: Option<HttpFilter>) -> Filter {
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(i.cluster.to_string())),
            timeout: Some(i.timeouts.request),
            idle_timeout: Some(i.timeouts.stream_idle),
            ..Default::default()
        })),
        typed_per_filter_config: i.per_route.clone(),
        ..Default::default()
    };
    let grpc = (i.protocol == Protocol::Grpc).then(grpc_stats);
    let http_filters = rbac.into_iter().chain(grpc).chain(i.filters.iter().cloned()).chain([router()]).collect();
    hcm_filter(HttpConnectionManager {
        stat_prefix: format!("localhost_{}", i.workload_port),
        forward_client_cert_details: ForwardClientCertDetails::SanitizeSet as i32,
        set_current_client_cert_details: Some(SetCurrentClientCertDetails { uri: true, ..Default::default() }),
        stream_idle_timeout: Some(secs(3600)),
        common_http_protocol_options: Some(CommonOptions { idle_timeout: Some(secs(0)), ..Default::default() }),
        request_headers_timeout: Some(i.timeouts.request_headers),
        http_filters,
        access_log: i.access_log.clone(),
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: format!("inbound:{}", i.service),
            validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
            request_headers_to_remove: vec!["x-kuma-tags".into()],
            virtual_hosts: vec![VirtualHost {
                name: i.service.to_string(),
                domains: vec!["*".into()],
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    })
}

/// MeshRetry's retry policy for an outbound of `protocol` (`http` and `grpc` only, as
/// Kuma's `GetRouteRetryConfig`); `None` without a policy or with `numRetries: 0`.
pub fn retry_policy(conf: Option<&Map<String, Value>>, protocol: Protocol) -> Option<RetryPolicy> {
    let (key, default_on) = match protocol {
        Protocol::Http => ("http", "gateway-error,connect-failure,refused-stream"),
        Protocol::Grpc => {
            ("grpc", "cancelled,connect-failure,gateway-error,refused-stream,reset,resource-exhausted,unavailable")
        }
        _ => return None,
    };
    let c = conf?.get(key)?.as_object()?;
    let num = c.get("numRetries").and_then(Value::as_u64);
    if num == Some(0) {
        return None;
    }
    let mut p = RetryPolicy {
        retry_on: default_on.into(),
        num_retries: num.and_then(|n| u32::try_from(n).ok()).map(|value| UInt32Value { value }),
        ..Default::default()
    };
    if let Some(d) = c.get("perTryTimeout") {
        p.per_try_timeout = Some(conf_duration(Some(c), "perTryTimeout", secs(0))).filter(|_| d.is_string());
    }
    if let Some(b) = c.get("backOff").and_then(Value::as_object) {
        let base_default =
            if protocol == Protocol::Grpc { Some(Duration { seconds: 0, nanos: 25_000_000 }) } else { None };
        let get = |k: &str| b.get(k).and_then(Value::as_str).and_then(|s| parse_duration(s).ok());
        let dur = |d: std::time::Duration| Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 };
        let base = get("baseInterval").map(dur).or(base_default);
        if let Some(base) = base {
            p.retry_back_off =
                Some(RetryBackOff { base_interval: Some(base), max_interval: get("maxInterval").map(dur) });
        }
    }
    if let Some(on) = c.get("retryOn").and_then(Value::as_array) {
        let mut conditions = vec![];
        for v in on.iter().filter_map(Value::as_str) {
            if let Ok(code) = v.parse::<u32>() {
                p.retriable_status_codes.push(code);
                continue;
            }
            if let Some(method) = v.strip_prefix("HttpMethod") {
                p.retriable_request_headers.push(HeaderMatcher {
                    name: ":method".into(),
                    header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(method.to_string())),
                        ..Default::default()
                    })),
                    ..Default::default()
                });
                continue;
            }
            conditions.push(retry_condition(v));
        }
        if !p.retriable_status_codes.is_empty() {
            conditions.push("retriable-status-codes".into());
        }
        if !conditions.is_empty() {
            p.retry_on = conditions.join(",");
        }
    }
    Some(p)
}

/// Kuma's `retryOn` names as Envoy's conditions (`5XX` → `5xx`, `GatewayError` →
/// `gateway-error`, …).
fn retry_condition(v: &str) -> String {
    match v {
        "5XX" => "5xx".into(),
        "Retriable4xx" => "retriable-4xx".into(),
        "Canceled" => "canceled".into(),
        other => {
            // CamelCase to kebab-case.
            let mut out = String::new();
            for (i, c) in other.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push('-');
                }
                out.push(c.to_ascii_lowercase());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_services_protocol_is_what_its_endpoints_share() {
        use Protocol::*;
        assert_eq!(Protocol::common([Http, Http].into_iter()), Http);
        assert_eq!(Protocol::common([Grpc, Http2].into_iter()), Http2);
        assert_eq!(Protocol::common([Http, Http2].into_iter()), Tcp);
        assert_eq!(Protocol::common([].into_iter()), Tcp);
        assert_eq!(Protocol::of_tag(Some("kafka")), Tcp);
    }

    #[test]
    fn grpc_connection_managers_carry_grpc_stats_before_the_router() {
        use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
        let names = |f: Filter| {
            let Some(ConfigType::TypedConfig(any)) = f.config_type else { panic!() };
            let hcm: HttpConnectionManager = prost::Message::decode(any.value.as_slice()).unwrap();
            hcm.http_filters.into_iter().map(|f| f.name).collect::<Vec<_>>()
        };
        let t = HttpTimeouts::of(None);
        let grpc = names(outbound("svc", Protocol::Grpc, vec![], &t, None, vec![]));
        assert_eq!(grpc, ["envoy.filters.http.grpc_stats", "envoy.filters.http.router"]);
        assert_eq!(names(outbound("svc", Protocol::Http, vec![], &t, None, vec![])), ["envoy.filters.http.router"]);
    }

    #[test]
    fn meshretry_becomes_envoys_retry_policy() {
        let conf = json!({"http": {"numRetries": 3, "perTryTimeout": "2s", "backOff": {"baseInterval": "10ms", "maxInterval": "1s"},
                                   "retryOn": ["5XX", "GatewayError", "503", "HttpMethodGET"]}});
        let p = retry_policy(conf.as_object(), Protocol::Http).unwrap();
        assert_eq!(p.retry_on, "5xx,gateway-error,retriable-status-codes");
        assert_eq!(p.num_retries.unwrap().value, 3);
        assert_eq!(p.per_try_timeout, Some(secs(2)));
        assert_eq!(p.retriable_status_codes, [503]);
        assert_eq!(p.retriable_request_headers[0].name, ":method");
        assert_eq!(p.retry_back_off.unwrap().base_interval, Some(Duration { seconds: 0, nanos: 10_000_000 }));
        let defaults = retry_policy(json!({"http": {"numRetries": 5}}).as_object(), Protocol::Http).unwrap();
        assert_eq!(defaults.retry_on, "gateway-error,connect-failure,refused-stream");
        assert_eq!(retry_policy(conf.as_object(), Protocol::Http2), None, "Kuma retries no http2 service");
        assert_eq!(retry_policy(json!({"http": {"numRetries": 0}}).as_object(), Protocol::Http), None);
    }
}
