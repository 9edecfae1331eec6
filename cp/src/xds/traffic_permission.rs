//! MeshTrafficPermission on a sidecar's inbounds, as Kuma 2.14 applies it in an mTLS mesh
//! (`kumahq/kuma:pkg/plugins/policies/meshtrafficpermission`): an `envoy.filters.network.rbac`
//! filter first on the mesh-mTLS filter chain (plaintext chains of a permissive inbound
//! get none), stats under `<listener>.`.
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

use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::rbac::v3::{self as rbac_pb, Permission, Policy, Principal, permission, principal};
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
    Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(name)),
                ignore_case: false,
            }),
        })),
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
    // (source rank, policy order, clients, action), the policies least specific first.
    let mut entries: Vec<(u8, usize, Principal, String)> = vec![];
    for (order, spec) in super::inbound_policy::selecting(policies, dp, Some(inbound)).iter().enumerate() {
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
        if action == "Deny" {
            continue;
        }
        let outranking_denies: Vec<Principal> =
            entries[i + 1..].iter().filter(|e| e.3 == "Deny").map(|e| e.2.clone()).collect();
        let mut ids = vec![who.clone()];
        if !outranking_denies.is_empty() {
            let denied =
                Principal { identifier: Some(principal::Identifier::OrIds(principal::Set { ids: outranking_denies })) };
            ids.push(Principal { identifier: Some(principal::Identifier::NotId(Box::new(denied))) });
        }
        let p = and(ids);
        if action == "AllowWithShadowDeny" {
            shadow_denied.push(p.clone());
        }
        allowed.push(p);
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
    let config = NetworkRbac {
        stat_prefix: format!("{}.", listener.replace(':', "_")),
        rules: Some(rules(rbac_pb::rbac::Action::Allow, allowed)),
        shadow_rules: (!shadow_denied.is_empty()).then(|| rules(rbac_pb::rbac::Action::Deny, shadow_denied)),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(config))),
    }
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
                        let Some(string_matcher::MatchPattern::Exact(e)) =
                            a.principal_name.as_ref().unwrap().match_pattern.as_ref()
                        else {
                            panic!()
                        };
                        sans.contains(e)
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

    const CLIENTS: &[(&str, &str)] = &[("web", "kuma://team/a"), ("api", "kuma://team/a"), ("cron", "kuma://team/b")];

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
        let allow_all = policy(
            "allow-all",
            json!({"targetRef": {"kind": "Mesh"},
            "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}),
        );
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
