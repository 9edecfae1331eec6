//! Envoy's route tables: virtual hosts chosen by `domains` with Envoy's precedence, routes
//! matched in order (path, headers, query parameters), and what a matched route does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::query_parameter_matcher::QueryParameterMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::redirect_action::{PathRewriteSpecifier, SchemeRewriteSpecifier};
use envoy_types::pb::envoy::config::route::v3::route::Action as RouteKind;
use envoy_types::pb::envoy::config::route::v3::route_action::{ClusterSpecifier, HostRewriteSpecifier};
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use http::{HeaderMap, StatusCode};
use regex::Regex;

use super::filters::PerRoute;
use super::headers::Mutations;
use crate::matcher::StringMatch;
use crate::snapshot::Target;

/// Envoy's default route timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// A route configuration, ready to match requests.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.suffix` (stored as `.suffix`) and `*suffix`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `prefix.*` (stored as `prefix.`) and `prefix*`, longest first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    ignore_port: bool,
    pub headers: Mutations,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    routes: Vec<Route>,
    pub headers: Mutations,
    pub retry: Option<Arc<RetryPolicy>>,
    pub per_filter: PerRoute,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// `metadata.filter_metadata["envoy.filters.http.lua"].route_kri` (Kuma's).
    pub route_kri: Option<String>,
    matcher: RouteMatch,
    pub action: RouteAction,
    pub headers: Mutations,
    pub per_filter: PerRoute,
}

#[derive(Debug)]
struct RouteMatch {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    /// `runtime_fraction`: the share of requests the route takes (its default value; dp
    /// has no runtime to override it).
    fraction: Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
    /// `filter_state` matchers: the connection's value under each key (from
    /// `set_filter_state`); a missing value does not match.
    filter_state: Vec<(String, ValueMatch)>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    /// `path_separated_prefix`: the prefix, then the end of the path, `?` or `/`.
    Separated(String),
    Regex(Regex),
}

/// Envoy's `HeaderMatcher` (routes and HTTP RBAC use it).
#[derive(Debug)]
pub struct HeaderMatch {
    name: HeaderKey,
    kind: ValueMatch,
    invert: bool,
    missing_as_empty: bool,
}

/// A header, or one of HTTP/2's pseudo-headers, which Envoy matches like headers
/// (MeshHTTPRoute's `method` match is a `:method` header matcher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pseudo {
    Method,
    Path,
    Authority,
    Scheme,
}

#[derive(Debug)]
enum HeaderKey {
    Header(http::HeaderName),
    Pseudo(Pseudo),
}

/// A request's pseudo-header values, for header matchers that name them.
#[derive(Debug, Clone, Copy, Default)]
pub struct PseudoHeaders<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
}

#[derive(Debug)]
enum ValueMatch {
    Present(bool),
    String(StringMatch),
    Regex(Regex),
    Range(i64, i64),
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    kind: ValueMatch,
}

#[derive(Debug)]
pub enum RouteAction {
    Forward(Forward),
    Direct { status: StatusCode, body: bytes::Bytes },
    Redirect(Redirect),
}

#[derive(Debug)]
pub struct Forward {
    pub targets: Vec<Target>,
    /// Cumulative weights when there is more than one target.
    pub cumulative: Vec<u64>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<String>,
    pub auto_host_rewrite: bool,
    /// The whole request, retries included; `None`: no limit (Envoy's `0s`).
    pub timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub retry: Option<Arc<RetryPolicy>>,
    /// The request's hash for a consistent-hashing cluster.
    pub hash_policy: Vec<super::hash_policy::HashPolicy>,
    /// `request_mirror_policies`: copies of the request, answers dropped.
    pub mirrors: Vec<Mirror>,
}

/// A `RequestMirrorPolicy`: a share of the requests also goes to `target`, with the
/// authority suffixed `-shadow` (unless `disable_shadow_host_suffix_append`) or rewritten.
#[derive(Debug)]
pub struct Mirror {
    pub target: Target,
    pub fraction: Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
    pub shadow_suffix: bool,
    pub host_rewrite: Option<String>,
}

impl Mirror {
    fn from_proto(m: &rpb::route_action::RequestMirrorPolicy, resolve: &Resolve<'_>) -> Result<Mirror, String> {
        if m.cluster.is_empty() {
            return Err("request_mirror_policies: only `cluster` is supported (not cluster_header)".into());
        }
        if !m.request_headers_mutations.is_empty() {
            return Err("request_mirror_policies: request_headers_mutations is not supported".into());
        }
        Ok(Mirror {
            target: (resolve.target)(&m.cluster, BTreeMap::new()),
            fraction: m.runtime_fraction.as_ref().and_then(|f| f.default_value),
            shadow_suffix: !m.disable_shadow_host_suffix_append,
            host_rewrite: Some(m.host_rewrite_literal.clone()).filter(|h| !h.is_empty()),
        })
    }

    /// The authority the copy carries: `host-shadow[:port]`, or the rewrite.
    pub fn authority(&self, authority: &str) -> String {
        if let Some(h) = &self.host_rewrite {
            return h.clone();
        }
        if !self.shadow_suffix {
            return authority.to_string();
        }
        // Before the port; an IPv6 literal's colons are inside its brackets.
        let port_at = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => i,
            _ => authority.len(),
        };
        format!("{}-shadow{}", &authority[..port_at], &authority[port_at..])
    }
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    /// Rewrites the path part (Kuma's MeshHTTPRoute writes `.*` to replace it whole).
    pub regex_rewrite: Option<(Regex, String)>,
    pub status: StatusCode,
    pub strip_query: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_retriable_status: bool,
    pub retriable_status_codes: Vec<u16>,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
}

impl RetryPolicy {
    fn from_proto(p: &rpb::RetryPolicy) -> Result<RetryPolicy, String> {
        let mut r = RetryPolicy {
            on_5xx: false,
            on_gateway_error: false,
            on_connect_failure: false,
            on_reset: false,
            on_retriable_status: false,
            retriable_status_codes: p.retriable_status_codes.iter().map(|c| *c as u16).collect(),
            num_retries: p.num_retries.map_or(1, |n| n.value),
            per_try_timeout: p.per_try_timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
        };
        let mut unknown = vec![];
        for cond in p.retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond {
                "5xx" => r.on_5xx = true,
                "gateway-error" => r.on_gateway_error = true,
                "connect-failure" => r.on_connect_failure = true,
                "reset" | "reset-before-request" => r.on_reset = true,
                "retriable-status-codes" => r.on_retriable_status = true,
                // Conditions that need what dp does not have (gRPC status, refused
                // streams, headers): never true here, so they never retry.
                "retriable-4xx"
                | "refused-stream"
                | "cancelled"
                | "deadline-exceeded"
                | "internal"
                | "resource-exhausted"
                | "unavailable"
                | "retriable-headers"
                | "envoy-ratelimited"
                | "http3-post-connect-failure" => {}
                // Envoy ignores what it does not know, with a warning; Kuma's MeshRetry
                // writes `canceled` for gRPC's `cancelled`.
                other => unknown.push(other),
            }
        }
        if !unknown.is_empty() {
            tracing::warn!(retry_on = %p.retry_on, unknown = ?unknown, "unknown retry_on conditions are ignored, as Envoy ignores them");
        }
        if let Some(b) = &p.retry_back_off {
            if let Some(base) = &b.base_interval {
                r.base_interval = duration(base).max(Duration::from_millis(1));
            }
            r.max_interval = b.max_interval.as_ref().map_or(r.base_interval * 10, duration);
        }
        Ok(r)
    }

    /// Whether a response with this status is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || (self.on_retriable_status && self.retriable_status_codes.contains(&status))
    }

    /// Whether a failure to connect is retried.
    pub fn retries_connect_failure(&self) -> bool {
        self.on_5xx || self.on_gateway_error || self.on_connect_failure
    }

    /// Whether a reset (the connection closed before the whole response) is retried.
    pub fn retries_reset(&self) -> bool {
        self.on_5xx || self.on_gateway_error || self.on_reset
    }
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// What request routing looks at.
pub struct RequestView<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub method: &'a str,
    pub scheme: &'a str,
    /// The request's random number (`runtime_fraction` matches draw from it).
    pub random: u64,
    /// The connection's filter state (`set_filter_state`).
    pub filter_state: &'a [(String, String)],
}

impl RouteTable {
    /// The virtual host for an authority, with Envoy's precedence: exact, then the
    /// longest suffix wildcard, then the longest prefix wildcard, then `*`. The port is
    /// part of the authority matched, unless `ignore_port_in_host_matching`.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let mut host = authority.to_ascii_lowercase();
        if self.ignore_port {
            host.truncate(strip_port(&host).len());
        }
        self.vhosts.get(self.lookup(&host)?)
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        if let Some((_, i)) = self.suffixes.iter().find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str())) {
            return Some(*i);
        }
        if let Some((_, i)) = self.prefixes.iter().find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str())) {
            return Some(*i);
        }
        self.any
    }

    /// The first route of the virtual host that matches.
    pub fn route(&self, req: &RequestView<'_>) -> Option<(&VirtualHost, &Route)> {
        let vh = self.virtual_host(req.host)?;
        let r = vh.routes.iter().find(|r| r.matcher.matches(req))?;
        Some((vh, r))
    }
}

fn strip_port(host: &str) -> &str {
    // `[v6]:port` and `name:port`; a bare IPv6 address has more than one colon.
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    match host.rfind(':') {
        Some(i) if host[..i].find(':').is_none() && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

impl RouteMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let (path, query) = req.path.split_once('?').unwrap_or((req.path, ""));
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Separated(p) => {
                starts_with(path, p, self.case_sensitive)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/') | Some(b'?'))
            }
            PathMatch::Regex(re) => re.is_match(path),
        };
        let pseudo = PseudoHeaders { method: req.method, path: req.path, authority: req.host, scheme: req.scheme };
        path_ok
            && self.headers.iter().all(|h| h.matches(req.headers, &pseudo))
            && self.query.iter().all(|q| q.matches(query))
            && self.fraction.as_ref().is_none_or(|f| super::filters::hit(f, req.random))
            && self
                .filter_state
                .iter()
                .all(|(key, m)| m.matches(req.filter_state.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())))
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.len() >= prefix.len() && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

impl ValueMatch {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (ValueMatch::String(m), Some(v)) => m.matches(v),
            (ValueMatch::Regex(re), Some(v)) => whole_match(re, v),
            (ValueMatch::Range(lo, hi), Some(v)) => v.parse::<i64>().is_ok_and(|n| *lo <= n && n < *hi),
        }
    }
}

/// Envoy's `safe_regex` matches the whole value.
fn whole_match(re: &Regex, v: &str) -> bool {
    re.find(v).is_some_and(|m| m.start() == 0 && m.end() == v.len())
}

impl HeaderMatch {
    pub fn from_proto(h: &rpb::HeaderMatcher) -> Result<HeaderMatch, String> {
        let name = match h.name.as_str() {
            ":method" => HeaderKey::Pseudo(Pseudo::Method),
            ":path" => HeaderKey::Pseudo(Pseudo::Path),
            ":authority" | "host" => HeaderKey::Pseudo(Pseudo::Authority),
            ":scheme" => HeaderKey::Pseudo(Pseudo::Scheme),
            n => HeaderKey::Header(
                http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("headers: `{n}` is not a header name"))?,
            ),
        };
        Ok(HeaderMatch {
            name,
            kind: value_match_of_header(h)?,
            invert: h.invert_match,
            missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    pub fn matches(&self, headers: &HeaderMap, pseudo: &PseudoHeaders<'_>) -> bool {
        let values: Vec<&str> = match &self.name {
            HeaderKey::Header(name) => headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect(),
            HeaderKey::Pseudo(p) => {
                let v = match p {
                    Pseudo::Method => pseudo.method,
                    Pseudo::Path => pseudo.path,
                    Pseudo::Authority => pseudo.authority,
                    Pseudo::Scheme => pseudo.scheme,
                };
                if v.is_empty() { vec![] } else { vec![v] }
            }
        };
        // Several values are matched joined with commas, as Envoy does.
        let joined;
        let value = match values.as_slice() {
            [] => None,
            [one] => Some(*one),
            many => {
                joined = many.join(",");
                Some(joined.as_str())
            }
        };
        let value = if value.is_none() && self.missing_as_empty { Some("") } else { value };
        let hit = self.kind.matches(value);
        // An inverted match of a missing header is still false, except for presence.
        if self.invert && (value.is_some() || matches!(self.kind, ValueMatch::Present(_))) { !hit } else { hit }
    }
}

impl QueryMatch {
    fn matches(&self, query: &str) -> bool {
        let value = query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == self.name).then_some(v)
        });
        self.kind.matches(value)
    }
}

/// Compiles `safe_regex` (RE2 syntax; Rust's `regex` accepts the same language).
pub fn regex(m: &envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher) -> Result<Regex, String> {
    Regex::new(&m.regex)
        .map_err(|e| format!("safe_regex `{}`: {}", m.regex, e.to_string().lines().last().unwrap_or("")))
}

fn value_match_of_header(h: &rpb::HeaderMatcher) -> Result<ValueMatch, String> {
    #[allow(deprecated)]
    Ok(match &h.header_match_specifier {
        None => ValueMatch::Present(true),
        Some(HeaderMatchSpecifier::PresentMatch(b)) => ValueMatch::Present(*b),
        Some(HeaderMatchSpecifier::ExactMatch(s)) => ValueMatch::String(exact(s)),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => {
            ValueMatch::String(StringMatch::new(crate::matcher::Pattern::Prefix(s.clone()), false))
        }
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => {
            ValueMatch::String(StringMatch::new(crate::matcher::Pattern::Suffix(s.clone()), false))
        }
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => {
            ValueMatch::String(StringMatch::new(crate::matcher::Pattern::Contains(s.clone()), false))
        }
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => ValueMatch::Regex(regex(re)?),
        Some(HeaderMatchSpecifier::RangeMatch(r)) => ValueMatch::Range(r.start, r.end),
        Some(HeaderMatchSpecifier::StringMatch(m)) => string_or_regex(m)?,
    })
}

fn exact(s: &str) -> StringMatch {
    StringMatch::new(crate::matcher::Pattern::Exact(s.to_string()), false)
}

fn string_or_regex(m: &envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher) -> Result<ValueMatch, String> {
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    match &m.match_pattern {
        Some(MatchPattern::SafeRegex(re)) => Ok(ValueMatch::Regex(regex(re)?)),
        _ => Ok(ValueMatch::String(StringMatch::from_proto(m)?)),
    }
}

/// Reads a `typed_per_filter_config`.
pub type PerFilterFn<'a> =
    &'a dyn Fn(&HashMap<String, envoy_types::pb::google::protobuf::Any>) -> Result<PerRoute, String>;

/// Everything a route table needs from the rest of the snapshot.
pub struct Resolve<'a> {
    /// A route's target: cluster by name, with `metadata_match`.
    pub target: &'a dyn Fn(&str, BTreeMap<String, String>) -> Target,
    pub per_filter: PerFilterFn<'a>,
}

impl RouteTable {
    pub fn build(rc: &rpb::RouteConfiguration, resolve: &Resolve<'_>) -> Result<RouteTable, String> {
        if rc.vhds.is_some() {
            return Err("vhds is not supported".into());
        }
        let mut table = RouteTable {
            name: rc.name.clone(),
            vhosts: vec![],
            exact: HashMap::new(),
            suffixes: vec![],
            prefixes: vec![],
            any: None,
            ignore_port: rc.ignore_port_in_host_matching,
            headers: Mutations::build(
                &rc.request_headers_to_add,
                &rc.request_headers_to_remove,
                &rc.response_headers_to_add,
                &rc.response_headers_to_remove,
            )?,
        };
        for (i, vh) in rc.virtual_hosts.iter().enumerate() {
            let built = build_vhost(vh, resolve).map_err(|e| format!("virtual_hosts[{i}] ({}): {e}", vh.name))?;
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                let dup = if d == "*" {
                    table.any.replace(i).is_some()
                } else if let Some(s) = d.strip_prefix('*') {
                    table.suffixes.iter().any(|(x, _)| x == s) || {
                        table.suffixes.push((s.to_string(), i));
                        false
                    }
                } else if let Some(p) = d.strip_suffix('*') {
                    table.prefixes.iter().any(|(x, _)| x == p) || {
                        table.prefixes.push((p.to_string(), i));
                        false
                    }
                } else {
                    table.exact.insert(d.clone(), i).is_some()
                };
                if dup {
                    return Err(format!("domain `{d}` is in more than one virtual host"));
                }
            }
            table.vhosts.push(built);
        }
        // Longest wildcard wins.
        table.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table.prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(table)
    }
}

fn build_vhost(vh: &rpb::VirtualHost, resolve: &Resolve<'_>) -> Result<VirtualHost, String> {
    if vh.require_tls != 0 {
        return Err("require_tls is not supported".into());
    }
    if vh.matcher.is_some() {
        return Err("matcher is not supported (use routes)".into());
    }
    let retry = vh.retry_policy.as_ref().map(RetryPolicy::from_proto).transpose()?.map(Arc::new);
    let mut routes = vec![];
    for (i, r) in vh.routes.iter().enumerate() {
        routes.push(build_route(r, retry.as_ref(), resolve).map_err(|e| format!("routes[{i}]: {e}"))?);
    }
    Ok(VirtualHost {
        name: vh.name.clone(),
        routes,
        headers: Mutations::build(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
        )?,
        retry,
        per_filter: (resolve.per_filter)(&vh.typed_per_filter_config)?,
    })
}

fn build_route(r: &rpb::Route, vh_retry: Option<&Arc<RetryPolicy>>, resolve: &Resolve<'_>) -> Result<Route, String> {
    let m = r.r#match.as_ref().ok_or("match is missing")?;
    // Envoy takes the runtime key's value when the runtime has one; dp has no runtime.
    let fraction = m.runtime_fraction.as_ref().map(|f| {
        f.default_value
            .unwrap_or(envoy_types::pb::envoy::r#type::v3::FractionalPercent { numerator: 0, denominator: 0 })
    });
    if m.grpc.is_some() || m.tls_context.is_some() || !m.dynamic_metadata.is_empty() || !m.cookies.is_empty() {
        return Err("match: only path, headers, query_parameters and filter_state are supported".into());
    }
    let mut filter_state = vec![];
    for f in &m.filter_state {
        use envoy_types::pb::envoy::r#type::matcher::v3::filter_state_matcher::Matcher;
        match &f.matcher {
            Some(Matcher::StringMatch(s)) => filter_state.push((f.key.clone(), string_or_regex(s)?)),
            Some(_) => return Err(format!("match.filter_state `{}`: only string_match is supported", f.key)),
            None => return Err(format!("match.filter_state `{}`: no matcher", f.key)),
        }
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => PathMatch::Separated(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => {
            let re = regex(re)?;
            // Envoy matches the whole path.
            PathMatch::Regex(Regex::new(&format!("^(?:{})$", re.as_str())).map_err(|e| e.to_string())?)
        }
        Some(_) => return Err("match: this path specifier is not supported".into()),
        None => return Err("match: a path specifier is required".into()),
    };
    let headers = m.headers.iter().map(HeaderMatch::from_proto).collect::<Result<Vec<_>, _>>()?;
    let mut query = vec![];
    for q in &m.query_parameters {
        let kind = match &q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => string_or_regex(s)?,
            Some(QueryParameterMatchSpecifier::PresentMatch(b)) => ValueMatch::Present(*b),
            None => ValueMatch::Present(true),
        };
        query.push(QueryMatch { name: q.name.clone(), kind });
    }
    let action = match &r.action {
        Some(RouteKind::Route(a)) => RouteAction::Forward(build_forward(a, vh_retry, resolve)?),
        Some(RouteKind::DirectResponse(d)) => {
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
            let status =
                StatusCode::from_u16(d.status as u16).map_err(|_| format!("direct_response: status {}", d.status))?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => bytes::Bytes::new(),
                Some(Specifier::InlineString(s)) => bytes::Bytes::from(s.clone()),
                Some(Specifier::InlineBytes(b)) => bytes::Bytes::from(b.clone()),
                Some(_) => return Err("direct_response: only inline bodies are supported".into()),
            };
            RouteAction::Direct { status, body }
        }
        Some(RouteKind::Redirect(rd)) => RouteAction::Redirect(build_redirect(rd)?),
        Some(_) => return Err("this route action is not supported".into()),
        None => return Err("the route has no action".into()),
    };
    let route_kri = r
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("envoy.filters.http.lua"))
        .and_then(|s| s.fields.get("route_kri"))
        .and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    Ok(Route {
        name: r.name.clone(),
        route_kri,
        matcher: RouteMatch {
            path,
            case_sensitive: m.case_sensitive.is_none_or(|b| b.value),
            headers,
            query,
            fraction,
            filter_state,
        },
        action,
        headers: Mutations::build(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
        per_filter: (resolve.per_filter)(&r.typed_per_filter_config)?,
    })
}

fn build_forward(
    a: &rpb::RouteAction,
    vh_retry: Option<&Arc<RetryPolicy>>,
    resolve: &Resolve<'_>,
) -> Result<Forward, String> {
    if a.hedge_policy.is_some() {
        return Err("hedge_policy is not supported".into());
    }
    if !a.path_rewrite.is_empty() || a.path_rewrite_policy.is_some() {
        return Err("path_rewrite is not supported (use prefix_rewrite or regex_rewrite)".into());
    }
    let base = crate::snapshot::lb_match_of(a.metadata_match.as_ref());
    let (targets, cumulative) = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => (vec![(resolve.target)(name, base)], vec![]),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let mut total = 0u64;
            let (mut targets, mut cumulative) = (vec![], vec![]);
            for c in &w.clusters {
                let weight = c.weight.map_or(0, |w| w.value);
                total += u64::from(weight);
                cumulative.push(total);
                let mut wanted = base.clone();
                wanted.extend(crate::snapshot::lb_match_of(c.metadata_match.as_ref()));
                targets.push((resolve.target)(&c.name, wanted));
            }
            if total == 0 {
                return Err("weighted_clusters: the weights add up to 0".into());
            }
            (targets, cumulative)
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => return Err("cluster_header is not supported".into()),
        Some(_) => return Err("this cluster specifier is not supported".into()),
        None => return Err("a cluster or weighted_clusters is required".into()),
    };
    let mirrors = a.request_mirror_policies.iter().map(|m| Mirror::from_proto(m, resolve)).collect::<Result<_, _>>()?;
    let (host_rewrite, auto) = match &a.host_rewrite_specifier {
        None => (None, false),
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => (Some(h.clone()), false),
        Some(HostRewriteSpecifier::AutoHostRewrite(b)) => (None, b.value),
        Some(_) => return Err("only host_rewrite_literal and auto_host_rewrite are supported".into()),
    };
    let mut fwd = finish(a, targets, cumulative, host_rewrite, auto, vh_retry)?;
    fwd.mirrors = mirrors;
    Ok(fwd)
}

fn finish(
    a: &rpb::RouteAction,
    targets: Vec<Target>,
    cumulative: Vec<u64>,
    host_rewrite: Option<String>,
    auto_host_rewrite: bool,
    vh_retry: Option<&Arc<RetryPolicy>>,
) -> Result<Forward, String> {
    let regex_rewrite = a.regex_rewrite.as_ref().map(regex_rewrite).transpose()?;
    let retry = match &a.retry_policy {
        Some(p) => Some(Arc::new(RetryPolicy::from_proto(p)?)),
        None => vh_retry.cloned(),
    };
    Ok(Forward {
        targets,
        cumulative,
        prefix_rewrite: Some(a.prefix_rewrite.clone()).filter(|p| !p.is_empty()),
        regex_rewrite,
        host_rewrite,
        auto_host_rewrite,
        timeout: match &a.timeout {
            None => Some(DEFAULT_TIMEOUT),
            Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
        },
        idle_timeout: a.idle_timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
        retry,
        hash_policy: super::hash_policy::HashPolicy::list(&a.hash_policy)?,
        mirrors: vec![],
    })
}

/// RE2 writes capture groups `\1`; Rust's regex `${1}`.
pub(crate) fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                out.push_str("${");
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    out.push(*d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// A `regex_rewrite`: the pattern, and the substitution in the regex crate's syntax.
fn regex_rewrite(
    rr: &envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute,
) -> Result<(Regex, String), String> {
    let re = rr.pattern.as_ref().ok_or("regex_rewrite.pattern is missing")?;
    Ok((regex(re)?, envoy_substitution(&rr.substitution)))
}

fn build_redirect(r: &rpb::RedirectAction) -> Result<Redirect, String> {
    let status = match r.response_code {
        0 => StatusCode::MOVED_PERMANENTLY,
        1 => StatusCode::FOUND,
        2 => StatusCode::SEE_OTHER,
        3 => StatusCode::TEMPORARY_REDIRECT,
        4 => StatusCode::PERMANENT_REDIRECT,
        c => return Err(format!("redirect: response_code {c} is unknown")),
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
        _ => None,
    };
    let (mut path, mut prefix_rewrite, mut regex) = (None, None, None);
    match &r.path_rewrite_specifier {
        None => {}
        Some(PathRewriteSpecifier::PathRedirect(p)) => path = Some(p.clone()),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) => prefix_rewrite = Some(p.clone()),
        Some(PathRewriteSpecifier::RegexRewrite(rr)) => regex = Some(regex_rewrite(rr)?),
        Some(PathRewriteSpecifier::PathRewrite(_)) => {
            return Err(
                "redirect: path_rewrite is not supported (path_redirect, prefix_rewrite and regex_rewrite are)".into(),
            );
        }
    }
    Ok(Redirect {
        scheme,
        host: Some(r.host_redirect.clone()).filter(|h| !h.is_empty()),
        port: u16::try_from(r.port_redirect).ok().filter(|p| *p != 0),
        path,
        prefix_rewrite,
        regex_rewrite: regex,
        status,
        strip_query: r.strip_query,
    })
}

impl Forward {
    /// The target for a request: by weight, from a per-request random number.
    pub fn pick(&self, random: u64) -> &Target {
        match self.cumulative.last() {
            None => &self.targets[0],
            Some(&total) => {
                let point = random % total;
                &self.targets[self.cumulative.partition_point(|&c| c <= point)]
            }
        }
    }

    /// The path sent upstream: `prefix_rewrite` replaces what the route's prefix matched,
    /// `regex_rewrite` rewrites the path part (the query is kept).
    pub fn rewrite_path(&self, route: &Route, path_and_query: &str) -> Option<String> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let new_path = if let Some(p) = &self.prefix_rewrite {
            let matched = match &route.matcher.path {
                PathMatch::Prefix(m) | PathMatch::Separated(m) => m.len(),
                PathMatch::Exact(_) | PathMatch::Regex(_) => path.len(),
            };
            format!("{p}{}", &path[matched.min(path.len())..])
        } else if let Some((re, sub)) = &self.regex_rewrite {
            re.replace_all(path, sub.as_str()).into_owned()
        } else {
            return None;
        };
        Some(match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        })
    }
}

impl Redirect {
    /// The `location` of a redirect of this request.
    pub fn location(&self, route: &Route, scheme: &str, authority: &str, path_and_query: &str) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let bare = strip_port(authority);
        let host = self.host.as_deref().unwrap_or(bare);
        let port = match self.port {
            Some(p) => format!(":{p}"),
            None if self.host.is_none() && bare.len() < authority.len() => authority[bare.len()..].to_string(),
            None => String::new(),
        };
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let mut new_path = match (&self.path, &self.prefix_rewrite) {
            (Some(p), _) => p.clone(),
            (None, Some(prefix)) => {
                let matched = match &route.matcher.path {
                    PathMatch::Prefix(m) | PathMatch::Separated(m) => m.len(),
                    _ => path.len(),
                };
                format!("{prefix}{}", &path[matched.min(path.len())..])
            }
            (None, None) => match &self.regex_rewrite {
                Some((re, sub)) => re.replace_all(path, sub.as_str()).into_owned(),
                None => path.to_string(),
            },
        };
        if !self.strip_query && !query.is_empty() && !new_path.contains('?') {
            new_path = format!("{new_path}?{query}");
        }
        format!("{scheme}://{host}{port}{new_path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(v: serde_json::Value) -> RouteTable {
        let bytes = serde_json::to_vec(&json!({"version_info": "1", "resources": [{
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "rc", "virtualHosts": v}]}))
        .unwrap();
        let rc = crate::resources::Resources::from_file_bytes(&bytes, "1").unwrap().routes.remove(0);
        let target = |name: &str, _: BTreeMap<String, String>| Target {
            cluster_name: name.to_string(),
            cluster: None,
            slot: None,
        };
        let per_filter = |_: &HashMap<String, envoy_types::pb::google::protobuf::Any>| Ok(PerRoute::default());
        RouteTable::build(&rc, &Resolve { target: &target, per_filter: &per_filter }).unwrap()
    }

    /// A GET request for `host` and `path` (no filter state, random 0).
    fn get<'a>(host: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView { host, path, headers, method: "GET", scheme: "http", random: 0, filter_state: &[] }
    }

    #[test]
    fn mirrors_carry_the_shadow_authority() {
        let m = |suffix: bool, rewrite: Option<&str>| Mirror {
            target: Target { cluster_name: "m".into(), cluster: None, slot: None },
            fraction: None,
            shadow_suffix: suffix,
            host_rewrite: rewrite.map(str::to_owned),
        };
        assert_eq!(m(true, None).authority("svc"), "svc-shadow");
        assert_eq!(m(true, None).authority("svc:8080"), "svc-shadow:8080");
        assert_eq!(m(true, None).authority("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(m(true, None).authority("[::1]"), "[::1]-shadow");
        assert_eq!(m(false, None).authority("svc:8080"), "svc:8080");
        assert_eq!(m(true, Some("other")).authority("svc"), "other");
    }

    fn cluster_of(t: &RouteTable, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let (_, r) = t.route(&get(host, path, &h))?;
        match &r.action {
            RouteAction::Forward(f) => Some(f.targets[0].cluster_name.clone()),
            _ => Some("-".into()),
        }
    }

    #[test]
    fn a_runtime_fraction_takes_its_share_of_requests() {
        // MeshHTTPRoute's share of traffic to a backend it cannot resolve: a 500 for 30 %.
        let t = table(json!([{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/", "runtimeFraction": {"defaultValue": {"numerator": 30}, "runtimeKey": "k"}},
             "directResponse": {"status": 500}},
            {"match": {"prefix": "/"}, "route": {"cluster": "rest"}}]}]));
        let h = HeaderMap::new();
        let taken = (0..1000u64)
            .filter(|random| {
                let (_, r) = t.route(&RequestView { random: *random, ..get("w", "/", &h) }).unwrap();
                matches!(r.action, RouteAction::Direct { .. })
            })
            .count();
        assert_eq!(taken, 300);
    }

    #[test]
    fn pseudo_headers_match_like_headers() {
        // MeshHTTPRoute's `method: POST` match, and the authority and scheme.
        let t = table(json!([{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/", "headers": [{"name": ":method", "stringMatch": {"exact": "POST"}}]}, "route": {"cluster": "post"}},
            {"match": {"prefix": "/", "headers": [{"name": ":authority", "stringMatch": {"prefix": "api."}},
                {"name": ":scheme", "stringMatch": {"exact": "https"}}]}, "route": {"cluster": "api-tls"}},
            {"match": {"prefix": "/", "headers": [{"name": ":path", "stringMatch": {"suffix": "?debug=1"}}]}, "route": {"cluster": "debug"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "rest"}}]}]));
        let h = HeaderMap::new();
        let route = |method, host, scheme, path| {
            let (_, r) = t
                .route(&RequestView { host, path, headers: &h, method, scheme, random: 0, filter_state: &[] })
                .unwrap();
            let RouteAction::Forward(f) = &r.action else { panic!("not forwarded") };
            f.targets[0].cluster_name.clone()
        };
        assert_eq!(route("POST", "web", "http", "/"), "post");
        assert_eq!(route("GET", "api.example", "https", "/"), "api-tls");
        assert_eq!(route("GET", "api.example", "http", "/"), "rest");
        assert_eq!(route("GET", "web", "http", "/x?debug=1"), "debug");
        assert_eq!(route("GET", "web", "http", "/x"), "rest");
    }

    #[test]
    fn virtual_hosts_follow_envoys_precedence() {
        let vh = |name: &str, domains: serde_json::Value| json!({"name": name, "domains": domains, "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}]});
        let t = table(json!([
            vh("any", json!(["*"])),
            vh("exact", json!(["api.example.com"])),
            vh("suffix", json!(["*.example.com"])),
            vh("longer-suffix", json!(["*.b.example.com"])),
            vh("prefix", json!(["api.*"])),
            vh("port", json!(["web:8080"])),
        ]));
        let c = |host| cluster_of(&t, host, "/", &[]).unwrap();
        assert_eq!(c("api.example.com"), "exact");
        assert_eq!(c("API.Example.com"), "exact");
        assert_eq!(c("api.example.com:80"), "prefix", "the port is part of the authority matched");
        assert_eq!(c("x.example.com"), "suffix");
        assert_eq!(c("a.b.example.com"), "longer-suffix");
        assert_eq!(c("api.other"), "prefix");
        assert_eq!(c("web:8080"), "port");
        assert_eq!(c("web"), "any");
        assert_eq!(c("example.com"), "any", "a wildcard needs at least one character");
    }

    #[test]
    fn routes_match_path_headers_and_query_in_order() {
        let t = table(json!([{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"path": "/exact"}, "route": {"cluster": "exact"}},
            {"match": {"safeRegex": {"regex": "/items/[0-9]+"}}, "route": {"cluster": "regex"}},
            {"match": {"pathSeparatedPrefix": "/sep"}, "route": {"cluster": "separated"}},
            {"match": {"prefix": "/api", "headers": [{"name": "x-version", "stringMatch": {"exact": "2"}}]},
                "route": {"cluster": "v2"}},
            {"match": {"prefix": "/api", "queryParameters": [{"name": "debug", "presentMatch": true}]},
                "route": {"cluster": "debug"}},
            {"match": {"prefix": "/CI", "caseSensitive": false}, "route": {"cluster": "ci"}},
            {"match": {"prefix": "/api"}, "route": {"cluster": "api"}},
            {"match": {"prefix": "/"}, "directResponse": {"status": 404}}
        ]}]));
        let c = |path, headers: &[(&str, &str)]| cluster_of(&t, "h", path, headers).unwrap();
        assert_eq!(c("/exact", &[]), "exact");
        assert_eq!(c("/exact?x=1", &[]), "exact");
        assert_eq!(c("/exactly", &[]), "-");
        assert_eq!(c("/items/42", &[]), "regex");
        assert_eq!(c("/items/42x", &[]), "-", "a regex matches the whole path");
        assert_eq!(c("/sep", &[]), "separated");
        assert_eq!(c("/sep/x", &[]), "separated");
        assert_eq!(c("/separate", &[]), "-");
        assert_eq!(c("/api/x", &[("x-version", "2")]), "v2");
        assert_eq!(c("/api/x", &[("x-version", "3")]), "api");
        assert_eq!(c("/api/x?debug", &[]), "debug");
        assert_eq!(c("/api/x?a=1&debug=1", &[]), "debug");
        assert_eq!(c("/ci/x", &[]), "ci");
    }

    #[test]
    fn a_redirect_can_rewrite_the_path_by_regex_as_kumas_replace_full_path() {
        let t = table(json!([{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"prefix": "/old"}, "redirect": {"regexRewrite": {"pattern": {"regex": ".*"}, "substitution": "/new"},
             "responseCode": "FOUND"}}]}]));
        let h = HeaderMap::new();
        let (_, r) = t.route(&get("web", "/old/x?q=1", &h)).unwrap();
        let RouteAction::Redirect(rd) = &r.action else { panic!() };
        assert_eq!(rd.location(r, "http", "web", "/old/x?q=1"), "http://web/new?q=1");
    }

    #[test]
    fn rewrites_and_redirects() {
        let t = table(json!([{"name": "vh", "domains": ["*"], "routes": [
            {"match": {"prefix": "/old/"}, "route": {"cluster": "c", "prefixRewrite": "/new/"}},
            {"match": {"prefix": "/re/"}, "route": {"cluster": "c",
                "regexRewrite": {"pattern": {"regex": "^/re/(\\w+)/(\\w+)$"}, "substitution": "/\\2/\\1"}}},
            {"match": {"prefix": "/go"}, "redirect": {"hostRedirect": "example.org", "prefixRewrite": "/gone",
                "responseCode": "TEMPORARY_REDIRECT"}},
            {"match": {"prefix": "/"}, "redirect": {"httpsRedirect": true}}
        ]}]));
        let h = HeaderMap::new();
        let rewrite = |path: &str| {
            let (_, r) = t.route(&get("h", path, &h)).unwrap();
            let RouteAction::Forward(f) = &r.action else { panic!() };
            f.rewrite_path(r, path).unwrap()
        };
        assert_eq!(rewrite("/old/a/b?q=1"), "/new/a/b?q=1");
        assert_eq!(rewrite("/re/one/two"), "/two/one");
        let redirect = |path: &str| {
            let (_, r) = t.route(&get("web:8080", path, &h)).unwrap();
            let RouteAction::Redirect(rd) = &r.action else { panic!() };
            (rd.status.as_u16(), rd.location(r, "http", "web:8080", path))
        };
        assert_eq!(redirect("/go/x?y=1"), (307, "http://example.org/gone/x?y=1".to_string()));
        assert_eq!(redirect("/a"), (301, "https://web:8080/a".to_string()));
    }

    #[test]
    fn retry_policy_reads_envoys_conditions() {
        let p = RetryPolicy::from_proto(&rpb::RetryPolicy {
            retry_on: "gateway-error,retriable-status-codes".into(),
            retriable_status_codes: vec![409],
            ..Default::default()
        })
        .unwrap();
        assert!(p.retries_status(503) && p.retries_status(409) && !p.retries_status(500));
        assert_eq!(p.num_retries, 1);
        // Unknown conditions are ignored (Envoy 1.40 warns and loads the route).
        let p = RetryPolicy::from_proto(&rpb::RetryPolicy { retry_on: "canceled,5xx".into(), ..Default::default() });
        assert!(p.unwrap().retries_status(500));
        assert_eq!(envoy_substitution("/\\2/\\1$"), "/${2}/${1}$$");
    }
}
