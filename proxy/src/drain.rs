//! Readiness state and graceful drain: SIGTERM flips readiness to TERMINATING, stops
//! the listeners, and waits for live connections up to the drain time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::Duration;
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    NotReady = 0,
    Ready = 1,
    Terminating = 2,
}

#[derive(Debug)]
pub struct Drain {
    state: AtomicU8,
    active: AtomicUsize,
    idle: Notify,
    stop_tx: watch::Sender<bool>,
    /// Set when the drain time ran out: live connections are cut.
    cut: AtomicBool,
    /// Wakes the connections [`Drain::unless_cut`] runs when `cut` is set.
    cut_notify: Notify,
}

/// Held by each live connection; dropping it lets the drain finish sooner.
#[derive(Debug)]
pub struct ConnGuard(Arc<Drain>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::new(Drain {
            state: AtomicU8::new(Readiness::NotReady as u8),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            stop_tx: watch::channel(false).0,
            cut: AtomicBool::new(false),
            cut_notify: Notify::new(),
        })
    }

    pub fn readiness(&self) -> Readiness {
        match self.state.load(Ordering::Acquire) {
            0 => Readiness::NotReady,
            1 => Readiness::Ready,
            _ => Readiness::Terminating,
        }
    }

    pub fn set_ready(&self) {
        let _ = self.state.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn track(self: &Arc<Self>) -> ConnGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.clone())
    }

    /// Tracks one more connection unless `limit` (> 0) are live already.
    pub fn try_track(self: &Arc<Self>, limit: usize) -> Option<ConnGuard> {
        if limit == 0 {
            return Some(self.track());
        }
        let admitted = self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1));
        admitted.is_ok().then(|| ConnGuard(self.clone()))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves when the drain starts; accept loops select on it.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// Starts the drain and waits until no connection is left or `deadline` passes.
    /// Returns the number of connections still open at the end.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.begin();
        self.wait(deadline).await
    }

    /// Readiness says TERMINATING and accept loops are told to stop.
    pub fn begin(&self) {
        self.state.store(Readiness::Terminating as u8, Ordering::Release);
        self.stop_tx.send_replace(true);
    }

    /// Cuts every live connection (the drain time ran out); each logs why as it goes.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.cut_notify.notify_waiters();
    }

    /// Whether [`Drain::cut`] was called.
    pub fn cut_off(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Runs `conn` to its end, or until connections are cut (`None`; dropping `conn`
    /// writes its record). A connection's task is woken by every read and write, so each
    /// poll only loads the cut flag: the `Notify` that wakes the task on a cut is polled
    /// once (and again only if the task's waker changes), where a channel in a `select!`
    /// would be polled, and its lock taken, on every wake.
    pub async fn unless_cut<F: Future>(&self, conn: F) -> Option<F::Output> {
        let notified = self.cut_notify.notified();
        tokio::pin!(notified, conn);
        // In the waiter list before the flag is first read: a later cut wakes this task.
        notified.as_mut().enable();
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if self.cut_off() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                if notified.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                registered = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Waits until no connection is left or `deadline` passes; returns how many are left.
    pub async fn wait(&self, deadline: Duration) -> usize {
        let wait_idle = async {
            loop {
                let notified = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait_idle).await;
        self.active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_connections_then_returns() {
        let d = Drain::new();
        d.set_ready();
        let g = d.track();
        // `join!` polls the drain first, so the check runs once the drain has begun.
        let check = async {
            assert_eq!(d.readiness(), Readiness::Terminating);
            assert!(*d.stopped().borrow());
            drop(g);
        };
        let (left, ()) = tokio::join!(d.drain(Duration::from_secs(30)), check);
        assert_eq!(left, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_the_deadline() {
        let d = Drain::new();
        let _g = d.track();
        assert_eq!(d.drain(Duration::from_secs(1)).await, 1);
    }

    #[tokio::test]
    async fn a_cut_ends_a_parked_connection_and_a_finished_one_keeps_its_output() {
        let d = Drain::new();
        assert_eq!(d.unless_cut(async { 7 }).await, Some(7));
        // Parked on a read that never comes: only the cut can wake it. On this
        // single-threaded runtime the spawned task's first poll has ended once `polled`
        // resolves.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (polled_tx, polled) = tokio::sync::oneshot::channel();
        let conn = tokio::spawn({
            let d = d.clone();
            async move {
                d.unless_cut(async move {
                    let _ = polled_tx.send(());
                    rx.await
                })
                .await
            }
        });
        polled.await.unwrap();
        assert!(!conn.is_finished());
        d.cut();
        // Without the wake the task would never run again: bounded, so that fails, not hangs.
        let out = tokio::time::timeout(Duration::from_secs(30), conn).await.expect("the cut woke the connection");
        assert_eq!(out.unwrap(), None);
        drop(tx);
        // After the cut, a connection is not started at all.
        assert_eq!(d.unless_cut(async { 7 }).await, None);
    }
}
