//! MeshHTTPRoute on a sidecar's HTTP outbounds, as Kuma 2.14's plugin writes routes
//! (`kumahq/kuma:pkg/plugins/policies/meshhttproute`):
//! * the rules of the mesh-wide policies' `to` entries for the outbound's MeshService are
//!   merged, a later policy's rule with the same `matches` replacing an earlier one's;
//! * every match is a route, ordered as Kuma's `CompareMatch`: exact paths, then longer
//!   prefixes, then regular expressions, then none; then those with a method, more headers,
//!   more query parameters; the catch-all `PathPrefix /` comes last unless a rule has it;
//! * a `PathPrefix /x` is two Envoy routes, `path: /x` and `prefix: /x/` (Kuma avoids
//!   `path_separated_prefix`);
//! * `backendRefs` (MeshService or MeshServiceSubset, by weight; by default the service
//!   itself) become the route's cluster or weighted clusters;
//! * filters: `RequestHeaderModifier`, `ResponseHeaderModifier`, `URLRewrite` (hostname,
//!   full path, prefix), `RequestRedirect` (scheme, host, port, path, status) and
//!   `RequestMirror` (a copy of each request, or of a percentage, to a backend's cluster).
//! * A route's name is Kuma's: the base64 SHA-256 of its rule's matches as Go marshals them.

use std::collections::BTreeMap;

use base64::Engine;
use envoy_types::pb::envoy::config::core::v3::{HeaderValueOption, RuntimeFractionalPercent, header_value_option};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction, RouteMatch, WeightedCluster,
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use serde_json::{Map, Value, json};

use super::http::HttpTimeouts;
use super::tcp_route::Backend;
use crate::model::Resource;

/// One rule: the matches it was written with (for its name), and its `default`.
#[derive(Clone, Debug)]
struct Rule {
    matches: Vec<Value>,
    default: Value,
}

fn rules(policies: &[Resource], service: &str) -> Vec<Rule> {
    let mut out: Vec<Rule> = vec![];
    for spec in super::resilience::mesh_wide(policies) {
        for to in spec["to"].as_array().into_iter().flatten() {
            let t = &to["targetRef"];
            if t["kind"] != "MeshService" || t["name"].as_str() != Some(service) {
                continue;
            }
            for r in to["rules"].as_array().into_iter().flatten() {
                let matches = r["matches"].as_array().cloned().unwrap_or_default();
                let rule = Rule { matches, default: r["default"].clone() };
                match out.iter_mut().find(|o| o.matches == rule.matches) {
                    Some(same) => *same = rule,
                    None => out.push(rule),
                }
            }
        }
    }
    out
}

fn backends_of(rule: &Rule, service: &str) -> Vec<Backend> {
    match rule.default["backendRefs"].as_array() {
        Some(refs) => refs.iter().filter_map(super::tcp_route::backend).collect(),
        None => vec![Backend { service: service.to_string(), tags: Default::default(), weight: 100 }],
    }
}

/// The backends a rule's RequestMirror filters copy requests to.
fn mirrors_of(rule: &Rule) -> impl Iterator<Item = Backend> + '_ {
    let filters = rule.default["filters"].as_array().into_iter().flatten();
    filters
        .filter(|f| f["type"] == "RequestMirror")
        .filter_map(|f| super::tcp_route::backend(&f["requestMirror"]["backendRef"]))
}

/// Every backend the routes to `service` send to (for its clusters); `None` when no
/// route applies.
pub fn backends(policies: &[Resource], service: &str) -> Option<Vec<Backend>> {
    let rules = rules(policies, service);
    if rules.is_empty() {
        return None;
    }
    let mut all: Vec<Backend> = rules.iter().flat_map(|r| backends_of(r, service)).collect();
    all.extend(rules.iter().flat_map(mirrors_of));
    // The catch-all's default backend, when no rule has the catch-all.
    all.push(Backend { service: service.to_string(), tags: Default::default(), weight: 100 });
    Some(all)
}

/// Kuma's ordering key of a match (smaller first).
fn order(m: &Value) -> (u8, std::cmp::Reverse<usize>, bool, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
    let path = &m["path"];
    let value_len = path["value"].as_str().map_or(0, str::len);
    let (rank, len) = match path["type"].as_str() {
        Some("Exact") => (0, 0),
        Some("PathPrefix") => (1, value_len),
        Some("RegularExpression") => (2, value_len),
        _ => (3, 0),
    };
    let count = |k: &str| m[k].as_array().map_or(0, Vec::len);
    (
        rank,
        std::cmp::Reverse(len),
        m["method"].as_str().is_none(),
        std::cmp::Reverse(count("headers")),
        std::cmp::Reverse(count("queryParams")),
    )
}

fn is_catch_all(m: &Value) -> bool {
    m.as_object().is_some_and(|o| o.len() == 1)
        && m["path"]["type"] == "PathPrefix"
        && m["path"]["value"] == "/"
        && m["path"].as_object().is_some_and(|p| p.len() == 2)
}

/// The routes of an outbound to `service`: MeshHTTPRoute's, then the catch-all to the
/// service itself.
pub fn routes(
    policies: &[Resource],
    service: &str,
    timeouts: &HttpTimeouts,
    retry: Option<&RetryPolicy>,
) -> Vec<Route> {
    let rules = rules(policies, service);
    let mut api: Vec<(Value, &Rule)> =
        rules.iter().flat_map(|r| r.matches.iter().map(move |m| (m.clone(), r))).collect();
    api.sort_by_key(|(m, _)| order(m));
    let default_rule =
        Rule { matches: vec![json!({"path": {"type": "PathPrefix", "value": "/"}})], default: json!({}) };
    if !api.iter().any(|(m, _)| is_catch_all(m)) {
        api.push((default_rule.matches[0].clone(), &default_rule));
    }
    let mut out = vec![];
    for (m, rule) in api {
        let name = route_name(&rule.matches);
        let backends = backends_of(rule, service);
        if backends.is_empty() {
            continue;
        }
        let action = route_action(&backends, timeouts, retry);
        let path = &m["path"];
        let value = path["value"].as_str().unwrap_or("/");
        let specifiers: Vec<(route_match::PathSpecifier, bool)> = match path["type"].as_str() {
            Some("Exact") => vec![(route_match::PathSpecifier::Path(value.into()), true)],
            Some("RegularExpression") => vec![(
                route_match::PathSpecifier::SafeRegex(RegexMatcher { regex: value.into(), ..Default::default() }),
                true,
            )],
            _ if value.trim_end_matches('/').is_empty() => {
                vec![(route_match::PathSpecifier::Prefix("/".into()), false)]
            }
            _ => {
                let trimmed = value.trim_end_matches('/');
                vec![
                    (route_match::PathSpecifier::Path(trimmed.into()), true),
                    (route_match::PathSpecifier::Prefix(format!("{trimmed}/")), false),
                ]
            }
        };
        for (spec, whole_path) in specifiers {
            let mut r = Route {
                name: name.clone(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(spec),
                    headers: header_matchers(&m),
                    query_parameters: query_matchers(&m),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(action.clone())),
                ..Default::default()
            };
            for f in rule.default["filters"].as_array().into_iter().flatten() {
                apply_filter(&mut r, f, whole_path);
            }
            out.push(r);
        }
    }
    out
}

/// MeshTimeouts whose top-level targetRef is a MeshHTTPRoute: their request and stream idle
/// timeouts go on the routes that MeshHTTPRoute's rules make toward `service`, over the
/// mesh's and the service's. (Kuma's `buildToListWithRoutes` turns each of the route's
/// rules into a subset of its service keyed by the hash of the rule's matches, which is
/// also the name of the rule's routes; the subset is more specific than the service.)
pub fn apply_route_timeouts(routes: &mut [Route], timeouts: &[Resource], http_routes: &[Resource], service: &str) {
    let mut by_route: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut targeting: Vec<(&Resource, Value)> = timeouts
        .iter()
        .filter_map(|r| Some((r, r.typed::<Value>().ok()?)))
        .filter(|(_, spec)| spec["targetRef"]["kind"] == "MeshHTTPRoute")
        .collect();
    targeting.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (_, spec) in &targeting {
        let route_name_ref = spec["targetRef"]["name"].as_str();
        let Some(route) = http_routes.iter().find(|r| Some(r.name.as_str()) == route_name_ref) else { continue };
        let Some(route_spec) =
            route.typed::<Value>().ok().filter(|s| matches!(s["targetRef"]["kind"].as_str(), None | Some("Mesh")))
        else {
            continue;
        };
        for to in route_spec["to"].as_array().into_iter().flatten() {
            let t = &to["targetRef"];
            if t["kind"] != "MeshService" || t["name"].as_str() != Some(service) {
                continue;
            }
            for rule in to["rules"].as_array().into_iter().flatten() {
                let name = route_name(rule["matches"].as_array().map_or(&[][..], Vec::as_slice));
                for item in spec["to"].as_array().into_iter().flatten() {
                    if let Value::Object(conf) = &item["default"] {
                        super::resilience::merge(by_route.entry(name.clone()).or_default(), conf);
                    }
                }
            }
        }
    }
    if by_route.is_empty() {
        return;
    }
    let base = super::resilience::merged_conf(timeouts, service).unwrap_or_default();
    for r in routes {
        let (Some(conf), Some(route::Action::Route(action))) = (by_route.get(&r.name), r.action.as_mut()) else {
            continue;
        };
        let mut merged = base.clone();
        super::resilience::merge(&mut merged, conf);
        let t = HttpTimeouts::of(Some(&merged));
        action.timeout = Some(t.request);
        action.idle_timeout = Some(t.stream_idle);
    }
}

/// Routes to an ExternalService send its own host name upstream.
pub fn auto_host_rewrite(routes: &mut [Route]) {
    for r in routes {
        if let Some(route::Action::Route(a)) = r.action.as_mut()
            && a.host_rewrite_specifier.is_none()
        {
            let on = envoy_types::pb::google::protobuf::BoolValue { value: true };
            a.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::AutoHostRewrite(on));
        }
    }
}

fn route_action(backends: &[Backend], timeouts: &HttpTimeouts, retry: Option<&RetryPolicy>) -> RouteAction {
    let cluster_specifier = match backends {
        [one] => route_action::ClusterSpecifier::Cluster(one.cluster()),
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|b| weighted_cluster::ClusterWeight {
                    name: b.cluster(),
                    weight: Some(UInt32Value { value: b.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: Some(timeouts.request),
        idle_timeout: Some(timeouts.stream_idle),
        retry_policy: retry.cloned(),
        ..Default::default()
    }
}

fn string_match(kind: &str, value: &str) -> Option<string_matcher::MatchPattern> {
    Some(match kind {
        "Exact" => string_matcher::MatchPattern::Exact(value.into()),
        "Prefix" => string_matcher::MatchPattern::Prefix(value.into()),
        "RegularExpression" => {
            string_matcher::MatchPattern::SafeRegex(RegexMatcher { regex: value.into(), ..Default::default() })
        }
        _ => return None,
    })
}

/// `:method` first, then the headers (a name's first match only), as Kuma.
fn header_matchers(m: &Value) -> Vec<HeaderMatcher> {
    let mut out = vec![];
    if let Some(method) = m["method"].as_str() {
        out.push(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: string_match("Exact", method),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for h in m["headers"].as_array().into_iter().flatten() {
        let Some(name) = h["name"].as_str() else { continue };
        if !seen.insert(name.to_string()) {
            continue;
        }
        let value = h["value"].as_str().unwrap_or_default();
        let spec = match h["type"].as_str().unwrap_or("Exact") {
            "Present" => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
            "Absent" => header_matcher::HeaderMatchSpecifier::PresentMatch(false),
            "Prefix" if value.is_empty() => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
            kind => header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: string_match(kind, value),
                ..Default::default()
            }),
        };
        out.push(HeaderMatcher { name: name.into(), header_match_specifier: Some(spec), ..Default::default() });
    }
    out
}

fn query_matchers(m: &Value) -> Vec<QueryParameterMatcher> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = vec![];
    for q in m["queryParams"].as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (q["name"].as_str(), q["value"].as_str()) else { continue };
        if !seen.insert(name.to_string()) {
            continue;
        }
        let kind = q["type"].as_str().unwrap_or("Exact");
        out.push(QueryParameterMatcher {
            name: name.into(),
            query_parameter_match_specifier: Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                StringMatcher { match_pattern: string_match(kind, value), ..Default::default() },
            )),
        });
    }
    out
}

/// `set` entries overwrite, `add` entries append; then `remove`.
fn header_changes(f: &Value) -> (Vec<HeaderValueOption>, Vec<String>) {
    let entry = super::http::header_option;
    use header_value_option::HeaderAppendAction::{AppendIfExistsOrAdd, OverwriteIfExistsOrAdd};
    let list = |k: &str| f[k].as_array().into_iter().flatten();
    let add = list("set")
        .filter_map(|h| entry(h, OverwriteIfExistsOrAdd))
        .chain(list("add").filter_map(|h| entry(h, AppendIfExistsOrAdd)))
        .collect();
    let remove = list("remove").filter_map(|v| v.as_str().map(str::to_owned)).collect();
    (add, remove)
}

fn apply_filter(r: &mut Route, f: &Value, whole_path: bool) {
    match f["type"].as_str() {
        Some("RequestHeaderModifier") => {
            let (add, remove) = header_changes(&f["requestHeaderModifier"]);
            r.request_headers_to_add.extend(add);
            r.request_headers_to_remove.extend(remove);
        }
        Some("ResponseHeaderModifier") => {
            let (add, remove) = header_changes(&f["responseHeaderModifier"]);
            r.response_headers_to_add.extend(add);
            r.response_headers_to_remove.extend(remove);
        }
        Some("URLRewrite") => {
            let Some(route::Action::Route(a)) = r.action.as_mut() else { return };
            let u = &f["urlRewrite"];
            if let Some(host) = u["hostname"].as_str() {
                a.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(host.into()));
            }
            let whole = |to: &str| RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher { regex: ".*".into(), ..Default::default() }),
                substitution: to.into(),
            };
            match (u["path"]["type"].as_str(), &u["path"]) {
                (Some("ReplaceFullPath"), p) => a.regex_rewrite = p["replaceFullPath"].as_str().map(whole),
                (Some("ReplacePrefixMatch"), p) => {
                    let to = p["replacePrefixMatch"].as_str().unwrap_or("/");
                    if whole_path {
                        a.regex_rewrite = Some(whole(to));
                    } else {
                        a.prefix_rewrite = to.to_string();
                    }
                }
                _ => {}
            }
        }
        Some("RequestRedirect") => {
            let rr = &f["requestRedirect"];
            let whole = |to: &str| {
                redirect_action::PathRewriteSpecifier::RegexRewrite(RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher { regex: ".*".into(), ..Default::default() }),
                    substitution: to.into(),
                })
            };
            let path = &rr["path"];
            let path_rewrite_specifier = match (path["type"].as_str(), path["replaceFullPath"].as_str()) {
                (Some("ReplaceFullPath"), Some(to)) => Some(whole(to)),
                (Some("ReplacePrefixMatch"), _) => {
                    let to = path["replacePrefixMatch"].as_str().unwrap_or("/");
                    Some(if whole_path {
                        whole(to)
                    } else {
                        redirect_action::PathRewriteSpecifier::PrefixRewrite(to.into())
                    })
                }
                _ => None,
            };
            use redirect_action::RedirectResponseCode as Code;
            let response_code = match rr["statusCode"].as_u64() {
                Some(301) => Code::MovedPermanently,
                Some(303) => Code::SeeOther,
                Some(307) => Code::TemporaryRedirect,
                Some(308) => Code::PermanentRedirect,
                _ => Code::Found,
            };
            r.action = Some(route::Action::Redirect(RedirectAction {
                scheme_rewrite_specifier: rr["scheme"]
                    .as_str()
                    .map(|s| redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s.into())),
                host_redirect: rr["hostname"].as_str().unwrap_or_default().into(),
                port_redirect: rr["port"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                path_rewrite_specifier,
                response_code: response_code as i32,
                ..Default::default()
            }));
        }
        Some("RequestMirror") => {
            let Some(route::Action::Route(a)) = r.action.as_mut() else { return };
            let m = &f["requestMirror"];
            let Some(backend) = super::tcp_route::backend(&m["backendRef"]) else { return };
            a.request_mirror_policies.push(route_action::RequestMirrorPolicy {
                cluster: backend.cluster(),
                runtime_fraction: super::fault_injection::percentage(&m["percentage"])
                    .map(|p| RuntimeFractionalPercent { default_value: Some(p), runtime_key: String::new() }),
                ..Default::default()
            });
        }
        other => tracing::debug!(filter = ?other, "MeshHTTPRoute filter not served"),
    }
}

/// Kuma's route name: base64(SHA-256(the rule's matches, as Go's `json.Marshal` writes
/// them: `path{value,type}`, `method`, `queryParams[{type,name,value}]`,
/// `headers[{type,name,value}]`, empty fields left out)).
fn route_name(matches: &[Value]) -> String {
    let s = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    let one = |m: &Value| {
        let mut parts = vec![];
        if m["path"].is_object() {
            parts.push(format!(r#""path":{{"value":{},"type":{}}}"#, s(&m["path"]["value"]), s(&m["path"]["type"])));
        }
        if let Some(method) = m["method"].as_str() {
            parts.push(format!(r#""method":{}"#, s(&json!(method))));
        }
        let entries = |k: &str, type_always: bool| {
            let items: Vec<String> = m[k]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let mut f = vec![];
                    if type_always || e["type"].is_string() {
                        f.push(format!(r#""type":{}"#, s(&e["type"])));
                    }
                    f.push(format!(r#""name":{}"#, s(&e["name"])));
                    if e["value"].is_string() {
                        f.push(format!(r#""value":{}"#, s(&e["value"])));
                    }
                    format!("{{{}}}", f.join(","))
                })
                .collect();
            (!items.is_empty()).then(|| format!(r#""{k}":[{}]"#, items.join(",")))
        };
        parts.extend(entries("queryParams", true));
        parts.extend(entries("headers", false));
        format!("{{{}}}", parts.join(","))
    };
    let json = format!("[{}]", matches.iter().map(one).collect::<Vec<_>>().join(","));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, json.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// What is wrong with a MeshHTTPRoute spec, as (field path, message): Kuma's validator's
/// checks of matches and filters, and its schema's enums; no stricter, since a zone also
/// validates what KDS brings from global.
pub fn problems(spec: &serde_json::Map<String, Value>) -> Vec<(String, String)> {
    let mut out = vec![];
    let gateway = spec.get("targetRef").is_some_and(|t| t["kind"] == "MeshGateway");
    let one_of = |out: &mut Vec<(String, String)>, at: String, v: &Value, allowed: &[&str]| {
        if let Some(v) = v.as_str().filter(|v| !allowed.contains(v)) {
            out.push((at, format!("{v:?} is not one of {}", allowed.join(", "))));
        }
    };
    for (i, to) in spec.get("to").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let at = format!("spec.to[{i}]");
        if !gateway && to["hostnames"].as_array().is_some_and(|h| !h.is_empty()) {
            out.push((format!("{at}.hostnames"), "must not be defined".into()));
        }
        for (j, rule) in to["rules"].as_array().into_iter().flatten().enumerate() {
            let at = format!("{at}.rules[{j}]");
            let matches = rule["matches"].as_array().cloned().unwrap_or_default();
            for (k, m) in matches.iter().enumerate() {
                let at = format!("{at}.matches[{k}]");
                let path = &m["path"];
                one_of(
                    &mut out,
                    format!("{at}.path.type"),
                    &path["type"],
                    &["Exact", "PathPrefix", "RegularExpression"],
                );
                let value = path["value"].as_str().unwrap_or_default();
                let absolute = || (format!("{at}.path.value"), "must be an absolute path".to_string());
                match path["type"].as_str() {
                    Some("PathPrefix") if value != "/" => {
                        if value.ends_with('/') {
                            out.push((
                                format!("{at}.path.value"),
                                "does not need a trailing slash because only a `/`-separated prefix or an entire \
                                 path is matched"
                                    .into(),
                            ));
                        }
                        if !value.starts_with('/') {
                            out.push(absolute());
                        }
                    }
                    Some("Exact") if !value.starts_with('/') => out.push(absolute()),
                    _ => {}
                }
                for (n, h) in m["headers"].as_array().into_iter().flatten().enumerate() {
                    let kinds = ["Exact", "Present", "RegularExpression", "Absent", "Prefix"];
                    one_of(&mut out, format!("{at}.headers[{n}].type"), &h["type"], &kinds);
                    let valueless = matches!(h["type"].as_str(), Some("Present" | "Absent"));
                    if valueless && h["value"].as_str().is_some_and(|v| !v.is_empty()) {
                        out.push((format!("{at}.headers[{n}].value"), "must not be defined".into()));
                    }
                }
                let mut names = std::collections::BTreeSet::new();
                for (n, q) in m["queryParams"].as_array().into_iter().flatten().enumerate() {
                    let name = q["name"].as_str().unwrap_or_default();
                    if !names.insert(name) {
                        out.push((format!("{at}.queryParams[{n}].name"), format!("multiple entries for name {name}")));
                    }
                }
            }
            // No matches stands for the `/` prefix.
            let all_prefixes = matches.iter().all(|m| m["path"]["type"] == "PathPrefix");
            for (n, f) in rule["default"]["filters"].as_array().into_iter().flatten().enumerate() {
                let at = format!("{at}.default.filters[{n}]");
                let kinds = [
                    ("RequestHeaderModifier", "requestHeaderModifier"),
                    ("ResponseHeaderModifier", "responseHeaderModifier"),
                    ("RequestRedirect", "requestRedirect"),
                    ("URLRewrite", "urlRewrite"),
                    ("RequestMirror", "requestMirror"),
                ];
                let Some((_, field)) = kinds.iter().find(|(k, _)| f["type"] == *k) else {
                    let names: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
                    one_of(&mut out, format!("{at}.type"), &f["type"], &names);
                    continue;
                };
                if !f[*field].is_object() {
                    out.push((format!("{at}.{field}"), "must be defined".into()));
                } else if matches!(*field, "requestRedirect" | "urlRewrite")
                    && !f[*field]["path"]["replacePrefixMatch"].is_null()
                    && !all_prefixes
                {
                    out.push((
                        format!("{at}.{field}.path.replacePrefixMatch"),
                        "can only appear if all matches match a path prefix".into(),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;

    fn policy(name: &str, rules: Value) -> Resource {
        Resource::from_json(&json!({"type": "MeshHTTPRoute", "mesh": "m", "name": name, "spec": {
            "targetRef": {"kind": "Mesh"},
            "to": [{"targetRef": {"kind": "MeshService", "name": "backend"}, "rules": rules}]}}))
        .unwrap()
    }

    fn paths(routes: &[Route]) -> Vec<String> {
        routes
            .iter()
            .map(|r| match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
                PathSpecifier::Path(p) => format!("={p}"),
                PathSpecifier::Prefix(p) => format!("^{p}"),
                PathSpecifier::SafeRegex(re) => format!("~{}", re.regex),
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn kumas_validator_refuses_what_it_refuses() {
        let spec = json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "MeshService", "name": "b"},
            "hostnames": ["x"],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "v1/"}, "headers": [{"type": "Present", "name": "a", "value": "1"}],
                                    "queryParams": [{"name": "q", "value": "1"}, {"name": "q", "value": "2"}]},
                                   {"path": {"type": "Exact", "value": "/x"}}],
                       "default": {"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}},
                                               {"type": "RequestHeaderModifier"}, {"type": "Teleport"}]}}]}]});
        let got: Vec<String> = problems(spec.as_object().unwrap()).into_iter().map(|(p, _)| p).collect();
        let at = "spec.to[0].rules[0]";
        assert_eq!(
            got,
            [
                "spec.to[0].hostnames".to_string(),
                format!("{at}.matches[0].path.value"),
                format!("{at}.matches[0].path.value"),
                format!("{at}.matches[0].headers[0].value"),
                format!("{at}.matches[0].queryParams[1].name"),
                format!("{at}.default.filters[0].urlRewrite.path.replacePrefixMatch"),
                format!("{at}.default.filters[1].requestHeaderModifier"),
                format!("{at}.default.filters[2].type"),
            ]
        );
        let good = json!({"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "MeshService", "name": "b"},
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}], "default": {}}]}]});
        assert!(problems(good.as_object().unwrap()).is_empty());
    }

    #[test]
    fn a_meshtimeout_on_a_meshhttproute_times_only_that_routes_rules() {
        let route = policy("slow-route", json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}]}]));
        let timeout = |name: &str, target: Value, http: Value| {
            Resource::from_json(&json!({"type": "MeshTimeout", "mesh": "m", "name": name, "spec": {
                "targetRef": target, "to": [{"targetRef": {"kind": "Mesh"}, "default": {"http": http}}]}}))
            .unwrap()
        };
        let timeouts = [
            timeout("mesh", json!({"kind": "Mesh"}), json!({"streamIdleTimeout": "10m"})),
            timeout("route", json!({"kind": "MeshHTTPRoute", "name": "slow-route"}), json!({"requestTimeout": "1s"})),
            // A MeshTimeout on a route that does not exist applies nowhere.
            timeout("other", json!({"kind": "MeshHTTPRoute", "name": "missing"}), json!({"requestTimeout": "2s"})),
        ];
        let base = HttpTimeouts::of(super::super::resilience::merged_conf(&timeouts, "backend").as_ref());
        let routes_of = |service: &str| {
            let mut routes = routes(std::slice::from_ref(&route), service, &base, None);
            apply_route_timeouts(&mut routes, &timeouts, std::slice::from_ref(&route), service);
            routes
        };
        let got = |routes: &[Route]| -> Vec<(String, i64, i64)> {
            let p = paths(routes);
            routes
                .iter()
                .zip(p)
                .map(|(r, p)| match r.action.as_ref().unwrap() {
                    route::Action::Route(a) => (p, a.timeout.unwrap().seconds, a.idle_timeout.unwrap().seconds),
                    _ => unreachable!(),
                })
                .collect()
        };
        assert_eq!(
            got(&routes_of("backend")),
            vec![("=/slow".into(), 1, 600), ("^/slow/".into(), 1, 600), ("^/".into(), 15, 600)],
            "the route's two /slow routes get 1s; the catch-all keeps the default; the mesh's idle stays"
        );
        // Another service's outbound is not that route's.
        assert!(got(&routes_of("web")).iter().all(|(_, t, _)| *t == 15));
    }

    #[test]
    fn the_catch_all_has_kumas_name() {
        let routes = routes(&[], "backend", &HttpTimeouts::of(None), None);
        assert_eq!(paths(&routes), ["^/"]);
        assert_eq!(routes[0].name, "9Zuf5Tg79OuZcQITwBbQykxAk2u4fRKrwYn3//AL4Yo=");
    }

    #[test]
    fn matches_are_ordered_as_kumas_and_prefixes_split_in_two() {
        let p = policy(
            "r",
            json!([
                {"matches": [{"path": {"type": "PathPrefix", "value": "/a"}}], "default": {}},
                {"matches": [{"path": {"type": "RegularExpression", "value": "^/re.*"}}], "default": {}},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/longer/"}, "headers": [{"name": "x", "value": "1"}]}],
                 "default": {"backendRefs": [{"kind": "MeshServiceSubset", "name": "backend", "tags": {"version": "v2"}, "weight": 1}],
                             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-v", "value": "2"}]}},
                                         {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]}},
                {"matches": [{"path": {"type": "Exact", "value": "/exact"}}], "default": {}},
            ]),
        );
        let routes = routes(&[p], "backend", &HttpTimeouts::of(None), None);
        assert_eq!(paths(&routes), ["=/exact", "=/longer", "^/longer/", "=/a", "^/a/", "~^/re.*", "^/"]);
        let v2 = &routes[1];
        assert_eq!(v2.request_headers_to_add[0].header.as_ref().unwrap().key, "x-v");
        assert_eq!(v2.r#match.as_ref().unwrap().headers[0].name, "x");
        let Some(route::Action::Route(a)) = &v2.action else { panic!() };
        assert!(
            matches!(&a.cluster_specifier, Some(route_action::ClusterSpecifier::Cluster(c)) if c.starts_with("backend-"))
        );
        assert!(a.regex_rewrite.is_some(), "the exact twin rewrites the whole path");
        let Some(route::Action::Route(a)) = &routes[2].action else { panic!() };
        assert_eq!(a.prefix_rewrite, "/new");
        assert_eq!(a.timeout.unwrap().seconds, 15);
        assert_eq!(routes[1].name, routes[2].name, "one rule, one name");
        assert_ne!(routes[1].name, routes[3].name);
    }

    #[test]
    fn a_later_policys_rule_with_the_same_matches_wins() {
        let m = json!([{"path": {"type": "PathPrefix", "value": "/"}}]);
        let a =
            policy("a", json!([{"matches": m, "default": {"backendRefs": [{"kind": "MeshService", "name": "one"}]}}]));
        let b =
            policy("b", json!([{"matches": m, "default": {"backendRefs": [{"kind": "MeshService", "name": "two"}]}}]));
        let routes = routes(&[b, a], "backend", &HttpTimeouts::of(None), None);
        assert_eq!(paths(&routes), ["^/"], "the rule's catch-all replaces the default one");
        let Some(route::Action::Route(act)) = &routes[0].action else { panic!() };
        assert_eq!(act.cluster_specifier, Some(route_action::ClusterSpecifier::Cluster("two".into())));
    }
}
