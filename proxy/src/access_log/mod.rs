//! Configured access logs: Envoy's `access_log` on `tcp_proxy` and
//! `http_connection_manager` (what Kuma's MeshAccessLog writes), to a file (a regular
//! file, or the pipe kuma-dp reads for a TCP backend), stdout or stderr, in Envoy's text
//! or JSON formats ([`format`]).
//!
//! Lines go through a bounded queue to one writer thread, so a slow disk or a pipe
//! nobody reads never holds up a connection; when the queue is full, or the pipe has no
//! reader, the line is dropped and counted. Loggers dp does not have (gRPC,
//! OpenTelemetry, ...) and access-log `filter`s are noted once and left out: the entry
//! is observability, not routing.

pub mod format;
pub mod pipe;
mod time;

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{SubstitutionFormatString, data_source, substitution_format_string};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    StderrAccessLog, StdoutAccessLog, stderr_access_log, stdout_access_log,
};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use format::{LogFormat, Text};
use prost::Name;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// What one entry describes: a TCP connection, or an HTTP request on one.
#[derive(Debug, Default)]
pub struct Record<'a> {
    pub start: Option<SystemTime>,
    pub duration: Duration,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// HTTP's status; `None` for TCP (Envoy writes 0).
    pub response_code: Option<u16>,
    /// Envoy's response flags (`-` when none).
    pub flags: &'a str,
    pub cluster: Option<&'a str>,
    pub upstream_host: Option<String>,
    /// The client: for HTTP, the one `x-forwarded-for` names unless `use_remote_address`.
    pub remote: Option<SocketAddr>,
    /// The connection's peer.
    pub direct_remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// The client certificate's URI SANs, joined by `,` (Envoy's `%DOWNSTREAM_PEER_URI_SAN%`).
    pub peer_uri_san: Option<&'a str>,
    /// Its DNS SANs, likewise.
    pub peer_dns_san: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub connection_id: u64,
    pub http: Option<HttpRecord<'a>>,
}

/// The HTTP side of an entry.
#[derive(Debug)]
pub struct HttpRecord<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub protocol: &'a str,
    pub route_name: &'a str,
    pub request: &'a http::HeaderMap,
    pub response: Option<&'a http::HeaderMap>,
    /// Dynamic metadata `kuma.routes` / `route_kri`: what Kuma's Lua filter copies from
    /// the route (route-targeted MeshAccessLog filters its loggers by it).
    pub route_kri: Option<&'a str>,
}

/// The access logs of one filter (none: empty).
#[derive(Debug, Default)]
pub struct AccessLogs(Vec<Logger>);

#[derive(Debug)]
struct Logger {
    sink: Sink,
    format: LogFormat,
    /// An access-log `metadata_filter` on a dynamic metadata value dp keeps.
    filter: Option<MetaFilter>,
}

/// Envoy's `MetadataFilter`, on the one dynamic metadata value dp keeps
/// (`kuma.routes` / `route_kri`).
#[derive(Debug)]
struct MetaFilter {
    namespace: String,
    key: String,
    value: ValueMatch,
    invert: bool,
    /// The result when the value is not there (Envoy's default: true).
    if_not_found: bool,
}

#[derive(Debug)]
enum ValueMatch {
    Null,
    Present(bool),
    String(crate::matcher::StringMatch),
}

impl MetaFilter {
    fn from_proto(f: &envoy_types::pb::envoy::config::accesslog::v3::AccessLogFilter) -> Result<MetaFilter, String> {
        use envoy_types::pb::envoy::config::accesslog::v3::access_log_filter::FilterSpecifier;
        use envoy_types::pb::envoy::r#type::matcher::v3::metadata_matcher::path_segment::Segment;
        use envoy_types::pb::envoy::r#type::matcher::v3::value_matcher::MatchPattern;
        let Some(FilterSpecifier::MetadataFilter(m)) = &f.filter_specifier else {
            return Err("only metadata_filter is applied".into());
        };
        let matcher = m.matcher.as_ref().ok_or("metadata_filter has no matcher")?;
        let [seg] = matcher.path.as_slice() else { return Err("metadata_filter: one path segment only".into()) };
        let Some(Segment::Key(key)) = &seg.segment else { return Err("metadata_filter: no key".into()) };
        let value = match matcher.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
            Some(MatchPattern::NullMatch(_)) => ValueMatch::Null,
            Some(MatchPattern::PresentMatch(b)) => ValueMatch::Present(*b),
            Some(MatchPattern::StringMatch(s)) => ValueMatch::String(crate::matcher::StringMatch::from_proto(s)?),
            _ => return Err("metadata_filter: only null, present and string matches are applied".into()),
        };
        Ok(MetaFilter {
            namespace: matcher.filter.clone(),
            key: key.clone(),
            value,
            invert: matcher.invert,
            if_not_found: m.match_if_key_not_found.is_none_or(|b| b.value),
        })
    }

    fn admits(&self, r: &Record<'_>) -> bool {
        let found = match (self.namespace.as_str(), self.key.as_str()) {
            ("kuma.routes", "route_kri") => r.http.as_ref().and_then(|h| h.route_kri),
            _ => None,
        };
        let Some(v) = found else { return self.if_not_found };
        let hit = match &self.value {
            ValueMatch::Null => false,
            ValueMatch::Present(p) => *p,
            ValueMatch::String(m) => m.matches(v),
        };
        hit != self.invert
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Sink {
    File(Arc<Path>),
    Stdout,
    Stderr,
}

impl AccessLogs {
    /// `owner` names the filter in notes.
    pub fn build(list: &[AccessLog], owner: &str, notes: &mut Vec<String>) -> Result<AccessLogs, String> {
        let mut loggers = vec![];
        for (i, a) in list.iter().enumerate() {
            let Some(access_log::ConfigType::TypedConfig(any)) = &a.config_type else {
                notes.push(format!("{owner}: access_log[{i}] ({}) has no typed_config; left out", a.name));
                continue;
            };
            let filter = match a.filter.as_ref().map(MetaFilter::from_proto) {
                None => None,
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    notes.push(format!("{owner}: access_log[{i}] ({}): {e}; every entry is logged", a.name));
                    None
                }
            };
            let mut unknown = vec![];
            let (sink, format) = if any.type_url == FileAccessLog::type_url() {
                let f: FileAccessLog = prost::Message::decode(&any.value[..]).map_err(|e| e.to_string())?;
                if f.path.is_empty() {
                    return Err(format!("access_log[{i}]: the file logger has no path"));
                }
                let format = match &f.access_log_format {
                    None => default_format(&mut unknown)?,
                    #[allow(deprecated)]
                    Some(file_access_log::AccessLogFormat::Format(s)) if s.is_empty() => default_format(&mut unknown)?,
                    #[allow(deprecated)]
                    Some(file_access_log::AccessLogFormat::Format(s)) => {
                        LogFormat::Text { text: Text::parse(s, &mut unknown)?, omit_empty: false }
                    }
                    #[allow(deprecated)]
                    Some(file_access_log::AccessLogFormat::JsonFormat(s))
                    | Some(file_access_log::AccessLogFormat::TypedJsonFormat(s)) => {
                        LogFormat::json(&struct_json(s), false, &mut unknown)?
                    }
                    Some(file_access_log::AccessLogFormat::LogFormat(f)) => log_format(f, &mut unknown)?,
                };
                (Sink::File(Arc::from(Path::new(&f.path))), format)
            } else if any.type_url == StdoutAccessLog::type_url() {
                let f: StdoutAccessLog = prost::Message::decode(&any.value[..]).map_err(|e| e.to_string())?;
                let format = match &f.access_log_format {
                    Some(stdout_access_log::AccessLogFormat::LogFormat(f)) => log_format(f, &mut unknown)?,
                    None => default_format(&mut unknown)?,
                };
                (Sink::Stdout, format)
            } else if any.type_url == StderrAccessLog::type_url() {
                let f: StderrAccessLog = prost::Message::decode(&any.value[..]).map_err(|e| e.to_string())?;
                let format = match &f.access_log_format {
                    Some(stderr_access_log::AccessLogFormat::LogFormat(f)) => log_format(f, &mut unknown)?,
                    None => default_format(&mut unknown)?,
                };
                (Sink::Stderr, format)
            } else {
                notes
                    .push(format!("{owner}: access_log[{i}] {} ({}) is not supported; left out", a.name, any.type_url));
                continue;
            };
            if !unknown.is_empty() {
                notes.push(format!(
                    "{owner}: access_log[{i}] ({}): dp writes `-` for {}",
                    a.name,
                    unknown.iter().map(|u| format!("%{u}%")).collect::<Vec<_>>().join(", ")
                ));
            }
            loggers.push(Logger { sink, format, filter });
        }
        Ok(AccessLogs(loggers))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Formats the entry for every logger and queues the lines.
    pub fn log(&self, r: &Record<'_>) {
        for l in &self.0 {
            if l.filter.as_ref().is_some_and(|f| !f.admits(r)) {
                continue;
            }
            let line = l.format.line(r);
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue().try_send((l.sink.clone(), line))
            {
                dropped();
            }
        }
    }
}

fn default_format(unknown: &mut Vec<String>) -> Result<LogFormat, String> {
    Ok(LogFormat::Text { text: Text::parse(format::DEFAULT_FORMAT, unknown)?, omit_empty: false })
}

fn log_format(f: &SubstitutionFormatString, unknown: &mut Vec<String>) -> Result<LogFormat, String> {
    use substitution_format_string::Format;
    let omit_empty = f.omit_empty_values;
    Ok(match &f.format {
        #[allow(deprecated)]
        Some(Format::TextFormat(t)) => LogFormat::Text { text: Text::parse(t, unknown)?, omit_empty },
        Some(Format::TextFormatSource(ds)) => {
            let text = match &ds.specifier {
                Some(data_source::Specifier::InlineString(s)) => s.clone(),
                Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(data_source::Specifier::Filename(p)) => {
                    std::fs::read_to_string(p).map_err(|e| format!("log_format: {p}: {e}"))?
                }
                _ => return Err("log_format: text_format_source must be inline or a file".into()),
            };
            LogFormat::Text { text: Text::parse(&text, unknown)?, omit_empty }
        }
        Some(Format::JsonFormat(s)) => LogFormat::json(&struct_json(s), omit_empty, unknown)?,
        None => default_format(unknown)?,
    })
}

/// A protobuf `Struct` as JSON.
fn struct_json(s: &Struct) -> serde_json::Map<String, serde_json::Value> {
    fn value(v: &PbValue) -> serde_json::Value {
        match &v.kind {
            Some(Kind::StringValue(s)) => s.clone().into(),
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, Into::into),
            Some(Kind::BoolValue(b)) => (*b).into(),
            Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_json(s)),
            Some(Kind::ListValue(l)) => l.values.iter().map(value).collect(),
            Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
        }
    }
    s.fields.iter().map(|(k, v)| (k.clone(), value(v))).collect()
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

fn dropped() {
    let n = DROPPED.fetch_add(1, Ordering::Relaxed);
    if n.is_power_of_two() || n == 0 {
        tracing::warn!(dropped = n + 1, "access-log lines dropped (the writer is behind, or a pipe has no reader)");
    }
}

/// Lines waiting for the writer at most.
const QUEUE: usize = 16 * 1024;

fn queue() -> &'static SyncSender<(Sink, String)> {
    static Q: OnceLock<SyncSender<(Sink, String)>> = OnceLock::new();
    Q.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Sink, String)>(QUEUE);
        let spawned = std::thread::Builder::new().name("dp-access-log".into()).spawn(move || writer(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access-log writer; access-log lines are dropped");
        }
        tx
    })
}

/// Appends each line to its sink. Files stay open; one that fails is opened again for
/// the next line. A pipe is opened without blocking: with no reader yet, the line is
/// dropped.
fn writer(rx: std::sync::mpsc::Receiver<(Sink, String)>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut files: std::collections::HashMap<Arc<Path>, std::fs::File> = Default::default();
    while let Ok((sink, line)) = rx.recv() {
        let ok = match &sink {
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()).is_ok(),
            Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()).is_ok(),
            Sink::File(path) => {
                if !files.contains_key(path) {
                    let opened =
                        std::fs::OpenOptions::new().append(true).create(true).custom_flags(libc::O_NONBLOCK).open(path);
                    match opened {
                        Ok(f) => {
                            files.insert(path.clone(), f);
                        }
                        Err(e) => tracing::debug!(path = %path.display(), error = %e, "cannot open the access log"),
                    }
                }
                match files.get_mut(path).map(|f| f.write_all(line.as_bytes())) {
                    Some(Ok(())) => true,
                    Some(Err(_)) => {
                        files.remove(path);
                        false
                    }
                    None => false,
                }
            }
        };
        if !ok {
            dropped();
        }
    }
}
