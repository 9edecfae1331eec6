//! The embedded descriptor set: what it holds, and proto3 JSON <-> binary transcoding of
//! resource specs through prost-reflect, checked against the generated prost structs.

use kuma_proto::FILE_DESCRIPTOR_SET;
use kuma_proto::kuma::mesh::v1alpha1 as mesh;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::{Value, json};

fn pool() -> DescriptorPool {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn message(name: &str) -> MessageDescriptor {
    pool().get_message_by_name(name).unwrap_or_else(|| panic!("{name} is in the descriptor set"))
}

/// proto3 JSON -> binary, through prost-reflect.
fn json_to_binary(name: &str, value: &Value) -> Vec<u8> {
    let msg = DynamicMessage::deserialize(message(name), value).expect("valid proto3 JSON");
    msg.encode_to_vec()
}

/// binary -> proto3 JSON, through prost-reflect.
fn binary_to_json(name: &str, bytes: &[u8]) -> Value {
    let msg = DynamicMessage::decode(message(name), bytes).expect("valid binary");
    serde_json::to_value(&msg).expect("serializes")
}

#[test]
fn descriptor_set_has_the_resource_messages_and_nothing_from_envoy() {
    let pool = pool();
    for name in [
        "kuma.mesh.v1alpha1.Mesh",
        "kuma.mesh.v1alpha1.Dataplane",
        "kuma.mesh.v1alpha1.DataplaneInsight",
        "kuma.mesh.v1alpha1.ZoneIngress",
        "kuma.mesh.v1alpha1.ZoneIngressInsight",
        "kuma.mesh.v1alpha1.ZoneEgress",
        "kuma.mesh.v1alpha1.ZoneEgressInsight",
        "kuma.mesh.v1alpha1.ExternalService",
        "kuma.mesh.v1alpha1.TrafficPermission",
        "kuma.mesh.v1alpha1.ServiceInsight",
        "kuma.mesh.v1alpha1.KumaResource",
        "kuma.system.v1alpha1.Secret",
        "kuma.system.v1alpha1.Zone",
        "kuma.system.v1alpha1.ZoneInsight",
        "kuma.system.v1alpha1.Config",
    ] {
        assert!(pool.get_message_by_name(name).is_some(), "{name} missing");
    }
    for file in pool.files() {
        let name = file.name();
        assert!(name.starts_with("api/") || name.starts_with("google/protobuf/"), "unexpected file {name}");
    }
    assert_eq!(pool.services().count(), 0, "the KDS services (and their Envoy import) stay out");
}

#[test]
fn mesh_with_mtls_backends_round_trips_through_proto3_json() {
    let input = json!({
        "mtls": {
            "enabledBackend": "ca-1",
            "backends": [{"name": "ca-1", "type": "builtin", "dpCert": {"rotation": {"expiration": "1d"}}}]
        }
    });
    let bytes = json_to_binary("kuma.mesh.v1alpha1.Mesh", &input);

    // The generated struct reads the same bytes.
    let mesh = mesh::Mesh::decode(bytes.as_slice()).unwrap();
    let mtls = mesh.mtls.as_ref().unwrap();
    assert_eq!(mtls.enabled_backend, "ca-1");
    assert_eq!(mtls.backends.len(), 1);
    assert_eq!(mtls.backends[0].name, "ca-1");
    assert_eq!(mtls.backends[0].r#type, "builtin");
    assert_eq!(mtls.backends[0].dp_cert.as_ref().unwrap().rotation.as_ref().unwrap().expiration, "1d");

    // And what it encodes comes back as the same JSON, with Kuma's camelCase names.
    assert_eq!(binary_to_json("kuma.mesh.v1alpha1.Mesh", &mesh.encode_to_vec()), input);
}

#[test]
fn dataplane_with_inbound_and_outbound_round_trips_through_proto3_json() {
    let input = json!({
        "networking": {
            "inbound": [{
                "tags": {"kuma.io/service": "web", "kuma.io/protocol": "http"},
                "port": 8080,
                "servicePort": 80,
                "serviceAddress": "127.0.0.1",
                "health": {"ready": true},
                "serviceProbe": {"interval": "10s", "unhealthyThreshold": 3, "tcp": {}},
                "state": "NotReady"
            }],
            "outbound": [{
                "port": 10001,
                "tags": {"kuma.io/service": "backend"},
                "backendRef": {"kind": "MeshService", "name": "backend", "port": 80}
            }],
            "gateway": {"tags": {"kuma.io/service": "edge"}, "type": "BUILTIN"},
            "transparentProxying": {
                "redirectPortInbound": 15006,
                "redirectPortOutbound": 15001,
                "reachableServices": ["backend"],
                "ipFamilyMode": "DualStack"
            },
            "address": "10.0.0.1",
            "advertisedAddress": "192.168.0.1",
            "admin": {"port": 9901}
        },
        "probes": {"port": 9000, "endpoints": [{"inboundPort": 8080, "inboundPath": "/healthz", "path": "/8080/healthz"}]}
    });
    let bytes = json_to_binary("kuma.mesh.v1alpha1.Dataplane", &input);

    let dp = mesh::Dataplane::decode(bytes.as_slice()).unwrap();
    let net = dp.networking.as_ref().unwrap();
    assert_eq!(net.address, "10.0.0.1");
    assert_eq!(net.advertised_address, "192.168.0.1");
    assert_eq!(net.inbound[0].port, 8080);
    assert_eq!(net.inbound[0].service_port, 80);
    assert_eq!(net.inbound[0].tags["kuma.io/service"], "web");
    assert_eq!(net.inbound[0].state(), mesh::dataplane::networking::inbound::State::NotReady);
    let probe = net.inbound[0].service_probe.as_ref().unwrap();
    assert_eq!(probe.interval.as_ref().unwrap().seconds, 10);
    assert_eq!(probe.unhealthy_threshold.as_ref().unwrap().value, 3);
    assert!(probe.tcp.is_some());
    assert_eq!(net.outbound[0].port, 10001);
    assert_eq!(net.outbound[0].backend_ref.as_ref().unwrap().kind, "MeshService");
    assert_eq!(net.gateway.as_ref().unwrap().r#type(), mesh::dataplane::networking::gateway::GatewayType::Builtin);
    let tp = net.transparent_proxying.as_ref().unwrap();
    assert_eq!((tp.redirect_port_inbound, tp.redirect_port_outbound), (15006, 15001));
    assert_eq!(tp.ip_family_mode(), mesh::dataplane::networking::transparent_proxying::IpFamilyMode::DualStack);
    assert_eq!(net.admin.as_ref().unwrap().port, 9901);
    assert_eq!(dp.probes.as_ref().unwrap().endpoints[0].inbound_path, "/healthz");

    let output = binary_to_json("kuma.mesh.v1alpha1.Dataplane", &dp.encode_to_vec());
    assert_eq!(output, input);
    // Spelled out: the JSON names are Kuma's REST ones, not the proto field names.
    let net = &output["networking"];
    assert!(net.get("transparentProxying").is_some() && net.get("transparent_proxying").is_none());
    assert!(net["transparentProxying"].get("redirectPortInbound").is_some());
    assert!(net["inbound"][0].get("serviceProbe").is_some());
}

#[test]
fn json_accepts_proto_field_names_too() {
    // protojson parsers accept both spellings; Kuma's REST clients send camelCase.
    let bytes = json_to_binary(
        "kuma.mesh.v1alpha1.Dataplane",
        &json!({"networking": {"transparent_proxying": {"redirect_port_inbound": 15006}}}),
    );
    let dp = mesh::Dataplane::decode(bytes.as_slice()).unwrap();
    assert_eq!(dp.networking.unwrap().transparent_proxying.unwrap().redirect_port_inbound, 15006);
}

#[test]
fn system_secret_and_zone_transcode() {
    let secret = json!({"data": "c2VjcmV0"});
    let bytes = json_to_binary("kuma.system.v1alpha1.Secret", &secret);
    let decoded = kuma_proto::kuma::system::v1alpha1::Secret::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.data.unwrap().value, b"secret");
    assert_eq!(binary_to_json("kuma.system.v1alpha1.Secret", &bytes), secret);

    // A wrapper set to its default still travels (nil means "enabled" for a Zone).
    let zone = json!({"enabled": false});
    let bytes = json_to_binary("kuma.system.v1alpha1.Zone", &zone);
    assert_eq!(bytes, [0x0a, 0x00]);
    assert_eq!(binary_to_json("kuma.system.v1alpha1.Zone", &bytes), zone);
}
