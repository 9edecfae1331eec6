//! How a sidecar speaks mesh mTLS: Kuma 2.14's MeshTLS policy over the Mesh backend's
//! `mode` (`kumahq/kuma:pkg/plugins/policies/meshtls/plugin/v1alpha1/plugin.go`).
//! * `mode`: `Strict`, the inbound takes mesh mTLS only; or `Permissive`, the inbound also
//!   takes plaintext and the application's own TLS, which the TLS inspector tells apart
//!   from mesh mTLS by its ALPN (a mesh client offers `kuma`). A MeshTLS `mode` wins over
//!   the backend's; a mesh without either is strict.
//! * `tlsVersion` and `tlsCiphers`: `tls_params` of the inbound's server context and of
//!   the mesh outbounds' client contexts (not of ExternalServices), both sides as Kuma
//!   writes them, so a restriction holds whichever proxy, dp or Envoy, is on either end.
//!
//! Kuma works the settings out per inbound, policies selected and ordered as
//! [`super::inbound_policy`] says, merged from the least specific to the most; inside a
//! policy its `from` entries (all `targetRef.kind: Mesh`) and then its `rules`. The
//! outbounds take the versions and ciphers, which only mesh-wide policies set.

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{TlsParameters, tls_parameters::TlsProtocol};
use serde_json::{Map, Value};

use crate::model::Resource;
use crate::model::specs::Inbound;

/// What the inbound listener accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Strict,
    Permissive,
}

/// The proxy's mesh mTLS settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshTls {
    pub mode: Mode,
    /// `None` when the policies restrict neither versions nor ciphers (Envoy's defaults).
    pub params: Option<TlsParameters>,
}

/// MeshTLS's version names, in order, with Envoy's values (`common_tls.ToTlsVersion`).
pub const VERSIONS: &[(&str, TlsProtocol)] = &[
    ("TLSAuto", TlsProtocol::TlsAuto),
    ("TLS10", TlsProtocol::TlSv10),
    ("TLS11", TlsProtocol::TlSv11),
    ("TLS12", TlsProtocol::TlSv12),
    ("TLS13", TlsProtocol::TlSv13),
];

/// The ciphers MeshTLS allows (`common_tls.AllCiphers`): BoringSSL's names, as Envoy takes them.
pub const CIPHERS: &[&str] = &[
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

pub const MODES: &[&str] = &["Strict", "Permissive"];

/// The settings of an inbound (`Some`) of the Dataplane `dp`, or of its outbounds (`None`),
/// in a mesh whose enabled backend has `backend_mode` (`STRICT`/`PERMISSIVE`), under these
/// MeshTLS policies.
pub fn resolve(backend_mode: Option<&str>, policies: &[Resource], dp: &Resource, inbound: Option<&Inbound>) -> MeshTls {
    let conf = super::inbound_policy::merged(policies, dp, inbound).unwrap_or_default();
    let mode = match conf.get("mode").and_then(Value::as_str) {
        Some("Permissive") => Mode::Permissive,
        Some(_) => Mode::Strict,
        None if backend_mode == Some("PERMISSIVE") => Mode::Permissive,
        None => Mode::Strict,
    };
    MeshTls { mode, params: params(&conf) }
}

fn version(v: &Value) -> Option<TlsProtocol> {
    VERSIONS.iter().find(|(name, _)| Some(*name) == v.as_str()).map(|(_, p)| *p)
}

fn params(conf: &Map<String, Value>) -> Option<TlsParameters> {
    let ciphers: Vec<String> = conf
        .get("tlsCiphers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| Some(c.as_str()?.to_string()))
        .collect();
    let min = conf.get("tlsVersion").and_then(|v| v.get("min")).and_then(version);
    let max = conf.get("tlsVersion").and_then(|v| v.get("max")).and_then(version);
    if ciphers.is_empty() && min.is_none() && max.is_none() {
        return None;
    }
    Some(TlsParameters {
        tls_minimum_protocol_version: min.unwrap_or(TlsProtocol::TlsAuto) as i32,
        tls_maximum_protocol_version: max.unwrap_or(TlsProtocol::TlsAuto) as i32,
        cipher_suites: ciphers,
        ..Default::default()
    })
}

/// What is wrong with a MeshTLS spec, as (field path, message), Kuma's validator's checks.
pub fn problems(spec: &Map<String, Value>) -> Vec<(String, String)> {
    let mut out = vec![];
    let top = spec.get("targetRef").and_then(|t| t["kind"].as_str()).unwrap_or("Mesh");
    if !["Mesh", "MeshSubset", "Dataplane"].contains(&top) {
        out.push(("spec.targetRef.kind".into(), "must be one of: Mesh, MeshSubset, Dataplane".into()));
    }
    if spec.contains_key("from") && spec.contains_key("rules") {
        out.push(("spec".into(), "must not define both from and rules".into()));
    }
    let entries = ["from", "rules"].into_iter().flat_map(|key| {
        spec.get(key).and_then(Value::as_array).into_iter().flatten().enumerate().map(move |(i, e)| (key, i, e))
    });
    for (key, i, entry) in entries {
        let at = format!("spec.{key}[{i}]");
        if key == "from" && entry["targetRef"]["kind"] != "Mesh" {
            out.push((format!("{at}.targetRef.kind"), "must be Mesh".into()));
        }
        let d = &entry["default"];
        if let Some(m) = d.get("mode")
            && !m.as_str().is_some_and(|m| MODES.contains(&m))
        {
            out.push((format!("{at}.default.mode"), format!("must be one of: {}", MODES.join(", "))));
        }
        // Versions and ciphers are mesh-wide only.
        let mesh_only = |out: &mut Vec<(String, String)>, key: &str| {
            let wrong = top != "Mesh";
            if wrong {
                out.push((format!("{at}.default.{key}"), "can only be set with top-level targetRef kind Mesh".into()));
            }
            wrong
        };
        if let Some(c) = d.get("tlsCiphers")
            && !mesh_only(&mut out, "tlsCiphers")
            && !c.as_array().is_some_and(|c| c.iter().all(|c| c.as_str().is_some_and(|c| CIPHERS.contains(&c))))
        {
            out.push((format!("{at}.default.tlsCiphers"), format!("must be a list of: {}", CIPHERS.join(", "))));
        }
        if let Some(v) = d.get("tlsVersion") {
            if mesh_only(&mut out, "tlsVersion") {
                continue;
            }
            let names: Vec<&str> = VERSIONS.iter().map(|(n, _)| *n).collect();
            let mut bounds = vec![];
            for side in ["min", "max"] {
                match v.get(side) {
                    None => bounds.push(None),
                    Some(x) => match version(x) {
                        Some(p) => bounds.push(Some(p)),
                        None => out.push((
                            format!("{at}.default.tlsVersion.{side}"),
                            format!("must be one of: {}", names.join(", ")),
                        )),
                    },
                }
            }
            if let [Some(min), Some(max)] = bounds[..]
                && min != TlsProtocol::TlsAuto
                && max != TlsProtocol::TlsAuto
                && min > max
            {
                out.push((format!("{at}.default.tlsVersion.min"), "must not be greater than max".into()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: Value) -> Resource {
        Resource::from_json(&json!({"type": "MeshTLS", "mesh": "default", "name": name, "spec": spec})).unwrap()
    }

    fn dataplane(name: &str, labels: Value) -> (Resource, Vec<Inbound>) {
        let r = Resource::from_json(&json!({"type": "Dataplane", "mesh": "default", "name": name, "labels": labels,
            "networking": {"address": "127.0.0.1", "inbound": [
                {"port": 1, "tags": {"kuma.io/service": "web", "team": "a"}},
                {"port": 2, "name": "admin", "tags": {"kuma.io/service": "web-admin"}}]}}))
        .unwrap();
        let spec: crate::model::specs::DataplaneSpec = r.typed().unwrap();
        (r, spec.networking.unwrap().inbound)
    }

    #[test]
    fn the_backend_mode_holds_until_a_policy_sets_one() {
        let (dp, inbounds) = dataplane("web-1", json!({}));
        let web = Some(&inbounds[0]);
        assert_eq!(resolve(None, &[], &dp, web), MeshTls::default());
        assert_eq!(resolve(Some("PERMISSIVE"), &[], &dp, web).mode, Mode::Permissive);
        let strict =
            policy("strict", json!({"targetRef": {"kind": "Mesh"}, "rules": [{"default": {"mode": "Strict"}}]}));
        assert_eq!(resolve(Some("PERMISSIVE"), &[strict], &dp, web).mode, Mode::Strict);
    }

    #[test]
    fn the_most_specific_policy_wins_and_versions_map_to_envoy() {
        let (dp, inbounds) = dataplane("web-1", json!({"env": "prod"}));
        let mesh = policy(
            "a-mesh",
            json!({"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {
                "mode": "Permissive", "tlsVersion": {"min": "TLS13"}, "tlsCiphers": ["ECDHE-RSA-AES128-GCM-SHA256"]}}]}),
        );
        let subset = policy(
            "b-subset",
            json!({"targetRef": {"kind": "MeshSubset", "tags": {"team": "a"}}, "rules": [{"default": {"mode": "Strict"}}]}),
        );
        let by_label = policy(
            "c-labels",
            json!({"targetRef": {"kind": "Dataplane", "labels": {"env": "prod"}}, "rules": [{"default": {"mode": "Permissive"}}]}),
        );
        let other = policy(
            "d-other",
            json!({"targetRef": {"kind": "Dataplane", "name": "web-2"}, "rules": [{"default": {"mode": "Strict"}}]}),
        );
        let section = policy(
            "e-section",
            json!({"targetRef": {"kind": "Dataplane", "name": "web-1", "sectionName": "admin"},
                "rules": [{"default": {"mode": "Strict"}}]}),
        );
        let all = [section, other, by_label, subset, mesh];
        let got = resolve(None, &all, &dp, Some(&inbounds[0]));
        assert_eq!(got.mode, Mode::Permissive, "the labels policy is the most specific that selects web's inbound");
        assert_eq!(resolve(None, &all, &dp, Some(&inbounds[1])).mode, Mode::Strict, "the admin inbound's section");
        let p = resolve(None, &all, &dp, None).params.unwrap();
        assert_eq!(p.tls_minimum_protocol_version, TlsProtocol::TlSv13 as i32);
        assert_eq!(p.tls_maximum_protocol_version, TlsProtocol::TlsAuto as i32);
        assert_eq!(p.cipher_suites, ["ECDHE-RSA-AES128-GCM-SHA256"]);
    }

    #[test]
    fn problems_name_the_field() {
        let bad = json!({"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "MeshService"},
            "default": {"mode": "Lenient", "tlsVersion": {"min": "TLS13", "max": "TLS12"}, "tlsCiphers": ["RC4"]}}]});
        let got = problems(bad.as_object().unwrap());
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.from[0].targetRef.kind",
                "spec.from[0].default.mode",
                "spec.from[0].default.tlsCiphers",
                "spec.from[0].default.tlsVersion.min"
            ]
        );
        let top = json!({"targetRef": {"kind": "MeshService"}, "rules": []});
        assert_eq!(problems(top.as_object().unwrap())[0].0, "spec.targetRef.kind");
        let subset_version = json!({"targetRef": {"kind": "MeshSubset", "tags": {}}, "rules": [{"default": {"tlsVersion": {"min": "TLS12"}}}]});
        assert_eq!(problems(subset_version.as_object().unwrap())[0].0, "spec.rules[0].default.tlsVersion");
        let good = json!({"targetRef": {"kind": "Mesh"}, "rules": [{"default": {"mode": "Permissive",
            "tlsVersion": {"min": "TLSAuto", "max": "TLS13"}, "tlsCiphers": ["ECDHE-ECDSA-AES128-GCM-SHA256"]}}]});
        assert!(problems(good.as_object().unwrap()).is_empty());
    }
}
