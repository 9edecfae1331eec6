//! Envoy's `TokenBucket`, shared by the HTTP and the network `local_ratelimit` filters:
//! full at first, `tokens_per_fill` more every `fill_interval` up to `max_tokens`. The
//! fills are counted when a token is asked for, not by a timer.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Bucket {
    max: u64,
    per_fill: u64,
    interval: Duration,
    state: Mutex<(u64, Instant)>,
}

impl Bucket {
    pub fn from_proto(b: &envoy_types::pb::envoy::r#type::v3::TokenBucket) -> Result<Bucket, String> {
        let interval = b.fill_interval.as_ref().map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32));
        let interval = interval.filter(|d| !d.is_zero()).ok_or("token_bucket.fill_interval is required")?;
        if b.max_tokens == 0 {
            return Err("token_bucket.max_tokens must be at least 1".into());
        }
        let max = u64::from(b.max_tokens);
        Ok(Bucket {
            max,
            per_fill: b.tokens_per_fill.map_or(1, |v| u64::from(v.value)),
            interval,
            state: Mutex::new((max, Instant::now())),
        })
    }

    /// Moves the last fill back, as if `by` had passed.
    #[cfg(test)]
    pub fn rewind(&self, by: Duration) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 -= by;
    }

    /// Takes a token; false when there is none.
    pub fn take(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *st;
        let fills = (last.elapsed().as_nanos() / self.interval.as_nanos().max(1)) as u64;
        if fills > 0 {
            *tokens = (*tokens + fills.saturating_mul(self.per_fill)).min(self.max);
            *last += self.interval * fills.min(u64::from(u32::MAX)) as u32;
        }
        if *tokens > 0 {
            *tokens -= 1;
            true
        } else {
            false
        }
    }
}
