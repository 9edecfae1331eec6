//! Logging: plain text on stderr, with the level changeable at run time through the
//! admin API (`POST /logging?level=debug`).

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

/// Handle to change the log level of the running process (and to see what the log writer
/// had to drop).
#[derive(Clone)]
pub struct LogLevel(reload::Handle<LevelFilter, Registry>, tracing_appender::non_blocking::ErrorCounter);

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

    /// Lines dropped because the writer's queue was full (a burst larger than it, or
    /// stderr blocked): counted, as a lost access-log line must not go unnoticed.
    pub fn dropped_lines(&self) -> u64 {
        self.1.dropped_lines() as u64
    }
}

/// Keeps the log writer's thread alive; dropping it flushes what is queued.
pub type Flush = tracing_appender::non_blocking::WorkerGuard;

/// Installs the global subscriber. Fails on an unknown level name. Lines are written
/// by a background thread, so a connection's access-log line costs a queue push, not
/// a write(2) on the data path.
pub fn init(level: &str) -> Result<(LogLevel, Flush), String> {
    let (layer, handle) = reload::Layer::new(filter(level)?);
    // 8k queued lines: enough for bursts, and the queue is preallocated (the default
    // 128k lines would cost 4 MiB of idle memory). The writer thread flushes whenever
    // the queue is empty, so the buffer only batches the lines of a burst into one
    // write(2) and never holds a line back.
    let (writer, flush) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(8192)
        .finish(std::io::BufWriter::with_capacity(16 * 1024, std::io::stderr()));
    let dropped = writer.error_counter();
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false))
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok((LogLevel(handle, dropped), flush))
}
