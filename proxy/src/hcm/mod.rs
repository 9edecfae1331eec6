//! dp's HTTP data path: Envoy's `http_connection_manager` as a terminal network filter,
//! after TLS termination or in plain text. Downstream HTTP/1.1 and HTTP/2 (hyper), route
//! tables, filters, and upstream connection pools per host.
//!
//! `HttpCfg` is built with the snapshot and shared by every connection of its chain;
//! [`server::serve`] runs one downstream connection.

pub mod filters;
pub mod hash_policy;
pub mod headers;
pub mod park;
pub mod pool;
pub mod route;
pub mod server;
pub mod throttle;
pub mod xfcc;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    CodecType, RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;

use crate::snapshot::Target;
use crate::stats::{HttpStats, Registry};
use route::{Resolve, RouteTable};

/// Envoy's defaults.
const DEFAULT_MAX_HEADERS_KB: u32 = 60;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug)]
pub struct HttpCfg {
    pub stat_prefix: String,
    pub stats: Arc<HttpStats>,
    pub routes: Arc<RouteTable>,
    pub filters: Vec<filters::Configured>,
    pub codec: Codec,
    /// How long a request's headers may take to arrive (`request_headers_timeout`).
    pub request_headers_timeout: Option<Duration>,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Option<Duration>,
    /// A request with no activity is reset after this long.
    pub stream_idle_timeout: Option<Duration>,
    pub max_request_headers_kb: u32,
    /// Append the peer's address to `x-forwarded-for` (`use_remote_address`).
    pub use_remote_address: bool,
    /// Peers whose requests count as internal (`internal_address_config`).
    internal: Vec<(IpAddr, u8)>,
    /// The `server` header of responses dp makes itself.
    pub server_name: String,
    /// The HCM's `access_log`: one entry per request.
    pub access_log: crate::access_log::AccessLogs,
    /// Kuma's Lua filter is there: the route's `route_kri` becomes dynamic metadata.
    pub route_kri: bool,
    /// What requests' `x-forwarded-client-cert` becomes.
    pub xfcc: xfcc::Xfcc,
}

/// What building an HCM needs from the snapshot being built.
pub struct BuildCtx<'a> {
    pub target: &'a dyn Fn(&str, BTreeMap<String, String>) -> Target,
    /// RDS route configurations by name.
    pub route_configs: &'a HashMap<&'a str, &'a RouteConfiguration>,
    pub stats: &'a Registry,
    pub notes: &'a mut Vec<String>,
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// An optional duration where 0 means "none" (Envoy's convention for timeouts).
fn timeout(d: Option<&envoy_types::pb::google::protobuf::Duration>, default: Option<Duration>) -> Option<Duration> {
    match d {
        None => default,
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    }
}

impl HttpCfg {
    pub fn build(h: &HttpConnectionManager, ctx: &mut BuildCtx<'_>) -> Result<HttpCfg, String> {
        let codec = match CodecType::try_from(h.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            _ => return Err(format!("codec_type {} is not supported (AUTO, HTTP1, HTTP2 are)", h.codec_type)),
        };
        if h.xff_num_trusted_hops != 0 || !h.original_ip_detection_extensions.is_empty() {
            return Err("xff_num_trusted_hops and original_ip_detection_extensions are not supported".into());
        }
        if h.http_protocol_options.as_ref().is_some_and(|o| o.accept_http_10) {
            return Err("http_protocol_options.accept_http_10 is not supported".into());
        }
        let access_log = crate::access_log::AccessLogs::build(
            &h.access_log,
            &format!("http_connection_manager `{}`", h.stat_prefix),
            ctx.notes,
        )?;
        if h.tracing.is_some() {
            ctx.notes.push(format!(
                "http_connection_manager `{}`: tracing is not implemented; no spans are sent",
                h.stat_prefix
            ));
        }
        let per_filter = |cfg: &HashMap<String, envoy_types::pb::google::protobuf::Any>| filters::per_route(cfg);
        let resolve = Resolve { target: ctx.target, per_filter: &per_filter };
        let table = match &h.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => {
                RouteTable::build(rc, &resolve).map_err(|e| format!("route_config: {e}"))?
            }
            Some(RouteSpecifier::Rds(rds)) => {
                let rc = ctx
                    .route_configs
                    .get(rds.route_config_name.as_str())
                    .ok_or_else(|| format!("rds: route configuration `{}` has not arrived", rds.route_config_name))?;
                RouteTable::build(rc, &resolve).map_err(|e| format!("route configuration `{}`: {e}", rc.name))?
            }
            Some(RouteSpecifier::ScopedRoutes(_)) => return Err("scoped_routes is not supported".into()),
            None => return Err("neither route_config nor rds is set".into()),
        };
        let mut built = vec![];
        let Some((last, rest)) = h.http_filters.split_last() else {
            return Err("http_filters is empty: the router must be last".into());
        };
        let typed =
            |f: &envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter| match &f
                .config_type
            {
                Some(ConfigType::TypedConfig(any)) => Ok(any.clone()),
                _ => Err(format!("http filter {}: only typed_config is supported", f.name)),
            };
        if !filters::is_router(&typed(last)?) {
            return Err(format!("http_filters: the last filter is {}, not the router", last.name));
        }
        for f in rest {
            if f.disabled {
                continue;
            }
            if let Some(c) = filters::build(&f.name, &typed(f)?, &h.stat_prefix, ctx.stats, ctx.notes)
                .map_err(|e| format!("http filter {}: {e}", f.name))?
            {
                built.push(c);
            }
        }
        let internal = h
            .internal_address_config
            .as_ref()
            .map(|c| {
                c.cidr_ranges
                    .iter()
                    .map(|r| {
                        let ip: IpAddr = r
                            .address_prefix
                            .parse()
                            .map_err(|_| format!("internal_address_config: `{}`", r.address_prefix))?;
                        Ok((ip, r.prefix_len.as_ref().map_or(0, |v| v.value) as u8))
                    })
                    .collect::<Result<Vec<_>, String>>()
            })
            .transpose()?
            .unwrap_or_default();
        let common = h.common_http_protocol_options.as_ref();
        let xfcc = xfcc::Xfcc::build(h, ctx.notes);
        Ok(HttpCfg {
            stat_prefix: h.stat_prefix.clone(),
            stats: ctx.stats.http(&h.stat_prefix),
            routes: Arc::new(table),
            route_kri: built.iter().any(|c| matches!(c.filter, filters::Filter::RouteKri)),
            filters: built,
            codec,
            request_headers_timeout: timeout(h.request_headers_timeout.as_ref(), None),
            idle_timeout: timeout(common.and_then(|c| c.idle_timeout.as_ref()), Some(DEFAULT_IDLE_TIMEOUT)),
            stream_idle_timeout: timeout(h.stream_idle_timeout.as_ref(), Some(DEFAULT_STREAM_IDLE_TIMEOUT)),
            max_request_headers_kb: h.max_request_headers_kb.map_or(DEFAULT_MAX_HEADERS_KB, |v| v.value.max(1)),
            use_remote_address: h.use_remote_address.is_some_and(|b| b.value),
            internal,
            server_name: if h.server_name.is_empty() { "envoy".into() } else { h.server_name.clone() },
            access_log,
            xfcc,
        })
    }

    /// Whether a peer counts as internal: the configured ranges, or with none, Envoy's
    /// default (RFC 1918, loopback and unique-local addresses).
    pub fn is_internal(&self, ip: IpAddr) -> bool {
        if !self.internal.is_empty() {
            return self.internal.iter().any(|(net, len)| in_cidr(*net, *len, ip));
        }
        match ip {
            IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
            IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        }
    }
}

fn in_cidr(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = u32::from(len.min(32));
            len == 0 || (u32::from(n) ^ u32::from(i)) >> (32 - len) == 0
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = u32::from(len.min(128));
            len == 0 || (u128::from(n) ^ u128::from(i)) >> (128 - len) == 0
        }
        (IpAddr::V4(_), IpAddr::V6(i)) => i.to_ipv4_mapped().is_some_and(|v4| in_cidr(net, len, IpAddr::V4(v4))),
        _ => false,
    }
}
