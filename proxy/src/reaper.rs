//! Frees replaced configuration off the data path.
//!
//! A connection keeps the snapshot and the listener it was routed by until it ends, so
//! after an update the last old connection to end used to free them, on a data-path
//! worker: the listener of a 10,000-service zone ingress, its chain tables and the old
//! snapshot's encoded resources took tens of milliseconds to free, a stall for every
//! connection on that worker (benches/storm.py). The reaper holds one more reference to
//! each replaced object and drops it on its own thread once it is the only holder left.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

type Held = Arc<dyn Send + Sync>;

/// How often the reaper looks at what it holds while it holds anything.
const EVERY: Duration = Duration::from_millis(100);

static REAPER: OnceLock<Mutex<Option<Sender<Held>>>> = OnceLock::new();

/// Frees `old` on the reaper's thread once nobody else holds it.
pub fn later<T: Send + Sync + 'static>(old: Arc<T>) {
    let sender = REAPER.get_or_init(|| Mutex::new(start()));
    let sender = sender.lock().unwrap_or_else(|e| e.into_inner());
    match sender.as_ref() {
        Some(tx) => {
            // A reaper that is gone hands the object back; it is dropped here, as before.
            let _ = tx.send(old);
        }
        None => drop(old),
    }
}

fn start() -> Option<Sender<Held>> {
    let (tx, rx) = mpsc::channel::<Held>();
    let spawned = std::thread::Builder::new().name("dp-reaper".into()).spawn(move || {
        crate::app::yield_to_the_data_path();
        let mut held: Vec<Held> = vec![];
        loop {
            let next = if held.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(EVERY)
            };
            match next {
                Ok(x) => held.push(x),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // The count cannot rise again once it is 1: only this thread holds it then.
            held.retain(|x| Arc::strong_count(x) > 1);
        }
    });
    spawned.ok().map(|_| tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says which thread dropped it.
    struct Noted(Mutex<mpsc::Sender<Option<String>>>);

    impl Drop for Noted {
        fn drop(&mut self) {
            let name = std::thread::current().name().map(str::to_string);
            let _ = self.0.lock().unwrap().send(name);
        }
    }

    #[test]
    fn the_last_reference_is_dropped_on_the_reaper_thread() {
        let (tx, rx) = mpsc::channel();
        let obj = Arc::new(Noted(Mutex::new(tx)));
        let connection = obj.clone();
        later(obj);
        // The "connection" ends on this thread; the object is not freed here.
        drop(connection);
        let by = rx.recv_timeout(Duration::from_secs(10)).expect("freed");
        assert_eq!(by.as_deref(), Some("dp-reaper"));
    }
}
