//! The generic matcher API (`xds.type.matcher.v3.Matcher`) as Envoy evaluates it: a list
//! of predicates over named inputs, first match wins, nested matchers, `on_no_match`.
//! Kuma uses it in the RBAC filters of zone proxies (inputs: URI SAN, server name) and to
//! skip a fault filter outside one server name (`ExtensionWithMatcher` + `SkipFilter`).

use std::net::IpAddr;

use envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use envoy_types::pb::xds::r#type::matcher::v3 as xm;
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::predicate::MatchType;
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::predicate::single_predicate::Matcher as ValueKind;
use envoy_types::pb::xds::r#type::matcher::v3::matcher::on_match::OnMatch as OnMatchKind;
use envoy_types::pb::xds::r#type::matcher::v3::string_matcher::MatchPattern;
use http::HeaderMap;
use regex::Regex;

use crate::matcher::{Pattern, StringMatch};

/// What a request or connection offers the inputs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Inputs<'a> {
    pub uri_sans: &'a [&'a str],
    pub dns_sans: &'a [&'a str],
    pub server_name: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub destination_port: Option<u16>,
    pub headers: Option<&'a HeaderMap>,
}

#[derive(Debug, Clone)]
enum Input {
    UriSan,
    DnsSan,
    ServerName,
    SourceIp,
    DestinationPort,
    RequestHeader(http::HeaderName),
}

#[derive(Debug)]
enum Value {
    String(StringMatch),
    Regex(Regex),
}

#[derive(Debug)]
enum Predicate {
    Single(Input, Value),
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
    Not(Box<Predicate>),
}

#[derive(Debug)]
enum OnMatch<A> {
    Action(A),
    Matcher(Box<Matcher<A>>),
}

/// A built matcher whose actions are `A`.
#[derive(Debug)]
pub struct Matcher<A> {
    list: Vec<(Predicate, OnMatch<A>)>,
    on_no_match: Option<OnMatch<A>>,
}

const INPUT_PREFIX: &str = "type.googleapis.com/";

fn input(c: &TypedExtensionConfig) -> Result<Input, String> {
    let url = c.typed_config.as_ref().map(|a| a.type_url.as_str()).unwrap_or_default();
    let name = url.strip_prefix(INPUT_PREFIX).unwrap_or(url);
    Ok(match name {
        "envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput" => Input::UriSan,
        "envoy.extensions.matching.common_inputs.ssl.v3.DnsSanInput" => Input::DnsSan,
        "envoy.extensions.matching.common_inputs.network.v3.ServerNameInput" => Input::ServerName,
        "envoy.extensions.matching.common_inputs.network.v3.SourceIPInput"
        | "envoy.extensions.matching.common_inputs.network.v3.DirectSourceIPInput" => Input::SourceIp,
        "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput" => Input::DestinationPort,
        "envoy.type.matcher.v3.HttpRequestHeaderMatchInput" => {
            use envoy_types::pb::envoy::r#type::matcher::v3::HttpRequestHeaderMatchInput;
            use prost::Message;
            let any = c.typed_config.as_ref().expect("type url read above");
            let h = HttpRequestHeaderMatchInput::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
            Input::RequestHeader(
                http::HeaderName::from_bytes(h.header_name.as_bytes())
                    .map_err(|_| format!("`{}` is not a header name", h.header_name))?,
            )
        }
        other => return Err(format!("input {} ({other}) is not supported", c.name)),
    })
}

fn value(m: &xm::StringMatcher) -> Result<Value, String> {
    let pattern = match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Pattern::Exact(s.clone()),
        Some(MatchPattern::Prefix(s)) => Pattern::Prefix(s.clone()),
        Some(MatchPattern::Suffix(s)) => Pattern::Suffix(s.clone()),
        Some(MatchPattern::Contains(s)) => Pattern::Contains(s.clone()),
        Some(MatchPattern::SafeRegex(re)) => {
            let re = Regex::new(&format!("^(?:{})$", re.regex)).map_err(|e| format!("safe_regex: {e}"))?;
            return Ok(Value::Regex(re));
        }
        Some(MatchPattern::Custom(c)) => return Err(format!("custom string matcher {} is not supported", c.name)),
        None => return Err("a value matcher has no pattern".into()),
    };
    Ok(Value::String(StringMatch::new(pattern, m.ignore_case)))
}

fn predicate(p: &xm::matcher::matcher_list::Predicate) -> Result<Predicate, String> {
    Ok(match &p.match_type {
        Some(MatchType::SinglePredicate(s)) => {
            let i = input(s.input.as_ref().ok_or("a predicate has no input")?)?;
            match &s.matcher {
                Some(ValueKind::ValueMatch(m)) => Predicate::Single(i, value(m)?),
                Some(ValueKind::CustomMatch(c)) => return Err(format!("custom_match {} is not supported", c.name)),
                None => return Err("a predicate has no value_match".into()),
            }
        }
        Some(MatchType::OrMatcher(l)) => Predicate::Or(l.predicate.iter().map(predicate).collect::<Result<_, _>>()?),
        Some(MatchType::AndMatcher(l)) => Predicate::And(l.predicate.iter().map(predicate).collect::<Result<_, _>>()?),
        Some(MatchType::NotMatcher(inner)) => Predicate::Not(Box::new(predicate(inner)?)),
        None => return Err("an empty predicate".into()),
    })
}

impl<A> Matcher<A> {
    /// Builds a matcher; `action` reads an action's typed config.
    pub fn build(
        m: &xm::Matcher,
        action: &dyn Fn(&TypedExtensionConfig) -> Result<A, String>,
    ) -> Result<Matcher<A>, String> {
        let on_match = |o: &xm::matcher::OnMatch| -> Result<OnMatch<A>, String> {
            if o.keep_matching {
                return Err("keep_matching is not supported".into());
            }
            match &o.on_match {
                Some(OnMatchKind::Action(a)) => Ok(OnMatch::Action(action(a)?)),
                Some(OnMatchKind::Matcher(inner)) => Ok(OnMatch::Matcher(Box::new(Matcher::build(inner, action)?))),
                None => Err("an on_match has neither action nor matcher".into()),
            }
        };
        let mut list = vec![];
        match &m.matcher_type {
            None => {}
            Some(xm::matcher::MatcherType::MatcherList(l)) => {
                for (i, fm) in l.matchers.iter().enumerate() {
                    let p = predicate(fm.predicate.as_ref().ok_or("a field matcher has no predicate")?)
                        .map_err(|e| format!("matchers[{i}]: {e}"))?;
                    let o = on_match(fm.on_match.as_ref().ok_or("a field matcher has no on_match")?)
                        .map_err(|e| format!("matchers[{i}]: {e}"))?;
                    list.push((p, o));
                }
            }
            Some(xm::matcher::MatcherType::MatcherTree(_)) => return Err("matcher_tree is not supported".into()),
        }
        let on_no_match =
            m.on_no_match.as_ref().map(|o| on_match(o)).transpose().map_err(|e| format!("on_no_match: {e}"))?;
        Ok(Matcher { list, on_no_match })
    }

    /// The action for these inputs, or `None` when nothing matched and there is no
    /// `on_no_match`.
    pub fn evaluate(&self, i: &Inputs<'_>) -> Option<&A> {
        let hit = self.list.iter().find(|(p, _)| p.matches(i)).map(|(_, o)| o).or(self.on_no_match.as_ref())?;
        match hit {
            OnMatch::Action(a) => Some(a),
            OnMatch::Matcher(m) => m.evaluate(i),
        }
    }
}

impl Predicate {
    fn matches(&self, i: &Inputs<'_>) -> bool {
        match self {
            Predicate::Or(l) => l.iter().any(|p| p.matches(i)),
            Predicate::And(l) => l.iter().all(|p| p.matches(i)),
            Predicate::Not(p) => !p.matches(i),
            Predicate::Single(input, v) => {
                let text: Option<String> = match input {
                    // Several SANs are offered joined by commas, as Envoy's inputs do.
                    Input::UriSan => Some(i.uri_sans.join(",")).filter(|s| !s.is_empty()),
                    Input::DnsSan => Some(i.dns_sans.join(",")).filter(|s| !s.is_empty()),
                    // Envoy keeps the requested server name lower-cased (a client may send
                    // `SNI.EXAMPLE`): the input sees it so.
                    Input::ServerName => i.server_name.map(str::to_ascii_lowercase),
                    Input::SourceIp => i.source_ip.map(|ip| ip.to_string()),
                    Input::DestinationPort => i.destination_port.map(|p| p.to_string()),
                    Input::RequestHeader(h) => {
                        i.headers.and_then(|m| m.get(h)).and_then(|v| v.to_str().ok()).map(str::to_owned)
                    }
                };
                // An input with no data matches nothing.
                text.is_some_and(|t| match v {
                    Value::String(m) => m.matches(&t),
                    Value::Regex(re) => re.is_match(&t),
                })
            }
        }
    }
}
