//! Envoy resources as JSON, for tests that write dp's `--xds-file`.

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `{socketAddress}` of `addr`.
pub fn socket(addr: SocketAddr) -> Value {
    json!({"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}})
}

/// A STATIC cluster over `endpoints`, with `extra` fields merged in.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr], extra: Value) -> Value {
    let eps: Vec<Value> = endpoints.iter().map(|a| json!({"endpoint": {"address": socket(*a)}})).collect();
    merged(
        json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name, "type": "STATIC", "connectTimeout": "1s",
            "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": eps}]}
        }),
        extra,
    )
}

/// A filter chain for these server names whose filters are `before` then a tcp_proxy to
/// `cluster`.
pub fn sni_chain(names: &[&str], before: Vec<Value>, cluster: &str) -> Value {
    let mut filters = before;
    filters.push(json!({"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "cluster": cluster, "statPrefix": cluster}}));
    json!({"filterChainMatch": {"serverNames": names, "transportProtocol": "tls"}, "filters": filters})
}

/// A listener on an ephemeral loopback port with the TLS inspector and `chains`.
pub fn tls_listener(name: &str, chains: Vec<Value>, extra: Value) -> Value {
    merged(
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": name,
            "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
            "listenerFilters": [{"name": "envoy.filters.listener.tls_inspector", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
            "filterChains": chains
        }),
        extra,
    )
}

/// Writes `resources` as an xDS file in a fresh directory; returns its path.
pub fn write_file(resources: Vec<Value>) -> PathBuf {
    let file = crate::temp_dir("xds").join("xds.json");
    let doc = json!({"version_info": "1", "resources": resources});
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    file
}

fn merged(mut base: Value, extra: Value) -> Value {
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}
