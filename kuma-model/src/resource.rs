//! Dataplane / ZoneIngress / ZoneEgress resources in Universal form, and Kuma's
//! naming rules for them.

use serde_json::Value;

use crate::proxy::ProxyType;

/// A rendered and checked Dataplane / ZoneIngress / ZoneEgress.
#[derive(Debug, Clone)]
pub struct ProxyResource {
    pub kind: String,
    pub mesh: String,
    pub name: String,
    /// The resource as JSON (Universal flat form), as sent to the control plane.
    pub json: Value,
}

/// Kuma's rule for resource names: a lower-case RFC 1123 subdomain of at most 253.
pub fn rfc1123_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Parses the rendered resource and checks it the way kuma-dp does before bootstrap.
pub fn parse_resource(text: &str, proxy_type: ProxyType, source: &str) -> Result<ProxyResource, String> {
    let json: Value = serde_json::from_str(text)
        .or_else(|_| serde_saphyr::from_str::<Value>(text))
        .map_err(|e| format!("{source}: not valid YAML or JSON: {}", e.to_string().lines().next().unwrap_or("")))?;
    let Some(obj) = json.as_object() else {
        return Err(format!("{source}: the resource must be a mapping with `type` and `name`"));
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let want = proxy_type.resource_type();
    if kind != want {
        return Err(format!(
            "{source}: resource type {kind:?} does not match --proxy-type={proxy_type} (expected type: {want})"
        ));
    }
    let name = obj.get("name").and_then(Value::as_str).unwrap_or("");
    if !rfc1123_name(name) {
        return Err(format!(
            "{source}: name {name:?} must be a lower-case RFC 1123 name (letters, digits, '-' and '.', at most 253)"
        ));
    }
    let mesh = obj.get("mesh").and_then(Value::as_str).unwrap_or("");
    if kind == "Dataplane" && mesh.is_empty() {
        return Err(format!("{source}: a Dataplane needs a `mesh`"));
    }
    if !mesh.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c)) {
        return Err(format!("{source}: mesh {mesh:?} may contain only lower-case letters, digits, '-', '_' and '.'"));
    }
    Ok(ProxyResource { kind: kind.to_string(), mesh: mesh.to_string(), name: name.to_string(), json })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources() {
        let zi = "type: ZoneIngress\nname: ingress-01\nnetworking: {address: 127.0.0.1, port: 10000}";
        let r = parse_resource(zi, ProxyType::Ingress, "f").unwrap();
        assert_eq!((r.kind.as_str(), r.name.as_str(), r.mesh.as_str()), ("ZoneIngress", "ingress-01", ""));
        let e = parse_resource(zi, ProxyType::Egress, "f").unwrap_err();
        assert!(e.contains("does not match --proxy-type=egress"), "{e}");
        let e = parse_resource("type: Dataplane\nname: Web", ProxyType::Dataplane, "f").unwrap_err();
        assert!(e.contains("RFC 1123"), "{e}");
        let e = parse_resource("type: Dataplane\nname: web", ProxyType::Dataplane, "f").unwrap_err();
        assert!(e.contains("needs a `mesh`"), "{e}");
        assert!(parse_resource("[1", ProxyType::Dataplane, "f").unwrap_err().contains("not valid YAML"));
    }
}
