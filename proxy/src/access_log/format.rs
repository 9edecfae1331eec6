//! Envoy's access-log format strings: text with `%OPERATOR%`, `%OPERATOR(arg)%` and
//! `%OPERATOR(arg):max_length%` command operators, and JSON formats whose values are such
//! strings. Operators dp does not know print `-` (they are listed once when the config
//! loads): an access log is observability, and a line with a gap is better than none.

use super::Record;
use serde_json::Value;

/// Envoy's default access-log line.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \
\"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// A parsed format string.
#[derive(Debug, Clone, PartialEq)]
pub struct Text(Vec<Part>);

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Op { op: Op, max_len: Option<usize> },
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    StartTime(Option<String>),
    Duration,
    BytesReceived,
    BytesSent,
    Protocol,
    ResponseCode,
    ResponseFlags,
    /// `REQ(name?alternative)`, lowercased.
    Req(String, Option<String>),
    Resp(String, Option<String>),
    UpstreamHost,
    UpstreamCluster,
    RemoteAddress {
        port: bool,
    },
    DirectRemoteAddress {
        port: bool,
    },
    LocalAddress {
        port: bool,
    },
    LocalPort,
    PeerUriSan,
    PeerDnsSan,
    RequestedServerName,
    ConnectionId,
    RouteName,
    Hostname,
    /// Known to Envoy, not kept by dp.
    Unknown,
}

impl Op {
    /// Whether the value is a number (kept a number in JSON formats).
    fn numeric(&self) -> bool {
        matches!(
            self,
            Op::Duration | Op::BytesReceived | Op::BytesSent | Op::ResponseCode | Op::ConnectionId | Op::LocalPort
        )
    }
}

impl Text {
    /// Parses `s`; unknown operators go into `unknown`.
    pub fn parse(s: &str, unknown: &mut Vec<String>) -> Result<Text, String> {
        let mut parts = vec![];
        let mut lit = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('%') {
                lit.push('%');
                rest = r;
                continue;
            }
            let end =
                operator_end(rest).ok_or_else(|| format!("format `{}`: an operator is not closed", s.trim_end()))?;
            let token = &rest[..end];
            rest = &rest[end + 1..];
            // `NAME(arg)` and `:max_length` after it.
            let (body, max_len) = match token.rsplit_once("):") {
                Some((b, n)) if n.bytes().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                    (format!("{b})"), Some(n.parse::<usize>().map_err(|e| e.to_string())?))
                }
                _ => (token.to_string(), None),
            };
            let (name, arg) = match body.split_once('(') {
                Some((n, a)) => (n, Some(a.strip_suffix(')').ok_or_else(|| format!("operator %{token}%: no `)`"))?)),
                None => (body.as_str(), None),
            };
            let headers = |a: Option<&str>| -> Result<(String, Option<String>), String> {
                let a = a.ok_or_else(|| format!("%{name}% needs a header name"))?;
                let (h, alt) = match a.split_once('?') {
                    Some((h, alt)) => (h, Some(alt.to_ascii_lowercase())),
                    None => (a, None),
                };
                Ok((h.to_ascii_lowercase(), alt))
            };
            let op = match name {
                "START_TIME" => Op::StartTime(arg.map(str::to_owned)),
                "DURATION" => Op::Duration,
                "BYTES_RECEIVED" => Op::BytesReceived,
                "BYTES_SENT" => Op::BytesSent,
                "PROTOCOL" => Op::Protocol,
                "RESPONSE_CODE" => Op::ResponseCode,
                "RESPONSE_FLAGS" => Op::ResponseFlags,
                "REQ" => {
                    let (h, alt) = headers(arg)?;
                    Op::Req(h, alt)
                }
                "RESP" => {
                    let (h, alt) = headers(arg)?;
                    Op::Resp(h, alt)
                }
                "UPSTREAM_HOST" => Op::UpstreamHost,
                "UPSTREAM_CLUSTER" => Op::UpstreamCluster,
                "DOWNSTREAM_REMOTE_ADDRESS" => Op::RemoteAddress { port: true },
                "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Op::RemoteAddress { port: false },
                "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Op::DirectRemoteAddress { port: true },
                "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => Op::DirectRemoteAddress { port: false },
                "DOWNSTREAM_LOCAL_ADDRESS" => Op::LocalAddress { port: true },
                "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Op::LocalAddress { port: false },
                "DOWNSTREAM_LOCAL_PORT" => Op::LocalPort,
                "DOWNSTREAM_PEER_URI_SAN" => Op::PeerUriSan,
                "DOWNSTREAM_PEER_DNS_SAN" => Op::PeerDnsSan,
                "REQUESTED_SERVER_NAME" => Op::RequestedServerName,
                "CONNECTION_ID" => Op::ConnectionId,
                "ROUTE_NAME" => Op::RouteName,
                "HOSTNAME" => Op::Hostname,
                other => {
                    if !unknown.iter().any(|u| u == other) {
                        unknown.push(other.to_string());
                    }
                    Op::Unknown
                }
            };
            if !lit.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut lit)));
            }
            parts.push(Part::Op { op, max_len });
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        Ok(Text(parts))
    }

    /// The line for `r`; a missing value is `-`, or nothing with `omit_empty`.
    pub fn format(&self, r: &Record<'_>, omit_empty: bool, out: &mut String) {
        for p in &self.0 {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Op { op, max_len } => match value(op, r) {
                    Some(v) => out.push_str(match max_len {
                        Some(n) => truncate(&v, *n),
                        None => &v,
                    }),
                    None if omit_empty => {}
                    None => out.push('-'),
                },
            }
        }
    }

    /// A JSON format's value: a lone numeric operator stays a number and a missing lone
    /// value is `null`, as Envoy's JSON formatter writes them.
    fn json(&self, r: &Record<'_>, omit_empty: bool) -> Value {
        if let [Part::Op { op, max_len: None }] = self.0.as_slice() {
            return match value(op, r) {
                Some(v) if op.numeric() => v.parse::<u64>().map(Value::from).unwrap_or(Value::String(v)),
                Some(v) => Value::String(v),
                None => Value::Null,
            };
        }
        let mut s = String::new();
        self.format(r, omit_empty, &mut s);
        Value::String(s)
    }
}

/// Where an operator ends: its closing `%`, skipping any `%` inside parentheses (a
/// START_TIME format such as `%START_TIME(%s)%`).
fn operator_end(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '%' if depth <= 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn value(op: &Op, r: &Record<'_>) -> Option<String> {
    let header = |map: Option<&http::HeaderMap>, name: &str, pseudo: &dyn Fn(&str) -> Option<String>| {
        if name.starts_with(':') {
            return pseudo(name);
        }
        map?.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let req_pseudo = |name: &str| -> Option<String> {
        let h = r.http.as_ref()?;
        Some(match name {
            ":method" => h.method.to_string(),
            ":path" => h.path.to_string(),
            ":authority" => h.authority.to_string(),
            ":scheme" => h.scheme.to_string(),
            _ => return None,
        })
        .filter(|v| !v.is_empty())
    };
    let resp_pseudo = |name: &str| -> Option<String> {
        (name == ":status").then_some(r.response_code).flatten().map(|c| c.to_string())
    };
    let with_alt =
        |map: Option<&http::HeaderMap>, name: &str, alt: &Option<String>, pseudo: &dyn Fn(&str) -> Option<String>| {
            header(map, name, pseudo).or_else(|| alt.as_deref().and_then(|a| header(map, a, pseudo)))
        };
    match op {
        Op::StartTime(fmt) => {
            Some(super::time::format(r.start.unwrap_or_else(std::time::SystemTime::now), fmt.as_deref()))
        }
        Op::Duration => Some(r.duration.as_millis().to_string()),
        Op::BytesReceived => Some(r.bytes_received.to_string()),
        Op::BytesSent => Some(r.bytes_sent.to_string()),
        Op::Protocol => r.http.as_ref().map(|h| h.protocol.to_string()),
        // TCP connections have no response code: Envoy writes 0.
        Op::ResponseCode => Some(r.response_code.unwrap_or(0).to_string()),
        Op::ResponseFlags => Some(r.flags.to_string()),
        Op::Req(name, alt) => with_alt(r.http.as_ref().map(|h| h.request), name, alt, &req_pseudo),
        Op::Resp(name, alt) => with_alt(r.http.as_ref().and_then(|h| h.response), name, alt, &resp_pseudo),
        Op::UpstreamHost => r.upstream_host.clone(),
        Op::UpstreamCluster => r.cluster.filter(|c| !c.is_empty()).map(str::to_owned),
        Op::RemoteAddress { port } => r.remote.map(|a| if *port { a.to_string() } else { a.ip().to_string() }),
        Op::DirectRemoteAddress { port } => {
            r.direct_remote.map(|a| if *port { a.to_string() } else { a.ip().to_string() })
        }
        Op::LocalAddress { port } => r.local.map(|a| if *port { a.to_string() } else { a.ip().to_string() }),
        Op::LocalPort => r.local.map(|a| a.port().to_string()),
        Op::PeerUriSan => r.peer_uri_san.map(str::to_owned),
        Op::PeerDnsSan => r.peer_dns_san.map(str::to_owned),
        Op::RequestedServerName => r.sni.filter(|s| !s.is_empty()).map(str::to_owned),
        Op::ConnectionId => Some(r.connection_id.to_string()),
        Op::RouteName => r.http.as_ref().map(|h| h.route_name).filter(|n| !n.is_empty()).map(str::to_owned),
        Op::Hostname => hostname(),
        Op::Unknown => None,
    }
}

fn hostname() -> Option<String> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string())).clone()
}

/// A `log_format`: text, or a JSON object of format strings.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    Text { text: Text, omit_empty: bool },
    Json { fields: Vec<(String, JsonField)>, omit_empty: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub enum JsonField {
    Format(Text),
    Object(Vec<(String, JsonField)>),
    Fixed(Value),
}

impl LogFormat {
    pub fn json(
        obj: &serde_json::Map<String, Value>,
        omit_empty: bool,
        unknown: &mut Vec<String>,
    ) -> Result<Self, String> {
        Ok(LogFormat::Json { fields: json_fields(obj, unknown)?, omit_empty })
    }

    /// One entry: a text format as written (its newline included, as in Envoy), a JSON
    /// object on one line.
    pub fn line(&self, r: &Record<'_>) -> String {
        match self {
            LogFormat::Text { text, omit_empty } => {
                let mut s = String::with_capacity(256);
                text.format(r, *omit_empty, &mut s);
                s
            }
            LogFormat::Json { fields, omit_empty } => {
                let mut s = Value::Object(json_value(fields, r, *omit_empty)).to_string();
                s.push('\n');
                s
            }
        }
    }
}

fn json_fields(
    obj: &serde_json::Map<String, Value>,
    unknown: &mut Vec<String>,
) -> Result<Vec<(String, JsonField)>, String> {
    let mut out = vec![];
    for (k, v) in obj {
        let f = match v {
            Value::String(s) => JsonField::Format(Text::parse(s, unknown)?),
            Value::Object(o) => JsonField::Object(json_fields(o, unknown)?),
            other => JsonField::Fixed(other.clone()),
        };
        out.push((k.clone(), f));
    }
    Ok(out)
}

fn json_value(fields: &[(String, JsonField)], r: &Record<'_>, omit_empty: bool) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for (k, f) in fields {
        let v = match f {
            JsonField::Format(t) => t.json(r, omit_empty),
            JsonField::Object(o) => Value::Object(json_value(o, r, omit_empty)),
            JsonField::Fixed(v) => v.clone(),
        };
        if omit_empty && (v.is_null() || v == "") {
            continue;
        }
        m.insert(k.clone(), v);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::super::HttpRecord;
    use super::*;

    fn line(fmt: &str, r: &Record<'_>) -> (String, Vec<String>) {
        let mut unknown = vec![];
        let t = Text::parse(fmt, &mut unknown).unwrap();
        let mut s = String::new();
        t.format(r, false, &mut s);
        (s, unknown)
    }

    #[test]
    fn operators_lengths_and_unknowns() {
        let mut req = http::HeaderMap::new();
        req.insert("user-agent", http::HeaderValue::from_static("curl/8.4.0"));
        req.insert("x-b", http::HeaderValue::from_static("bee"));
        let r = Record {
            response_code: Some(503),
            flags: "UF",
            duration: std::time::Duration::from_millis(42),
            http: Some(HttpRecord {
                method: "POST",
                path: "/p?q",
                authority: "svc",
                scheme: "http",
                protocol: "HTTP/2",
                route_name: "",
                request: &req,
                response: None,
                route_kri: None,
            }),
            ..Default::default()
        };
        let (s, unknown) = line(
            "%REQ(:METHOD)% %REQ(USER-AGENT):4% %REQ(X-A?X-B)% %RESPONSE_CODE% %RESPONSE_FLAGS% %DURATION% \
             %ROUTE_NAME% %UPSTREAM_TRANSPORT_FAILURE_REASON% 50%%",
            &r,
        );
        assert_eq!(s, "POST curl bee 503 UF 42 - - 50%");
        assert_eq!(unknown, ["UPSTREAM_TRANSPORT_FAILURE_REASON"]);
        // A TCP entry: no HTTP side, response code 0.
        let tcp = Record { flags: "-", ..Default::default() };
        assert_eq!(line("%RESPONSE_CODE% %PROTOCOL% %REQ(:PATH)%", &tcp).0, "0 - -");
        assert!(Text::parse("%DURATION", &mut vec![]).is_err());
        assert!(Text::parse("%REQ%", &mut vec![]).is_err());
    }
}
