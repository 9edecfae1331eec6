//! Load balancing over a cluster's hosts, as Envoy does it: priority levels with the
//! overprovisioning factor and spill-over by each level's healthy share, panic mode,
//! and weighted round robin by earliest deadline first (EDF), so that weights hold
//! exactly over each cycle.
//!
//! Consistent hashing (RING_HASH, MAGLEV) picks within a level by a request's hash
//! ([`super::hashing`]); the hash also picks the level, as Envoy's does.
//!
//! Which hosts may take traffic changes at run time (active health checks, outlier
//! ejections); what the picking needs is worked out once per change into a [`Plan`],
//! not on every pick: a global epoch counts availability changes, and a plan also
//! expires when its first ejection ends.

use super::cluster::{Host, LbPolicy};
use super::hashing::{Hashing, Table};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// Bumped whenever a host's availability changes anywhere (health check verdict,
/// ejection): cached plans are stale then.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Says that some host's availability changed.
pub fn availability_changed() {
    EPOCH.fetch_add(1, Ordering::Release);
}

/// Envoy's defaults: `overprovisioning_factor` 140 (%), `healthy_panic_threshold` 50 (%).
pub const DEFAULT_OVERPROVISIONING: u32 = 140;
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// The longest EDF cycle kept precomputed; larger weight sums are scaled down.
const MAX_CYCLE: u64 = 4096;

/// The hosts a route balances over, in priority levels.
#[derive(Debug)]
pub struct HostSet {
    /// Every host with a weight, all priorities (EDS-unhealthy ones too: they count in
    /// their level's health), in EDS order.
    pub hosts: Vec<Arc<Host>>,
    overprovisioning: u32,
    panic_threshold: u32,
    /// RING_HASH or MAGLEV: each level's plan has its table.
    hashing: Option<Hashing>,
    plan: RwLock<Arc<Plan>>,
}

impl Default for HostSet {
    fn default() -> Self {
        HostSet::new(vec![], DEFAULT_OVERPROVISIONING, DEFAULT_PANIC_THRESHOLD, None)
    }
}

/// What picking needs, for one state of host availability.
#[derive(Debug, Default)]
struct Plan {
    epoch: u64,
    /// The plan is stale from then on (an ejection ends).
    expires: Option<Instant>,
    /// Per level, the cumulative share of traffic in percent (the last is 100).
    loads: Vec<u32>,
    levels: Vec<Level>,
}

/// The hosts of one priority level that take traffic now.
#[derive(Debug, Default)]
struct Level {
    hosts: Vec<Arc<Host>>,
    /// Host indexes in EDF order for one cycle of the weights; empty when all weights
    /// are equal (plain rotation).
    cycle: Vec<u32>,
    /// Cumulative weights, for random and least-request picks; empty when uniform.
    cumulative: Vec<u64>,
    next: AtomicUsize,
    /// The consistent-hashing table over `hosts`, when the cluster hashes.
    table: Option<Table>,
}

impl HostSet {
    pub fn new(hosts: Vec<Arc<Host>>, overprovisioning: u32, panic_threshold: u32, hashing: Option<Hashing>) -> Self {
        let hosts: Vec<Arc<Host>> = hosts.into_iter().filter(|h| h.weight > 0).collect();
        let set = HostSet {
            hosts,
            overprovisioning: overprovisioning.max(1),
            panic_threshold: panic_threshold.min(100),
            hashing,
            plan: RwLock::new(Arc::new(Plan { epoch: u64::MAX, ..Plan::default() })),
        };
        set.current();
        set
    }

    /// The same levels' settings over other hosts (a subset).
    pub fn with_hosts(&self, hosts: Vec<Arc<Host>>) -> Self {
        HostSet::new(hosts, self.overprovisioning, self.panic_threshold, self.hashing)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Picks a host. `attempt` > 0 on retries; round robin moves on by itself, random
    /// and least-request draw again, hashing moves along its table. `hash`: the
    /// request's, for a hashing cluster (without one, a random number stands in, as in
    /// Envoy).
    pub fn pick(&self, lb: LbPolicy, attempt: u32, hash: Option<u64>) -> Option<Arc<Host>> {
        let plan = self.current();
        let hash = self.hashing.map(|_| hash.unwrap_or_else(random));
        let level = match plan.loads.len() {
            0 => return None,
            1 => &plan.levels[0],
            _ => {
                let point = (hash.unwrap_or_else(random) % 100) as u32;
                &plan.levels[plan.loads.partition_point(|&l| l <= point).min(plan.levels.len() - 1)]
            }
        };
        match (&level.table, hash) {
            (Some(table), Some(h)) => table.pick(h, attempt).and_then(|i| level.hosts.get(i)).cloned(),
            _ => level.pick(lb, attempt).cloned(),
        }
    }

    /// The plan for the hosts' availability now, worked out again if it changed.
    fn current(&self) -> Arc<Plan> {
        let epoch = EPOCH.load(Ordering::Acquire);
        {
            let plan = self.plan.read().unwrap_or_else(|e| e.into_inner());
            if plan.epoch == epoch && plan.expires.is_none_or(|t| Instant::now() < t) {
                return plan.clone();
            }
        }
        let plan = Arc::new(self.work_out(epoch));
        *self.plan.write().unwrap_or_else(|e| e.into_inner()) = plan.clone();
        plan
    }

    fn work_out(&self, epoch: u64) -> Plan {
        let now = Instant::now();
        let mut expires: Option<Instant> = None;
        // Per priority: every host, and those available now.
        type AllAndUp = (Vec<Arc<Host>>, Vec<Arc<Host>>);
        let mut by_priority: BTreeMap<u32, AllAndUp> = BTreeMap::new();
        for h in &self.hosts {
            let (all, up) = by_priority.entry(h.priority).or_default();
            all.push(h.clone());
            match h.available(now) {
                Ok(()) => up.push(h.clone()),
                Err(Some(until)) => {
                    expires = Some(expires.map_or(until, |e| e.min(until)));
                }
                Err(None) => {}
            }
        }
        let counts: Vec<(usize, usize)> = by_priority.values().map(|(all, up)| (all.len(), up.len())).collect();
        let shares = shares(&counts, self.overprovisioning, self.panic_threshold);
        let levels = by_priority
            .into_values()
            .zip(&shares.panic)
            .map(|((all, up), &panic)| Level::new(if panic { all } else { up }, self.hashing.as_ref()))
            .collect();
        let loads = shares
            .loads
            .iter()
            .scan(0u32, |acc, l| {
                *acc += l;
                Some(*acc)
            })
            .collect();
        Plan { epoch, expires, loads, levels }
    }
}

/// How traffic is split over priority levels.
#[derive(Debug, PartialEq, Eq)]
struct Shares {
    /// Percent per level, summing to 100 (or all zero with no hosts).
    loads: Vec<u32>,
    /// Whether each level balances over all its hosts, healthy or not.
    panic: Vec<bool>,
}

/// Envoy's priority load: each level's health is its healthy share of hosts times the
/// overprovisioning factor (at most 100 %); levels take load in order up to their
/// health, normalised when the levels' health sums to less than 100. A level whose
/// healthy share is under the panic threshold is in panic unless the levels are
/// healthy enough overall; when every level is, load follows host counts.
/// `counts`: (hosts, healthy hosts) per level, in priority order.
fn shares(counts: &[(usize, usize)], overprovisioning: u32, panic_threshold: u32) -> Shares {
    let n = counts.len();
    let mut loads = vec![0u32; n];
    if n == 0 {
        return Shares { loads, panic: vec![] };
    }
    let health: Vec<u32> = counts
        .iter()
        .map(|&(all, up)| (overprovisioning as usize * up).checked_div(all).unwrap_or(0).min(100) as u32)
        .collect();
    let total = health.iter().sum::<u32>().min(100);
    if total == 0 && panic_threshold == 0 {
        loads[0] = 100;
        return Shares { loads, panic: vec![false; n] };
    }
    let panic: Vec<bool> = counts
        .iter()
        .map(|&(all, up)| total != 100 && all > 0 && ((100 * up / all) as u32) < panic_threshold)
        .collect();
    if panic.iter().all(|&p| p) {
        let hosts: usize = counts.iter().map(|c| c.0).sum();
        if hosts == 0 {
            return Shares { loads, panic };
        }
        let mut left = 100u32;
        for (l, &(all, _)) in loads.iter_mut().zip(counts) {
            *l = (100 * all / hosts) as u32;
            left -= *l;
        }
        loads[0] += left;
        return Shares { loads, panic };
    }
    let mut left = 100u32;
    let mut first = None;
    for (i, &h) in health.iter().enumerate() {
        if first.is_none() && h > 0 {
            first = Some(i);
        }
        loads[i] = left.min(h * 100 / total.max(1));
        left -= loads[i];
    }
    loads[first.unwrap_or(0)] += left;
    Shares { loads, panic }
}

impl Level {
    fn new(hosts: Vec<Arc<Host>>, hashing: Option<&Hashing>) -> Self {
        let table = hashing.map(|h| Table::build(h, &hosts));
        let uniform = hosts.windows(2).all(|w| w[0].weight == w[1].weight);
        let (cycle, cumulative) = if uniform || table.is_some() {
            (vec![], vec![])
        } else {
            let weights: Vec<u64> = hosts.iter().map(|h| u64::from(h.weight)).collect();
            let cumulative = weights
                .iter()
                .scan(0u64, |acc, w| {
                    *acc += w;
                    Some(*acc)
                })
                .collect();
            (edf_cycle(&weights), cumulative)
        };
        Level { hosts, cycle, cumulative, next: AtomicUsize::new(0), table }
    }

    fn pick(&self, lb: LbPolicy, attempt: u32) -> Option<&Arc<Host>> {
        let n = self.hosts.len();
        if n <= 1 {
            return self.hosts.first();
        }
        let i = match lb {
            LbPolicy::RoundRobin => {
                let tick = self.next.fetch_add(1, Ordering::Relaxed);
                match self.cycle.len() {
                    0 => tick % n,
                    len => self.cycle[tick % len] as usize,
                }
            }
            // Hashing clusters pick by their table; this is for a level without one.
            LbPolicy::Random | LbPolicy::RingHash | LbPolicy::Maglev => {
                self.weighted(random().wrapping_add(u64::from(attempt)))
            }
            LbPolicy::LeastRequest => {
                // Power of two choices, weighted by the hosts' weights.
                let r = random();
                let (a, b) = (self.weighted(r), self.weighted(r.rotate_left(32)));
                let load = |i: usize| {
                    let h = &self.hosts[i];
                    (h.active.load(Ordering::Relaxed) + 1) * 1_000_000 / u64::from(h.weight.max(1))
                };
                if load(b) < load(a) { b } else { a }
            }
        };
        self.hosts.get(i)
    }

    fn weighted(&self, r: u64) -> usize {
        match self.cumulative.last() {
            None => (r % self.hosts.len() as u64) as usize,
            Some(&total) => self.cumulative.partition_point(|&c| c <= r % total),
        }
    }
}

/// One cycle of earliest-deadline-first picks: host `i` with weight `w` is due every
/// `1/w`; the earliest deadline goes next, ties to the lower index. Over a cycle each
/// host is picked exactly its weight's times (weights reduced by their common divisor,
/// and scaled down when they sum to more than [`MAX_CYCLE`]).
fn edf_cycle(weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let sum: u64 = w.iter().sum();
    if sum > MAX_CYCLE {
        w = w.iter().map(|x| (x * MAX_CYCLE / sum).max(1)).collect();
    }
    let sum: u64 = w.iter().sum();
    // Deadlines as fractions k/w compared exactly: (k1 * w2) vs (k2 * w1).
    let mut due: Vec<u64> = vec![1; w.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for i in 1..w.len() {
            if u128::from(due[i]) * u128::from(w[best]) < u128::from(due[best]) * u128::from(w[i]) {
                best = i;
            }
        }
        out.push(best as u32);
        due[best] += 1;
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A fast non-cryptographic random number (per-thread xorshift), for load balancing,
/// weights, faults and request ids.
pub fn random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edf_honours_small_weights_exactly_per_cycle() {
        let c = edf_cycle(&[1, 2, 7]);
        assert_eq!(c.len(), 10);
        let count = |i| c.iter().filter(|&&x| x == i).count();
        assert_eq!((count(0), count(1), count(2)), (1, 2, 7));
        // Interleaved by deadline (k/w), ties to the first host: Envoy's order.
        assert_eq!(c, [2, 2, 2, 1, 2, 2, 2, 0, 1, 2]);
        assert_eq!(edf_cycle(&[100, 300]).len(), 4, "common divisor removed");
        assert!(edf_cycle(&[1, 1_000_000]).len() <= MAX_CYCLE as usize + 1);
    }

    #[test]
    fn priority_shares_follow_envoys_arithmetic() {
        let s = |c: &[(usize, usize)]| shares(c, 140, 50);
        // All healthy: everything to P0.
        assert_eq!(s(&[(2, 2), (2, 2)]).loads, [100, 0]);
        // Half of P0 down: 140 % * 1/2 = 70 % stays, 30 % spills.
        assert_eq!(s(&[(2, 1), (2, 2)]).loads, [70, 30]);
        // P0 a third healthy: 46 %; it is in panic only if the total is short.
        assert_eq!(s(&[(3, 1), (2, 2)]), Shares { loads: vec![46, 54], panic: vec![false, false] });
        // Nothing healthy in P0.
        assert_eq!(s(&[(2, 0), (2, 2)]).loads, [0, 100]);
        // Both levels short: normalised to 100, P0 in panic (under 50 %).
        assert_eq!(s(&[(4, 1), (4, 1)]), Shares { loads: vec![50, 50], panic: vec![true, true] });
        assert_eq!(s(&[(10, 1), (2, 1)]), Shares { loads: vec![17, 83], panic: vec![true, false] });
        // No healthy host anywhere: total panic, load by host count.
        assert_eq!(s(&[(3, 0), (1, 0)]), Shares { loads: vec![75, 25], panic: vec![true, true] });
        // Panic disabled and nothing healthy: P0 takes the (unservable) load.
        assert_eq!(shares(&[(3, 0)], 140, 0), Shares { loads: vec![100], panic: vec![false] });
    }
}
