//! Envoy's RBAC filters: the network one (`envoy.filters.network.rbac`), which Kuma puts
//! before `tcp_proxy` on mTLS chains to apply TrafficPermission / MeshTrafficPermission,
//! and the HTTP one (`envoy.filters.http.rbac`), on HTTP chains.
//!
//! The network filter is evaluated once per connection, after the TLS handshake and
//! before any byte goes upstream (Envoy's default `ONE_TIME_ON_FIRST_BYTE`); the HTTP one
//! once per request. With `rules`, a policy matches when one of its permissions and one
//! of its principals match; `ALLOW` lets a connection through only when some policy
//! matches, `DENY` refuses it when some policy matches. With `matcher` (the generic
//! matcher API, as Kuma's zone proxies use), the first matching action decides and
//! nothing matching means deny.

use crate::hcm::route::HeaderMatch;
use crate::match_api::{Inputs, Matcher};
use crate::matcher::StringMatch;
use crate::stats::{RbacStats, Registry};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::Rbac as RbacRules;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Principal, permission, principal, rbac};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbacFilter;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use envoy_types::pb::xds::r#type::matcher::v3::Matcher as XdsMatcher;
use http::HeaderMap;
use prost::{Message, Name};
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug)]
pub struct Rbac {
    /// `None` (and no matcher): every connection is allowed.
    rules: Option<Rules>,
    /// The matcher API; its actions say allow (true) or deny.
    matcher: Option<Matcher<bool>>,
    pub stats: Arc<RbacStats>,
}

#[derive(Debug)]
struct Rules {
    deny: bool,
    /// (name, permissions, principals), in name order for stable decisions.
    policies: Vec<(String, Vec<Perm>, Vec<Who>)>,
}

#[derive(Debug)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    DestinationPort(u16),
    DestinationIp(Cidr),
    ServerName(StringMatch),
    /// HTTP only.
    Header(HeaderMatch),
    /// HTTP only: the path without the query.
    UrlPath(StringMatch),
}

#[derive(Debug)]
enum Who {
    Any,
    And(Vec<Who>),
    Or(Vec<Who>),
    Not(Box<Who>),
    /// A verified client certificate, and when set a URI (then DNS) SAN that matches.
    Authenticated(Option<StringMatch>),
    /// Without PROXY protocol or trusted headers, the source, direct and remote
    /// addresses of a TCP connection are all the peer's.
    RemoteIp(Cidr),
}

#[derive(Debug, Clone, Copy)]
struct Cidr {
    net: IpAddr,
    len: u8,
}

/// What a connection shows the filter.
#[derive(Debug, Default)]
pub struct Subject<'a> {
    pub remote_ip: Option<IpAddr>,
    pub local_ip: Option<IpAddr>,
    pub local_port: u16,
    pub server_name: Option<&'a str>,
    /// The client certificate was verified (mTLS).
    pub authenticated: bool,
    pub uri_sans: &'a [&'a str],
    pub dns_sans: &'a [&'a str],
    /// The request, for the HTTP filter.
    pub headers: Option<&'a HeaderMap>,
    pub path: Option<&'a str>,
    /// The request's `:method`, `:path`, `:authority` and `:scheme`.
    pub pseudo: crate::hcm::route::PseudoHeaders<'a>,
}

impl Rbac {
    pub fn build(f: &RbacFilter, stats: &Registry) -> Result<Rbac, String> {
        Rbac::from_parts(f.rules.as_ref(), f.matcher.as_ref(), false, stats.rbac(&f.stat_prefix))
    }

    /// An HTTP RBAC filter of the connection manager whose `stat_prefix` is `hcm_prefix`.
    pub fn build_http(f: &HttpRbacFilter, hcm_prefix: &str, stats: &Registry) -> Result<Rbac, String> {
        // Shadow rules only count, they never decide: not evaluated (the caller notes it).
        let stats = stats.http_rbac(hcm_prefix, &f.rules_stat_prefix);
        Rbac::from_parts(f.rules.as_ref(), f.matcher.as_ref(), true, stats)
    }

    fn from_parts(
        rules: Option<&RbacRules>,
        matcher: Option<&XdsMatcher>,
        http: bool,
        stats: Arc<RbacStats>,
    ) -> Result<Rbac, String> {
        if rules.is_some() && matcher.is_some() {
            return Err("rules and matcher are both set".into());
        }
        let matcher = matcher.map(|m| Matcher::build(m, &action)).transpose().map_err(|e| format!("matcher: {e}"))?;
        let rules = match rules {
            None => None,
            Some(r) => {
                let deny = match rbac::Action::try_from(r.action) {
                    Ok(rbac::Action::Allow) => false,
                    Ok(rbac::Action::Deny) => true,
                    _ => return Err(format!("rules.action {} is not supported (ALLOW and DENY are)", r.action)),
                };
                let mut policies = vec![];
                for (name, p) in &r.policies {
                    if p.condition.is_some() || p.checked_condition.is_some() {
                        return Err(format!("policy `{name}`: conditions are not supported"));
                    }
                    let perms = p.permissions.iter().map(|p| perm(p, http)).collect::<Result<_, _>>();
                    let who = p.principals.iter().map(principal).collect::<Result<_, _>>();
                    policies.push((
                        name.clone(),
                        perms.map_err(|e| format!("policy `{name}`: permissions: {e}"))?,
                        who.map_err(|e| format!("policy `{name}`: principals: {e}"))?,
                    ));
                }
                policies.sort_by(|a, b| a.0.cmp(&b.0));
                Some(Rules { deny, policies })
            }
        };
        Ok(Rbac { rules, matcher, stats })
    }

    /// Whether the connection may go on; counts the decision.
    pub fn allows(&self, s: &Subject<'_>) -> bool {
        let allowed = match (&self.rules, &self.matcher) {
            (_, Some(m)) => {
                let inputs = Inputs {
                    uri_sans: s.uri_sans,
                    dns_sans: s.dns_sans,
                    server_name: s.server_name,
                    source_ip: s.remote_ip,
                    destination_port: Some(s.local_port),
                    headers: s.headers,
                };
                m.evaluate(&inputs).copied().unwrap_or(false)
            }
            (None, None) => true,
            (Some(r), None) => {
                let matched = r
                    .policies
                    .iter()
                    .any(|(_, perms, who)| perms.iter().any(|p| p.matches(s)) && who.iter().any(|w| w.matches(s)));
                matched != r.deny
            }
        };
        if allowed {
            self.stats.allowed.inc()
        } else {
            self.stats.denied.inc()
        }
        allowed
    }
}

/// An RBAC action of the matcher API: allow (true) or deny.
fn action(c: &TypedExtensionConfig) -> Result<bool, String> {
    let any = c.typed_config.as_ref().ok_or("an action has no typed_config")?;
    if any.type_url != envoy_types::pb::envoy::config::rbac::v3::Action::type_url() {
        return Err(format!("action {} is not an RBAC action", any.type_url));
    }
    let a =
        envoy_types::pb::envoy::config::rbac::v3::Action::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
    match rbac::Action::try_from(a.action) {
        Ok(rbac::Action::Allow) => Ok(true),
        Ok(rbac::Action::Deny) => Ok(false),
        _ => Err(format!("action `{}`: only ALLOW and DENY are supported", a.name)),
    }
}

fn perm(p: &Permission, http: bool) -> Result<Perm, String> {
    use permission::Rule;
    let all = |l: &[Permission]| l.iter().map(|p| perm(p, http)).collect::<Result<Vec<_>, _>>();
    Ok(match &p.rule {
        Some(Rule::Any(true)) => Perm::Any,
        Some(Rule::AndRules(set)) => Perm::And(all(&set.rules)?),
        Some(Rule::OrRules(set)) => Perm::Or(all(&set.rules)?),
        Some(Rule::NotRule(inner)) => Perm::Not(Box::new(perm(inner, http)?)),
        Some(Rule::Header(h)) if http => Perm::Header(HeaderMatch::from_proto(h)?),
        Some(Rule::UrlPath(m)) if http => match &m.rule {
            Some(envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule::Path(sm)) => {
                Perm::UrlPath(StringMatch::from_proto(sm).map_err(|e| format!("url_path: {e}"))?)
            }
            None => return Err("url_path has no rule".into()),
        },
        Some(Rule::DestinationPort(port)) => {
            Perm::DestinationPort(u16::try_from(*port).map_err(|_| format!("destination_port {port}"))?)
        }
        Some(Rule::DestinationIp(c)) => Perm::DestinationIp(cidr(c)?),
        Some(Rule::RequestedServerName(m)) => {
            Perm::ServerName(StringMatch::from_proto(m).map_err(|e| format!("requested_server_name: {e}"))?)
        }
        Some(Rule::Any(false)) | None => return Err("a permission has no rule".into()),
        Some(other) => return Err(format!("{} is not supported", rule_name(other))),
    })
}

#[allow(deprecated)]
fn rule_name(r: &permission::Rule) -> &'static str {
    use permission::Rule;
    match r {
        Rule::Header(_) => "header",
        Rule::UrlPath(_) => "url_path",
        Rule::DestinationPortRange(_) => "destination_port_range",
        Rule::Metadata(_) => "metadata",
        Rule::Matcher(_) => "matcher",
        Rule::UriTemplate(_) => "uri_template",
        _ => "this permission",
    }
}

fn principal(p: &Principal) -> Result<Who, String> {
    use principal::Identifier;
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => Who::Any,
        Some(Identifier::AndIds(set)) => Who::And(set.ids.iter().map(principal).collect::<Result<_, _>>()?),
        Some(Identifier::OrIds(set)) => Who::Or(set.ids.iter().map(principal).collect::<Result<_, _>>()?),
        Some(Identifier::NotId(inner)) => Who::Not(Box::new(principal(inner)?)),
        Some(Identifier::Authenticated(a)) => Who::Authenticated(
            a.principal_name
                .as_ref()
                .map(StringMatch::from_proto)
                .transpose()
                .map_err(|e| format!("authenticated.principal_name: {e}"))?,
        ),
        #[allow(deprecated)]
        Some(Identifier::SourceIp(c)) | Some(Identifier::DirectRemoteIp(c)) | Some(Identifier::RemoteIp(c)) => {
            Who::RemoteIp(cidr(c)?)
        }
        Some(Identifier::Any(false)) | None => return Err("a principal has no identifier".into()),
        Some(_) => {
            return Err("only any, and_ids, or_ids, not_id, authenticated and the IP principals are supported".into());
        }
    })
}

fn cidr(c: &CidrRange) -> Result<Cidr, String> {
    let net: IpAddr = c.address_prefix.parse().map_err(|_| format!("`{}` is not an IP address", c.address_prefix))?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(0, |v| v.value);
    if len > max {
        return Err(format!("prefix_len {len} is longer than {max}"));
    }
    Ok(Cidr { net, len: len as u8 })
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        let (net, ip, bits) = match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(n.to_bits()), u128::from(i.to_bits()), 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
            _ => return false,
        };
        let len = u32::from(self.len);
        len == 0 || (net ^ ip) >> (bits - len) == 0
    }
}

impl Perm {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(all) => all.iter().all(|p| p.matches(s)),
            Perm::Or(any) => any.iter().any(|p| p.matches(s)),
            Perm::Not(p) => !p.matches(s),
            Perm::DestinationPort(port) => s.local_port == *port,
            Perm::DestinationIp(c) => s.local_ip.is_some_and(|ip| c.contains(ip)),
            // Envoy's requested server name is lower-cased (the client's case is not kept).
            Perm::ServerName(m) => match s.server_name {
                Some(n) if n.bytes().any(|b| b.is_ascii_uppercase()) => m.matches(&n.to_ascii_lowercase()),
                n => m.matches(n.unwrap_or("")),
            },
            Perm::Header(h) => s.headers.is_some_and(|m| h.matches(m, &s.pseudo)),
            Perm::UrlPath(m) => s.path.is_some_and(|p| m.matches(p.split('?').next().unwrap_or(p))),
        }
    }
}

impl Who {
    fn matches(&self, s: &Subject<'_>) -> bool {
        match self {
            Who::Any => true,
            Who::And(all) => all.iter().all(|w| w.matches(s)),
            Who::Or(any) => any.iter().any(|w| w.matches(s)),
            Who::Not(w) => !w.matches(s),
            Who::Authenticated(None) => s.authenticated,
            Who::Authenticated(Some(m)) => {
                // Envoy: the URI SANs, else the DNS SANs (the subject is not read).
                s.authenticated
                    && if s.uri_sans.is_empty() {
                        s.dns_sans.iter().any(|d| m.matches(d))
                    } else {
                        s.uri_sans.iter().any(|u| m.matches(u))
                    }
            }
            Who::RemoteIp(c) => s.remote_ip.is_some_and(|ip| c.contains(ip)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::rbac::v3::{Policy, Rbac as Rules};
    use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn exact(s: &str) -> StringMatcher {
        StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Exact(s.into())), ..Default::default() }
    }

    fn filter(action: rbac::Action, principals: Vec<Principal>, permissions: Vec<Permission>) -> Rbac {
        let policy = Policy { permissions, principals, ..Default::default() };
        let f = RbacFilter {
            rules: Some(Rules {
                action: action as i32,
                policies: [("p".to_string(), policy)].into(),
                ..Default::default()
            }),
            stat_prefix: "t.".into(),
            ..Default::default()
        };
        Rbac::build(&f, &Registry::default()).unwrap()
    }

    #[test]
    fn http_shadow_rules_never_decide() {
        // Kuma's `kuma.io/effect: shadow`: the rules allow web, the shadow rules deny all.
        let rules = |action: rbac::Action, who: Vec<Principal>| Rules {
            action: action as i32,
            policies: [(
                "p".to_string(),
                Policy { permissions: vec![any_perm()], principals: who, ..Default::default() },
            )]
            .into(),
            ..Default::default()
        };
        let f = HttpRbacFilter {
            rules: Some(rules(rbac::Action::Allow, vec![spiffe("spiffe://m/web")])),
            shadow_rules: Some(rules(
                rbac::Action::Deny,
                vec![Principal { identifier: Some(principal::Identifier::Any(true)) }],
            )),
            ..Default::default()
        };
        let r = Rbac::build_http(&f, "inbound", &Registry::default()).unwrap();
        assert!(r.allows(&Subject { authenticated: true, uri_sans: &["spiffe://m/web"], ..Default::default() }));
        assert!(!r.allows(&Subject { authenticated: true, uri_sans: &["spiffe://m/api"], ..Default::default() }));
    }

    fn any_perm() -> Permission {
        Permission { rule: Some(permission::Rule::Any(true)) }
    }

    fn spiffe(name: &str) -> Principal {
        Principal {
            identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
                principal_name: Some(exact(name)),
            })),
        }
    }

    #[test]
    fn kuma_traffic_permission_allows_only_the_named_identity() {
        let f = filter(rbac::Action::Allow, vec![spiffe("spiffe://zone-1/backend")], vec![any_perm()]);
        let web = Subject { authenticated: true, uri_sans: &["spiffe://zone-1/web"], ..Default::default() };
        let backend = Subject { authenticated: true, uri_sans: &["spiffe://zone-1/backend"], ..Default::default() };
        assert!(f.allows(&backend));
        assert!(!f.allows(&web));
        assert!(!f.allows(&Subject::default()), "no certificate");
        assert_eq!((f.stats.allowed.get(), f.stats.denied.get()), (1, 2));
    }

    #[test]
    fn deny_action_and_combinators() {
        let not_web = Principal { identifier: Some(principal::Identifier::NotId(Box::new(spiffe("spiffe://m/web")))) };
        let port = Permission { rule: Some(permission::Rule::DestinationPort(8080)) };
        let f = filter(rbac::Action::Deny, vec![not_web], vec![port]);
        let web =
            Subject { authenticated: true, uri_sans: &["spiffe://m/web"], local_port: 8080, ..Default::default() };
        let api =
            Subject { authenticated: true, uri_sans: &["spiffe://m/api"], local_port: 8080, ..Default::default() };
        let api_other_port = Subject { local_port: 9090, ..api };
        assert!(f.allows(&web));
        assert!(!f.allows(&api));
        assert!(f.allows(&api_other_port));
    }

    #[test]
    fn the_requested_server_name_is_seen_lower_cased() {
        let by_name = Permission { rule: Some(permission::Rule::RequestedServerName(exact("sni.example"))) };
        let f = filter(
            rbac::Action::Allow,
            vec![Principal { identifier: Some(principal::Identifier::Any(true)) }],
            vec![by_name],
        );
        assert!(f.allows(&Subject { server_name: Some("SNI.Example"), ..Default::default() }));
        assert!(f.allows(&Subject { server_name: Some("sni.example"), ..Default::default() }));
        assert!(!f.allows(&Subject { server_name: Some("sni.example.other"), ..Default::default() }));
    }

    #[test]
    fn cidrs() {
        let c =
            |p: &str, len| cidr(&CidrRange { address_prefix: p.into(), prefix_len: Some(UInt32Value { value: len }) });
        assert!(c("10.0.0.0", 8).unwrap().contains("10.1.2.3".parse().unwrap()));
        assert!(!c("10.0.0.0", 8).unwrap().contains("11.1.2.3".parse().unwrap()));
        assert!(c("10.0.0.0", 8).unwrap().contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(c("0.0.0.0", 0).unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!(c("2001:db8::", 32).unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!(c("10.0.0.0", 33).is_err());
    }
}
