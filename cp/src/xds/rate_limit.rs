//! MeshRateLimit's TCP limit on a sidecar's inbounds, as Kuma 2.14's plugin writes it
//! (`kumahq/kuma:pkg/plugins/policies/meshratelimit/plugin/xds/configurer.go`): with
//! `local.tcp.connectionRate {num, interval}` (and not `disabled`), a network
//! `local_ratelimit` filter first on every filter chain of the inbound, stats under
//! `tcp_rate_limit`, whose bucket holds `num` tokens refilled every `interval`. The
//! policies are selected and merged as [`super::inbound_policy`] says.
//!
//! On an HTTP inbound, `local.http.requestRate` is Envoy's HTTP `local_ratelimit`: an
//! empty filter before the router, and the bucket in the route's `typed_per_filter_config`
//! (stats under `rate_limit`, 100 % enabled and enforced), with `onRateLimit`'s status
//! (429 by default, Envoy's) and response headers.

use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::TokenBucket;
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use envoy_types::util::pack_any;
use kuma_model::duration::parse_duration;

use envoy_types::pb::envoy::config::core::v3::{RuntimeFractionalPercent, header_value_option::HeaderAppendAction};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as HttpLocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, HttpStatus};
use envoy_types::pb::google::protobuf::Any;
use serde_json::Value;

use crate::model::Resource;
use crate::model::specs::Inbound;

/// The connection-rate filter of an inbound of the Dataplane `dp`; `None` without a limit.
pub fn inbound_filter(policies: &[Resource], dp: &Resource, inbound: &Inbound) -> Option<Filter> {
    let conf = super::inbound_policy::merged(policies, dp, Some(inbound))?;
    let tcp = &conf.get("local")?["tcp"];
    if tcp["disabled"].as_bool() == Some(true) {
        return None;
    }
    let config = LocalRateLimit {
        stat_prefix: "tcp_rate_limit".into(),
        token_bucket: Some(bucket(&tcp["connectionRate"])?),
        ..Default::default()
    };
    Some(Filter {
        name: "envoy.filters.network.local_ratelimit".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(config))),
    })
}

fn bucket(rate: &Value) -> Option<TokenBucket> {
    let num = u32::try_from(rate["num"].as_u64()?).ok().filter(|n| *n > 0)?;
    let interval = parse_duration(rate["interval"].as_str()?).ok().filter(|d| !d.is_zero())?;
    Some(TokenBucket {
        max_tokens: num,
        tokens_per_fill: Some(UInt32Value { value: num }),
        fill_interval: Some(Duration { seconds: interval.as_secs() as i64, nanos: interval.subsec_nanos() as i32 }),
    })
}

/// The request-rate limit of an HTTP inbound: the filter for its connection manager, and
/// the bucket for its route; `None` without a limit.
pub fn inbound_http(policies: &[Resource], dp: &Resource, inbound: &Inbound) -> Option<(HttpFilter, Any)> {
    let conf = super::inbound_policy::merged(policies, dp, Some(inbound))?;
    let http = &conf.get("local")?["http"];
    if http["disabled"].as_bool() == Some(true) {
        return None;
    }
    let token_bucket = Some(bucket(&http["requestRate"])?);
    let on = &http["onRateLimit"];
    let header = super::http::header_option;
    let list = |k: &str| on["headers"][k].as_array().into_iter().flatten();
    let response_headers_to_add = list("add")
        .filter_map(|h| header(h, HeaderAppendAction::AppendIfExistsOrAdd))
        .chain(list("set").filter_map(|h| header(h, HeaderAppendAction::OverwriteIfExistsOrAdd)))
        .collect();
    let all = |key: &str| RuntimeFractionalPercent {
        default_value: Some(FractionalPercent { numerator: 100, denominator: 0 }),
        runtime_key: key.into(),
    };
    let per_route = HttpLocalRateLimit {
        stat_prefix: "rate_limit".into(),
        status: on["status"].as_u64().and_then(|c| i32::try_from(c).ok()).map(|code| HttpStatus { code }),
        token_bucket,
        filter_enabled: Some(all("local_rate_limit_enabled")),
        filter_enforced: Some(all("local_rate_limit_enforced")),
        response_headers_to_add,
        ..Default::default()
    };
    let filter = HttpFilter {
        name: "envoy.filters.http.local_ratelimit".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpLocalRateLimit {
            stat_prefix: "rate_limit".into(),
            ..Default::default()
        }))),
        ..Default::default()
    };
    Some((filter, pack_any(per_route)))
}

/// What is wrong with a MeshRateLimit spec: its rates, as (field path, message).
pub fn problems(spec: &serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    let mut out = vec![];
    for (at, entry) in super::timeout::entries(spec) {
        for (kind, rate) in [("tcp", "connectionRate"), ("http", "requestRate")] {
            let r = &entry["default"]["local"][kind][rate];
            if r.is_null() {
                continue;
            }
            let path = format!("{at}.default.local.{kind}.{rate}");
            if r["num"].as_u64().is_none_or(|n| u32::try_from(n).is_err()) {
                out.push((format!("{path}.num"), "must be a whole number of at most 4294967295".into()));
            }
            super::timeout::check_duration(&mut out, format!("{path}.interval"), &r["interval"]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_connection_rate_becomes_a_token_bucket() {
        let dp = Resource::from_json(&json!({"type": "Dataplane", "mesh": "m", "name": "web-1",
            "networking": {"address": "127.0.0.1", "inbound": [{"port": 1, "tags": {"kuma.io/service": "web"}}]}}))
        .unwrap();
        let spec: crate::model::specs::DataplaneSpec = dp.typed().unwrap();
        let inb = &spec.networking.unwrap().inbound[0];
        let policy = |tcp: serde_json::Value| {
            Resource::from_json(&json!({"type": "MeshRateLimit", "mesh": "m", "name": "rl", "spec": {
                "targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"local": {"tcp": tcp}}}]}}))
            .unwrap()
        };
        let f = inbound_filter(&[policy(json!({"connectionRate": {"num": 5, "interval": "10s"}}))], &dp, inb).unwrap();
        let Some(filter::ConfigType::TypedConfig(any)) = f.config_type else { panic!() };
        let rl: LocalRateLimit = prost::Message::decode(any.value.as_slice()).unwrap();
        let bucket = rl.token_bucket.unwrap();
        assert_eq!((bucket.max_tokens, bucket.tokens_per_fill.unwrap().value), (5, 5));
        assert_eq!(bucket.fill_interval.unwrap().seconds, 10);
        let off = json!({"disabled": true, "connectionRate": {"num": 5, "interval": "10s"}});
        assert!(inbound_filter(&[policy(off)], &dp, inb).is_none());
        assert!(inbound_filter(&[], &dp, inb).is_none());
        let bad = json!({"from": [{"targetRef": {"kind": "Mesh"}, "default": {"local": {"tcp":
            {"connectionRate": {"num": -1, "interval": "1 hour"}}}}}]});
        let fields: Vec<String> = problems(bad.as_object().unwrap()).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "spec.from[0].default.local.tcp.connectionRate.num",
                "spec.from[0].default.local.tcp.connectionRate.interval"
            ]
        );
    }
}
