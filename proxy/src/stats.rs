//! Counters and gauges, named as Envoy names them so existing dashboards keep working.
//!
//! Stats live in a registry keyed by listener address, cluster name and tcp_proxy stat
//! prefix, so they survive configuration reloads; the snapshot holds `Arc`s to them and
//! the hot path only does relaxed atomic adds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! stat_struct {
    ($name:ident { $($field:ident : $kind:literal),* $(,)? }) => {
        #[derive(Debug, Default)]
        pub struct $name { $(pub $field: Counter,)* }
        impl $name {
            const FIELDS: &[(&str, &str)] = &[$((stringify!($field), $kind)),*];
            fn values(&self) -> Vec<u64> {
                vec![$(self.$field.get()),*]
            }
        }
    };
}

stat_struct!(ListenerStats {
    downstream_cx_total: "counter",
    downstream_cx_active: "gauge",
    downstream_cx_destroy: "counter",
    no_filter_chain_match: "counter",
    downstream_listener_filter_error: "counter",
    downstream_pre_cx_timeout: "counter",
});

stat_struct!(ClusterStats {
    upstream_cx_total: "counter",
    upstream_cx_active: "gauge",
    upstream_cx_connect_fail: "counter",
    upstream_cx_connect_timeout: "counter",
    upstream_cx_overflow: "counter",
    upstream_cx_none_healthy: "counter",
    upstream_cx_tx_bytes_total: "counter",
    upstream_cx_rx_bytes_total: "counter",
    upstream_cx_destroy: "counter",
    health_check_attempt: "counter",
    health_check_success: "counter",
    health_check_failure: "counter",
});

stat_struct!(TcpStats {
    downstream_cx_total: "counter",
    downstream_cx_no_route: "counter",
    downstream_cx_tx_bytes_total: "counter",
    downstream_cx_rx_bytes_total: "counter",
    idle_timeout: "counter",
    upstream_flush_active: "gauge",
});

stat_struct!(RbacStats { allowed: "counter", denied: "counter" });

stat_struct!(GlobalStats {
    tls_inspector_client_hello_too_large: "counter",
    tls_inspector_tls_found: "counter",
    tls_inspector_tls_not_found: "counter",
    tls_inspector_sni_found: "counter",
    tls_inspector_sni_not_found: "counter",
    tls_inspector_alpn_found: "counter",
    config_update_success: "counter",
    config_update_rejected: "counter",
    listener_manager_total_listeners_active: "gauge",
    server_live: "gauge",
});

/// Stats, and the other per-name state that must outlive configuration updates.
#[derive(Debug, Default)]
pub struct Registry {
    pub global: GlobalStats,
    /// Active health checking's verdict per host.
    pub health: crate::health::Checks,
    listeners: Mutex<BTreeMap<String, Arc<ListenerStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    tcp: Mutex<BTreeMap<String, Arc<TcpStats>>>,
    rbac: Mutex<BTreeMap<String, Arc<RbacStats>>>,
}

fn get<T: Default>(map: &Mutex<BTreeMap<String, Arc<T>>>, key: &str) -> Arc<T> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = m.get(key) {
        return v.clone();
    }
    m.entry(key.to_string()).or_default().clone()
}

impl Registry {
    pub fn listener(&self, address: &str) -> Arc<ListenerStats> {
        get(&self.listeners, address)
    }
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        get(&self.clusters, name)
    }
    pub fn tcp(&self, prefix: &str) -> Arc<TcpStats> {
        get(&self.tcp, prefix)
    }
    /// Network RBAC filters, by `stat_prefix` (Envoy: `<prefix>rbac.allowed`).
    pub fn rbac(&self, prefix: &str) -> Arc<RbacStats> {
        get(&self.rbac, prefix)
    }

    /// Prometheus text exposition format, Envoy's names (`envoy_cluster_upstream_cx_total`
    /// with label `envoy_cluster_name`, and so on).
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let global = [(String::new(), self.global.values())];
        family(&mut out, "envoy_", GlobalStats::FIELDS, "", &global);
        let listeners = rows(&self.listeners, ListenerStats::values);
        family(&mut out, "envoy_listener_", ListenerStats::FIELDS, "envoy_listener_address", &listeners);
        let clusters = rows(&self.clusters, ClusterStats::values);
        family(&mut out, "envoy_cluster_", ClusterStats::FIELDS, "envoy_cluster_name", &clusters);
        let tcp = rows(&self.tcp, TcpStats::values);
        family(&mut out, "envoy_tcp_", TcpStats::FIELDS, "envoy_tcp_prefix", &tcp);
        let rbac = rows(&self.rbac, RbacStats::values);
        family(&mut out, "envoy_rbac_", RbacStats::FIELDS, "envoy_rbac_prefix", &rbac);
        out
    }
}

fn rows<T>(map: &Mutex<BTreeMap<String, Arc<T>>>, values: fn(&T) -> Vec<u64>) -> Vec<(String, Vec<u64>)> {
    let m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.iter().map(|(k, v)| (k.clone(), values(v))).collect()
}

/// Writes one `# TYPE` line per metric, then its sample for every label value.
fn family(out: &mut String, prefix: &str, fields: &[(&str, &str)], label: &str, rows: &[(String, Vec<u64>)]) {
    if rows.is_empty() {
        return;
    }
    for (i, (field, kind)) in fields.iter().enumerate() {
        let _ = writeln!(out, "# TYPE {prefix}{field} {kind}");
        for (value, values) in rows {
            if label.is_empty() {
                let _ = writeln!(out, "{prefix}{field} {}", values[i]);
            } else {
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = writeln!(out, "{prefix}{field}{{{label}=\"{escaped}\"}} {}", values[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_envoy_names() {
        let r = Registry::default();
        r.cluster("mesh1:backend").upstream_cx_total.add(3);
        r.listener("127.0.0.1_10001").downstream_cx_total.inc();
        let text = r.prometheus();
        assert!(text.contains("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"mesh1:backend\"} 3"), "{text}");
        assert!(text.contains("envoy_listener_downstream_cx_total{envoy_listener_address=\"127.0.0.1_10001\"} 1"));
        assert!(Arc::ptr_eq(&r.cluster("mesh1:backend"), &r.cluster("mesh1:backend")));
    }
}
