//! Logging: plain text on stderr, with the level changeable at run time through the
//! admin API (`POST /logging?level=debug`).
//!
//! Lines are written by a background thread in batches ([`LineQueue`]): a connection's
//! access-log line costs an append to a buffer, not a write(2) and not a thread wake-up
//! on the data path (Envoy's access logs are flushed by a thread of their own too).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

/// Handle to change the log level of the running process (and to see what the log writer
/// had to drop).
#[derive(Clone)]
pub struct LogLevel(reload::Handle<LevelFilter, Registry>, Arc<Shared>);

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// The filter for a kuma-dp level name. Access logs follow the level, except that
/// `info` keeps them (they are the per-connection record users rely on).
/// (A plain level filter: an `EnvFilter` would link the regex engine for nothing.)
fn filter(level: &str) -> Result<LevelFilter, String> {
    if !LEVELS.contains(&level) {
        return Err(format!("unknown log level `{level}`; use one of {}", LEVELS.join(", ")));
    }
    level.parse::<LevelFilter>().map_err(|e| e.to_string())
}

impl LogLevel {
    pub fn set(&self, level: &str) -> Result<(), String> {
        let f = filter(level)?;
        self.0.reload(f).map_err(|e| e.to_string())
    }

    /// Lines dropped because the queue was full (stderr blocked, or a burst larger than
    /// it): counted, as a lost access-log line must not go unnoticed.
    pub fn dropped_lines(&self) -> u64 {
        self.1.dropped.load(Ordering::Relaxed)
    }
}

/// Bytes of lines waiting for the writer at most; beyond, lines are dropped and counted
/// (the data path never waits for stderr).
const QUEUE_LIMIT: usize = 1024 * 1024;
/// How long the writer lets lines gather after the first one of a batch arrived: one
/// write(2) and one wake-up per this interval under load, instead of one per line.
const LINGER: Duration = Duration::from_millis(10);
/// A batch buffer that grew past this (a burst) is given back after it was written.
const KEEP_CAPACITY: usize = 64 * 1024;

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
pub struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when the queue goes from empty to not, and on close.
    wake: Condvar,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one formatted line (tracing's fmt layer writes each event in one call).
    fn push(&self, line: &[u8]) {
        let mut q = self.lock();
        if q.bytes.len() + line.len() > QUEUE_LIMIT {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = q.bytes.is_empty();
        q.bytes.extend_from_slice(line);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for a first line, lets others gather for [`LINGER`],
    /// writes them all at once; after close, writes what is left and returns.
    fn run(&self, out: &mut dyn Write) {
        let mut batch = Vec::new();
        loop {
            let mut q = self.lock();
            while q.bytes.is_empty() && !q.closed {
                q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            if !q.closed {
                drop(q);
                std::thread::sleep(LINGER);
                q = self.lock();
            }
            std::mem::swap(&mut batch, &mut q.bytes);
            let closed = q.closed;
            drop(q);
            // A failing stderr cannot be reported anywhere; the lines are lost.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch.shrink_to(KEEP_CAPACITY);
            }
            if closed {
                return;
            }
        }
    }
}

/// What tracing's fmt layer writes lines into.
#[derive(Clone)]
struct LineQueue(Arc<Shared>);

impl Write for LineQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineQueue {
    type Writer = LineQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Keeps the log writer's thread alive; dropping it writes what is queued and waits.
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer thread for `out`.
fn start(out: Box<dyn Write + Send>) -> std::io::Result<(LineQueue, Flush)> {
    let shared = Arc::new(Shared::default());
    let writer = shared.clone();
    let thread = std::thread::Builder::new().name("dp-log".into()).spawn(move || {
        let mut out = out;
        writer.run(&mut out);
    })?;
    Ok((LineQueue(shared.clone()), Flush { shared, thread: Some(thread) }))
}

/// Installs the global subscriber. Fails on an unknown level name.
pub fn init(level: &str) -> Result<(LogLevel, Flush), String> {
    let (layer, handle) = reload::Layer::new(filter(level)?);
    let (writer, flush) =
        start(Box::new(std::io::stderr())).map_err(|e| format!("cannot start the log writer: {e}"))?;
    let shared = writer.0.clone();
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false))
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok((LogLevel(handle, shared), flush))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can read, and which can be made to block.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_queued_while_the_writer_is_busy_go_out_in_one_write_in_order_and_all_at_close() {
        let sink = Sink::default();
        // stderr blocks until the test opens the gate: whatever the scheduling, every line
        // queued meanwhile must leave in the writer's next write(2), not one write each.
        let gate = sink.gate.lock().unwrap();
        let (mut q, flush) = start(Box::new(sink.clone())).unwrap();
        let lines: Vec<String> = (0..2000).map(|i| format!("line {i}\n")).collect();
        for l in &lines {
            q.write_all(l.as_bytes()).unwrap();
        }
        drop(gate);
        drop(flush);
        assert_eq!(String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap(), lines.concat());
        // At most the batch the writer took before the gate blocked it, then the rest.
        let writes = sink.writes.load(Ordering::SeqCst);
        assert!(writes <= 2, "{writes} writes for 2000 lines");
    }

    #[test]
    fn a_blocked_stderr_drops_and_counts_lines_beyond_the_limit_and_never_blocks_the_caller() {
        let sink = Sink::default();
        let gate = sink.gate.lock().unwrap();
        let (mut q, flush) = start(Box::new(sink.clone())).unwrap();
        let line = vec![b'x'; 1023];
        let total = 3 * QUEUE_LIMIT / 1024;
        for _ in 0..total {
            q.write_all(&[&line[..], b"\n"].concat()).unwrap();
        }
        let dropped = q.0.dropped.load(Ordering::Relaxed) as usize;
        // At most one batch was taken by the writer (now blocked in write), and the queue
        // holds at most QUEUE_LIMIT bytes: everything beyond was dropped and counted.
        assert!(dropped >= total - 2 * QUEUE_LIMIT / 1024, "dropped {dropped} of {total}");
        drop(gate);
        drop(flush);
        let written = sink.bytes.lock().unwrap().len() / 1024;
        assert_eq!(written + dropped, total, "every line is either written or counted as dropped");
    }
}
