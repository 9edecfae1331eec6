//! What every accept loop does when accept(2) fails. Out of file descriptors (EMFILE,
//! ENFILE) or memory, accepting again at once fails again at once: the loop would spin a
//! core exactly when the process is overloaded. So it backs off, doubling the pause
//! while the errors last (the connections it holds keep being served meanwhile), counts
//! every failure, and logs at most once per second with how many it did not log.

use crate::stats::Counter;
use std::io;
use std::time::{Duration, Instant};

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_millis(200);
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One accept loop's failure state.
#[derive(Debug)]
pub struct AcceptErrors {
    /// What the loop accepts for, for the log (`listener 0.0.0.0:10001`, `admin`, ...).
    what: String,
    pause: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    pub fn new(what: impl Into<String>) -> Self {
        AcceptErrors { what: what.into(), pause: FIRST_PAUSE, last_log: None, unlogged: 0 }
    }

    /// A connection was accepted: the next failure starts from a short pause again.
    pub fn accepted(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// Counts and maybe logs the failure, then waits before the next accept.
    pub async fn failed(&mut self, e: &io::Error, counter: Option<&Counter>) {
        if let Some(c) = counter {
            c.inc();
        }
        let now = Instant::now();
        if self.last_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            let hint = if out_of_descriptors(e) {
                "; out of file descriptors: raise the limit (ulimit -n) or lower the connection limits"
            } else {
                ""
            };
            tracing::warn!(
                accepting = %self.what,
                error = %e,
                not_logged = self.unlogged,
                pause_ms = self.pause.as_millis() as u64,
                "accept failed{hint}"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_to_a_cap_and_logging_is_rate_limited() {
        let mut a = AcceptErrors::new("test");
        let c = Counter::default();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            a.failed(&e, Some(&c)).await;
        }
        // 5 + 10 + ... + 160, then 200 for the rest.
        assert_eq!(t0.elapsed(), Duration::from_millis(5 + 10 + 20 + 40 + 80 + 160 + 4 * 200));
        assert_eq!(c.get(), 10);
        assert_eq!(a.pause, LONGEST_PAUSE);
        a.accepted();
        assert_eq!(a.pause, FIRST_PAUSE);
    }
}
