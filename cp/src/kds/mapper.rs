//! Which resources cross KDS and how they change on the way (Kuma's filters and mappers,
//! `kumahq/kuma:pkg/kds/context/context.go`, and the zone pinning of
//! `kumahq/kuma:pkg/kds/v2/store/sync.go`). Pure functions over [`Resource`]s.

use serde_json::Value;

use super::hash::hashed_name;
use crate::model::labels::{self, DELETION_GRACE, DISPLAY_NAME, KDS_SYNC, ORIGIN, ORIGIN_GLOBAL, ORIGIN_ZONE, ZONE};
use crate::model::{KdsFlags, Resource, ResourceType};

/// The zone on the other end of a stream, as global sees it.
#[derive(Clone, Debug)]
pub struct PeerZone {
    /// Its `client-id`: the zone's name.
    pub name: String,
    /// It sent the `hash-suffix` feature (every Kuma zone since 2.6 does, and ours does).
    pub hash_suffix: bool,
}

/// Global secrets that never leave global (`GlobalProvidedFilter`).
const GLOBAL_ONLY_SECRETS: [&str; 4] = ["envoy-admin-ca", "admin-user-token", "inter-cp-ca", "user-token-revocations"];
const USER_TOKEN_KEY_PREFIX: &str = "user-token-signing-key";
pub const ZONE_TOKEN_KEY_PREFIX: &str = "zone-token-signing-key-";
pub const ZONE_TOKEN_PUBLIC_KEY_PREFIX: &str = "zone-token-signing-public-key-";

fn kds_sync_override(r: &Resource) -> Option<bool> {
    match r.labels.get(KDS_SYNC).map(String::as_str) {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    }
}

/// What global sends to zone `to` in place of `r`, if anything. `zone_enabled` tells
/// whether a zone is enabled (`Zone.enabled`, default true): a disabled zone's ingresses
/// are not sent to the others, which is what takes its traffic away. `public_key` turns
/// a zone-token signing key (private PEM) into its public PEM.
pub fn global_to_zone(
    r: &Resource,
    to: &PeerZone,
    zone_enabled: &dyn Fn(&str) -> bool,
    public_key: &dyn Fn(&str) -> Option<String>,
) -> Option<Resource> {
    let d = r.descriptor();
    if kds_sync_override(r) == Some(false) {
        return None;
    }
    let mut out = r.clone();
    if labels::locally_originated(&r.labels, true) {
        if !d.kds.has(KdsFlags::GLOBAL_TO_ZONES) {
            return None;
        }
        if r.rtype == ResourceType::GlobalSecret {
            if GLOBAL_ONLY_SECRETS.contains(&r.name.as_str()) || r.name.starts_with(USER_TOKEN_KEY_PREFIX) {
                return None;
            }
            if let Some(serial) = r.name.strip_prefix(ZONE_TOKEN_KEY_PREFIX) {
                // Zones verify zone tokens; only global can mint them.
                let private = secret_text(r)?;
                let public = public_key(&private)?;
                out.name = format!("{ZONE_TOKEN_PUBLIC_KEY_PREFIX}{serial}");
                out.spec.insert("data".into(), Value::String(b64(&public)));
            }
        }
    } else {
        // A zone's resource: re-sent to the other zones when the type says so and its
        // zone is enabled (new-style zone policies would need Kuma's producer role: not sent).
        let origin_zone = r.labels.get(ZONE)?;
        if !d.kds.has(KdsFlags::SYNCED_ACROSS_ZONES)
            || d.policy
            || origin_zone == &to.name
            || !zone_enabled(origin_zone)
        {
            return None;
        }
    }
    out.labels.insert(ORIGIN.into(), ORIGIN_GLOBAL.into());
    if to.hash_suffix && !d.skip_kds_hash {
        rename_with_hash(&mut out);
    }
    out.owner = None;
    Some(out)
}

/// What zone `zone` sends to global in place of its resource `r`, if anything: only what
/// the zone itself created, labelled with its origin and renamed with the zone in the hash.
pub fn zone_to_global(r: &Resource, zone: &str) -> Option<Resource> {
    let d = r.descriptor();
    let sync = kds_sync_override(r);
    if sync == Some(false) || !(d.kds.sent_by_zone() || sync == Some(true)) {
        return None;
    }
    if !labels::locally_originated(&r.labels, false) {
        return None; // came from global
    }
    let mut out = r.clone();
    out.labels.insert(ORIGIN.into(), ORIGIN_ZONE.into());
    out.labels.insert(ZONE.into(), zone.into());
    out.labels.remove(DELETION_GRACE);
    if let Some(Value::Array(subs)) = out.spec.get_mut("subscriptions") {
        // Kuma's MapInsightResourcesZeroGeneration: the generation is a local counter.
        for s in subs.iter_mut().filter_map(Value::as_object_mut) {
            s.remove("generation");
        }
    }
    rename_with_hash(&mut out);
    out.owner = None;
    Some(out)
}

/// `HashedName(mesh, display name, zone label)` and the display-name label.
fn rename_with_hash(r: &mut Resource) {
    let display = r.display_name().to_string();
    let zone = r.labels.get(ZONE).cloned();
    let extras: Vec<&str> = zone.iter().map(String::as_str).collect();
    r.name = hashed_name(&r.mesh, &display, &extras);
    r.labels.entry(DISPLAY_NAME.into()).or_insert(display);
}

/// Global receiving `r` from zone `zone`: the zone's identity is the stream's, whatever the
/// resource says (a zone cannot speak for another). Returns the values it replaced.
pub fn pin_to_zone(r: &mut Resource, zone: &str, hash_suffix: bool) -> Vec<String> {
    let mut replaced = Vec::new();
    if !hash_suffix {
        // Kuma's legacy naming for zones that do not hash: `<zone>.<name>`.
        r.name = format!("{zone}.{}", r.name);
    }
    for (k, v) in [(ZONE, zone), (ORIGIN, ORIGIN_ZONE)] {
        if let Some(old) = r.labels.insert(k.into(), v.into())
            && old != v
            && k == ZONE
        {
            replaced.push(old);
        }
    }
    let mut pin_field = |v: Option<&mut Value>| {
        if let Some(v) = v {
            if let Some(s) = v.as_str()
                && !s.is_empty()
                && s != zone
            {
                replaced.push(s.to_string());
            }
            *v = Value::String(zone.to_string());
        }
    };
    match r.rtype {
        ResourceType::ZoneIngress | ResourceType::ZoneEgress => {
            if !r.spec.contains_key("zone") {
                r.spec.insert("zone".into(), Value::String(String::new()));
            }
            pin_field(r.spec.get_mut("zone"));
            if let Some(Value::Array(services)) = r.spec.get_mut("availableServices") {
                for s in services {
                    pin_field(s.pointer_mut("/tags/kuma.io~1zone"));
                }
            }
        }
        ResourceType::Dataplane => {
            if let Some(Value::Array(inbounds)) = r.spec.get_mut("networking").and_then(|n| n.get_mut("inbound")) {
                for i in inbounds {
                    pin_field(i.pointer_mut("/tags/kuma.io~1zone"));
                }
            }
            pin_field(r.spec.get_mut("networking").and_then(|n| n.pointer_mut("/gateway/tags/kuma.io~1zone")));
        }
        _ => {}
    }
    replaced
}

fn secret_text(r: &Resource) -> Option<String> {
    use base64::Engine;
    let data = r.spec.get("data")?.as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).ok()?).ok()
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(v: Value) -> Resource {
        Resource::from_json(&v).unwrap()
    }

    fn zone2() -> PeerZone {
        PeerZone { name: "zone-2".into(), hash_suffix: true }
    }

    #[test]
    fn a_zone_ingress_keeps_one_name_from_zone_through_global_to_other_zones() {
        let mut zi = res(json!({"type": "ZoneIngress", "name": "ingress", "zone": "zone-1",
            "networking": {"address": "127.0.0.1", "port": 10001}}));
        labels::compute(&mut zi, labels::Role::Zone("zone-1"));
        let up = zone_to_global(&zi, "zone-1").unwrap();
        assert_eq!(up.name, "ingress-b5cdx6b4b7wxzc4d");
        assert_eq!(up.labels[DISPLAY_NAME], "ingress");
        assert_eq!(up.labels[ORIGIN], "zone");
        let down = global_to_zone(&up, &zone2(), &|_| true, &|_| None).unwrap();
        assert_eq!(down.name, up.name);
        assert_eq!(down.labels[ORIGIN], "global");
        assert_eq!(down.labels[ZONE], "zone-1");
        // Not back to its own zone, and not from a disabled zone.
        let zone1 = PeerZone { name: "zone-1".into(), hash_suffix: true };
        assert!(global_to_zone(&up, &zone1, &|_| true, &|_| None).is_none());
        assert!(global_to_zone(&up, &zone2(), &|z| z != "zone-1", &|_| None).is_none());
    }

    #[test]
    fn global_policies_get_hashed_names_meshes_and_secrets_keep_theirs() {
        let tp = res(json!({"type": "TrafficPermission", "mesh": "default", "name": "tr-update"}));
        let down = global_to_zone(&tp, &zone2(), &|_| true, &|_| None).unwrap();
        assert_eq!(down.name, "tr-update-7c4bxx6842b298dv");
        assert_eq!(down.labels[DISPLAY_NAME], "tr-update");
        let ca =
            res(json!({"type": "Secret", "mesh": "default", "name": "default.ca-builtin-cert-ca-1", "data": "eA=="}));
        assert_eq!(global_to_zone(&ca, &zone2(), &|_| true, &|_| None).unwrap().name, "default.ca-builtin-cert-ca-1");
        // Zone-provided-only types do not flow down.
        let dp = res(
            json!({"type": "Dataplane", "mesh": "default", "name": "dp", "labels": {"kuma.io/origin": "zone", "kuma.io/zone": "zone-1"}}),
        );
        assert!(global_to_zone(&dp, &zone2(), &|_| true, &|_| None).is_none());
    }

    #[test]
    fn zone_token_keys_go_down_as_public_keys_and_user_token_keys_not_at_all() {
        let key = res(json!({"type": "GlobalSecret", "name": "zone-token-signing-key-1", "data": b64("PRIVATE")}));
        let down = global_to_zone(&key, &zone2(), &|_| true, &|p| Some(format!("public of {p}"))).unwrap();
        assert_eq!(down.name, "zone-token-signing-public-key-1");
        assert_eq!(secret_text(&down).as_deref(), Some("public of PRIVATE"));
        for name in ["user-token-signing-key-1", "admin-user-token", "inter-cp-ca"] {
            let s = res(json!({"type": "GlobalSecret", "name": name, "data": "eA=="}));
            assert!(global_to_zone(&s, &zone2(), &|_| true, &|_| None).is_none(), "{name}");
        }
    }

    #[test]
    fn zones_send_only_their_own_resources() {
        let from_global = res(
            json!({"type": "ZoneIngress", "name": "ingress-x", "labels": {"kuma.io/origin": "global", "kuma.io/zone": "zone-2"}}),
        );
        assert!(zone_to_global(&from_global, "zone-1").is_none());
        let mesh = res(json!({"type": "Mesh", "name": "default"}));
        assert!(zone_to_global(&mesh, "zone-1").is_none());
        let insight = res(json!({"type": "DataplaneInsight", "mesh": "default", "name": "web",
            "subscriptions": [{"id": "a", "generation": 7}]}));
        let up = zone_to_global(&insight, "zone-1").unwrap();
        assert!(up.spec["subscriptions"][0].get("generation").is_none());
        let disabled = res(
            json!({"type": "Dataplane", "mesh": "default", "name": "dp", "labels": {"kuma.io/kds-sync": "disabled"}}),
        );
        assert!(zone_to_global(&disabled, "zone-1").is_none());
    }

    #[test]
    fn global_pins_what_a_zone_claims_to_the_zone_of_the_stream() {
        let mut zi = res(json!({"type": "ZoneIngress", "name": "i", "zone": "zone-9",
            "labels": {"kuma.io/zone": "zone-9"},
            "availableServices": [{"tags": {"kuma.io/service": "echo", "kuma.io/zone": "zone-9"}}, {"tags": {"kuma.io/service": "x"}}]}));
        let replaced = pin_to_zone(&mut zi, "zone-2", true);
        assert_eq!(zi.labels[ZONE], "zone-2");
        assert_eq!(zi.spec["zone"], "zone-2");
        assert_eq!(zi.spec["availableServices"][0]["tags"]["kuma.io/zone"], "zone-2");
        // An absent zone tag names no zone: left alone.
        assert!(zi.spec["availableServices"][1]["tags"].get("kuma.io/zone").is_none());
        assert_eq!(replaced, vec!["zone-9", "zone-9", "zone-9"]);
        let mut dp = res(json!({"type": "Dataplane", "mesh": "default", "name": "d",
            "networking": {"inbound": [{"tags": {"kuma.io/service": "a", "kuma.io/zone": "zone-9"}}]}}));
        pin_to_zone(&mut dp, "zone-2", false);
        assert_eq!(dp.name, "zone-2.d");
        assert_eq!(dp.spec["networking"]["inbound"][0]["tags"]["kuma.io/zone"], "zone-2");
    }
}
