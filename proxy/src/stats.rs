//! Counters and gauges, named as Envoy names them so existing dashboards keep working.
//!
//! Stats live in a registry keyed by listener address, cluster name and tcp_proxy stat
//! prefix, so they survive configuration reloads; the snapshot holds `Arc`s to them and
//! the hot path only does relaxed atomic adds.

pub mod text;

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
    /// Adds one unless the value is `limit` or more; says whether it did.
    pub fn fetch_inc_below(&self, limit: u64) -> bool {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < limit).then_some(v + 1)).is_ok()
    }
}

macro_rules! stat_struct {
    ($name:ident { $($field:ident : $kind:literal),* $(,)? } $($extra:ident : $ty:ty),*) => {
        #[derive(Debug, Default)]
        pub struct $name { $(pub $field: Counter,)* $(pub $extra: $ty,)* }
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
    downstream_cx_overflow: "counter",
    downstream_global_cx_overflow: "counter",
    downstream_cx_accept_error: "counter",
    no_filter_chain_match: "counter",
    downstream_listener_filter_error: "counter",
    downstream_pre_cx_timeout: "counter",
} ssl: std::sync::OnceLock<Box<SslStats>>);

stat_struct!(SslStats {
    connection_error: "counter",
    handshake: "counter",
    session_reused: "counter",
    no_certificate: "counter",
    fail_verify_no_cert: "counter",
    fail_verify_error: "counter",
    fail_verify_san: "counter",
});

impl ListenerStats {
    /// Envoy's `listener.<address>.ssl.*`, made on the listener's first TLS handshake.
    pub fn ssl(&self) -> &SslStats {
        self.ssl.get_or_init(Box::default)
    }
}

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
    outlier_detection_ejections_active: "gauge",
    outlier_detection_ejections_total: "counter",
    outlier_detection_ejections_enforced_total: "counter",
    outlier_detection_ejections_overflow: "counter",
    outlier_detection_ejections_enforced_consecutive_5xx: "counter",
    outlier_detection_ejections_detected_consecutive_5xx: "counter",
    outlier_detection_ejections_enforced_consecutive_gateway_failure: "counter",
    outlier_detection_ejections_detected_consecutive_gateway_failure: "counter",
    outlier_detection_ejections_enforced_consecutive_local_origin_failure: "counter",
    outlier_detection_ejections_detected_consecutive_local_origin_failure: "counter",
    outlier_detection_ejections_enforced_success_rate: "counter",
    outlier_detection_ejections_detected_success_rate: "counter",
    outlier_detection_ejections_enforced_failure_percentage: "counter",
    outlier_detection_ejections_detected_failure_percentage: "counter",
} http: std::sync::OnceLock<Box<UpstreamHttpStats>>, ssl: std::sync::OnceLock<Box<SslStats>>);

stat_struct!(TcpStats {
    downstream_cx_total: "counter",
    downstream_cx_no_route: "counter",
    downstream_cx_tx_bytes_total: "counter",
    downstream_cx_rx_bytes_total: "counter",
    idle_timeout: "counter",
    upstream_flush_active: "gauge",
});

stat_struct!(RbacStats { allowed: "counter", denied: "counter" });

stat_struct!(ConnectionLimitStats { limited_connections: "counter", active_connections: "gauge" });

stat_struct!(LocalRateLimitStats { rate_limited: "counter" });

stat_struct!(HttpStats {
    downstream_rq_total: "counter",
    downstream_rq_active: "gauge",
    downstream_rq_http1_total: "counter",
    downstream_rq_http2_total: "counter",
    rq_direct_response: "counter",
    rq_redirect: "counter",
    no_route: "counter",
    // dp's own: times an idle HTTP/1 connection was parked (hcm::park).
    downstream_cx_http1_parked: "counter",
} classes: Classes);

/// Requests by response code class (1xx to 5xx), rendered as Envoy's `_xx` stats with
/// the `envoy_response_code_class` label.
#[derive(Debug, Default)]
pub struct Classes([Counter; 5]);

impl Classes {
    pub fn record(&self, status: u16) {
        if let Some(c) = self.0.get(usize::from(status / 100).wrapping_sub(1)) {
            c.inc();
        }
    }
    pub fn get(&self, class: u16) -> u64 {
        self.0.get(usize::from(class).wrapping_sub(1)).map_or(0, Counter::get)
    }
}

/// Envoy's default histogram buckets, in milliseconds.
const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// A latency histogram in milliseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Counter; 19],
    count: Counter,
    /// Sum in microseconds (rendered in milliseconds).
    sum_us: Counter,
}

impl Histogram {
    pub fn record(&self, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        if let Some(i) = BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.buckets[i].inc();
        }
        self.count.inc();
        self.sum_us.add(d.as_micros() as u64);
    }
    pub fn count(&self) -> u64 {
        self.count.get()
    }
}

/// The HTTP side of a cluster, made on its first request (TCP-only clusters pay nothing).
#[derive(Debug, Default)]
pub struct UpstreamHttpStats {
    pub upstream_rq_total: Counter,
    pub upstream_rq_active: Counter,
    pub upstream_rq_pending_overflow: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    pub upstream_rq_retry: Counter,
    pub classes: Classes,
    /// By response code, few distinct ones per cluster.
    codes: Mutex<BTreeMap<u16, u64>>,
    pub upstream_rq_time: Histogram,
}

impl UpstreamHttpStats {
    pub fn record(&self, status: u16, took: std::time::Duration) {
        self.upstream_rq_total.inc();
        self.classes.record(status);
        *self.codes.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
        self.upstream_rq_time.record(took);
    }
    pub fn code(&self, status: u16) -> u64 {
        self.codes.lock().unwrap_or_else(|e| e.into_inner()).get(&status).copied().unwrap_or(0)
    }
}

impl ClusterStats {
    /// Envoy's `cluster.<name>.ssl.*`, made on the cluster's first TLS handshake.
    pub fn ssl(&self) -> &SslStats {
        self.ssl.get_or_init(Box::default)
    }
    /// The cluster's HTTP stats, made on first use.
    pub fn http(&self) -> &UpstreamHttpStats {
        self.http.get_or_init(Default::default)
    }
}

stat_struct!(GlobalStats {
    tls_inspector_client_hello_too_large: "counter",
    tls_inspector_tls_found: "counter",
    tls_inspector_tls_not_found: "counter",
    tls_inspector_sni_found: "counter",
    tls_inspector_sni_not_found: "counter",
    tls_inspector_alpn_found: "counter",
    http_inspector_http10_found: "counter",
    http_inspector_http11_found: "counter",
    http_inspector_http2_found: "counter",
    http_inspector_http_not_found: "counter",
    config_update_success: "counter",
    config_update_rejected: "counter",
    listener_manager_total_listeners_active: "gauge",
    server_live: "gauge",
    log_lines_dropped: "counter",
});

/// Stats, and the other per-name state that must outlive configuration updates.
#[derive(Debug, Default)]
pub struct Registry {
    pub global: GlobalStats,
    /// Active health checking's verdict per host.
    pub health: crate::health::Checks,
    /// Outlier detection per cluster.
    pub outlier: crate::outlier::Detectors,
    listeners: Mutex<BTreeMap<String, Arc<ListenerStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    tcp: Mutex<BTreeMap<String, Arc<TcpStats>>>,
    rbac: Mutex<BTreeMap<String, Arc<RbacStats>>>,
    /// HTTP RBAC filters, by (HCM `stat_prefix`, `rules_stat_prefix`).
    http_rbac: Mutex<BTreeMap<(String, String), Arc<RbacStats>>>,
    connection_limit: Mutex<BTreeMap<String, Arc<ConnectionLimitStats>>>,
    local_ratelimit: Mutex<BTreeMap<String, Arc<LocalRateLimitStats>>>,
    http: Mutex<BTreeMap<String, Arc<HttpStats>>>,
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
    /// HTTP RBAC filters (Envoy: `http.<hcm prefix>.rbac.<rules_stat_prefix>allowed`).
    pub fn http_rbac(&self, hcm_prefix: &str, rules_prefix: &str) -> Arc<RbacStats> {
        let mut m = self.http_rbac.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((hcm_prefix.to_string(), rules_prefix.to_string())).or_default().clone()
    }
    /// `connection_limit` filters, by `stat_prefix` (Envoy: `connection_limit.<prefix>.*`).
    pub fn connection_limit(&self, prefix: &str) -> Arc<ConnectionLimitStats> {
        get(&self.connection_limit, prefix)
    }
    /// Network `local_ratelimit` filters, by `stat_prefix` (Envoy: `local_rate_limit.<prefix>.*`).
    pub fn local_ratelimit(&self, prefix: &str) -> Arc<LocalRateLimitStats> {
        get(&self.local_ratelimit, prefix)
    }
    /// HTTP connection managers, by `stat_prefix` (Envoy: `http.<prefix>.*`).
    pub fn http(&self, prefix: &str) -> Arc<HttpStats> {
        get(&self.http, prefix)
    }

    /// Prometheus text exposition format, Envoy's names (`envoy_cluster_upstream_cx_total`
    /// with label `envoy_cluster_name`, and so on).
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let global = [(String::new(), self.global.values())];
        family(&mut out, "envoy_", GlobalStats::FIELDS, "", &global);
        let listeners = rows(&self.listeners, ListenerStats::values);
        family(&mut out, "envoy_listener_", ListenerStats::FIELDS, "envoy_listener_address", &listeners);
        let ssl = ssl_rows(&self.listeners, |l| l.ssl.get());
        family(&mut out, "envoy_listener_ssl_", SslStats::FIELDS, "envoy_listener_address", &ssl);
        let clusters = rows(&self.clusters, ClusterStats::values);
        family(&mut out, "envoy_cluster_", ClusterStats::FIELDS, "envoy_cluster_name", &clusters);
        let ssl = ssl_rows(&self.clusters, |c| c.ssl.get());
        family(&mut out, "envoy_cluster_ssl_", SslStats::FIELDS, "envoy_cluster_name", &ssl);
        let tcp = rows(&self.tcp, TcpStats::values);
        family(&mut out, "envoy_tcp_", TcpStats::FIELDS, "envoy_tcp_prefix", &tcp);
        let rbac = rows(&self.rbac, RbacStats::values);
        family(&mut out, "envoy_rbac_", RbacStats::FIELDS, "envoy_rbac_prefix", &rbac);
        self.http_rbac_prometheus(&mut out);
        let limits = rows(&self.connection_limit, ConnectionLimitStats::values);
        let prefix = "envoy_connection_limit_prefix";
        family(&mut out, "envoy_connection_limit_", ConnectionLimitStats::FIELDS, prefix, &limits);
        let rate = rows(&self.local_ratelimit, LocalRateLimitStats::values);
        family(
            &mut out,
            "envoy_local_rate_limit_",
            LocalRateLimitStats::FIELDS,
            "envoy_local_rate_limit_prefix",
            &rate,
        );
        let http = rows(&self.http, HttpStats::values);
        family(&mut out, "envoy_http_", HttpStats::FIELDS, "envoy_http_conn_manager_prefix", &http);
        self.upstream_http(&mut out);
        let m = self.http.lock().unwrap_or_else(|e| e.into_inner());
        if !m.is_empty() {
            let _ = writeln!(out, "# TYPE envoy_http_downstream_rq_xx counter");
            for (prefix, h) in m.iter() {
                for class in 1..=5u16 {
                    let _ = writeln!(
                        out,
                        "envoy_http_downstream_rq_xx{{envoy_response_code_class=\"{class}\",envoy_http_conn_manager_prefix=\"{}\"}} {}",
                        prefix.replace('\\', "\\\\").replace('"', "\\\""),
                        h.classes.get(class)
                    );
                }
            }
        }
        out
    }

    /// HTTP RBAC as Envoy exports `http.<hcm prefix>.rbac.<rules prefix>allowed`: the HCM
    /// prefix as a label, the rules prefix (Kuma sets none) in the name. A family's samples
    /// are written together, as the exposition format requires.
    fn http_rbac_prometheus(&self, out: &mut String) {
        let m = self.http_rbac.lock().unwrap_or_else(|e| e.into_inner());
        let mut families: BTreeMap<String, (&str, Vec<String>)> = BTreeMap::new();
        for ((hcm, rules), s) in m.iter() {
            let hcm = hcm.replace('\\', "\\\\").replace('"', "\\\"");
            for ((field, kind), value) in RbacStats::FIELDS.iter().zip(s.values()) {
                let name = format!("envoy_http_rbac_{}{field}", rules.replace(['.', '-'], "_"));
                let sample = format!("{{envoy_http_conn_manager_prefix=\"{hcm}\"}} {value}");
                families.entry(name).or_insert((kind, vec![])).1.push(sample);
            }
        }
        for (name, (kind, samples)) in families {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for sample in samples {
                let _ = writeln!(out, "{name}{sample}");
            }
        }
    }

    /// Clusters' HTTP stats: totals, `_xx` by code class, by code, and the request time
    /// histogram, with Envoy's tag names.
    fn upstream_http(&self, out: &mut String) {
        let m = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        let with: Vec<(&String, &UpstreamHttpStats)> =
            m.iter().filter_map(|(k, c)| c.http.get().map(|h| (k, &**h))).collect();
        if with.is_empty() {
            return;
        }
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        type Field = fn(&UpstreamHttpStats) -> u64;
        let fields: [(&str, &str, Field); 6] = [
            ("upstream_rq_total", "counter", |h| h.upstream_rq_total.get()),
            ("upstream_rq_active", "gauge", |h| h.upstream_rq_active.get()),
            ("upstream_rq_pending_overflow", "counter", |h| h.upstream_rq_pending_overflow.get()),
            ("upstream_rq_timeout", "counter", |h| h.upstream_rq_timeout.get()),
            ("upstream_rq_per_try_timeout", "counter", |h| h.upstream_rq_per_try_timeout.get()),
            ("upstream_rq_retry", "counter", |h| h.upstream_rq_retry.get()),
        ];
        for (name, kind, get) in fields {
            let _ = writeln!(out, "# TYPE envoy_cluster_{name} {kind}");
            for (c, h) in &with {
                let _ = writeln!(out, "envoy_cluster_{name}{{envoy_cluster_name=\"{}\"}} {}", esc(c), get(h));
            }
        }
        let _ = writeln!(out, "# TYPE envoy_cluster_upstream_rq_xx counter");
        for (c, h) in &with {
            for class in 1..=5u16 {
                let _ = writeln!(
                    out,
                    "envoy_cluster_upstream_rq_xx{{envoy_response_code_class=\"{class}\",envoy_cluster_name=\"{}\"}} {}",
                    esc(c),
                    h.classes.get(class)
                );
            }
        }
        let _ = writeln!(out, "# TYPE envoy_cluster_upstream_rq counter");
        for (c, h) in &with {
            for (code, n) in h.codes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = writeln!(
                    out,
                    "envoy_cluster_upstream_rq{{envoy_response_code=\"{code}\",envoy_cluster_name=\"{}\"}} {n}",
                    esc(c)
                );
            }
        }
        let _ = writeln!(out, "# TYPE envoy_cluster_upstream_rq_time histogram");
        for (c, h) in &with {
            let t = &h.upstream_rq_time;
            let mut acc = 0;
            for (i, b) in BUCKETS_MS.iter().enumerate() {
                acc += t.buckets[i].get();
                let _ = writeln!(
                    out,
                    "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{}\",le=\"{b}\"}} {acc}",
                    esc(c)
                );
            }
            let _ = writeln!(
                out,
                "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{}\",le=\"+Inf\"}} {}",
                esc(c),
                t.count.get()
            );
            let _ = writeln!(
                out,
                "envoy_cluster_upstream_rq_time_sum{{envoy_cluster_name=\"{}\"}} {}",
                esc(c),
                t.sum_us.get() as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "envoy_cluster_upstream_rq_time_count{{envoy_cluster_name=\"{}\"}} {}",
                esc(c),
                t.count.get()
            );
        }
    }
}

fn rows<T>(map: &Mutex<BTreeMap<String, Arc<T>>>, values: fn(&T) -> Vec<u64>) -> Vec<(String, Vec<u64>)> {
    let m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.iter().map(|(k, v)| (k.clone(), values(v))).collect()
}

/// The `ssl.*` values of the listeners or clusters that have made TLS handshakes.
fn ssl_rows<T>(
    map: &Mutex<BTreeMap<String, Arc<T>>>,
    ssl: fn(&T) -> Option<&Box<SslStats>>,
) -> Vec<(String, Vec<u64>)> {
    let m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.iter().filter_map(|(k, v)| ssl(v).map(|s| (k.clone(), s.values()))).collect()
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
