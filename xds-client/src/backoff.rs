//! Exponential backoff with full jitter: the n-th delay is uniform in `[0, min(max, initial * 2^n)]`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Reconnect delays. Defaults: `initial` 100 ms, `max` 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(100), max: Duration::from_secs(10) }
    }
}

/// The running state of one [`Backoff`].
#[derive(Debug)]
pub struct Retry {
    config: Backoff,
    attempt: u32,
    rng: u64,
}

impl Retry {
    pub fn new(config: Backoff) -> Self {
        // A random seed without a dependency: std's per-process random SipHash keys.
        let seed = RandomState::new().build_hasher().finish() | 1;
        Self { config, attempt: 0, rng: seed }
    }

    /// Back to the first delay (after a stream that delivered a response).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The cap of the current attempt, before jitter.
    pub(crate) fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.config.initial.saturating_mul(factor).min(self.config.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_up_to_max_and_reset() {
        let mut r = Retry::new(Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) });
        let mut caps = Vec::new();
        for _ in 0..6 {
            caps.push(r.cap().as_millis());
            let d = r.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        r.reset();
        assert_eq!(r.cap(), Duration::from_millis(100));
        for _ in 0..100 {
            r.next_delay();
        }
        assert_eq!(r.cap(), Duration::from_secs(1), "no overflow after many attempts");
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut r = Retry::new(Backoff { initial: Duration::from_secs(10), max: Duration::from_secs(10) });
        let delays: std::collections::BTreeSet<_> = (0..50).map(|_| r.next_delay()).collect();
        assert!(delays.len() > 40, "full jitter gives distinct delays: {}", delays.len());
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
    }
}
