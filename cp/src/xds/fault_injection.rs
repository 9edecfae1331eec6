//! MeshFaultInjection on a sidecar's HTTP inbounds, as Kuma 2.14's plugin writes it
//! (`kumahq/kuma:pkg/plugins/policies/meshfaultinjection/plugin/xds`): each entry of the
//! selected `default.http` list is an `envoy.filters.http.fault` filter before the router,
//! in the policy's order: `abort` (status, percentage), `delay` (fixed, percentage) and
//! `responseBandwidth` (a response rate limit, percentage).
//!
//! The policies are selected and merged as [`super::inbound_policy`] says (targetRef
//! Mesh, MeshSubset or Dataplane; `from` entries for the mesh and `rules`). A `from` entry
//! for some callers only (MeshService, MeshSubset, MeshServiceSubset) gets its own faults,
//! matched on the `x-kuma-tags` header the callers' outbounds send (Kuma's tag regex), and
//! the mesh-wide faults then skip those callers, as Kuma's subset rules split them.
//! Outbounds send `x-kuma-tags` when the mesh has a MeshFaultInjection ([`tags_header`]).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, header_value_option::HeaderAppendAction};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    FaultDelay, FaultRateLimit, fault_delay, fault_rate_limit,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{FaultAbort, HttpFault, fault_abort};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
use envoy_types::pb::google::protobuf::Duration;
use envoy_types::util::pack_any;
use kuma_model::duration::parse_duration;
use serde_json::Value;

use crate::model::Resource;
use crate::model::specs::Inbound;

/// The fault filters of an HTTP inbound of the Dataplane `dp`, in the policy's order.
pub fn inbound_filters(policies: &[Resource], dp: &Resource, inbound: &Inbound) -> Vec<HttpFilter> {
    let mesh_wide = super::inbound_policy::merged(policies, dp, Some(inbound));
    let mesh_faults = mesh_wide.as_ref().and_then(|c| c.get("http")).and_then(Value::as_array);
    // Callers named by `from` entries, with the faults each gets (its entries' `http`,
    // later ones replacing earlier ones, else the mesh-wide faults).
    let mut callers: Vec<(BTreeMap<String, String>, Vec<Value>)> = vec![];
    for spec in super::inbound_policy::selecting(policies, dp, Some(inbound)) {
        for from in spec["from"].as_array().into_iter().flatten() {
            let Some(tags) = caller_tags(&from["targetRef"]) else { continue };
            let Some(http) = from["default"]["http"].as_array() else { continue };
            match callers.iter_mut().find(|(t, _)| *t == tags) {
                Some(c) => c.1 = http.clone(),
                None => callers.push((tags, http.clone())),
            }
        }
    }
    let mut out = vec![];
    for (tags, faults) in &callers {
        let only = vec![header(tags, false)];
        out.extend(faults.iter().filter_map(fault).map(|f| filter(HttpFault { headers: only.clone(), ..f })));
    }
    let others: Vec<HeaderMatcher> = callers.iter().map(|(tags, _)| header(tags, true)).collect();
    for f in mesh_faults.into_iter().flatten().filter_map(fault) {
        out.push(filter(HttpFault { headers: others.clone(), ..f }));
    }
    out
}

/// The caller tags a `from` targetRef names; `None` for the mesh (or an unknown kind).
fn caller_tags(t: &Value) -> Option<BTreeMap<String, String>> {
    let mut tags: BTreeMap<String, String> = t["tags"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    match t["kind"].as_str()? {
        "MeshService" | "MeshServiceSubset" => {
            tags.insert("kuma.io/service".into(), t["name"].as_str()?.to_string());
        }
        "MeshSubset" if !tags.is_empty() => {}
        _ => return None,
    }
    Some(tags)
}

/// Kuma's `MatchingRegex` on `x-kuma-tags` (`&key=value,…&` per tag): every tag's value
/// among the key's values (dots in values escaped).
fn header(tags: &BTreeMap<String, String>, invert: bool) -> HeaderMatcher {
    let re: String = tags
        .iter()
        .map(|(k, v)| {
            let value = if v == "*" { String::new() } else { format!("[^&]*{v}[,&]").replace('.', "\\.") };
            format!("&{k}={value}.*")
        })
        .collect();
    HeaderMatcher {
        name: TAGS_HEADER.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: format!(".*{re}"),
                ..Default::default()
            })),
            ..Default::default()
        })),
        invert_match: invert,
        ..Default::default()
    }
}

/// The header outbounds add when the mesh has a MeshFaultInjection: the proxy's tags as
/// Kuma serializes them, `&key=value1,value2&` per key.
pub fn tags_header(policies: &[Resource], own_tags: &BTreeMap<String, String>) -> Option<HeaderValueOption> {
    if policies.is_empty() {
        return None;
    }
    let value: String = own_tags.iter().map(|(k, v)| format!("&{k}={v}&")).collect();
    super::http::header_option(
        &serde_json::json!({"name": TAGS_HEADER, "value": value}),
        HeaderAppendAction::AppendIfExistsOrAdd,
    )
}

const TAGS_HEADER: &str = "x-kuma-tags";

fn filter(f: HttpFault) -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.fault".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(f))),
        ..Default::default()
    }
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
pub(crate) fn percentage(v: &Value) -> Option<FractionalPercent> {
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
    fn callers_are_matched_by_kumas_tag_regex() {
        let tags: BTreeMap<String, String> = [("kuma.io/service".to_string(), "web.v1".to_string())].into();
        let h = header(&tags, true);
        let Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)) = h.header_match_specifier else { panic!() };
        let Some(string_matcher::MatchPattern::SafeRegex(re)) = m.match_pattern else { panic!() };
        assert_eq!((re.regex.as_str(), h.invert_match), (r".*&kuma.io/service=[^&]*web\.v1[,&].*", true));
        let own: BTreeMap<String, String> =
            [("a".to_string(), "1,2".to_string()), ("b".to_string(), "3".to_string())].into();
        assert_eq!(tags_header(&[], &own), None, "no MeshFaultInjection, no header");
        let policy = Resource::from_json(&json!({"type": "MeshFaultInjection", "mesh": "m", "name": "fi",
            "spec": {"targetRef": {"kind": "Mesh"}}}))
        .unwrap();
        let h = tags_header(&[policy], &own).unwrap().header.unwrap();
        assert_eq!((h.key.as_str(), h.value.as_str()), ("x-kuma-tags", "&a=1,2&&b=3&"));
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
