//! Resilience policies on a sidecar's outbounds, as Kuma 2.14's plugins write them:
//! * MeshCircuitBreaker: `connectionLimits` as the cluster's default-priority thresholds,
//!   `outlierDetection` as Envoy's, detectors without a `consecutive` not enforced, and
//!   `healthyPanicThreshold` as the cluster's panic threshold;
//! * MeshRetry: `tcp.maxConnectAttempt` as the outbound tcp_proxy's
//!   `max_connect_attempts` (HTTP services' retry policies: [`super::http::retry_policy`]);
//! * MeshHealthCheck: an active check of the service's protocol, as Kuma picks it: TCP
//!   (connect, or `send`/`receive` payloads), HTTP (`path`, `expectedStatuses`, headers)
//!   or gRPC (the health service), with Kuma's defaults (interval 1m, timeout 15s,
//!   5 failures down, 1 success up).
//!
//! Policies that apply to the whole mesh (`targetRef.kind: Mesh`) are read; their `to`
//! entries for the mesh and then for the outbound's service are merged in that order,
//! later fields winning, as Kuma orders targetRefs by specificity. Other top-level
//! targetRefs are not matched yet (said once per policy in the log).

use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, OutlierDetection, circuit_breakers};
use envoy_types::pb::envoy::config::core::v3::RoutingPriority;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use kuma_model::duration::parse_duration;
use serde_json::{Map, Value};

use std::collections::BTreeMap;

use crate::model::Resource;

/// The merged `default` of every `to` entry of these policies (one kind) that selects
/// `service`.
pub fn merged_conf(policies: &[Resource], service: &str) -> Option<Map<String, Value>> {
    let mut mesh_level = vec![];
    let mut service_level = vec![];
    let specs = mesh_wide(policies);
    for spec in &specs {
        for to in spec["to"].as_array().into_iter().flatten() {
            let t = &to["targetRef"];
            match t["kind"].as_str() {
                Some("Mesh") => mesh_level.push(&to["default"]),
                Some("MeshService") if t["name"].as_str() == Some(service) => service_level.push(&to["default"]),
                _ => {}
            }
        }
    }
    let mut out: Option<Map<String, Value>> = None;
    for d in mesh_level.into_iter().chain(service_level) {
        if let Value::Object(d) = d {
            merge(out.get_or_insert_with(Map::new), d);
        }
    }
    out
}

/// The specs of the policies (one kind) that target the whole mesh, by name, as Kuma
/// orders policies of equal specificity; the others are said in the debug log.
pub(crate) fn mesh_wide(policies: &[Resource]) -> Vec<Value> {
    let mut sorted: Vec<(&Resource, Value)> =
        policies.iter().filter_map(|r| Some((r, r.typed::<Value>().ok()?))).collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    sorted
        .into_iter()
        .filter(|(r, spec)| match spec["targetRef"]["kind"].as_str() {
            None | Some("Mesh") => true,
            Some(other) => {
                tracing::debug!(policy = %r.name, kind = %r.rtype.name(), target = other, "only targetRef.kind Mesh is matched");
                false
            }
        })
        .map(|(_, spec)| spec)
        .collect()
}

/// Deep merge: objects field by field, anything else replaced.
pub(crate) fn merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Applies the merged conf to an outbound cluster.
pub fn apply(cluster: &mut Cluster, conf: &Map<String, Value>) {
    let u32_of = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).map(|value| UInt32Value { value });
    if let Some(limits) = conf.get("connectionLimits") {
        let t = circuit_breakers::Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: u32_of(&limits["maxConnections"]),
            max_pending_requests: u32_of(&limits["maxPendingRequests"]),
            max_requests: u32_of(&limits["maxRequests"]),
            max_retries: u32_of(&limits["maxRetries"]),
            max_connection_pools: u32_of(&limits["maxConnectionPools"]),
            ..Default::default()
        };
        cluster.circuit_breakers = Some(CircuitBreakers { thresholds: vec![t], ..Default::default() });
    }
    let Some(od) = conf.get("outlierDetection") else { return };
    if od["disabled"].as_bool() == Some(true) {
        return;
    }
    let duration = |v: &Value| {
        let d = parse_duration(v.as_str()?).ok()?;
        Some(Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 })
    };
    let det = &od["detectors"];
    // A detector without `consecutive` is not enforced (Kuma sets enforcing to 0).
    let consecutive = |name: &str| u32_of(&det[name]["consecutive"]);
    let enforcing = |on: bool| Some(UInt32Value { value: if on { 100 } else { 0 } });
    let total = consecutive("totalFailures");
    let gateway = consecutive("gatewayFailures");
    let local = consecutive("localOriginFailures");
    cluster.outlier_detection = Some(OutlierDetection {
        interval: duration(&od["interval"]),
        base_ejection_time: duration(&od["baseEjectionTime"]),
        max_ejection_percent: u32_of(&od["maxEjectionPercent"]),
        split_external_local_origin_errors: od["splitExternalAndLocalErrors"].as_bool().unwrap_or(false),
        enforcing_consecutive_5xx: enforcing(total.is_some()),
        consecutive_5xx: total,
        enforcing_consecutive_gateway_failure: enforcing(gateway.is_some()),
        consecutive_gateway_failure: gateway,
        enforcing_consecutive_local_origin_failure: enforcing(local.is_some()),
        consecutive_local_origin_failure: local,
        enforcing_success_rate: enforcing(det.get("successRate").is_some()),
        enforcing_local_origin_success_rate: enforcing(det.get("successRate").is_some()),
        enforcing_failure_percentage: enforcing(det.get("failurePercentage").is_some()),
        enforcing_failure_percentage_local_origin: enforcing(det.get("failurePercentage").is_some()),
        ..Default::default()
    });
    let panic = match &od["healthyPanicThreshold"] {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim_end_matches('%').parse().ok(),
        _ => None,
    };
    if let Some(value) = panic {
        cluster.common_lb_config.get_or_insert_with(Default::default).healthy_panic_threshold = Some(Percent { value });
    }
}

/// MeshRetry's TCP connect attempts, when set.
pub fn connect_attempts(conf: &Map<String, Value>) -> Option<u32> {
    conf.get("tcp")?.get("maxConnectAttempt")?.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0)
}

/// MeshLoadBalancingStrategy's `loadBalancer` as the cluster's policy, as Kuma's plugin
/// writes it: RoundRobin, LeastRequest (`choiceCount`), Random, RingHash (`hashFunction`,
/// `minRingSize`, `maxRingSize`) and Maglev (`tableSize`). Hash policies go on HTTP
/// routes, which these TCP outbounds do not have: a hashing cluster picks at random here.
pub fn apply_load_balancer(cluster: &mut Cluster, conf: &Map<String, Value>) {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        LbConfig, LbPolicy, LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig, ring_hash_lb_config::HashFunction,
    };
    use envoy_types::pb::google::protobuf::UInt64Value;
    let lb = conf.get("loadBalancer").cloned().unwrap_or(Value::Null);
    let u64_of = |v: &Value| v.as_u64().map(|value| UInt64Value { value });
    let (policy, config) = match lb["type"].as_str() {
        Some("RoundRobin") => (LbPolicy::RoundRobin, None),
        Some("LeastRequest") => {
            let choice = lb["leastRequest"]["choiceCount"].as_u64().and_then(|n| u32::try_from(n).ok());
            let cfg = choice.map(|value| {
                LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                    choice_count: Some(UInt32Value { value }),
                    ..Default::default()
                })
            });
            (LbPolicy::LeastRequest, cfg)
        }
        Some("Random") => (LbPolicy::Random, None),
        Some("RingHash") => {
            let r = &lb["ringHash"];
            let murmur = r["hashFunction"].as_str() == Some("MurmurHash2");
            let cfg = RingHashLbConfig {
                minimum_ring_size: u64_of(&r["minRingSize"]),
                maximum_ring_size: u64_of(&r["maxRingSize"]),
                hash_function: if murmur { HashFunction::MurmurHash2 } else { HashFunction::XxHash } as i32,
            };
            (LbPolicy::RingHash, Some(LbConfig::RingHashLbConfig(cfg)))
        }
        Some("Maglev") => {
            let cfg = MaglevLbConfig { table_size: u64_of(&lb["maglev"]["tableSize"]) };
            (LbPolicy::Maglev, Some(LbConfig::MaglevLbConfig(cfg)))
        }
        _ => return,
    };
    cluster.lb_policy = policy as i32;
    cluster.lb_config = config;
}

/// MeshHealthCheck as the cluster's active health check (TCP).
pub fn apply_health_check(
    cluster: &mut Cluster,
    conf: &Map<String, Value>,
    protocol: super::http::Protocol,
    source_tags: &BTreeMap<String, String>,
) {
    use super::http::Protocol;
    use envoy_types::pb::envoy::config::core::v3::{HealthCheck, health_check};
    let conf_of = |key: &str| conf.get(key).filter(|v| v.is_object());
    let disabled = |v: &Value| v["disabled"].as_bool() == Some(true);
    // Kuma's `selectHealthCheckType`: the check of the service's protocol; TCP for an HTTP
    // or gRPC service only when its own check is there but disabled.
    let (http, grpc, tcp) = (conf_of("http"), conf_of("grpc"), conf_of("tcp"));
    let tcp_on = tcp.is_some_and(|t| !disabled(t));
    let checker = match protocol {
        Protocol::Http | Protocol::Http2 => match http {
            Some(h) if !disabled(h) => {
                health_check::HealthChecker::HttpHealthCheck(http_check(h, protocol, source_tags))
            }
            Some(_) if tcp_on => tcp_check(tcp.unwrap_or(&Value::Null)),
            _ => return,
        },
        Protocol::Grpc => match grpc {
            Some(g) if !disabled(g) => health_check::HealthChecker::GrpcHealthCheck(health_check::GrpcHealthCheck {
                service_name: g["serviceName"].as_str().unwrap_or_default().into(),
                authority: g["authority"].as_str().unwrap_or_default().into(),
                ..Default::default()
            }),
            Some(_) if tcp_on => tcp_check(tcp.unwrap_or(&Value::Null)),
            _ => return,
        },
        Protocol::Tcp if tcp_on => tcp_check(tcp.unwrap_or(&Value::Null)),
        Protocol::Tcp => return,
    };
    let duration = |key: &str, dflt: u64| {
        let d = conf.get(key).and_then(Value::as_str).and_then(|s| parse_duration(s).ok());
        let d = d.unwrap_or(std::time::Duration::from_secs(dflt));
        Some(Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 })
    };
    let threshold = |key: &str, dflt: u32| {
        let v = conf.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).unwrap_or(dflt);
        Some(UInt32Value { value: v })
    };
    cluster.health_checks = vec![HealthCheck {
        interval: duration("interval", 60),
        timeout: duration("timeout", 15),
        unhealthy_threshold: threshold("unhealthyThreshold", 5),
        healthy_threshold: threshold("healthyThreshold", 1),
        health_checker: Some(checker),
        ..Default::default()
    }];
}

/// MeshHealthCheck's `tcp`: connect, or send and expect payloads (Kuma sends them as hex).
fn tcp_check(tcp: &Value) -> envoy_types::pb::envoy::config::core::v3::health_check::HealthChecker {
    use envoy_types::pb::envoy::config::core::v3::health_check;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let payload = |text: String| health_check::Payload { payload: Some(health_check::payload::Payload::Text(text)) };
    health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck {
        send: tcp["send"].as_str().map(|s| payload(hex(s))),
        receive: tcp["receive"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|r| payload(hex(r)))
            .collect(),
        ..Default::default()
    })
}

/// MeshHealthCheck's `http`: `path` (`/`), `expectedStatuses` (any 2xx when unset, as
/// Envoy), `requestHeadersToAdd`, Kuma's `x-kuma-tags` with the checking proxy's tags, and
/// HTTP/2 for `http2` services.
fn http_check(
    h: &Value,
    protocol: super::http::Protocol,
    source_tags: &BTreeMap<String, String>,
) -> envoy_types::pb::envoy::config::core::v3::health_check::HttpHealthCheck {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    use envoy_types::pb::envoy::r#type::v3::{CodecClientType, Int64Range};
    let mut headers = vec![];
    if !source_tags.is_empty() {
        let tags: String = source_tags.iter().map(|(k, v)| format!("&{k}={v}&")).collect();
        headers.extend(super::http::header_option(
            &serde_json::json!({"name": "x-kuma-tags", "value": tags}),
            HeaderAppendAction::AppendIfExistsOrAdd,
        ));
    }
    let modifier = &h["requestHeadersToAdd"];
    for (list, action) in
        [("add", HeaderAppendAction::AppendIfExistsOrAdd), ("set", HeaderAppendAction::OverwriteIfExistsOrAdd)]
    {
        for entry in modifier[list].as_array().into_iter().flatten() {
            // A comma-separated value is one header per value, as Kuma writes it.
            for value in entry["value"].as_str().unwrap_or_default().split(',') {
                let one = serde_json::json!({"name": entry["name"], "value": value});
                headers.extend(super::http::header_option(&one, action));
            }
        }
    }
    envoy_types::pb::envoy::config::core::v3::health_check::HttpHealthCheck {
        path: h["path"].as_str().unwrap_or("/").into(),
        expected_statuses: h["expectedStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64)
            .map(|s| Int64Range { start: s, end: s + 1 })
            .collect(),
        request_headers_to_add: headers,
        codec_client_type: if protocol == super::http::Protocol::Http2 {
            CodecClientType::Http2 as i32
        } else {
            CodecClientType::Http1 as i32
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourceType;
    use serde_json::json;

    fn policy(name: &str, spec: Value) -> Resource {
        let mut r = Resource::new(ResourceType::MeshCircuitBreaker, "default", name);
        r.spec = spec.as_object().unwrap().clone();
        r
    }

    #[test]
    fn mesh_then_service_entries_merge_and_map_to_envoy() {
        let p = [
            policy(
                "all",
                json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}, "default": {
                "connectionLimits": {"maxConnections": 1024, "maxRequests": 1024},
                "outlierDetection": {"interval": "5s", "baseEjectionTime": "30s",
                    "detectors": {"totalFailures": {"consecutive": 10}}}}}]}),
            ),
            policy(
                "echo",
                json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "MeshService", "name": "echo"},
                "default": {"outlierDetection": {"maxEjectionPercent": 100, "healthyPanicThreshold": 0,
                    "detectors": {"totalFailures": {"consecutive": 3}}}}}]}),
            ),
        ];
        let conf = merged_conf(&p, "echo").unwrap();
        let mut c = Cluster::default();
        apply(&mut c, &conf);
        let od = c.outlier_detection.unwrap();
        assert_eq!(od.consecutive_5xx.unwrap().value, 3, "the service entry wins");
        assert_eq!(od.interval.unwrap().seconds, 5, "the mesh entry's interval stays");
        assert_eq!(od.max_ejection_percent.unwrap().value, 100);
        assert_eq!(od.enforcing_consecutive_gateway_failure.unwrap().value, 0);
        assert_eq!(c.circuit_breakers.unwrap().thresholds[0].max_connections.unwrap().value, 1024);
        assert_eq!(c.common_lb_config.unwrap().healthy_panic_threshold.unwrap().value, 0.0);
        let other = merged_conf(&p, "web").unwrap();
        assert_eq!(other["outlierDetection"]["detectors"]["totalFailures"]["consecutive"], 10);
        assert!(merged_conf(&[], "echo").is_none());
    }

    #[test]
    fn load_balancers_map_to_envoy() {
        use envoy_types::pb::envoy::config::cluster::v3::cluster::{LbConfig, LbPolicy};
        let conf = |lb: Value| json!({"loadBalancer": lb}).as_object().unwrap().clone();
        let mut c = Cluster::default();
        apply_load_balancer(
            &mut c,
            &conf(
                json!({"type": "RingHash", "ringHash": {"hashFunction": "MurmurHash2", "minRingSize": 100, "maxRingSize": 1000}}),
            ),
        );
        assert_eq!(c.lb_policy, LbPolicy::RingHash as i32);
        let Some(LbConfig::RingHashLbConfig(r)) = &c.lb_config else { panic!("{c:?}") };
        assert_eq!(
            (r.minimum_ring_size.unwrap().value, r.maximum_ring_size.unwrap().value, r.hash_function),
            (100, 1000, 1)
        );
        apply_load_balancer(&mut c, &conf(json!({"type": "Maglev", "maglev": {"tableSize": 251}})));
        assert_eq!(c.lb_policy, LbPolicy::Maglev as i32);
        assert!(matches!(&c.lb_config, Some(LbConfig::MaglevLbConfig(m)) if m.table_size.unwrap().value == 251));
        apply_load_balancer(&mut c, &conf(json!({"type": "Random"})));
        assert_eq!((c.lb_policy, c.lb_config.is_none()), (LbPolicy::Random as i32, true));
    }

    #[test]
    fn retries_and_health_checks_map_to_envoy() {
        let retry = [policy(
            "r",
            json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"},
                "default": {"tcp": {"maxConnectAttempt": 3}}}]}),
        )];
        assert_eq!(connect_attempts(&merged_conf(&retry, "echo").unwrap()), Some(3));
        let hc = [policy(
            "hc",
            json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"},
                "default": {"interval": "2s", "unhealthyThreshold": 2, "tcp": {"send": "ping", "receive": ["pong"]}}}]}),
        )];
        let mut c = Cluster::default();
        apply_health_check(
            &mut c,
            &merged_conf(&hc, "echo").unwrap(),
            super::super::http::Protocol::Tcp,
            &BTreeMap::new(),
        );
        let h = &c.health_checks[0];
        assert_eq!((h.interval.unwrap().seconds, h.timeout.unwrap().seconds), (2, 15));
        assert_eq!((h.unhealthy_threshold.unwrap().value, h.healthy_threshold.unwrap().value), (2, 1));
        let Some(envoy_types::pb::envoy::config::core::v3::health_check::HealthChecker::TcpHealthCheck(t)) =
            &h.health_checker
        else {
            panic!("a TCP check")
        };
        let text = |p: &Option<envoy_types::pb::envoy::config::core::v3::health_check::Payload>| match p
            .as_ref()
            .and_then(|p| p.payload.clone())
        {
            Some(envoy_types::pb::envoy::config::core::v3::health_check::payload::Payload::Text(t)) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(text(&t.send), "70696e67", "hex of ping");
        assert_eq!(text(&t.receive.first().cloned()), "706f6e67");
    }
}
