//! The MeshMetric policy on a sidecar (Kuma's `meshmetric` plugin): its `default` (the
//! policies that target the whole mesh, merged by name order) reaches the proxy twice:
//! as the dynamic-config listener's `/meshmetric` body, which kuma-dp (and dp) read for
//! the applications to scrape and whether unused stats are left out, and as one
//! Prometheus listener per Prometheus backend, routed to the metrics socket. Other
//! targetRef kinds and OpenTelemetry backends are not generated (said in the debug log).

use serde_json::{Map, Value, json};

use super::prometheus::MetricsEndpoint;
use crate::model::Resource;

/// The merged `default` of the policies that select the whole mesh.
pub fn merged(policies: &[Resource]) -> Option<Map<String, Value>> {
    let mut out: Option<Map<String, Value>> = None;
    for spec in super::resilience::mesh_wide(policies) {
        if let Value::Object(d) = &spec["default"] {
            super::resilience::merge(out.get_or_insert_with(Map::new), d);
        }
    }
    out
}

/// The `/meshmetric` body (Kuma's `dpapi.MeshMetricDpConfig`).
pub fn body(conf: &Map<String, Value>) -> Vec<u8> {
    let applications: Vec<Value> = conf
        .get("applications")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|a| {
            json!({
                "name": a.get("name"),
                "path": a["path"].as_str().unwrap_or("/metrics/prometheus"),
                "port": a["port"].as_u64().unwrap_or(0),
                "address": a["address"].as_str().unwrap_or("127.0.0.1"),
            })
        })
        .collect();
    let backends: Vec<Value> = conf
        .get("backends")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|b| json!({"type": b["type"], "name": b["prometheus"]["clientId"]}))
        .collect();
    let mut metrics = json!({"applications": applications, "backends": backends, "extraLabels": {}});
    if let Some(sidecar) = conf.get("sidecar") {
        metrics["sidecar"] = sidecar.clone();
    }
    serde_json::to_vec(&json!({"observability": {"metrics": metrics}})).expect("JSON serializes")
}

/// Each Prometheus backend: its listener's name and endpoint (Kuma's defaults: port 5670,
/// path `/metrics`, client id `default`; plain text unless its TLS mode asks otherwise,
/// which is not generated).
pub fn prometheus_backends(conf: &Map<String, Value>) -> Vec<(String, MetricsEndpoint)> {
    let mut out = vec![];
    for b in conf.get("backends").and_then(Value::as_array).into_iter().flatten() {
        if b["type"].as_str() != Some("Prometheus") {
            tracing::debug!(kind = ?b["type"], "MeshMetric: only Prometheus backends are generated");
            continue;
        }
        let p = &b["prometheus"];
        let id = p["clientId"].as_str().filter(|c| !c.is_empty()).unwrap_or("default");
        let ep = MetricsEndpoint {
            port: p["port"].as_u64().and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0).unwrap_or(5670),
            path: p["path"].as_str().filter(|v| !v.is_empty()).unwrap_or("/metrics").to_string(),
            skip_mtls: true,
        };
        out.push((format!("_kuma:metrics:prometheus:{id}"), ep));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, spec: Value) -> Resource {
        Resource::from_json(&json!({"type": "MeshMetric", "mesh": "default", "name": name, "spec": spec})).unwrap()
    }

    #[test]
    fn mesh_policies_merge_into_the_dataplanes_config_and_its_listeners() {
        let conf = merged(&[
            policy(
                "b",
                json!({"targetRef": {"kind": "Mesh"}, "default": {"sidecar": {"includeUnused": true},
                "backends": [{"type": "Prometheus", "prometheus": {"port": 1234, "clientId": "main"}}]}}),
            ),
            policy("a", json!({"targetRef": {"kind": "Mesh"}, "default": {"applications": [{"port": 8888}]}})),
            policy("c", json!({"targetRef": {"kind": "MeshSubset"}, "default": {"applications": []}})),
        ])
        .unwrap();
        let body: Value = serde_json::from_slice(&body(&conf)).unwrap();
        assert_eq!(
            body,
            json!({"observability": {"metrics": {
                "applications": [{"name": null, "path": "/metrics/prometheus", "port": 8888, "address": "127.0.0.1"}],
                "backends": [{"type": "Prometheus", "name": "main"}],
                "sidecar": {"includeUnused": true}, "extraLabels": {}}}})
        );
        let eps = prometheus_backends(&conf);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].0, "_kuma:metrics:prometheus:main");
        assert_eq!((eps[0].1.port, eps[0].1.path.as_str()), (1234, "/metrics"));
    }
}
