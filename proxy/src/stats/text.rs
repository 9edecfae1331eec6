//! Envoy's `GET /stats`: every stat under its dotted Envoy name
//! (`cluster.backend.upstream_cx_total: 3`), sorted by name, as text or JSON, with the
//! query parameters Envoy takes (`filter`, `usedonly`, `type`, `format`). Kuma's GUI and
//! `kumactl inspect dataplane --type=stats` show this page of a proxy.

use super::{
    BUCKETS_MS, ClusterStats, ConnectionLimitStats, GlobalStats, Histogram, HttpStats, ListenerStats,
    LocalRateLimitStats, RbacStats, Registry, SslStats, TcpStats,
};
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One stat, read at the time of the request.
#[derive(Debug)]
pub struct Stat {
    pub name: String,
    pub kind: Kind,
    /// A counter's or gauge's value; a histogram's sample count.
    pub value: u64,
    /// A histogram's cumulative quantiles ([`QUANTILES`]), in milliseconds.
    pub quantiles: Option<Vec<f64>>,
}

/// The quantiles Envoy reports for a histogram, in percent.
pub const QUANTILES: [f64; 10] = [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

/// What `GET /stats?...` asked for.
#[derive(Debug, Default)]
pub struct Query {
    filter: Option<regex::Regex>,
    used_only: bool,
    kinds: Option<Kind>,
    pub format: Format,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    Json,
    Prometheus,
}

impl Query {
    /// Envoy's parameters; a bad value is an error naming it (the admin answers 400).
    pub fn parse(query: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            match k {
                "filter" if !v.is_empty() => {
                    let re = regex::Regex::new(&v).map_err(|e| {
                        // The parser's message draws a caret under the pattern: its last line says what is wrong.
                        let e = e.to_string();
                        let why = e.lines().last().unwrap_or_default().trim_start_matches("error: ").to_string();
                        format!("invalid regex in filter={v}: {why}")
                    })?;
                    q.filter = Some(re);
                }
                "filter" => {}
                "usedonly" => q.used_only = true,
                "type" => {
                    q.kinds = match &*v {
                        "All" => None,
                        "Counters" => Some(Kind::Counter),
                        "Gauges" => Some(Kind::Gauge),
                        "Histograms" => Some(Kind::Histogram),
                        other => return Err(format!("invalid type={other}; use All, Counters, Gauges or Histograms")),
                    }
                }
                "format" => {
                    q.format = match &*v {
                        "text" => Format::Text,
                        "json" => Format::Json,
                        "prometheus" => Format::Prometheus,
                        other => return Err(format!("invalid format={other}; use text, json or prometheus")),
                    }
                }
                // Envoy's other parameters (histogram_buckets, pretty, ...) change only the layout.
                _ => {}
            }
        }
        Ok(q)
    }

    pub fn used_only(&self) -> bool {
        self.used_only
    }

    /// `usedonly` keeps what is not zero: dp does not track whether a stat was ever
    /// written, which is Envoy's test (a gauge back at 0 is "used" there).
    fn wants(&self, s: &Stat) -> bool {
        self.kinds.is_none_or(|k| k == s.kind)
            && (!self.used_only || s.value > 0)
            && self.filter.as_ref().is_none_or(|re| re.is_match(&s.name))
    }

    /// The stats this query selects, rendered in its format (not `Prometheus`, which the
    /// registry renders itself).
    pub fn render(&self, stats: &[Stat]) -> String {
        let chosen = stats.iter().filter(|s| self.wants(s));
        if self.format == Format::Json {
            return json(chosen);
        }
        let mut out = String::new();
        for s in chosen {
            match &s.quantiles {
                None => {
                    let _ = writeln!(out, "{}: {}", s.name, s.value);
                }
                Some(_) if s.value == 0 => {
                    let _ = writeln!(out, "{}: No recorded values", s.name);
                }
                Some(q) => {
                    let _ = write!(out, "{}:", s.name);
                    for (p, v) in QUANTILES.iter().zip(q) {
                        // (interval, cumulative): dp keeps no per-interval histograms.
                        let _ = write!(out, " P{p}(nan,{})", round(*v));
                    }
                    out.push('\n');
                }
            }
        }
        out
    }
}

fn json<'a>(stats: impl Iterator<Item = &'a Stat>) -> String {
    let mut items = vec![];
    let mut computed = vec![];
    for s in stats {
        match &s.quantiles {
            None => items.push(serde_json::json!({"name": s.name, "value": s.value})),
            Some(q) => {
                let values: Vec<_> = q
                    .iter()
                    .map(|v| {
                        let cumulative = (s.value > 0).then(|| round(*v));
                        serde_json::json!({"interval": null, "cumulative": cumulative})
                    })
                    .collect();
                computed.push(serde_json::json!({"name": s.name, "values": values}));
            }
        }
    }
    if !computed.is_empty() {
        items.push(
            serde_json::json!({"histograms": {"supported_quantiles": QUANTILES, "computed_quantiles": computed}}),
        );
    }
    serde_json::to_string_pretty(&serde_json::json!({ "stats": items })).unwrap_or_default()
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Envoy's dotted name of a field: the namespaces Envoy nests (`health_check.attempt`,
/// `outlier_detection.ejections_active`, `server.live`, ...) get their dot back.
fn dotted(field: &str) -> String {
    const NAMESPACES: [&str; 6] =
        ["tls_inspector_", "http_inspector_", "listener_manager_", "server_", "outlier_detection_", "health_check_"];
    match NAMESPACES.iter().find(|ns| field.starts_with(*ns)) {
        Some(ns) => format!("{}.{}", &ns[..ns.len() - 1], &field[ns.len()..]),
        None => field.to_string(),
    }
}

fn push_fields(out: &mut Vec<Stat>, prefix: &str, fields: &[(&str, &str)], values: Vec<u64>) {
    for ((field, kind), value) in fields.iter().zip(values) {
        let kind = if *kind == "gauge" { Kind::Gauge } else { Kind::Counter };
        out.push(Stat { name: format!("{prefix}{}", dotted(field)), kind, value, quantiles: None });
    }
}

fn push_classes(out: &mut Vec<Stat>, prefix: &str, what: &str, classes: &super::Classes) {
    for class in 1..=5u16 {
        let value = classes.get(class);
        out.push(Stat { name: format!("{prefix}{what}_{class}xx"), kind: Kind::Counter, value, quantiles: None });
    }
}

impl Histogram {
    /// The cumulative quantiles, interpolated within Envoy's default buckets.
    fn quantiles(&self) -> Vec<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(super::Counter::get).collect();
        let total = self.count.get();
        QUANTILES
            .iter()
            .map(|p| {
                let rank = (p / 100.0 * total as f64).max(1.0);
                let mut below = 0u64;
                for (i, n) in counts.iter().enumerate() {
                    if *n > 0 && (below + n) as f64 >= rank {
                        let lo = if i == 0 { 0.0 } else { BUCKETS_MS[i - 1] };
                        let share = (rank - below as f64) / *n as f64;
                        return lo + (BUCKETS_MS[i] - lo) * share;
                    }
                    below += n;
                }
                // Samples above the last bucket.
                BUCKETS_MS[BUCKETS_MS.len() - 1]
            })
            .collect()
    }
}

impl Registry {
    /// Every stat under Envoy's dotted name, sorted by name.
    pub fn envoy_stats(&self) -> Vec<Stat> {
        let mut out = vec![];
        push_fields(&mut out, "", GlobalStats::FIELDS, self.global.values());
        for (address, s) in self.listeners.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            push_fields(&mut out, &format!("listener.{address}."), ListenerStats::FIELDS, s.values());
            if let Some(ssl) = s.ssl.get() {
                push_fields(&mut out, &format!("listener.{address}.ssl."), SslStats::FIELDS, ssl.values());
            }
        }
        for (name, c) in self.clusters.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let prefix = format!("cluster.{name}.");
            push_fields(&mut out, &prefix, ClusterStats::FIELDS, c.values());
            if let Some(ssl) = c.ssl.get() {
                push_fields(&mut out, &format!("{prefix}ssl."), SslStats::FIELDS, ssl.values());
            }
            let Some(h) = c.http.get() else { continue };
            let fields = [
                ("upstream_rq_total", &h.upstream_rq_total, Kind::Counter),
                ("upstream_rq_active", &h.upstream_rq_active, Kind::Gauge),
                ("upstream_rq_pending_overflow", &h.upstream_rq_pending_overflow, Kind::Counter),
                ("upstream_rq_timeout", &h.upstream_rq_timeout, Kind::Counter),
                ("upstream_rq_per_try_timeout", &h.upstream_rq_per_try_timeout, Kind::Counter),
                ("upstream_rq_retry", &h.upstream_rq_retry, Kind::Counter),
            ];
            for (field, counter, kind) in fields {
                out.push(Stat { name: format!("{prefix}{field}"), kind, value: counter.get(), quantiles: None });
            }
            push_classes(&mut out, &prefix, "upstream_rq", &h.classes);
            for (code, n) in h.codes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                out.push(Stat {
                    name: format!("{prefix}upstream_rq_{code}"),
                    kind: Kind::Counter,
                    value: *n,
                    quantiles: None,
                });
            }
            let t = &h.upstream_rq_time;
            let quantiles = Some(t.quantiles());
            out.push(Stat {
                name: format!("{prefix}upstream_rq_time"),
                kind: Kind::Histogram,
                value: t.count(),
                quantiles,
            });
        }
        for (p, s) in self.tcp.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            push_fields(&mut out, &format!("tcp.{p}."), TcpStats::FIELDS, s.values());
        }
        for (p, s) in self.rbac.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            push_fields(&mut out, &format!("{p}rbac."), RbacStats::FIELDS, s.values());
        }
        for ((hcm, rules), s) in self.http_rbac.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            push_fields(&mut out, &format!("http.{hcm}.rbac.{rules}"), RbacStats::FIELDS, s.values());
        }
        for (p, s) in self.connection_limit.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            push_fields(&mut out, &format!("connection_limit.{p}."), ConnectionLimitStats::FIELDS, s.values());
        }
        for (p, s) in self.local_ratelimit.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            push_fields(&mut out, &format!("local_rate_limit.{p}."), LocalRateLimitStats::FIELDS, s.values());
        }
        for (p, s) in self.http.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let prefix = format!("http.{p}.");
            push_fields(&mut out, &prefix, HttpStats::FIELDS, s.values());
            push_classes(&mut out, &prefix, "downstream_rq", &s.classes);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Whether a query string asks for `usedonly` (with or without a value, as Envoy takes it).
pub fn asks_used_only(query: &str) -> bool {
    query.split('&').any(|kv| kv == "usedonly" || kv.starts_with("usedonly="))
}

/// `usedonly` on the Prometheus text (`/stats/prometheus?usedonly`, and what kuma-dp asks
/// for a MeshMetric that leaves out unused stats): samples at zero go, a histogram's
/// series go when its count is zero, and a family left with no sample loses its `# TYPE`.
pub fn prometheus_used_only(text: &str) -> String {
    // The family each line belongs to comes from the `# TYPE` line before it.
    let typed = |line: &str| -> Option<(String, bool)> {
        let mut parts = line.strip_prefix("# TYPE ")?.split(' ');
        Some((parts.next()?.to_string(), parts.next() == Some("histogram")))
    };
    let labels_without_le = |labels: &str| -> String {
        let Some(at) = labels.find("le=\"") else { return labels.to_string() };
        let end = labels[at + 4..].find('"').map_or(labels.len(), |e| at + 4 + e + 1);
        let (head, tail) = (&labels[..at], &labels[end..]);
        // One comma stays between the labels around `le`, none next to a brace.
        let joined = match (head.strip_suffix(','), tail.strip_prefix(',')) {
            (Some(h), _) => format!("{h}{tail}"),
            (None, Some(t)) => format!("{head}{t}"),
            (None, None) => format!("{head}{tail}"),
        };
        // A histogram without other labels: its `_count` line has no braces.
        if joined == "{}" { String::new() } else { joined }
    };
    let split = |line: &str| -> Option<(String, String, String)> {
        let (series, value) = line.rsplit_once(' ')?;
        let (name, labels) = match series.find('{') {
            Some(b) => (&series[..b], &series[b..]),
            None => (series, ""),
        };
        Some((name.to_string(), labels.to_string(), value.to_string()))
    };
    let mut used_series = std::collections::HashSet::new();
    let mut family: Option<(String, bool)> = None;
    for line in text.lines() {
        if let Some(f) = typed(line) {
            family = Some(f);
        } else if let (Some((f, true)), Some((name, labels, value))) = (&family, split(line))
            && name == format!("{f}_count")
            && value != "0"
        {
            used_series.insert((f.clone(), labels));
        }
    }
    let mut out = String::with_capacity(text.len() / 2);
    let mut pending: Option<&str> = None;
    let mut family: Option<(String, bool)> = None;
    for line in text.lines() {
        if let Some(f) = typed(line) {
            pending = Some(line);
            family = Some(f);
            continue;
        }
        let keep = match (&family, split(line)) {
            (Some((f, true)), Some((_, labels, _))) => used_series.contains(&(f.clone(), labels_without_le(&labels))),
            (_, Some((_, _, value))) => value != "0",
            (_, None) => true,
        };
        if keep {
            if let Some(t) = pending.take() {
                out.push_str(t);
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_names_filters_and_formats() {
        let r = Registry::default();
        r.cluster("backend").upstream_cx_total.add(3);
        r.cluster("backend").health_check_attempt.inc();
        r.cluster("backend").http().record(200, std::time::Duration::from_millis(3));
        r.listener("127.0.0.1_10001").downstream_cx_active.set(2);
        r.listener("127.0.0.1_10001").ssl().fail_verify_san.inc();
        r.cluster("backend").ssl().session_reused.add(4);
        r.listener("0.0.0.0_80").downstream_cx_total.inc();
        r.rbac("inbound_10001.").denied.inc();
        r.http_rbac("web", "").allowed.add(2);
        r.http_rbac("x-api", "x.").denied.inc();
        r.http_rbac("zz", "").allowed.inc();
        r.global.server_live.set(1);
        let prom = r.prometheus();
        let family = "# TYPE envoy_http_rbac_allowed counter\n\
            envoy_http_rbac_allowed{envoy_http_conn_manager_prefix=\"web\"} 2\n\
            envoy_http_rbac_allowed{envoy_http_conn_manager_prefix=\"zz\"} 1\n";
        assert!(prom.contains(family), "one family, its samples together:\n{prom}");
        assert!(prom.contains("envoy_http_rbac_x_denied{envoy_http_conn_manager_prefix=\"x-api\"} 1\n"), "{prom}");
        // Only listeners and clusters that made TLS handshakes have `ssl.*` stats.
        let ssl = "# TYPE envoy_listener_ssl_fail_verify_san counter\n\
            envoy_listener_ssl_fail_verify_san{envoy_listener_address=\"127.0.0.1_10001\"} 1\n#";
        assert!(prom.contains(ssl), "{prom}");
        assert!(prom.contains("envoy_cluster_ssl_session_reused{envoy_cluster_name=\"backend\"} 4\n"), "{prom}");
        let stats = r.envoy_stats();
        let text = Query::parse("").unwrap().render(&stats);
        for line in [
            "cluster.backend.upstream_cx_total: 3\n",
            "cluster.backend.health_check.attempt: 1\n",
            "cluster.backend.upstream_rq_200: 1\n",
            "cluster.backend.upstream_rq_2xx: 1\n",
            "listener.127.0.0.1_10001.downstream_cx_active: 2\n",
            "listener.127.0.0.1_10001.ssl.fail_verify_san: 1\n",
            "listener.127.0.0.1_10001.ssl.handshake: 0\n",
            "cluster.backend.ssl.session_reused: 4\n",
            "inbound_10001.rbac.denied: 1\n",
            "http.web.rbac.allowed: 2\n",
            "server.live: 1\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        let names: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
        assert!(names.is_sorted(), "{names:?}");
        assert!(!text.contains("listener.0.0.0.0_80.ssl."), "{text}");
        let hist = text.lines().find(|l| l.starts_with("cluster.backend.upstream_rq_time:")).unwrap();
        assert!(hist.contains(" P50(nan,") && !hist.contains("No recorded"), "{hist}");
        // One sample of 3 ms lies in the (1, 5] bucket: every quantile is within it.
        let p50: f64 = hist.split(" P50(nan,").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
        assert!((1.0..=5.0).contains(&p50), "{hist}");

        let q = Query::parse("filter=cluster%5C.backend%5C.upstream_cx&usedonly").unwrap();
        assert_eq!(q.render(&stats), "cluster.backend.upstream_cx_total: 3\n");
        let gauges = Query::parse("type=Gauges&usedonly").unwrap().render(&stats);
        assert_eq!(gauges, "listener.127.0.0.1_10001.downstream_cx_active: 2\nserver.live: 1\n");
        let j: serde_json::Value =
            serde_json::from_str(&Query::parse("format=json&filter=upstream_rq_time%24").unwrap().render(&stats))
                .unwrap();
        let computed = &j["stats"][0]["histograms"]["computed_quantiles"][0];
        assert_eq!(computed["name"], "cluster.backend.upstream_rq_time");
        assert_eq!(computed["values"].as_array().unwrap().len(), QUANTILES.len());

        assert_eq!(Query::parse("filter=(").unwrap_err(), "invalid regex in filter=(: unclosed group");
        assert!(Query::parse("type=Bogus").unwrap_err().contains("invalid type=Bogus"));
    }

    #[test]
    fn prometheus_used_only_drops_zeros_unused_histograms_and_empty_families() {
        let text = "# TYPE envoy_a counter\nenvoy_a{x=\"1\"} 0\nenvoy_a{x=\"2\"} 3\n\
                    # TYPE envoy_b gauge\nenvoy_b 0\n\
                    # TYPE envoy_h histogram\n\
                    envoy_h_bucket{c=\"used\",le=\"1\"} 0\nenvoy_h_bucket{c=\"used\",le=\"+Inf\"} 2\n\
                    envoy_h_sum{c=\"used\"} 0.5\nenvoy_h_count{c=\"used\"} 2\n\
                    envoy_h_bucket{c=\"idle\",le=\"1\"} 0\nenvoy_h_bucket{c=\"idle\",le=\"+Inf\"} 0\n\
                    envoy_h_sum{c=\"idle\"} 0\nenvoy_h_count{c=\"idle\"} 0\n\
                    # TYPE envoy_u histogram\nenvoy_u_bucket{le=\"+Inf\"} 1\nenvoy_u_sum 2\nenvoy_u_count 1\n";
        assert_eq!(
            prometheus_used_only(text),
            "# TYPE envoy_a counter\nenvoy_a{x=\"2\"} 3\n\
             # TYPE envoy_h histogram\n\
             envoy_h_bucket{c=\"used\",le=\"1\"} 0\nenvoy_h_bucket{c=\"used\",le=\"+Inf\"} 2\n\
             envoy_h_sum{c=\"used\"} 0.5\nenvoy_h_count{c=\"used\"} 2\n\
             # TYPE envoy_u histogram\nenvoy_u_bucket{le=\"+Inf\"} 1\nenvoy_u_sum 2\nenvoy_u_count 1\n"
        );
    }
}
