//! MeshTrafficPermission on a sidecar's inbounds, as Kuma 2.14 applies it in an mTLS mesh
//! (`kumahq/kuma:pkg/plugins/policies/meshtrafficpermission`): an `envoy.filters.network.rbac`
//! filter first on the mesh-mTLS filter chain (plaintext chains of a permissive inbound
//! get none), stats under `<listener>.`; and on a zone egress's ExternalService chains
//! that some policy selects, in place of TrafficPermission's rules.
//!
//! Each `from` entry names sources: the whole mesh, a MeshSubset (every tag: its
//! `kuma.io/service` as the SPIFFE ID `spiffe://<mesh>/<service>`, any other as the
//! certificate's `kuma://<tag>/<value>`), a MeshService, or a MeshServiceSubset. For one
//! client, the entry that decides is the most specific source kind that holds it, and
//! among equals the one of the most specific policy (by name within a rank). So a client
//! is let in by an Allow entry unless a Deny entry that outranks it also holds the client,
//! which is how the RBAC principals are written. `AllowWithShadowDeny` lets in and puts
//! the client in the shadow rules. With no entry at all the inbound lets nobody in: Kuma
//! fails closed.
//!
//! Kuma 2.12's `rules` form lists SPIFFE ID matchers (`Exact`/`Prefix`) under `deny`,
//! `allow` and `allowWithShadowDeny`: a client any deny matches is out, whatever else
//! allows it; one an allow matches is in.

use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::rbac::v3::{self as rbac_pb, Permission, Policy, Principal, permission, principal};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, http_filter};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::util::pack_any;
use serde_json::Value;

use crate::model::Resource;
use crate::model::specs::Inbound;

/// How specific a `from` targetRef is; `None` for kinds that name no source.
fn source_rank(kind: Option<&str>) -> Option<u8> {
    match kind {
        Some("Mesh") => Some(0),
        Some("MeshSubset") => Some(1),
        Some("MeshService") => Some(2),
        Some("MeshServiceSubset") => Some(3),
        _ => None,
    }
}

fn authenticated(name: String) -> Principal {
    matching(string_matcher::MatchPattern::Exact(name))
}

fn matching(pattern: string_matcher::MatchPattern) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(StringMatcher { match_pattern: Some(pattern), ignore_case: false }),
        })),
    }
}

fn or(ids: Vec<Principal>) -> Principal {
    Principal { identifier: Some(principal::Identifier::OrIds(principal::Set { ids })) }
}

fn not(p: Principal) -> Principal {
    Principal { identifier: Some(principal::Identifier::NotId(Box::new(p))) }
}

/// A `rules` matcher (`spiffeID: {type: Exact|Prefix, value}`) as a principal.
fn spiffe_matcher(m: &Value) -> Option<Principal> {
    let value = m["spiffeID"]["value"].as_str()?.to_string();
    match m["spiffeID"]["type"].as_str()? {
        "Exact" => Some(matching(string_matcher::MatchPattern::Exact(value))),
        "Prefix" => Some(matching(string_matcher::MatchPattern::Prefix(value))),
        _ => None,
    }
}

fn any() -> Principal {
    Principal { identifier: Some(principal::Identifier::Any(true)) }
}

fn and(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => any(),
        1 => ids.remove(0),
        _ => Principal { identifier: Some(principal::Identifier::AndIds(principal::Set { ids })) },
    }
}

/// The clients a `from` targetRef names.
fn sources(mesh: &str, target: &Value) -> Principal {
    let tag = |k: &str, v: &str| {
        if k == "kuma.io/service" {
            authenticated(format!("spiffe://{mesh}/{v}"))
        } else {
            authenticated(format!("kuma://{k}/{v}"))
        }
    };
    let mut ids = vec![];
    if let Some(name) = target["name"].as_str().filter(|_| target["kind"] != "MeshSubset") {
        ids.push(tag("kuma.io/service", name));
    }
    for (k, v) in target["tags"].as_object().into_iter().flatten() {
        ids.push(tag(k, v.as_str().unwrap_or_default()));
    }
    and(ids)
}

/// The network RBAC filter for an inbound (listener `listener`) of the Dataplane `dp`.
pub fn inbound_filter(policies: &[Resource], mesh: &str, dp: &Resource, inbound: &Inbound, listener: &str) -> Filter {
    let (rules, shadow_rules) = rbac_of(&super::inbound_policy::selecting(policies, dp, Some(inbound)), mesh);
    let config = NetworkRbac {
        stat_prefix: format!("{}.", listener.replace(':', "_")),
        rules: Some(rules),
        shadow_rules,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(config))),
    }
}

/// The same rules as [`inbound_filter`], as the HTTP `rbac` filter Kuma puts first in an
/// HTTP inbound's connection manager (a refused request gets 403).
pub fn inbound_http_filter(policies: &[Resource], mesh: &str, dp: &Resource, inbound: &Inbound) -> HttpFilter {
    let (rules, shadow_rules) = rbac_of(&super::inbound_policy::selecting(policies, dp, Some(inbound)), mesh);
    let config = HttpRbac { rules: Some(rules), shadow_rules, ..Default::default() };
    HttpFilter {
        name: "envoy.filters.http.rbac".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(config))),
        ..Default::default()
    }
}

/// The RBAC rules (and shadow rules) for an ExternalService `service` a zone egress
/// serves, when some policy selects it (top-level targetRef the mesh, or the MeshService
/// of its name), as Kuma's egress applies them; `None` leaves it to TrafficPermission.
pub fn external_service_rules(
    policies: &[Resource],
    mesh: &str,
    service: &str,
) -> Option<(rbac_pb::Rbac, Option<rbac_pb::Rbac>)> {
    let mut selected: Vec<(u8, &str, Value)> = policies
        .iter()
        .filter_map(|r| {
            let spec = r.typed::<Value>().ok()?;
            let t = &spec["targetRef"];
            let rank = match t["kind"].as_str() {
                None | Some("Mesh") => 0,
                Some("MeshService") if t["name"].as_str() == Some(service) => 2,
                _ => return None,
            };
            Some((rank, r.name.as_str(), spec))
        })
        .collect();
    if selected.is_empty() {
        return None;
    }
    selected.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let specs: Vec<Value> = selected.into_iter().map(|(_, _, s)| s).collect();
    Some(rbac_of(&specs, mesh))
}

/// The RBAC rules (and shadow rules) of these policies' specs, least specific first.
fn rbac_of(specs: &[Value], mesh: &str) -> (rbac_pb::Rbac, Option<rbac_pb::Rbac>) {
    // (source rank, policy order, clients, action).
    let mut entries: Vec<(u8, usize, Principal, String)> = vec![];
    // The `rules` form's matchers, by list: deny, allow, allowWithShadowDeny.
    let mut listed: [Vec<Principal>; 3] = Default::default();
    for (order, spec) in specs.iter().enumerate() {
        for rule in spec["rules"].as_array().into_iter().flatten() {
            for (list, key) in listed.iter_mut().zip(["deny", "allow", "allowWithShadowDeny"]) {
                list.extend(rule["default"][key].as_array().into_iter().flatten().filter_map(spiffe_matcher));
            }
        }
        for from in spec["from"].as_array().into_iter().flatten() {
            let (Some(rank), Some(action)) =
                (source_rank(from["targetRef"]["kind"].as_str()), from["default"]["action"].as_str())
            else {
                continue;
            };
            entries.push((rank, order, sources(mesh, &from["targetRef"]), action.to_string()));
        }
    }
    entries.sort_by_key(|e| (e.0, e.1));
    let mut allowed = vec![];
    let mut shadow_denied = vec![];
    for (i, (_, _, who, action)) in entries.iter().enumerate() {
        if !matches!(action.as_str(), "Allow" | "AllowWithShadowDeny") {
            continue;
        }
        let outranking_denies: Vec<Principal> =
            entries[i + 1..].iter().filter(|e| e.3 == "Deny").map(|e| e.2.clone()).collect();
        let mut ids = vec![who.clone()];
        if !outranking_denies.is_empty() {
            ids.push(not(or(outranking_denies)));
        }
        let p = and(ids);
        if action == "AllowWithShadowDeny" {
            shadow_denied.push(p.clone());
        }
        allowed.push(p);
    }
    let [deny, allow, shadow] = listed;
    shadow_denied.extend(shadow.iter().cloned());
    allowed.extend(allow.into_iter().chain(shadow));
    // A `rules` deny holds against every allow, of either form.
    if !deny.is_empty() {
        let denied = or(deny);
        allowed = allowed.into_iter().map(|p| and(vec![p, not(denied.clone())])).collect();
    }
    let policy = |principals: Vec<Principal>| Policy {
        permissions: vec![Permission { rule: Some(permission::Rule::Any(true)) }],
        principals,
        ..Default::default()
    };
    let rules = |action: rbac_pb::rbac::Action, principals: Vec<Principal>| rbac_pb::Rbac {
        action: action as i32,
        policies: if principals.is_empty() {
            Default::default()
        } else {
            [("MeshTrafficPermission".to_string(), policy(principals))].into_iter().collect()
        },
        ..Default::default()
    };
    let shadow_rules = (!shadow_denied.is_empty()).then(|| rules(rbac_pb::rbac::Action::Deny, shadow_denied));
    (rules(rbac_pb::rbac::Action::Allow, allowed), shadow_rules)
}

const ACTIONS: &[&str] = &["Allow", "Deny", "AllowWithShadowDeny"];

/// Top-level targetRef kinds Kuma 2.14 takes (the route kinds select nothing here).
const TOP_KINDS: &[&str] =
    &["Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "Dataplane", "MeshGatewayRoute", "MeshHTTPRoute"];

/// What is wrong with a MeshTrafficPermission spec, as (field path, message): Kuma's
/// validator's checks and no more, since a zone NACKs over KDS what fails them.
pub fn problems(spec: &serde_json::Map<String, Value>) -> Vec<(String, String)> {
    let mut out = vec![];
    let top = spec.get("targetRef").and_then(|t| t["kind"].as_str()).unwrap_or("Mesh");
    if !TOP_KINDS.contains(&top) {
        out.push(("spec.targetRef.kind".into(), format!("must be one of: {}", TOP_KINDS.join(", "))));
    }
    let from = spec.get("from").and_then(Value::as_array);
    let rules = spec.get("rules").and_then(Value::as_array);
    match (from.is_some_and(|f| !f.is_empty()), rules.is_some_and(|r| !r.is_empty())) {
        (false, false) => out.push(("spec.from".into(), "needs at least one item (or spec.rules)".into())),
        (true, true) => out.push(("spec".into(), "must not define both from and rules".into())),
        _ => {}
    }
    for (i, rule) in rules.into_iter().flatten().enumerate() {
        for key in ["deny", "allow", "allowWithShadowDeny"] {
            for (j, m) in rule["default"][key].as_array().into_iter().flatten().enumerate() {
                if spiffe_matcher(m).is_none() {
                    out.push((
                        format!("spec.rules[{i}].default.{key}[{j}].spiffeID"),
                        "must have a type (Exact or Prefix) and a value".into(),
                    ));
                }
            }
        }
    }
    for (i, entry) in from.into_iter().flatten().enumerate() {
        let kind = entry["targetRef"]["kind"].as_str();
        if source_rank(kind).is_none() {
            out.push((
                format!("spec.from[{i}].targetRef.kind"),
                "must be one of: Mesh, MeshSubset, MeshService, MeshServiceSubset".into(),
            ));
        } else if matches!(kind, Some("MeshService" | "MeshServiceSubset"))
            && entry["targetRef"]["name"].as_str().is_none()
        {
            out.push((format!("spec.from[{i}].targetRef.name"), "must be set".into()));
        }
        if entry.get("default").is_none() {
            out.push((format!("spec.from[{i}].default"), "must be defined".into()));
        } else if let Some(a) = entry["default"].get("action")
            && !a.as_str().is_some_and(|a| ACTIONS.contains(&a))
        {
            out.push((format!("spec.from[{i}].default.action"), format!("must be one of: {}", ACTIONS.join(", "))));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: Value) -> Resource {
        Resource::from_json(&json!({"type": "MeshTrafficPermission", "mesh": "m", "name": name, "spec": spec})).unwrap()
    }

    /// The names the RBAC rules let in, out of these (service, extra tag) clients.
    fn admitted(policies: &[Resource], clients: &[(&str, &str)]) -> Vec<String> {
        let dp = Resource::from_json(&json!({"type": "Dataplane", "mesh": "m", "name": "backend-1",
            "networking": {"address": "127.0.0.1", "inbound": [{"port": 1, "tags": {"kuma.io/service": "backend"}}]}}))
        .unwrap();
        let spec: crate::model::specs::DataplaneSpec = dp.typed().unwrap();
        let inbound = &spec.networking.unwrap().inbound[0];
        let f = inbound_filter(policies, "m", &dp, inbound, "inbound:127.0.0.1:1");
        let Some(filter::ConfigType::TypedConfig(any)) = f.config_type else { panic!() };
        let rbac: NetworkRbac = prost::Message::decode(any.value.as_slice()).unwrap();
        assert_eq!(rbac.stat_prefix, "inbound_127.0.0.1_1.");
        let rules = rbac.rules.unwrap();
        let holds = |p: &Principal, sans: &[String]| -> bool {
            fn eval(p: &Principal, sans: &[String]) -> bool {
                match p.identifier.as_ref().unwrap() {
                    principal::Identifier::Any(b) => *b,
                    principal::Identifier::AndIds(s) => s.ids.iter().all(|i| eval(i, sans)),
                    principal::Identifier::OrIds(s) => s.ids.iter().any(|i| eval(i, sans)),
                    principal::Identifier::NotId(i) => !eval(i, sans),
                    principal::Identifier::Authenticated(a) => {
                        match a.principal_name.as_ref().unwrap().match_pattern.as_ref().unwrap() {
                            string_matcher::MatchPattern::Exact(e) => sans.contains(e),
                            string_matcher::MatchPattern::Prefix(p) => sans.iter().any(|s| s.starts_with(p)),
                            other => panic!("{other:?}"),
                        }
                    }
                    other => panic!("{other:?}"),
                }
            }
            eval(p, sans)
        };
        clients
            .iter()
            .filter(|(svc, tag)| {
                let sans = [format!("spiffe://m/{svc}"), format!("kuma://kuma.io/service/{svc}"), tag.to_string()];
                rules.policies.values().any(|p| p.principals.iter().any(|pr| holds(pr, &sans)))
            })
            .map(|(svc, _)| svc.to_string())
            .collect()
    }

    /// Kuma's mesh-wide allow-all.
    fn allow_all() -> Resource {
        policy(
            "allow-all",
            json!({"targetRef": {"kind": "Mesh"},
            "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}),
        )
    }

    const CLIENTS: &[(&str, &str)] = &[("web", "kuma://team/a"), ("api", "kuma://team/a"), ("cron", "kuma://team/b")];

    #[test]
    fn problems_name_the_field() {
        let bad = json!({"targetRef": {"kind": "Mesh"}, "from": [
            {"targetRef": {"kind": "MeshGateway"}, "default": {"action": "Allow"}},
            {"targetRef": {"kind": "MeshService"}, "default": {"action": "allow"}}]});
        let fields: Vec<String> = problems(bad.as_object().unwrap()).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["spec.from[0].targetRef.kind", "spec.from[1].targetRef.name", "spec.from[1].default.action"]
        );
        assert_eq!(problems(json!({"targetRef": {"kind": "Mesh"}}).as_object().unwrap())[0].0, "spec.from");
    }

    #[test]
    fn a_rules_deny_holds_against_every_allow() {
        let allow_all = allow_all();
        let rules = policy(
            "rules",
            json!({"targetRef": {"kind": "Mesh"}, "rules": [{"default": {
            "deny": [{"spiffeID": {"type": "Exact", "value": "spiffe://m/api"}}],
            "allow": [{"spiffeID": {"type": "Prefix", "value": "spiffe://m/"}}]}}]}),
        );
        assert_eq!(admitted(std::slice::from_ref(&rules), CLIENTS), ["web", "cron"]);
        assert_eq!(admitted(&[allow_all, rules], CLIENTS), ["web", "cron"], "the from allow-all does not undo it");
        let bad = json!({"rules": [{"default": {"allow": [{"spiffeID": {"type": "Regex", "value": "x"}}]}}]});
        assert_eq!(problems(bad.as_object().unwrap())[0].0, "spec.rules[0].default.allow[0].spiffeID");
    }

    #[test]
    fn no_permission_lets_nobody_in() {
        assert!(admitted(&[], CLIENTS).is_empty());
        let elsewhere = policy(
            "other",
            json!({"targetRef": {"kind": "MeshService", "name": "frontend"},
            "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}),
        );
        assert!(admitted(&[elsewhere], CLIENTS).is_empty(), "a policy for another service");
    }

    #[test]
    fn the_most_specific_source_decides() {
        let allow_all = allow_all();
        assert_eq!(admitted(std::slice::from_ref(&allow_all), CLIENTS), ["web", "api", "cron"]);
        let deny_team_a = policy(
            "deny-team-a",
            json!({"targetRef": {"kind": "Mesh"},
            "from": [{"targetRef": {"kind": "MeshSubset", "tags": {"team": "a"}}, "default": {"action": "Deny"}}]}),
        );
        assert_eq!(admitted(&[allow_all.clone(), deny_team_a.clone()], CLIENTS), ["cron"]);
        // A MeshService source outranks the MeshSubset one, whatever the policies' order.
        let allow_web = policy(
            "a-allow-web",
            json!({"targetRef": {"kind": "MeshService", "name": "backend"},
            "from": [{"targetRef": {"kind": "MeshService", "name": "web"}, "default": {"action": "AllowWithShadowDeny"}}]}),
        );
        assert_eq!(admitted(&[allow_all, deny_team_a.clone(), allow_web], CLIENTS), ["web", "cron"]);
        // The same source kind: the more specific policy wins.
        let allow_team_a_here = policy(
            "z-allow",
            json!({"targetRef": {"kind": "MeshService", "name": "backend"},
            "from": [{"targetRef": {"kind": "MeshSubset", "tags": {"team": "a"}}, "default": {"action": "Allow"}}]}),
        );
        assert_eq!(admitted(&[allow_team_a_here, deny_team_a], CLIENTS), ["web", "api"]);
    }
}
