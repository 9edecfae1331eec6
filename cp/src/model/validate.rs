//! Validation of resources as the REST API and the proxies' own documents receive them,
//! with Kuma's field paths and messages.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::specs::{DataplaneSpec, ExternalServiceSpec, MeshSpec, ZoneEgressSpec, ZoneIngressSpec};
use super::{Cause, Resource, ResourceType, SERVICE_TAG, parse_duration};

use kuma_model::resource::rfc1123_name as is_rfc1123_subdomain;

fn is_mesh_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c))
}

fn is_tag_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_:/".contains(&c))
}

fn is_tag_value(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_:".contains(&c))
}

fn check_port(causes: &mut Vec<Cause>, field: &str, port: i64) {
    if !(1..=65535).contains(&port) {
        causes.push(Cause::new(field, "port must be in the range [1, 65535]"));
    }
}

fn typed_or_cause<T: for<'de> Deserialize<'de>>(r: &Resource, causes: &mut Vec<Cause>) -> Option<T> {
    match r.typed::<T>() {
        Ok(t) => Some(t),
        Err(e) => {
            causes.push(Cause::new("", format!("cannot read the {} spec: {e}", r.rtype.name())));
            None
        }
    }
}

/// The problems of a policy's spec, as (field path, message).
type PolicyCheck = fn(&Map<String, Value>) -> Vec<(String, String)>;

/// Validate name/mesh and the spec of a resource. Returns every problem found.
pub fn validate(r: &Resource) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    if r.name.is_empty() {
        causes.push(Cause::new("name", "must not be empty"));
    } else if r.rtype != ResourceType::Mesh && !is_rfc1123_subdomain(&r.name) {
        causes.push(Cause::new(
            "name",
            "invalid characters: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    } else if r.rtype == ResourceType::Mesh && !is_mesh_name(&r.name) {
        causes.push(Cause::new("name", "invalid characters: allowed are lowercase letters, digits, '-', '_' and '.'"));
    }
    if r.rtype.is_mesh_scoped() && !is_mesh_name(&r.mesh) {
        causes.push(Cause::new("mesh", "invalid mesh name: allowed are lowercase letters, digits, '-', '_' and '.'"));
    }
    match r.rtype {
        ResourceType::Dataplane => validate_dataplane(r, &mut causes),
        ResourceType::ZoneIngress => validate_zone_ingress(r, &mut causes),
        ResourceType::ZoneEgress => validate_zone_egress(r, &mut causes),
        ResourceType::ExternalService => validate_external_service(r, &mut causes),
        ResourceType::Mesh => validate_mesh(r, &mut causes),
        ResourceType::Zone => {
            if let Some(v) = r.spec.get("enabled")
                && !v.is_boolean()
                && !v.is_null()
            {
                causes.push(Cause::new("enabled", "must be a boolean"));
            }
        }
        ResourceType::Config if !matches!(r.spec.get("config"), Some(Value::String(_))) => {
            causes.push(Cause::new("config", "must be a string"));
        }
        ResourceType::Secret | ResourceType::GlobalSecret if !matches!(r.spec.get("data"), Some(Value::String(_))) => {
            causes.push(Cause::new("data", "must be a base64 string"));
        }
        // Stored and synced as given; `cp` does not interpret them.
        _ => {}
    }
    // New-style policies `cp` generates from: Kuma's validators' checks, no stricter (a zone
    // also validates what KDS brings, and refuses what fails).
    let policy_problems: Option<PolicyCheck> = match r.rtype {
        ResourceType::MeshTLS => Some(crate::xds::meshtls::problems),
        ResourceType::MeshTrafficPermission => Some(crate::xds::traffic_permission::problems),
        ResourceType::MeshTimeout => Some(crate::xds::timeout::problems),
        ResourceType::MeshRateLimit => Some(crate::xds::rate_limit::problems),
        ResourceType::MeshHTTPRoute => Some(crate::xds::http_route::problems),
        _ => None,
    };
    for (field, message) in policy_problems.map(|f| f(&r.spec)).unwrap_or_default() {
        causes.push(Cause::new(field, message));
    }
    if causes.is_empty() { Ok(()) } else { Err(causes) }
}

pub(crate) fn validate_ip_or_host(causes: &mut Vec<Cause>, field: &str, addr: &str, required: bool) {
    if addr.is_empty() {
        if required {
            causes.push(Cause::new(field, "address can't be empty"));
        }
        return;
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        if ip.is_unspecified() {
            causes.push(Cause::new(field, "must not be 0.0.0.0 or ::"));
        }
    } else if !addr.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.') {
        causes.push(Cause::new(field, "address has to be a valid IP address or domain name"));
    }
}

fn validate_dataplane(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<DataplaneSpec>(r, causes) else { return };
    let Some(net) = spec.networking else {
        causes.push(Cause::new("networking", "must be defined"));
        return;
    };
    validate_ip_or_host(causes, "networking.address", &net.address, true);
    if !net.advertised_address.is_empty() {
        validate_ip_or_host(causes, "networking.advertisedAddress", &net.advertised_address, false);
    }
    if net.inbound.is_empty() && net.gateway.is_none() {
        causes.push(Cause::new("networking", "has to contain at least one inbound interface or gateway"));
    }
    if let Some(admin) = &net.admin {
        check_port(causes, "networking.admin.port", admin.port);
    }
    for (i, ob) in net.outbound.iter().enumerate() {
        let p = format!("networking.outbound[{i}]");
        check_port(causes, &format!("{p}.port"), ob.port);
        if let Some(a) = &ob.address
            && !a.is_empty()
            && a.parse::<IpAddr>().is_err()
        {
            causes.push(Cause::new(format!("{p}.address"), "address has to be valid IP address"));
        }
        match (&ob.backend_ref, ob.tags.is_empty()) {
            (Some(_), false) => {
                causes.push(Cause::new(format!("{p}.tags"), "tags and backendRef cannot be defined at the same time"))
            }
            (None, true) => causes.push(Cause::new(format!("{p}.tags"), "has to contain at least one tag")),
            (None, false) if ob.tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) => {
                causes.push(Cause::new(format!("{p}.tags[\"{SERVICE_TAG}\"]"), "tag has to exist"))
            }
            _ => {}
        }
    }
    for (i, inb) in net.inbound.iter().enumerate() {
        let p = format!("networking.inbound[{i}]");
        check_port(causes, &format!("{p}.port"), inb.port);
        if let Some(sp) = inb.service_port {
            check_port(causes, &format!("{p}.servicePort"), sp);
        }
        for (f, v) in [("address", &inb.address), ("serviceAddress", &inb.service_address)] {
            if let Some(a) = v
                && !a.is_empty()
                && a.parse::<IpAddr>().is_err()
            {
                causes.push(Cause::new(format!("{p}.{f}"), "address has to be valid IP address"));
            }
        }
        if inb.tags.is_empty() {
            causes.push(Cause::new(format!("{p}.tags"), "has to contain at least one tag"));
        } else if inb.tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) {
            causes.push(Cause::new(format!("{p}.tags[\"{SERVICE_TAG}\"]"), "tag has to exist"));
        }
        for (k, v) in &inb.tags {
            if !is_tag_key(k) {
                causes.push(Cause::new(
                    format!("{p}.tags"),
                    format!(
                        "tag name {k:?} must consist of alphanumeric characters, dots, dashes, slashes and underscores"
                    ),
                ));
            }
            if !is_tag_value(v) {
                causes.push(Cause::new(
                    format!("{p}.tags[\"{k}\"]"),
                    "tag value must be non-empty and consist of alphanumeric characters, dots, dashes and underscores",
                ));
            }
        }
    }
}

fn validate_zone_ingress(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<ZoneIngressSpec>(r, causes) else { return };
    let n = &spec.networking;
    validate_ip_or_host(causes, "networking.address", &n.address, false);
    check_port(causes, "networking.port", n.port);
    if n.advertised_address.is_empty() != (n.advertised_port == 0) {
        let field =
            if n.advertised_address.is_empty() { "networking.advertisedAddress" } else { "networking.advertisedPort" };
        causes.push(Cause::new(field, "advertisedAddress and advertisedPort must be set together"));
    }
    if !n.advertised_address.is_empty() {
        validate_ip_or_host(causes, "networking.advertisedAddress", &n.advertised_address, false);
    }
    if n.advertised_port != 0 {
        check_port(causes, "networking.advertisedPort", n.advertised_port);
    }
    if let Some(admin) = &n.admin {
        check_port(causes, "networking.admin.port", admin.port);
        if admin.port == n.port {
            causes.push(Cause::new("networking.admin.port", "must differ from networking.port"));
        }
    }
}

fn validate_zone_egress(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<ZoneEgressSpec>(r, causes) else { return };
    validate_ip_or_host(causes, "networking.address", &spec.networking.address, false);
    check_port(causes, "networking.port", spec.networking.port);
}

fn validate_external_service(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<ExternalServiceSpec>(r, causes) else { return };
    if spec.tags.get(crate::model::SERVICE_TAG).is_none_or(|s| s.is_empty()) {
        causes.push(Cause::new("tags", "must have a kuma.io/service tag"));
    }
    if spec.host_port().is_none() {
        causes.push(Cause::new("networking.address", "must be host:port with a port between 1 and 65535"));
    }
    if let Some(p) = spec.tags.get("kuma.io/protocol")
        && !matches!(p.as_str(), "tcp" | "http" | "http2" | "grpc" | "kafka")
    {
        causes.push(Cause::new("tags[\"kuma.io/protocol\"]", "must be one of tcp, http, http2, grpc, kafka"));
    }
}

fn validate_mesh(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<MeshSpec>(r, causes) else { return };
    let Some(mtls) = spec.mtls else { return };
    let mut seen = std::collections::BTreeSet::new();
    for (i, b) in mtls.backends.iter().enumerate() {
        if b.name.is_empty() {
            causes.push(Cause::new(format!("mtls.backends[{i}].name"), "cannot be empty"));
        } else if !seen.insert(b.name.clone()) {
            causes.push(Cause::new(
                format!("mtls.backends[{i}].name"),
                format!("{:?} is already used for another backend", b.name),
            ));
        }
        if !matches!(b.backend_type.as_str(), "builtin" | "provided") {
            causes.push(Cause::new(format!("mtls.backends[{i}].type"), "must be one of: builtin, provided"));
        }
        if let Some(r) = b.dp_cert.as_ref().and_then(|d| d.rotation.as_ref())
            && !r.expiration.is_empty()
            && let Err(e) = parse_duration(&r.expiration)
        {
            causes.push(Cause::new(format!("mtls.backends[{i}].dpCert.rotation.expiration"), e));
        }
        if let Some(m) = &b.mode
            && !matches!(m.as_str(), "STRICT" | "PERMISSIVE")
        {
            causes.push(Cause::new(format!("mtls.backends[{i}].mode"), "must be one of: STRICT, PERMISSIVE"));
        }
    }
    if !mtls.enabled_backend.is_empty() && !seen.contains(&mtls.enabled_backend) {
        causes.push(Cause::new("mtls.enabledBackend", "has to be set to one of the backends in the mesh"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::mesh_mtls_enabled;

    #[test]
    fn dataplane_validation_paths() {
        let v: Value = serde_json::json!({
            "type": "Dataplane", "mesh": "default", "name": "dp-1",
            "networking": {"address": "", "inbound": [{"port": 70000, "tags": {"version": "v1"}}]}
        });
        let r = Resource::from_json(&v).unwrap();
        let causes = validate(&r).unwrap_err();
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"networking.address"), "{fields:?}");
        assert!(fields.contains(&"networking.inbound[0].port"), "{fields:?}");
        assert!(fields.contains(&"networking.inbound[0].tags[\"kuma.io/service\"]"), "{fields:?}");
    }

    #[test]
    fn flat_round_trip() {
        let v: Value = serde_json::json!({"type": "Mesh", "name": "default", "mtls": {"enabledBackend": "ca-1",
            "backends": [{"name": "ca-1", "type": "builtin"}]}, "extra": 1});
        let r = Resource::from_json(&v).unwrap();
        validate(&r).unwrap();
        assert!(mesh_mtls_enabled(&r));
        let back = r.to_json();
        assert_eq!(back["extra"], 1);
        assert_eq!(back["mtls"]["enabledBackend"], "ca-1");
    }
}
