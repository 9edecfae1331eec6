//! Envoy's interval detectors: every `interval`, each host's answers since the last look.
//! * Success rate (on by default): among the hosts with at least `request_volume` answers,
//!   when there are at least `minimum_hosts`, a host whose success rate is below
//!   mean − stdev × `stdev_factor` / 1000 is an outlier.
//! * Failure percentage (enforced at 0 % by default): a host with at least
//!   `request_volume` answers, among at least `minimum_hosts` such, whose failures reach
//!   `threshold` percent.
//!
//! Answers are 5xx (failure) or not; without the split, connections count too (a failed
//! one as a 503), as Envoy maps them.

use super::{Detector, Kind};
use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
use std::sync::Weak;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatesCfg {
    pub success_rate_minimum_hosts: u64,
    pub success_rate_request_volume: u64,
    pub success_rate_stdev_factor: u64,
    pub enforcing_success_rate: u32,
    pub failure_percentage_minimum_hosts: u64,
    pub failure_percentage_request_volume: u64,
    pub failure_percentage_threshold: u64,
    pub enforcing_failure_percentage: u32,
}

/// Envoy's defaults.
impl Default for RatesCfg {
    fn default() -> Self {
        RatesCfg {
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_success_rate: 100,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
        }
    }
}

impl RatesCfg {
    pub fn from_proto(o: &OutlierDetection) -> RatesCfg {
        let d = RatesCfg::default();
        let u = |v: Option<u32>, dflt: u64| v.map_or(dflt, u64::from);
        RatesCfg {
            success_rate_minimum_hosts: u(o.success_rate_minimum_hosts.map(|v| v.value), d.success_rate_minimum_hosts),
            success_rate_request_volume: u(
                o.success_rate_request_volume.map(|v| v.value),
                d.success_rate_request_volume,
            ),
            success_rate_stdev_factor: u(o.success_rate_stdev_factor.map(|v| v.value), d.success_rate_stdev_factor),
            enforcing_success_rate: o.enforcing_success_rate.map_or(d.enforcing_success_rate, |v| v.value),
            failure_percentage_minimum_hosts: u(
                o.failure_percentage_minimum_hosts.map(|v| v.value),
                d.failure_percentage_minimum_hosts,
            ),
            failure_percentage_request_volume: u(
                o.failure_percentage_request_volume.map(|v| v.value),
                d.failure_percentage_request_volume,
            ),
            failure_percentage_threshold: u(
                o.failure_percentage_threshold.map(|v| v.value),
                d.failure_percentage_threshold,
            )
            .min(100),
            enforcing_failure_percentage: o
                .enforcing_failure_percentage
                .map_or(d.enforcing_failure_percentage, |v| v.value),
        }
    }
}

/// The outliers among hosts' (successes, failures) of one interval, by index.
pub(super) fn outliers(cfg: &RatesCfg, answers: &[(u64, u64)]) -> Vec<(usize, Kind)> {
    let mut out = vec![];
    // Success rate.
    let rates: Vec<(usize, f64)> = answers
        .iter()
        .enumerate()
        .filter(|(_, (s, f))| s + f >= cfg.success_rate_request_volume.max(1))
        .map(|(i, (s, f))| (i, 100.0 * *s as f64 / (s + f) as f64))
        .collect();
    if !rates.is_empty() && rates.len() as u64 >= cfg.success_rate_minimum_hosts {
        let n = rates.len() as f64;
        let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
        let var = rates.iter().map(|(_, r)| (r - mean) * (r - mean)).sum::<f64>() / n;
        let threshold = mean - var.sqrt() * (cfg.success_rate_stdev_factor as f64 / 1000.0);
        out.extend(rates.iter().filter(|(_, r)| *r < threshold).map(|(i, _)| (*i, Kind::SuccessRate)));
    }
    // Failure percentage.
    let volumes: Vec<(usize, u64, u64)> = answers
        .iter()
        .enumerate()
        .filter(|(_, (s, f))| s + f >= cfg.failure_percentage_request_volume.max(1))
        .map(|(i, (s, f))| (i, *s, *f))
        .collect();
    if !volumes.is_empty() && volumes.len() as u64 >= cfg.failure_percentage_minimum_hosts {
        for (i, s, f) in volumes {
            if 100 * f >= cfg.failure_percentage_threshold * (s + f) && !out.iter().any(|(j, _)| *j == i) {
                out.push((i, Kind::FailurePercentage));
            }
        }
    }
    out
}

/// Runs the interval detectors of `d` for as long as it is in use.
pub(super) async fn every_interval(d: Weak<Detector>) {
    loop {
        let interval = match d.upgrade() {
            Some(d) => d.cfg().interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(d) = d.upgrade() else { return };
        d.evaluate(Instant::now());
    }
}

impl Detector {
    /// One interval: takes every host's answers since the last and ejects the outliers.
    pub(super) fn evaluate(&self, now: Instant) {
        let cfg = self.cfg();
        let hosts: Vec<_> =
            self.hosts.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(a, m)| (a.clone(), m.clone())).collect();
        let answers: Vec<(u64, u64)> = hosts
            .iter()
            .map(|(_, m)| std::mem::take(&mut m.state.lock().unwrap_or_else(|e| e.into_inner()).answers))
            .collect();
        for (i, kind) in outliers(&cfg.rates, &answers) {
            let enforcing = match kind {
                Kind::SuccessRate => cfg.rates.enforcing_success_rate,
                _ => cfg.rates.enforcing_failure_percentage,
            };
            let (addr, m) = &hosts[i];
            self.eject(m, addr, kind, enforcing, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_far_below_the_others_success_rate_is_an_outlier() {
        let cfg = RatesCfg::default();
        // Five hosts with 100 answers: four at 99 %, one at 50 %.
        let mut answers = vec![(99, 1); 4];
        answers.push((50, 50));
        assert_eq!(outliers(&cfg, &answers), [(4, Kind::SuccessRate)]);
        // Too few answers from one host: four hosts count, fewer than five.
        answers[0] = (10, 0);
        assert!(outliers(&cfg, &answers).is_empty());
        // All alike: nobody.
        assert!(outliers(&cfg, &[(90, 10); 6]).is_empty());
    }

    #[test]
    fn failure_percentage_takes_hosts_over_the_threshold() {
        let cfg =
            RatesCfg { failure_percentage_minimum_hosts: 2, success_rate_minimum_hosts: 100, ..Default::default() };
        let answers = [(10, 90), (100, 0), (40, 60)];
        assert_eq!(outliers(&cfg, &answers), [(0, Kind::FailurePercentage)]);
    }
}
