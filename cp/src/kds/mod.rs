//! KDS, Kuma's multi-zone sync, as Kuma 2.14 speaks it (`shared/reference/kuma-kds.md`).
//!
//! A zone dials global and opens, on one HTTP/2 connection, `KDSSyncService`'s two
//! streams: `GlobalToZoneSync` (global is the Delta xDS server, the zone subscribes to
//! every type global provides) and `ZoneToGlobalSync` (the roles reversed on a stream the
//! zone opened: global subscribes, the zone answers). Both ends run the same parts:
//!
//! * [`provider`]: the resources one side offers the other (filtered and renamed by
//!   [`mapper`], encoded by [`codec`]), served by `xds::delta`'s state machine, the one
//!   ADS uses;
//! * [`sink`]: applying what the other side sent to the store, with initial-sync deletes
//!   and ownership;
//! * [`insight`]: ZoneInsight subscriptions (Online/Offline) and their counters.
//!
//! [`global`] is the server, [`zone`] the client.

pub mod codec;
pub mod global;
pub mod hash;
pub mod insight;
pub mod mapper;
pub mod metrics;
pub mod provider;
pub mod sink;
pub mod stream;
pub mod zone;

use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as PbValue, value};
use serde_json::Value;

use crate::model::ResourceType;

/// gRPC metadata a zone sends on every call.
pub const CLIENT_ID: &str = "client-id";
pub const VERSION_HEADER: &str = "version";
pub const KDS_VERSION_HEADER: &str = "kds-version";
pub const FEATURES_HEADER: &str = "features";
pub const KDS_VERSION: &str = "v3";
/// `features` values: global may health-check the zone; names are hash-suffixed.
pub const FEATURE_ZONE_PING_HEALTH: &str = "zone-ping-health";
pub const FEATURE_HASH_SUFFIX: &str = "hash-suffix";
/// Node metadata `features` of a zone's requests (the ones global's filters read).
pub const NODE_FEATURES: [&str; 2] = ["zone-token", "hash-suffix"];

/// Node metadata keys.
pub const MD_VERSION: &str = "version";
pub const MD_CONFIG: &str = "config";
pub const MD_CONTROL_PLANE_ID: &str = "control-plane-id";
pub const MD_FEATURES: &str = "features";

/// The Kuma release whose protocol this control plane speaks, reported as its version
/// (global checks that a zone is within two minor versions).
pub const KUMA_VERSION: &str = "2.14.3";

/// Largest KDS message, both ways, unless configured (Kuma: 10 MiB).
pub const DEFAULT_MAX_MESSAGE: usize = 10 * 1024 * 1024;

/// Types global sends to zones (`TypesSentByGlobal`), in a stable order.
pub fn types_sent_by_global() -> Vec<ResourceType> {
    ResourceType::ALL.iter().copied().filter(|t| t.kds().sent_by_global()).collect()
}

/// Types zones send to global (`TypesSentByZone`).
pub fn types_sent_by_zone() -> Vec<ResourceType> {
    ResourceType::ALL.iter().copied().filter(|t| t.kds().sent_by_zone()).collect()
}

/// `version` metadata: Kuma's `kuma.system.v1alpha1.Version` as protojson.
pub fn version_json() -> Value {
    serde_json::json!({"kumaCp": {
        "version": KUMA_VERSION,
        "gitTag": concat!("mesh-cp-", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "buildDate": "",
    }})
}

/// A JSON value as a protobuf `Value` (node metadata).
pub fn to_pb(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => value::Kind::NullValue(0),
        Value::Bool(b) => value::Kind::BoolValue(*b),
        Value::Number(n) => value::Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => value::Kind::StringValue(s.clone()),
        Value::Array(a) => value::Kind::ListValue(ListValue { values: a.iter().map(to_pb).collect() }),
        Value::Object(m) => {
            value::Kind::StructValue(Struct { fields: m.iter().map(|(k, v)| (k.clone(), to_pb(v))).collect() })
        }
    };
    PbValue { kind: Some(kind) }
}

/// A protobuf `Value` as JSON.
pub fn from_pb(v: &PbValue) -> Value {
    match &v.kind {
        Some(value::Kind::NullValue(_)) | None => Value::Null,
        Some(value::Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Some(value::Kind::StringValue(s)) => Value::String(s.clone()),
        Some(value::Kind::BoolValue(b)) => Value::Bool(*b),
        Some(value::Kind::StructValue(s)) => {
            Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), from_pb(v))).collect())
        }
        Some(value::Kind::ListValue(l)) => Value::Array(l.values.iter().map(from_pb).collect()),
    }
}

/// The node metadata of a KDS request as one JSON object.
pub fn node_metadata(md: Option<&Struct>) -> serde_json::Map<String, Value> {
    md.map(|s| s.fields.iter().map(|(k, v)| (k.clone(), from_pb(v))).collect()).unwrap_or_default()
}

/// Every value of a gRPC metadata key (a key may be sent several times).
pub fn metadata_values(md: &tonic::metadata::MetadataMap, key: &str) -> Vec<String> {
    md.get_all(key)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .collect()
}

/// This control plane's configuration as the `config` node metadata (Kuma sends its
/// whole config; global reads `store.type` from it for `inspect zones`).
pub fn config_json(cp: &crate::context::Cp) -> String {
    serde_json::json!({
        "mode": cp.mode_name(),
        "store": {"type": cp.store.store_type()},
        "multizone": {"zone": {"name": cp.cfg.zone_name, "globalAddress": cp.cfg.global_address}},
    })
    .to_string()
}
