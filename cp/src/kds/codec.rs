//! Resources on the KDS wire: each is a delta `Resource` named `<name>.<mesh>` whose body
//! is a `kuma.mesh.v1alpha1.KumaResource` (meta: name, mesh, labels; no times, no
//! version). Its `spec` is the resource's protobuf message for the types Kuma defines in
//! protobuf, or the spec's JSON with an empty type URL for Go-struct types (the new-style
//! policies) (`kuma-kds.md` 1.2-1.3).
//!
//! `cp` keeps specs as proto3 JSON, so protobuf specs are transcoded through a
//! descriptor pool of our `.proto` files (`kuma-proto`).

use std::sync::OnceLock;

use envoy_types::pb::envoy::service::discovery::v3::Resource as DeltaResource;
use envoy_types::pb::google::protobuf::Any;
use kuma_proto::kuma::mesh::v1alpha1::KumaResource;
use kuma_proto::kuma::mesh::v1alpha1::kuma_resource::Meta;
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use serde_json::{Map, Value};

use super::sink::wire_key;
use crate::model::{Resource, ResourceType};

/// `Resource.resource.type_url` of every KDS resource.
pub const KUMA_RESOURCE_TYPE: &str = "type.googleapis.com/kuma.mesh.v1alpha1.KumaResource";
const TYPE_PREFIX: &str = "type.googleapis.com/";

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // Built into the binary by kuma-proto's build script: cannot fail unless the build is broken.
        DescriptorPool::decode(kuma_proto::FILE_DESCRIPTOR_SET).expect("kuma-proto's descriptor set decodes")
    })
}

/// Encode a spec (proto3 JSON) as the `Any` of its type.
pub fn spec_to_any(rtype: ResourceType, spec: &Map<String, Value>) -> Result<Any, String> {
    let Some(message) = rtype.descriptor().proto else {
        let value = serde_json::to_vec(spec).map_err(|e| e.to_string())?;
        return Ok(Any { type_url: String::new(), value });
    };
    let desc = pool().get_message_by_name(message).ok_or_else(|| format!("no descriptor for {message}"))?;
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    // Read in place: a copy of the spec first cost as much again for a 10,000-entry one.
    let msg = DynamicMessage::deserialize_with_options(desc, spec, &options)
        .map_err(|e| format!("the {} spec cannot be encoded: {e}", rtype.name()))?;
    Ok(Any { type_url: format!("{TYPE_PREFIX}{message}"), value: msg.encode_to_vec() })
}

/// Decode a spec `Any` of `rtype` to proto3 JSON.
pub fn any_to_spec(rtype: ResourceType, any: &Any) -> Result<Map<String, Value>, String> {
    let Some(message) = rtype.descriptor().proto else {
        if !any.type_url.is_empty() {
            return Err(format!(
                "the spec of a {} must be JSON with an empty type URL, got {:?}",
                rtype.name(),
                any.type_url
            ));
        }
        return match serde_json::from_slice(&any.value) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(Value::Null) => Ok(Map::new()),
            Ok(_) => Err("the spec is not a JSON object".into()),
            Err(e) => Err(format!("the spec is not JSON: {e}")),
        };
    };
    let expected = format!("{TYPE_PREFIX}{message}");
    if any.type_url != expected {
        return Err(format!("the spec of a {} must be {expected}, got {:?}", rtype.name(), any.type_url));
    }
    let desc = pool().get_message_by_name(message).ok_or_else(|| format!("no descriptor for {message}"))?;
    let msg =
        DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| format!("the spec does not decode: {e}"))?;
    let options = SerializeOptions::new().skip_default_fields(true);
    match msg.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Ok(Map::new()),
        Err(e) => Err(format!("the spec cannot be written as JSON: {e}")),
    }
}

/// A resource as a delta `Resource`. The version is a hash of its content, so an
/// unchanged resource is never sent twice.
pub fn encode(r: &Resource) -> Result<DeltaResource, String> {
    let spec = spec_to_any(r.rtype, &r.spec)?;
    let kr = KumaResource {
        meta: Some(Meta {
            name: r.name.clone(),
            mesh: r.mesh.clone(),
            version: String::new(),
            labels: r.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }),
        spec: Some(spec),
        status: None,
    };
    Ok(DeltaResource {
        name: wire_key(&r.mesh, &r.name),
        version: version(r),
        resource: Some(Any { type_url: KUMA_RESOURCE_TYPE.into(), value: kr.encode_to_vec() }),
        ..Default::default()
    })
}

/// A received delta `Resource` of `rtype` as a resource (times, version and owner unset).
pub fn decode(rtype: ResourceType, d: &DeltaResource) -> Result<Resource, String> {
    let any = d.resource.as_ref().ok_or("no resource body")?;
    if any.type_url != KUMA_RESOURCE_TYPE {
        return Err(format!("expected {KUMA_RESOURCE_TYPE}, got {:?}", any.type_url));
    }
    let kr = KumaResource::decode(any.value.as_slice()).map_err(|e| format!("not a KumaResource: {e}"))?;
    let meta = kr.meta.ok_or("the KumaResource has no meta")?;
    let spec = match &kr.spec {
        Some(s) => any_to_spec(rtype, s)?,
        None => Map::new(),
    };
    if rtype.is_mesh_scoped() && meta.mesh.is_empty() {
        return Err(format!("a {} needs a mesh", rtype.name()));
    }
    let mut r = Resource::new(rtype, &meta.mesh, &meta.name);
    r.labels = meta.labels.into_iter().collect();
    r.spec = spec;
    let (mesh, name) = super::sink::split_wire_key(&d.name);
    if (mesh.as_str(), name.as_str()) != (r.mesh.as_str(), r.name.as_str()) {
        return Err(format!("the resource is named {:?} but its meta says {:?} in mesh {:?}", d.name, r.name, r.mesh));
    }
    Ok(r)
}

/// Hex SHA-256 of the resource's content in a canonical form (sorted keys): Kuma hashes
/// the deterministic protobuf encoding, but protobuf maps have no stable order in Rust
/// and the version is opaque to the receiver.
pub fn version(r: &Resource) -> String {
    let mut out = Vec::with_capacity(256);
    canonical(&Value::String(r.name.clone()), &mut out);
    canonical(&Value::String(r.mesh.clone()), &mut out);
    canonical(&serde_json::to_value(&r.labels).unwrap_or_default(), &mut out);
    canonical_map(&r.spec, &mut out);
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &out);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON with every object's keys in order, written straight into `out` (no copy of the
/// value and no string per leaf: the spec can have 10,000 entries).
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => canonical_map(m, out),
        Value::Array(a) => {
            out.push(b'[');
            for x in a {
                canonical(x, out);
                out.push(b',');
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect("a Vec takes any JSON"),
    }
}

fn canonical_map(m: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &Value)> = m.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0)); // in order already unless serde_json keeps insertion order
    out.push(b'{');
    for (k, v) in entries {
        serde_json::to_writer(&mut *out, k).expect("a Vec takes any JSON");
        out.push(b':');
        canonical(v, out);
        out.push(b',');
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(v: Value) -> Resource {
        Resource::from_json(&v).unwrap()
    }

    #[test]
    fn protobuf_specs_round_trip_through_the_wire() {
        let dp = res(json!({"type": "Dataplane", "mesh": "default", "name": "web-1",
            "labels": {"kuma.io/zone": "zone-1"},
            "networking": {"address": "10.0.0.1", "inbound": [{"port": 8080, "servicePort": 80,
                "tags": {"kuma.io/service": "web", "version": "v1"}}],
                "outbound": [{"port": 20012, "tags": {"kuma.io/service": "echo"}}]}}));
        let wire = encode(&dp).unwrap();
        assert_eq!(wire.name, "web-1.default");
        let back = decode(ResourceType::Dataplane, &wire).unwrap();
        assert_eq!(back.labels, dp.labels);
        assert_eq!(back.spec["networking"]["inbound"][0]["servicePort"], 80);
        assert_eq!(back.spec["networking"]["inbound"][0]["tags"]["version"], "v1");
        assert_eq!(back.spec["networking"]["outbound"][0]["port"], 20012);
        // The spec Any is the Dataplane message itself.
        let kr = KumaResource::decode(wire.resource.unwrap().value.as_slice()).unwrap();
        assert_eq!(kr.spec.unwrap().type_url, "type.googleapis.com/kuma.mesh.v1alpha1.Dataplane");
    }

    #[test]
    fn json_specs_travel_as_json_with_an_empty_type_url() {
        let p = res(json!({"type": "MeshTimeout", "mesh": "default", "name": "t",
            "spec": {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}}]}}));
        let wire = encode(&p).unwrap();
        let kr = KumaResource::decode(wire.resource.as_ref().unwrap().value.as_slice()).unwrap();
        assert_eq!(kr.spec.as_ref().unwrap().type_url, "");
        let back = decode(ResourceType::MeshTimeout, &wire).unwrap();
        assert_eq!(back.spec, p.spec);
    }

    #[test]
    fn versions_follow_content_only() {
        let a = res(
            json!({"type": "Mesh", "name": "m", "mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}}),
        );
        let mut b = a.clone();
        b.creation_time = "later".into();
        assert_eq!(version(&a), version(&b));
        b.labels.insert("x".into(), "y".into());
        assert_ne!(version(&a), version(&b));
        // Pinned: what the same content hashed to before the canonical form was written in
        // place, so an upgraded control plane does not make its peers fetch everything again.
        let c = res(json!({"type": "ZoneIngress", "name": "i\"1", "labels": {"kuma.io/zone": "z"},
            "networking": {"address": "10.0.0.1", "port": 10001},
            "availableServices": [{"tags": {"kuma.io/service": "b", "a": "é"}, "instances": 2, "mesh": "default"}]}));
        assert_eq!(version(&c), "62c060d25cb90797fdd21a82dbb67933a27d9613853a5f3c0fba73d72f287b00");
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let wrong_type = DeltaResource {
            name: "x.".into(),
            resource: Some(Any { type_url: "type.googleapis.com/other".into(), value: vec![] }),
            ..Default::default()
        };
        assert!(decode(ResourceType::Mesh, &wrong_type).unwrap_err().contains("expected"));
        let zi = res(json!({"type": "ZoneIngress", "name": "i", "networking": {"port": 10001}}));
        let mut wire = encode(&zi).unwrap();
        wire.name = "other.".into();
        assert!(decode(ResourceType::ZoneIngress, &wire).unwrap_err().contains("named"));
        // A Mesh spec that is not a Mesh.
        let bogus = res(json!({"type": "Mesh", "name": "m", "mtls": "not an object"}));
        assert!(encode(&bogus).unwrap_err().contains("cannot be encoded"));
    }
}
