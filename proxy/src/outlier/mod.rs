//! Passive health checking: Envoy's outlier detection, consecutive-error kinds.
//!
//! Each host of a cluster with `outlier_detection` has a [`Monitor`] that is told how its
//! connections and requests end. N errors in a row eject the host for `base_ejection_time`
//! times the number of times it was ejected (up to `max_ejection_time`); no more than
//! `max_ejection_percent` of the cluster's hosts are out at once, but always at least one
//! may be. As in Envoy without `split_external_local_origin_errors`, a failed connection
//! counts as a 503 and a connect timeout as a 504, so TCP clusters eject on connect
//! failures through the `consecutive_5xx` threshold. With the split (MeshCircuitBreaker's
//! `splitExternalAndLocalErrors`), connect failures and timeouts count only towards
//! `consecutive_local_origin_failure`, a connection made resets that count, and the 5xx
//! counts see only the upstream's answers.
//!
//! Every `interval`, the success-rate and failure-percentage detectors look at each host's
//! answers since the last look ([`rates`]), as Envoy's do (success rate is on by default).
//!
//! Detectors and monitors live in the stats registry, keyed by cluster name and host
//! address, so an ejection survives a configuration update that keeps the host.

mod rates;

use crate::stats::ClusterStats;
use crate::upstream::HostAddr;
use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How an upstream connection or request ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected (TCP, and TLS when originated).
    Connected,
    /// The connection failed or was refused.
    ConnectFailed,
    /// The connection attempt timed out.
    ConnectTimeout,
    /// An HTTP response with this status.
    Status(u16),
}

impl Outcome {
    /// Envoy's mapping of local-origin results to HTTP codes when they are not split.
    fn code(self) -> u16 {
        match self {
            Outcome::Connected => 200,
            Outcome::ConnectFailed => 503,
            Outcome::ConnectTimeout => 504,
            Outcome::Status(s) => s,
        }
    }
}

/// A cluster's `outlier_detection`, with Envoy's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierCfg {
    pub consecutive_5xx: u32,
    pub enforcing_consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// `split_external_local_origin_errors`.
    pub split: bool,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub rates: rates::RatesCfg,
}

impl OutlierCfg {
    /// Reads the proto. Success-rate and failure-percentage detection, which need request
    /// volumes over intervals, are not implemented: returned as notes when configured.
    pub fn from_proto(o: &OutlierDetection, notes: &mut Vec<String>, cluster: &str) -> Result<Self, String> {
        let u = |v: Option<u32>, d: u32| v.unwrap_or(d);
        let d = |v: &Option<envoy_types::pb::google::protobuf::Duration>, dflt: Duration| {
            v.as_ref().map_or(dflt, |d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        };
        if o.enforcing_local_origin_success_rate.as_ref().is_some_and(|v| v.value > 0)
            || o.enforcing_failure_percentage_local_origin.as_ref().is_some_and(|v| v.value > 0)
        {
            notes.push(format!(
                "cluster `{cluster}`: outlier_detection's local-origin success-rate and failure-percentage detectors \
                 are not implemented"
            ));
        }
        let cfg = OutlierCfg {
            consecutive_5xx: u(o.consecutive_5xx.map(|v| v.value), 5),
            enforcing_consecutive_5xx: u(o.enforcing_consecutive_5xx.map(|v| v.value), 100),
            consecutive_gateway_failure: u(o.consecutive_gateway_failure.map(|v| v.value), 5),
            enforcing_consecutive_gateway_failure: u(o.enforcing_consecutive_gateway_failure.map(|v| v.value), 0),
            interval: d(&o.interval, Duration::from_secs(10)),
            base_ejection_time: d(&o.base_ejection_time, Duration::from_secs(30)),
            max_ejection_time: d(&o.max_ejection_time, Duration::from_secs(300)),
            max_ejection_percent: u(o.max_ejection_percent.map(|v| v.value), 10).min(100),
            split: o.split_external_local_origin_errors,
            consecutive_local_origin_failure: u(o.consecutive_local_origin_failure.map(|v| v.value), 5),
            enforcing_consecutive_local_origin_failure: u(
                o.enforcing_consecutive_local_origin_failure.map(|v| v.value),
                100,
            ),
            rates: rates::RatesCfg::from_proto(o),
        };
        if cfg.interval.is_zero() || cfg.base_ejection_time.is_zero() {
            return Err(format!("cluster `{cluster}`: outlier_detection interval and base_ejection_time must be > 0"));
        }
        Ok(cfg)
    }
}

/// Why a host was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    FailurePercentage,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Consecutive5xx => "consecutive_5xx",
            Kind::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            Kind::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            Kind::SuccessRate => "success_rate",
            Kind::FailurePercentage => "failure_percentage",
        }
    }
}

#[derive(Debug, Default)]
struct HostState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Connect failures and timeouts in a row (with the split).
    consecutive_local: u32,
    /// The upstream's answers since the rate detectors last looked: (successes, failures).
    answers: (u64, u64),
    /// When the current ejection started.
    ejected_at: Option<Instant>,
    /// How many ejection times the current (or next) ejection lasts.
    backoff: u32,
    /// When the host was last let back in.
    returned_at: Option<Instant>,
}

impl HostState {
    /// Counts an outcome; the detector that fires (a streak reaching its threshold, as
    /// Envoy fires exactly then) with its enforcement percentage.
    fn count(&mut self, cfg: &OutlierCfg, outcome: Outcome) -> Option<(Kind, u32)> {
        match outcome {
            Outcome::Connected if cfg.split => {
                self.consecutive_local = 0;
                None
            }
            Outcome::ConnectFailed | Outcome::ConnectTimeout if cfg.split => {
                self.consecutive_local += 1;
                (self.consecutive_local == cfg.consecutive_local_origin_failure)
                    .then_some((Kind::ConsecutiveLocalOriginFailure, cfg.enforcing_consecutive_local_origin_failure))
            }
            _ => {
                let code = outcome.code();
                if code < 500 {
                    self.consecutive_5xx = 0;
                    self.consecutive_gateway = 0;
                    return None;
                }
                self.consecutive_5xx += 1;
                if matches!(code, 502..=504) {
                    self.consecutive_gateway += 1;
                } else {
                    self.consecutive_gateway = 0;
                }
                if self.consecutive_5xx == cfg.consecutive_5xx {
                    Some((Kind::Consecutive5xx, cfg.enforcing_consecutive_5xx))
                } else if self.consecutive_gateway == cfg.consecutive_gateway_failure {
                    Some((Kind::ConsecutiveGatewayFailure, cfg.enforcing_consecutive_gateway_failure))
                } else {
                    None
                }
            }
        }
    }
}

/// One host's outlier state.
#[derive(Debug, Default)]
pub struct Monitor {
    state: Mutex<HostState>,
}

impl Monitor {
    /// Until when the host is ejected, if it is now.
    pub fn ejected_until(&self, cfg: &OutlierCfg, now: Instant) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let until = s.ejected_at? + ejection_time(cfg, s.backoff);
        (until > now).then_some(until)
    }
}

fn ejection_time(cfg: &OutlierCfg, backoff: u32) -> Duration {
    cfg.base_ejection_time.saturating_mul(backoff.max(1)).min(cfg.max_ejection_time.max(cfg.base_ejection_time))
}

/// A cluster's outlier detector.
#[derive(Debug)]
pub struct Detector {
    cluster: String,
    cfg: Mutex<OutlierCfg>,
    hosts: Mutex<HashMap<HostAddr, Arc<Monitor>>>,
    stats: Arc<ClusterStats>,
}

impl Detector {
    pub fn cfg(&self) -> OutlierCfg {
        self.cfg.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a new configuration and host list; monitors of hosts that stay keep their
    /// state, the others are forgotten.
    pub fn update(&self, cfg: OutlierCfg, addrs: &[HostAddr]) -> Vec<Arc<Monitor>> {
        *self.cfg.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = HashMap::with_capacity(addrs.len());
        let monitors = addrs
            .iter()
            .map(|a| {
                let m = hosts.remove(a).unwrap_or_default();
                kept.insert(a.clone(), m.clone());
                m
            })
            .collect();
        *hosts = kept;
        drop(hosts);
        self.refresh_active(Instant::now());
        monitors
    }

    /// Records how a connection or request to `host` ended; may eject it.
    pub fn record(&self, monitor: &Monitor, host: &HostAddr, outcome: Outcome) {
        let cfg = self.cfg();
        let now = Instant::now();
        let tripped = {
            let mut s = monitor.state.lock().unwrap_or_else(|e| e.into_inner());
            // What the rate detectors count: the upstream's answers (and, unsplit, the
            // connections, as Envoy maps them to 200, 503 and 504).
            if !cfg.split || matches!(outcome, Outcome::Status(_)) {
                if outcome.code() < 500 {
                    s.answers.0 += 1;
                } else {
                    s.answers.1 += 1;
                }
            }
            s.count(&cfg, outcome)
        };
        let Some((kind, enforcing)) = tripped else { return };
        self.eject(monitor, host, kind, enforcing, now);
    }

    /// A detector found `host` an outlier: counted, and ejected when enforced and the
    /// cluster may lose one more host.
    fn eject(&self, monitor: &Monitor, host: &HostAddr, kind: Kind, enforcing: u32, now: Instant) {
        let cfg = self.cfg();
        let st = &self.stats;
        match kind {
            Kind::Consecutive5xx => st.outlier_detection_ejections_detected_consecutive_5xx.inc(),
            Kind::ConsecutiveGatewayFailure => {
                st.outlier_detection_ejections_detected_consecutive_gateway_failure.inc()
            }
            Kind::ConsecutiveLocalOriginFailure => {
                st.outlier_detection_ejections_detected_consecutive_local_origin_failure.inc()
            }
            Kind::SuccessRate => st.outlier_detection_ejections_detected_success_rate.inc(),
            Kind::FailurePercentage => st.outlier_detection_ejections_detected_failure_percentage.inc(),
        }
        if monitor.ejected_until(&cfg, now).is_some() || !enforced(enforcing) {
            return;
        }
        let active = self.refresh_active(now);
        let total = self.hosts.lock().unwrap_or_else(|e| e.into_inner()).len().max(1) as u64;
        if active > 0 && 100 * (active + 1) > u64::from(cfg.max_ejection_percent) * total {
            st.outlier_detection_ejections_overflow.inc();
            return;
        }
        {
            let mut s = monitor.state.lock().unwrap_or_else(|e| e.into_inner());
            // The back-off shrinks by one for each ejection time the host stayed in.
            if let Some(back) = s.returned_at {
                let calm = now.saturating_duration_since(back).as_nanos() / cfg.base_ejection_time.as_nanos().max(1);
                s.backoff = s.backoff.saturating_sub(u32::try_from(calm).unwrap_or(u32::MAX));
            }
            let cap = (cfg.max_ejection_time.as_nanos() / cfg.base_ejection_time.as_nanos().max(1)).max(1);
            s.backoff = (s.backoff + 1).min(u32::try_from(cap).unwrap_or(u32::MAX));
            s.ejected_at = Some(now);
            s.returned_at = Some(now + ejection_time(&cfg, s.backoff));
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
            s.consecutive_local = 0;
        }
        st.outlier_detection_ejections_enforced_total.inc();
        st.outlier_detection_ejections_total.inc();
        match kind {
            Kind::Consecutive5xx => st.outlier_detection_ejections_enforced_consecutive_5xx.inc(),
            Kind::ConsecutiveGatewayFailure => {
                st.outlier_detection_ejections_enforced_consecutive_gateway_failure.inc()
            }
            Kind::ConsecutiveLocalOriginFailure => {
                st.outlier_detection_ejections_enforced_consecutive_local_origin_failure.inc()
            }
            Kind::SuccessRate => st.outlier_detection_ejections_enforced_success_rate.inc(),
            Kind::FailurePercentage => st.outlier_detection_ejections_enforced_failure_percentage.inc(),
        }
        st.outlier_detection_ejections_active.set(active + 1);
        tracing::warn!(
            cluster = %self.cluster,
            host = %host,
            reason = kind.name(),
            for_ms = ejection_time(&cfg, monitor.state.lock().unwrap_or_else(|e| e.into_inner()).backoff).as_millis() as u64,
            "outlier detection: host ejected"
        );
        crate::snapshot::lb::availability_changed();
    }

    /// Counts the hosts ejected now, and sets the gauge.
    pub fn refresh_active(&self, now: Instant) -> u64 {
        let cfg = self.cfg();
        let n = self
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|m| m.ejected_until(&cfg, now).is_some())
            .count() as u64;
        self.stats.outlier_detection_ejections_active.set(n);
        n
    }
}

/// Whether an enforcement percentage rolls in favour of ejecting.
fn enforced(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && crate::snapshot::lb::random() % 100 < u64::from(percent))
}

/// Every cluster's detector, for as long as a snapshot uses it.
#[derive(Debug, Default)]
pub struct Detectors {
    clusters: Mutex<HashMap<String, Weak<Detector>>>,
}

impl Detectors {
    /// The detector of `cluster`: the one already running, or a new one.
    pub fn cluster(&self, cluster: &str, cfg: &OutlierCfg, stats: &Arc<ClusterStats>) -> Arc<Detector> {
        let mut m = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = m.get(cluster).and_then(Weak::upgrade) {
            return d;
        }
        m.retain(|_, w| w.strong_count() > 0);
        let d = Arc::new(Detector {
            cluster: cluster.to_string(),
            cfg: Mutex::new(cfg.clone()),
            hosts: Mutex::default(),
            stats: stats.clone(),
        });
        m.insert(cluster.to_string(), Arc::downgrade(&d));
        // The rate detectors look every `interval`, while the detector is in use.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(rates::every_interval(Arc::downgrade(&d)));
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: u32, pct: u32) -> OutlierCfg {
        OutlierCfg {
            consecutive_5xx: n,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: pct,
            split: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            rates: Default::default(),
        }
    }

    #[test]
    fn with_the_split_connect_failures_count_apart_from_the_upstreams_answers() {
        let c = OutlierCfg { split: true, consecutive_local_origin_failure: 2, ..cfg(2, 100) };
        let d = Detectors::default().cluster("c", &c, &Default::default());
        let m = d.update(c.clone(), &[addr(1)]);
        // A 503 and a connect failure: neither streak reaches 2.
        d.record(&m[0], &addr(1), Outcome::Status(503));
        d.record(&m[0], &addr(1), Outcome::ConnectFailed);
        d.record(&m[0], &addr(1), Outcome::Connected);
        d.record(&m[0], &addr(1), Outcome::ConnectTimeout);
        assert!(m[0].ejected_until(&c, Instant::now()).is_none(), "a connection made resets the local streak");
        d.record(&m[0], &addr(1), Outcome::ConnectFailed);
        assert!(m[0].ejected_until(&c, Instant::now()).is_some(), "two local-origin failures in a row");
        assert_eq!(d.stats.outlier_detection_ejections_enforced_consecutive_local_origin_failure.get(), 1);
        assert_eq!(d.stats.outlier_detection_ejections_detected_consecutive_5xx.get(), 0);
    }

    fn addr(port: u16) -> HostAddr {
        HostAddr::Ip(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn n_failures_in_a_row_eject_and_a_success_resets_the_count() {
        let d = Detectors::default().cluster("c", &cfg(3, 100), &Default::default());
        let m = d.update(cfg(3, 100), &[addr(1), addr(2)]);
        let now = Instant::now();
        for _ in 0..2 {
            d.record(&m[0], &addr(1), Outcome::ConnectFailed);
        }
        d.record(&m[0], &addr(1), Outcome::Connected);
        d.record(&m[0], &addr(1), Outcome::Status(503));
        d.record(&m[0], &addr(1), Outcome::ConnectTimeout);
        assert!(m[0].ejected_until(&d.cfg(), now).is_none(), "the success reset the streak");
        d.record(&m[0], &addr(1), Outcome::Status(500));
        let until = m[0].ejected_until(&d.cfg(), Instant::now()).expect("ejected");
        assert!(until > now + Duration::from_secs(29));
        assert_eq!(d.stats.outlier_detection_ejections_active.get(), 1);
        assert_eq!(d.stats.outlier_detection_ejections_enforced_consecutive_5xx.get(), 1);
        assert!(m[0].ejected_until(&d.cfg(), now + Duration::from_secs(31)).is_none(), "back after the ejection time");
    }

    #[test]
    fn max_ejection_percent_holds_but_one_host_may_always_go() {
        let d = Detectors::default().cluster("c", &cfg(1, 10), &Default::default());
        let m = d.update(cfg(1, 10), &[addr(1), addr(2), addr(3)]);
        d.record(&m[0], &addr(1), Outcome::ConnectFailed);
        d.record(&m[1], &addr(2), Outcome::ConnectFailed);
        let now = Instant::now();
        assert!(m[0].ejected_until(&d.cfg(), now).is_some(), "one host is always allowed");
        assert!(m[1].ejected_until(&d.cfg(), now).is_none(), "a second would exceed 10 %");
        assert_eq!(d.stats.outlier_detection_ejections_overflow.get(), 1);
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_state_survives_updates() {
        let c = cfg(1, 100);
        let d = Detectors::default().cluster("c", &c, &Default::default());
        let m = d.update(c.clone(), &[addr(1)]);
        d.record(&m[0], &addr(1), Outcome::ConnectFailed);
        m[0].state.lock().unwrap().ejected_at = Some(Instant::now() - Duration::from_secs(31));
        assert!(m[0].ejected_until(&c, Instant::now()).is_none());
        // Back in, fails again at once: twice as long now.
        m[0].state.lock().unwrap().returned_at = Some(Instant::now());
        d.record(&m[0], &addr(1), Outcome::ConnectFailed);
        let until = m[0].ejected_until(&c, Instant::now()).unwrap();
        assert!(until > Instant::now() + Duration::from_secs(59), "{:?}", until - Instant::now());
        let again = d.update(c.clone(), &[addr(1), addr(2)]);
        assert!(Arc::ptr_eq(&again[0], &m[0]), "the host's state is kept across updates");
    }
}
