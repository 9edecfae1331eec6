//! MeshTimeout's TCP timeouts on a sidecar, as Kuma 2.14's plugin writes them
//! (`kumahq/kuma:pkg/plugins/policies/meshtimeout/plugin/xds/configurer.go`): once a policy
//! reaches a listener, `idleTimeout` is its tcp_proxy's idle timeout (1h when unset) and
//! `connectionTimeout` its cluster's connect timeout (5s when unset); `0s` turns a timeout off.
//! * Outbounds: the `to` entries for the mesh, then for the outbound's MeshService.
//! * Inbounds: the `from` entries (targetRef Mesh) and `rules` of the policies that select
//!   the inbound ([`super::inbound_policy`]), on its listener and its application cluster.
//!
//! The `http` timeouts of HTTP services are [`super::http::HttpTimeouts`]'s.

use envoy_types::pb::google::protobuf::Duration;
use kuma_model::duration::parse_duration;
use serde_json::{Map, Value};

use crate::model::Resource;
use crate::model::specs::Inbound;

/// A listener's idle timeout and its cluster's connect timeout.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeouts {
    pub idle: Duration,
    pub connect: Duration,
}

fn duration(conf: &Map<String, Value>, key: &str, default_secs: i64) -> Duration {
    match conf.get(key).and_then(Value::as_str).and_then(|s| parse_duration(s).ok()) {
        Some(d) => Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 },
        None => Duration { seconds: default_secs, nanos: 0 },
    }
}

fn timeouts(conf: &Map<String, Value>) -> Timeouts {
    Timeouts { idle: duration(conf, "idleTimeout", 3600), connect: duration(conf, "connectionTimeout", 5) }
}

/// The timeouts of the outbound to `service`; `None` when no policy reaches it.
pub fn outbound(policies: &[Resource], service: &str) -> Option<Timeouts> {
    super::resilience::merged_conf(policies, service).map(|c| timeouts(&c))
}

/// The timeouts of an inbound of the Dataplane `dp`; `None` when no policy reaches it.
pub fn inbound(policies: &[Resource], dp: &Resource, inbound: &Inbound) -> Option<Timeouts> {
    super::inbound_policy::merged(policies, dp, Some(inbound)).map(|c| timeouts(&c))
}

/// A duration field that does not parse, as (field path, message); Kuma's decoder refuses
/// such a policy too.
pub fn check_duration(out: &mut Vec<(String, String)>, path: String, v: &Value) {
    match v.as_str().map(parse_duration) {
        Some(Ok(_)) => {}
        Some(Err(e)) => out.push((path, e)),
        None => out.push((path, "must be a duration such as 30s, 1m30s or 500ms".into())),
    }
}

/// The entries of a policy's `to`, `from` and `rules` lists with their field paths.
pub fn entries(spec: &Map<String, Value>) -> impl Iterator<Item = (String, &Value)> {
    ["to", "from", "rules"].into_iter().flat_map(move |key| {
        spec.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(move |(i, e)| (format!("spec.{key}[{i}]"), e))
    })
}

/// What is wrong with a MeshTimeout spec: its durations, as (field path, message).
pub fn problems(spec: &Map<String, Value>) -> Vec<(String, String)> {
    let mut out = vec![];
    for (at, entry) in entries(spec) {
        let d = &entry["default"];
        for key in ["connectionTimeout", "idleTimeout"] {
            if let Some(v) = d.get(key) {
                check_duration(&mut out, format!("{at}.default.{key}"), v);
            }
        }
        for (key, v) in d["http"].as_object().into_iter().flatten() {
            if key.ends_with("Timeout") || key.ends_with("Duration") {
                check_duration(&mut out, format!("{at}.default.http.{key}"), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: Value) -> Resource {
        Resource::from_json(&json!({"type": "MeshTimeout", "mesh": "m", "name": name, "spec": spec})).unwrap()
    }

    fn secs(seconds: i64) -> Duration {
        Duration { seconds, nanos: 0 }
    }

    #[test]
    fn kumas_defaults_fill_what_a_policy_leaves_unset() {
        let p = policy(
            "t",
            json!({"targetRef": {"kind": "Mesh"},
            "to": [{"targetRef": {"kind": "Mesh"}, "default": {"idleTimeout": "20s"}},
                   {"targetRef": {"kind": "MeshService", "name": "db"}, "default": {"connectionTimeout": "250ms", "idleTimeout": "0s"}}],
            "from": [{"targetRef": {"kind": "Mesh"}, "default": {"connectionTimeout": "2s"}}]}),
        );
        let ps = [p];
        assert_eq!(outbound(&ps, "web"), Some(Timeouts { idle: secs(20), connect: secs(5) }));
        assert_eq!(
            outbound(&ps, "db"),
            Some(Timeouts { idle: secs(0), connect: Duration { seconds: 0, nanos: 250_000_000 } })
        );
        let dp = Resource::from_json(&json!({"type": "Dataplane", "mesh": "m", "name": "web-1",
            "networking": {"address": "127.0.0.1", "inbound": [{"port": 1, "tags": {"kuma.io/service": "web"}}]}}))
        .unwrap();
        let spec: crate::model::specs::DataplaneSpec = dp.typed().unwrap();
        let inb = &spec.networking.unwrap().inbound[0];
        assert_eq!(inbound(&ps, &dp, inb), Some(Timeouts { idle: secs(3600), connect: secs(2) }));
        assert_eq!(inbound(&[], &dp, inb), None);
        assert_eq!(outbound(&[], "web"), None);
    }

    #[test]
    fn a_duration_that_does_not_parse_is_named() {
        let spec = json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"},
            "default": {"idleTimeout": "10", "connectionTimeout": "2s", "http": {"requestTimeout": 5}}}]});
        let fields: Vec<String> = problems(spec.as_object().unwrap()).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["spec.to[0].default.idleTimeout", "spec.to[0].default.http.requestTimeout"]);
    }
}
