//! Kuma resources in their Universal REST shape, and their validation.
//!
//! A resource is kept as its meta fields plus the spec as a JSON object, so that fields
//! `cp` does not interpret survive a round trip (and travel over KDS unchanged). The parts
//! it does interpret are read through the typed views in [`specs`]. What differs between
//! types is in [`descriptor`].

pub mod descriptor;
pub mod labels;
pub mod specs;
pub mod validate;

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

pub use descriptor::{Descriptor, KdsFlags, ResourceType, Scope, Shape};
pub use specs::*;
pub use validate::validate;

pub const SERVICE_TAG: &str = "kuma.io/service";

/// The key of a resource: type, mesh ("" for global-scoped types) and name.
pub type Key = (ResourceType, String, String);

/// One stored resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub rtype: ResourceType,
    /// Empty for global-scoped types.
    pub mesh: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, set by the store.
    pub creation_time: String,
    pub modification_time: String,
    /// The spec: flat fields (legacy types) or the content of `spec` (new-style types).
    pub spec: Map<String, Value>,
    /// Store version of this resource (monotonic per store), 0 before it is stored.
    pub version: u64,
    /// The resource whose deletion deletes this one (Kuma's `CreateWithOwner`): a zone owns
    /// what global received from it, a proxy owns its insight.
    pub owner: Option<Key>,
}

const META_KEYS: [&str; 7] = ["type", "mesh", "name", "labels", "creationTime", "modificationTime", "kri"];

/// A validation problem at a field path, as in Kuma's `causes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cause {
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Cause { field: field.into(), message: message.into() }
    }
}

/// Errors from parsing or validating a resource document.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("the document is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("resource is not valid: {}", format_causes(.0))]
    Invalid(Vec<Cause>),
}

pub fn format_causes(causes: &[Cause]) -> String {
    causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect::<Vec<_>>().join("; ")
}

/// The resource type a proxy of `p` runs as.
pub fn proxy_resource_type(p: kuma_model::proxy::ProxyType) -> ResourceType {
    ResourceType::from_name(p.resource_type()).unwrap_or(ResourceType::Dataplane)
}

/// The key of (type, mesh, name): the mesh is dropped for global-scoped types.
pub fn key(rtype: ResourceType, mesh: &str, name: &str) -> Key {
    (rtype, if rtype.is_mesh_scoped() { mesh.to_string() } else { String::new() }, name.to_string())
}

impl Resource {
    pub fn new(rtype: ResourceType, mesh: &str, name: &str) -> Self {
        Resource {
            rtype,
            mesh: if rtype.is_mesh_scoped() { mesh.to_string() } else { String::new() },
            name: name.to_string(),
            labels: BTreeMap::new(),
            creation_time: String::new(),
            modification_time: String::new(),
            spec: Map::new(),
            version: 0,
            owner: None,
        }
    }

    pub fn descriptor(&self) -> &'static Descriptor {
        self.rtype.descriptor()
    }

    /// REST/JSON representation (flat or with a nested `spec`, per the type).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(self.rtype.name().into()));
        if self.rtype.is_mesh_scoped() {
            m.insert("mesh".into(), Value::String(self.mesh.clone()));
        }
        m.insert("name".into(), Value::String(self.name.clone()));
        if !self.creation_time.is_empty() {
            m.insert("creationTime".into(), Value::String(self.creation_time.clone()));
            m.insert("modificationTime".into(), Value::String(self.modification_time.clone()));
        }
        if !self.labels.is_empty() {
            m.insert("labels".into(), serde_json::to_value(&self.labels).unwrap_or(Value::Null));
        }
        match self.descriptor().shape {
            Shape::Flat => {
                for (k, v) in &self.spec {
                    m.insert(k.clone(), v.clone());
                }
            }
            Shape::Nested => {
                m.insert("spec".into(), Value::Object(self.spec.clone()));
            }
        }
        Value::Object(m)
    }

    /// Parse a REST document (already decoded to JSON). `type` and `name` are required.
    pub fn from_json(v: &Value) -> Result<Self, ResourceError> {
        let Value::Object(obj) = v else {
            return Err(ResourceError::Invalid(vec![Cause::new("", "the document must be an object")]));
        };
        let mut causes = Vec::new();
        let rtype = match obj.get("type") {
            Some(Value::String(t)) => match ResourceType::from_name(t) {
                Some(t) => Some(t),
                None => {
                    causes.push(Cause::new("type", format!("unknown resource type {t:?}")));
                    None
                }
            },
            _ => {
                causes.push(Cause::new("type", "must be a non-empty string"));
                None
            }
        };
        let name = match obj.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                causes.push(Cause::new("name", "must be a non-empty string"));
                String::new()
            }
        };
        let mesh = match obj.get("mesh") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(m)) => m.clone(),
            Some(_) => {
                causes.push(Cause::new("mesh", "must be a string"));
                String::new()
            }
        };
        let mut labels = BTreeMap::new();
        match obj.get("labels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(l)) => {
                for (k, v) in l {
                    match v {
                        Value::String(s) => {
                            labels.insert(k.clone(), s.clone());
                        }
                        _ => causes.push(Cause::new(format!("labels[{k:?}]"), "must be a string")),
                    }
                }
            }
            Some(_) => causes.push(Cause::new("labels", "must be a map of strings")),
        }
        let Some(rtype) = rtype else {
            return Err(ResourceError::Invalid(causes));
        };
        let spec = match rtype.descriptor().shape {
            Shape::Flat => {
                let mut spec: Map<String, Value> = obj
                    .iter()
                    .filter(|(k, _)| !META_KEYS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if rtype == ResourceType::Zone {
                    lift_nested_zone_spec(&mut spec, &mut causes);
                }
                spec
            }
            Shape::Nested => match obj.get("spec") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(s)) => s.clone(),
                Some(_) => {
                    causes.push(Cause::new("spec", "must be an object"));
                    Map::new()
                }
            },
        };
        if !causes.is_empty() {
            return Err(ResourceError::Invalid(causes));
        }
        let mut r = Resource::new(rtype, &mesh, &name);
        if rtype.is_mesh_scoped() && mesh.is_empty() {
            r.mesh = "default".into();
        }
        r.labels = labels;
        r.spec = spec;
        Ok(r)
    }

    pub fn spec_value(&self) -> Value {
        Value::Object(self.spec.clone())
    }

    /// Typed view of the spec; fields we do not know are ignored. Read in place (no copy
    /// of the spec first: the generators read every Dataplane this way on each change).
    pub fn typed<T: for<'de> serde::Deserialize<'de>>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.spec)
    }

    pub fn key(&self) -> Key {
        (self.rtype, self.mesh.clone(), self.name.clone())
    }

    /// The `kuma.io/display-name` label, else the name: what a user called it.
    pub fn display_name(&self) -> &str {
        self.labels.get(labels::DISPLAY_NAME).map(String::as_str).unwrap_or(&self.name)
    }
}

/// The seed guide disables a zone with `spec: {enabled: false}`, while Kuma's Universal
/// format is flat (`enabled: false` beside `name`) and Kuma silently ignores the nested
/// form. Both mean the same thing here: the nested fields are lifted, and a document that
/// says two different things is refused.
fn lift_nested_zone_spec(spec: &mut Map<String, Value>, causes: &mut Vec<Cause>) {
    let Some(nested) = spec.remove("spec") else { return };
    let Value::Object(nested) = nested else {
        causes.push(Cause::new("spec", "must be an object (or write `enabled:` beside `name:`)"));
        return;
    };
    for (k, v) in nested {
        match spec.get(&k) {
            Some(flat) if *flat != v => causes.push(Cause::new(
                format!("spec.{k}"),
                format!("differs from the top-level `{k}`; write it once, beside `name:`"),
            )),
            _ => {
                spec.insert(k, v);
            }
        }
    }
}

/// Decode a YAML or JSON document (JSON is a subset of YAML, but JSON is tried first for
/// precise error messages). Inputs are bounded by the caller.
pub fn parse_document(text: &str) -> Result<Value, ResourceError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        return serde_json::from_str(text).map_err(|e| ResourceError::Syntax(e.to_string()));
    }
    serde_saphyr::from_str::<Value>(text).map_err(|e| ResourceError::Syntax(first_line(&e.to_string())))
}

/// Decode every document of a multi-document YAML stream (`---` separated).
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ResourceError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return serde_json::from_str(text).map(|v| vec![v]).map_err(|e| ResourceError::Syntax(e.to_string()));
    }
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ResourceError::Syntax(first_line(&e.to_string())))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// RFC 3339 UTC timestamp with second precision, e.g. `2026-01-02T03:04:05Z`.
pub fn rfc3339(unix_secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Seconds since the epoch of an RFC 3339 timestamp (fractions dropped); `None` when it
/// is not one.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The current time in RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(now_unix())
}

pub use kuma_model::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.5Z"), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("720h").unwrap().as_secs(), 720 * 3600);
        assert_eq!(parse_duration("100ms").unwrap().as_millis(), 100);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn nested_policies_keep_their_spec_under_spec() {
        let v = serde_json::json!({"type": "MeshTimeout", "name": "t1", "mesh": "default",
            "spec": {"targetRef": {"kind": "Mesh"}}});
        let r = Resource::from_json(&v).unwrap();
        assert_eq!(r.spec["targetRef"]["kind"], "Mesh");
        assert_eq!(r.to_json()["spec"]["targetRef"]["kind"], "Mesh");
        assert!(r.to_json().get("targetRef").is_none());
    }

    #[test]
    fn a_zone_accepts_the_seed_guides_nested_spec() {
        let nested = serde_json::json!({"type": "Zone", "name": "zone-1", "spec": {"enabled": false}});
        let r = Resource::from_json(&nested).unwrap();
        assert_eq!(r.spec.get("enabled"), Some(&Value::Bool(false)));
        assert!(r.spec.get("spec").is_none());
        let both = serde_json::json!({"type": "Zone", "name": "zone-1", "enabled": true, "spec": {"enabled": false}});
        let e = Resource::from_json(&both).unwrap_err();
        assert!(e.to_string().contains("spec.enabled: differs from the top-level `enabled`"), "{e}");
    }
}
