//! The HTTP filters dp runs before the router: `rbac`, `fault`, `local_ratelimit`, each
//! possibly wrapped in `ExtensionWithMatcher` (Kuma skips a fault filter outside one
//! server name with `SkipFilter`). Filters that only observe are accepted and ignored;
//! any other filter is refused by name, since skipping it would change what the
//! control plane asked for.

use crate::token_bucket::Bucket;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::matching::v3::ExtensionWithMatcher;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use http::StatusCode;
use prost::{Message, Name};

use super::route::HeaderMatch;
use crate::match_api::{Inputs, Matcher};
use crate::snapshot::rbac::{Rbac, Subject};
use crate::stats::Registry;

const TYPE_PREFIX: &str = "type.googleapis.com/";
const SKIP_FILTER: &str = "envoy.extensions.filters.common.matcher.action.v3.SkipFilter";
const LOCAL_RATELIMIT_NAME: &str = "envoy.filters.http.local_ratelimit";

/// Filters that only observe: accepted, and not run.
const OBSERVERS: &[&str] =
    &["envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", "envoy.extensions.filters.http.tap.v3.Tap"];

#[derive(Debug)]
pub enum Filter {
    Rbac(Arc<Rbac>),
    Fault(Arc<Fault>),
    RateLimit(Arc<RateLimit>),
    /// Kuma's Lua script for route-targeted MeshAccessLog, recognised by its text: it
    /// copies the route's `route_kri` metadata into the dynamic metadata `kuma.routes`,
    /// which the access loggers filter on. Nothing else in Lua is run.
    RouteKri,
}

/// The one Lua script dp knows, as Kuma 2.14 writes it (compared without whitespace).
const KUMA_ROUTE_KRI_LUA: &str = r#"function envoy_on_request(handle)
  local meta = handle:metadata():get("route_kri")
  if meta ~= nil then
    handle:streamInfo():dynamicMetadata():set("kuma.routes", "route_kri", meta)
  end
end"#;

fn is_kuma_route_kri(lua: &envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua) -> bool {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    #[allow(deprecated)]
    let code = match lua.default_source_code.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.as_str(),
        _ => lua.inline_code.as_str(),
    };
    lua.source_codes.is_empty() && words(code) == words(KUMA_ROUTE_KRI_LUA)
}

/// A filter, and when it is wrapped in a matcher, when to skip it.
#[derive(Debug)]
pub struct Configured {
    pub name: String,
    pub filter: Filter,
    skip: Option<Matcher<()>>,
}

#[derive(Debug)]
pub struct Fault {
    headers: Vec<HeaderMatch>,
    delay: Option<(Duration, FractionalPercent)>,
    abort: Option<(StatusCode, FractionalPercent, String)>,
    /// `response_rate_limit`: KiB per second.
    response_kbps: Option<(u64, FractionalPercent)>,
}

/// A token bucket (`local_ratelimit`), shared by every connection of the listener.
#[derive(Debug)]
pub struct RateLimit {
    bucket: Option<Bucket>,
    enabled: FractionalPercent,
    enforced: FractionalPercent,
    status: StatusCode,
    /// `response_headers_to_add`: on the responses it refuses.
    headers: Option<Arc<super::headers::Mutations>>,
}

/// Per-route (and per-virtual-host) filter configuration: `typed_per_filter_config`.
#[derive(Debug, Default)]
pub struct PerRoute {
    pub rate_limit: Option<Arc<RateLimit>>,
}

/// What a request shows the filters.
pub struct Request<'a> {
    pub subject: Subject<'a>,
    pub random: u64,
}

/// What a filter decided.
pub enum Verdict {
    Continue,
    Respond {
        status: StatusCode,
        body: String,
        flag: &'static str,
        /// Headers the filter adds to its response.
        headers: Option<Arc<super::headers::Mutations>>,
    },
    Delay(Duration),
    /// The fault filter's response rate limit (after its delay, when it has one).
    Throttle {
        delay: Option<Duration>,
        kbps: u64,
    },
}

fn any_name(any: &Any) -> &str {
    any.type_url.strip_prefix(TYPE_PREFIX).unwrap_or(&any.type_url)
}

fn decode<M: Message + Default>(any: &Any) -> Result<M, String> {
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", any.type_url))
}

/// Reads an HCM's `http_filters`; the last must be the router. `None` for a filter that
/// only observes.
pub fn build(
    name: &str,
    any: &Any,
    hcm_prefix: &str,
    stats: &Registry,
    notes: &mut Vec<String>,
) -> Result<Option<Configured>, String> {
    let (filter, skip) = if any.type_url == ExtensionWithMatcher::type_url() {
        let ewm: ExtensionWithMatcher = decode(any)?;
        #[allow(deprecated)]
        if ewm.matcher.is_some() {
            return Err("ExtensionWithMatcher.matcher (the deprecated one) is not supported; use xds_matcher".into());
        }
        let inner =
            ewm.extension_config.as_ref().and_then(|c| c.typed_config.as_ref()).ok_or("extension_config is missing")?;
        let skip = ewm
            .xds_matcher
            .as_ref()
            .map(|m| Matcher::build(m, &skip_action))
            .transpose()
            .map_err(|e| format!("xds_matcher: {e}"))?;
        (inner.clone(), skip)
    } else {
        (any.clone(), None)
    };
    let f = match any_name(&filter) {
        n if n == RbacFilter::full_name() => {
            let f: RbacFilter = decode(&filter)?;
            if f.shadow_rules.is_some() || f.shadow_matcher.is_some() {
                // Kuma's `kuma.io/effect: shadow` permissions: Envoy only counts them.
                notes.push(format!(
                    "http filter {name}: shadow_rules are not evaluated (they never decide; their stats are not kept)"
                ));
            }
            Filter::Rbac(Arc::new(Rbac::build_http(&f, hcm_prefix, stats)?))
        }
        n if n == HttpFault::full_name() => Filter::Fault(Arc::new(fault(&decode(&filter)?)?)),
        n if n == LocalRateLimit::full_name() => Filter::RateLimit(Arc::new(rate_limit(&decode(&filter)?)?)),
        n if n == envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua::full_name() => {
            if !is_kuma_route_kri(&decode(&filter)?) {
                return Err(format!("HTTP filter {name}: Lua is not supported (only Kuma's route_kri script is)"));
            }
            Filter::RouteKri
        }
        n if OBSERVERS.contains(&n) => return Ok(None),
        n => return Err(format!("HTTP filter {name} ({n}) is not supported")),
    };
    Ok(Some(Configured { name: name.to_string(), filter: f, skip }))
}

/// Whether a filter is the router (the end of the chain).
pub fn is_router(any: &Any) -> bool {
    any_name(any) == Router::full_name()
}

fn skip_action(c: &TypedExtensionConfig) -> Result<(), String> {
    match c.typed_config.as_ref().map(any_name) {
        Some(SKIP_FILTER) => Ok(()),
        other => Err(format!("action {} is not supported (only SkipFilter)", other.unwrap_or(&c.name))),
    }
}

fn fault(f: &HttpFault) -> Result<Fault, String> {
    if f.max_active_faults.is_some() || !f.downstream_nodes.is_empty() {
        return Err("fault: max_active_faults and downstream_nodes are not supported".into());
    }
    let response_kbps = match &f.response_rate_limit {
        None => None,
        Some(r) => {
            use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_rate_limit::LimitType;
            match &r.limit_type {
                Some(LimitType::FixedLimit(l)) if l.limit_kbps > 0 => {
                    Some((l.limit_kbps, r.percentage.unwrap_or_default()))
                }
                Some(LimitType::FixedLimit(_)) => {
                    return Err("fault.response_rate_limit: limit_kbps must be at least 1".into());
                }
                _ => return Err("fault.response_rate_limit: only fixed_limit is supported".into()),
            }
        }
    };
    if !f.upstream_cluster.is_empty() {
        return Err("fault: upstream_cluster is not supported".into());
    }
    let delay = match &f.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(fd)) => Some((
                Duration::new(fd.seconds.max(0) as u64, fd.nanos.max(0) as u32),
                d.percentage.unwrap_or_default(),
            )),
            _ => return Err("fault.delay: only fixed_delay is supported".into()),
        },
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => match &a.error_type {
            Some(ErrorType::HttpStatus(code)) => Some((
                StatusCode::from_u16(*code as u16).map_err(|_| format!("fault.abort: http_status {code}"))?,
                a.percentage.unwrap_or_default(),
                a.response_body.clone(),
            )),
            _ => return Err("fault.abort: only http_status is supported".into()),
        },
    };
    let headers = f.headers.iter().map(HeaderMatch::from_proto).collect::<Result<_, _>>()?;
    Ok(Fault { headers, delay, abort, response_kbps })
}

fn percent(p: &Option<envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent>) -> FractionalPercent {
    p.as_ref()
        .and_then(|r| r.default_value)
        // Envoy's default, "for safety": not enabled, not enforced.
        .unwrap_or(FractionalPercent { numerator: 0, denominator: 0 })
}

pub fn rate_limit(l: &LocalRateLimit) -> Result<RateLimit, String> {
    if !l.descriptors.is_empty() || !l.rate_limits.is_empty() {
        return Err("local_ratelimit: descriptors are not supported".into());
    }
    let bucket = match &l.token_bucket {
        None => None,
        Some(b) => Some(Bucket::from_proto(b).map_err(|e| format!("local_ratelimit: {e}"))?),
    };
    let status = match l.status.as_ref().map(|s| s.code) {
        None | Some(0) => StatusCode::TOO_MANY_REQUESTS,
        Some(c) => StatusCode::from_u16(c as u16).map_err(|_| format!("local_ratelimit: status {c}"))?,
    };
    // Without a token bucket the filter-level config only names the stat prefix; a
    // route's `typed_per_filter_config` brings the bucket (Kuma's MeshRateLimit shape).
    let headers = if l.response_headers_to_add.is_empty() {
        None
    } else {
        let m = super::headers::Mutations::build(&[], &[], &l.response_headers_to_add, &[])
            .map_err(|e| format!("local_ratelimit: {e}"))?;
        Some(Arc::new(m))
    };
    Ok(RateLimit {
        bucket,
        enabled: percent(&l.filter_enabled),
        enforced: percent(&l.filter_enforced),
        status,
        headers,
    })
}

/// Reads a route's `typed_per_filter_config`.
pub fn per_route(cfg: &HashMap<String, Any>) -> Result<PerRoute, String> {
    let mut out = PerRoute::default();
    for (name, any) in cfg {
        match any_name(any) {
            n if n == LocalRateLimit::full_name() => {
                out.rate_limit = Some(Arc::new(rate_limit(&decode(any)?).map_err(|e| format!("{name}: {e}"))?));
            }
            // Per-route configs of filters dp does not run change nothing dp does.
            _ if name != LOCAL_RATELIMIT_NAME => {}
            n => return Err(format!("typed_per_filter_config `{name}`: {n} is not supported")),
        }
    }
    Ok(out)
}

/// Whether an event with this probability happens, given a uniform random number.
pub(crate) fn hit(p: &FractionalPercent, random: u64) -> bool {
    let denominator: u64 = match p.denominator {
        1 => 10_000,
        2 => 1_000_000,
        _ => 100,
    };
    random % denominator < u64::from(p.numerator).min(denominator)
}

impl Configured {
    /// Runs the filter on a request. `per_route` is the matched route's (else its
    /// virtual host's) configuration.
    pub fn decide(&self, r: &Request<'_>, per_route: Option<&PerRoute>) -> Verdict {
        if let Some(skip) = &self.skip {
            let s = &r.subject;
            let inputs = Inputs {
                uri_sans: s.uri_sans,
                dns_sans: s.dns_sans,
                server_name: s.server_name,
                source_ip: s.remote_ip,
                destination_port: Some(s.local_port),
                headers: s.headers,
            };
            if skip.evaluate(&inputs).is_some() {
                return Verdict::Continue;
            }
        }
        match &self.filter {
            Filter::RouteKri => Verdict::Continue,
            Filter::Rbac(rbac) => {
                if rbac.allows(&r.subject) {
                    Verdict::Continue
                } else {
                    Verdict::Respond {
                        status: StatusCode::FORBIDDEN,
                        body: "RBAC: access denied".into(),
                        flag: "RBAC",
                        headers: None,
                    }
                }
            }
            Filter::Fault(f) => {
                if !f.headers.iter().all(|h| r.subject.headers.is_some_and(|m| h.matches(m, &r.subject.pseudo))) {
                    return Verdict::Continue;
                }
                // Independent draws for delay and abort, as Envoy makes them.
                if let Some((status, p, body)) = &f.abort
                    && hit(p, r.random)
                {
                    let body = if body.is_empty() { "fault filter abort".to_string() } else { body.clone() };
                    return Verdict::Respond { status: *status, body, flag: "FI", headers: None };
                }
                let delay = match &f.delay {
                    Some((d, p)) if hit(p, r.random.rotate_left(17)) => Some(*d),
                    _ => None,
                };
                match (&f.response_kbps, delay) {
                    (Some((kbps, p)), delay) if hit(p, r.random.rotate_left(41)) => {
                        Verdict::Throttle { delay, kbps: *kbps }
                    }
                    (_, Some(d)) => Verdict::Delay(d),
                    (_, None) => Verdict::Continue,
                }
            }
            Filter::RateLimit(own) => {
                let l = per_route.and_then(|p| p.rate_limit.as_deref()).unwrap_or(own);
                if l.limited(r.random) {
                    Verdict::Respond {
                        status: l.status,
                        body: "local_rate_limited".into(),
                        flag: "RL",
                        headers: l.headers.clone(),
                    }
                } else {
                    Verdict::Continue
                }
            }
        }
    }
}

impl RateLimit {
    /// Takes a token; true when the request is to be refused.
    fn limited(&self, random: u64) -> bool {
        let Some(b) = &self.bucket else { return false };
        if !hit(&self.enabled, random) {
            return false;
        }
        if b.take() {
            return false;
        }
        hit(&self.enforced, random.rotate_left(29))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_follow_their_denominator() {
        let p = |n, d| FractionalPercent { numerator: n, denominator: d };
        assert_eq!((0..100).filter(|r| hit(&p(50, 0), *r)).count(), 50);
        assert_eq!((0..10_000).filter(|r| hit(&p(50, 1), *r)).count(), 50);
        assert!(!hit(&p(0, 0), 0));
        assert!((0..100).all(|r| hit(&p(100, 0), r)));
    }

    fn all() -> envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent {
        envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent {
            default_value: Some(FractionalPercent { numerator: 100, denominator: 0 }),
            runtime_key: String::new(),
        }
    }

    #[test]
    fn the_bucket_empties_and_refills() {
        let l = rate_limit(&LocalRateLimit {
            token_bucket: Some(envoy_types::pb::envoy::r#type::v3::TokenBucket {
                max_tokens: 2,
                tokens_per_fill: None,
                fill_interval: Some(envoy_types::pb::google::protobuf::Duration { seconds: 3600, nanos: 0 }),
            }),
            filter_enabled: Some(all()),
            filter_enforced: Some(all()),
            ..Default::default()
        })
        .unwrap();
        assert!(!l.limited(1) && !l.limited(2));
        assert!(l.limited(3), "the third request in the hour is refused");
        l.bucket.as_ref().unwrap().rewind(Duration::from_secs(3600));
        assert!(!l.limited(4), "a fill brings one token back");
        assert!(l.limited(5));
        assert_eq!(l.status, StatusCode::TOO_MANY_REQUESTS);
    }
}
