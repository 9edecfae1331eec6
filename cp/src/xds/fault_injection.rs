//! MeshFaultInjection on a sidecar's HTTP inbounds, as Kuma 2.14's plugin writes it
//! (`kumahq/kuma:pkg/plugins/policies/meshfaultinjection/plugin/xds`): each entry of the
//! selected `default.http` list is an `envoy.filters.http.fault` filter before the router,
//! in the policy's order: `abort` (status, percentage), `delay` (fixed, percentage) and
//! `responseBandwidth` (a response rate limit, percentage).
//!
//! The policies are selected and merged as [`super::inbound_policy`] says (targetRef
//! Mesh, MeshSubset or Dataplane; `from` entries for the mesh and `rules`). `from` entries
//! for one MeshService need Kuma's `x-kuma-tags` header, which the outbounds here do not
//! send yet: they are left out rather than applied to every caller.

use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    FaultDelay, FaultRateLimit, fault_delay, fault_rate_limit,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
use envoy_types::pb::google::protobuf::Duration;
use envoy_types::util::pack_any;
use kuma_model::duration::parse_duration;
use serde_json::Value;

use crate::model::Resource;
use crate::model::specs::Inbound;

/// The fault filters of an HTTP inbound of the Dataplane `dp`, in the policy's order.
pub fn inbound_filters(policies: &[Resource], dp: &Resource, inbound: &Inbound) -> Vec<HttpFilter> {
    let Some(conf) = super::inbound_policy::merged(policies, dp, Some(inbound)) else { return vec![] };
    let faults = conf.get("http").and_then(Value::as_array).into_iter().flatten();
    faults
        .filter_map(fault)
        .map(|f| HttpFilter {
            name: "envoy.filters.http.fault".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(f))),
            ..Default::default()
        })
        .collect()
}

fn fault(entry: &Value) -> Option<HttpFault> {
    let mut f = HttpFault::default();
    let a = &entry["abort"];
    if let Some(status) = a["httpStatus"].as_u64().and_then(|s| u32::try_from(s).ok()) {
        f.abort = Some(FaultAbort {
            error_type: Some(fault_abort::ErrorType::HttpStatus(status)),
            percentage: percentage(&a["percentage"]),
            ..Default::default()
        });
    }
    let d = &entry["delay"];
    if let Some(value) = d["value"].as_str().and_then(|v| parse_duration(v).ok()) {
        let fixed = Duration { seconds: value.as_secs() as i64, nanos: value.subsec_nanos() as i32 };
        f.delay = Some(FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(fixed)),
            percentage: percentage(&d["percentage"]),
        });
    }
    let b = &entry["responseBandwidth"];
    if let Some(kbps) = b["limit"].as_str().and_then(kbps) {
        f.response_rate_limit = Some(FaultRateLimit {
            limit_type: Some(fault_rate_limit::LimitType::FixedLimit(fault_rate_limit::FixedLimit {
                limit_kbps: kbps,
            })),
            percentage: percentage(&b["percentage"]),
        });
    }
    (f.abort.is_some() || f.delay.is_some() || f.response_rate_limit.is_some()).then_some(f)
}

/// Kuma's `ConvertPercentage`: a whole percentage over a hundred, one with two decimals
/// over ten thousand, else over a million. The policy gives a number or a string.
fn percentage(v: &Value) -> Option<FractionalPercent> {
    let p = v.as_f64().or_else(|| v.as_str()?.parse().ok())?.clamp(0.0, 100.0);
    let (numerator, denominator) = if p.fract() == 0.0 {
        (p, DenominatorType::Hundred)
    } else if (p * 100.0).fract() == 0.0 {
        (p * 100.0, DenominatorType::TenThousand)
    } else {
        ((p * 10_000.0).round(), DenominatorType::Million)
    };
    Some(FractionalPercent { numerator: numerator as u32, denominator: denominator as i32 })
}

/// `10kbps`, `5Mbps`, `1Gbps` in kbit/s.
fn kbps(limit: &str) -> Option<u64> {
    let (n, unit) = limit.split_at(limit.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "kbps" => n,
        "Mbps" => n * 1000,
        "Gbps" => n * 1_000_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn percentages_and_bandwidths_as_kumas() {
        let p = |v: Value| percentage(&v).map(|p| (p.numerator, p.denominator));
        assert_eq!(p(json!(10)), Some((10, DenominatorType::Hundred as i32)));
        assert_eq!(p(json!("2.5")), Some((250, DenominatorType::TenThousand as i32)));
        assert_eq!(p(json!(0.125)), Some((1250, DenominatorType::Million as i32)));
        assert_eq!(kbps("5Mbps"), Some(5000));
        assert_eq!(kbps("5"), None);
    }

    #[test]
    fn each_http_entry_is_a_fault_filter() {
        let dp = Resource::from_json(&json!({"type": "Dataplane", "mesh": "m", "name": "web-1",
            "networking": {"address": "127.0.0.1", "inbound": [{"port": 1, "tags": {"kuma.io/service": "web"}}]}}))
        .unwrap();
        let spec: crate::model::specs::DataplaneSpec = dp.typed().unwrap();
        let inb = &spec.networking.unwrap().inbound[0];
        let policy = Resource::from_json(&json!({"type": "MeshFaultInjection", "mesh": "m", "name": "fi", "spec": {
            "targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"http": [
                {"abort": {"httpStatus": 418, "percentage": 50}},
                {"delay": {"value": "2s", "percentage": "12.5"}, "responseBandwidth": {"limit": "100kbps", "percentage": 100}}]}}]}}))
        .unwrap();
        let filters = inbound_filters(&[policy], &dp, inb);
        assert_eq!(filters.len(), 2);
        assert!(filters.iter().all(|f| f.name == "envoy.filters.http.fault"));
    }
}
